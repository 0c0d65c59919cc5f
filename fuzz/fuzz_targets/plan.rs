//! Rollout plan files (the server's `parse_plan`, through the narrow
//! `flotte_server::fuzzing` entry point): any text is a plan or a list of
//! problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(problems) = flotte_server::fuzzing::parse_plan(text) {
        assert!(!problems.is_empty());
    }
});
