//! Settings files: `agent.toml` and `server.toml`, parsed and validated as
//! the binaries do. Paths the validation would read (the join token file,
//! release keys) are cleared first: the target fuzzes the text, not the
//! machine's files.
#![no_main]

use flotte_agent::config::AgentConfigFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut agent) = toml::from_str::<AgentConfigFile>(text) {
        agent.join_token_file = None;
        agent.images.release_keys.clear();
        if let Err(error) = agent.validate() {
            assert!(!error.to_string().is_empty());
        }
    }
    if let Err(problems) = flotte_server::fuzzing::validate_server_settings(text) {
        assert!(!problems.is_empty());
    }
});
