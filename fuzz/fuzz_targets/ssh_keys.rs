//! SSH public keys: the server's parser (`flotte_proto::ssh_keys`) and the
//! agent's own key validation (`flotte_agent::access::boundary::key_verdict`),
//! which stands between a possibly compromised server and `authorized_keys`.
//! A key the agent accepts is one bare `type base64` line with no control
//! character, and its fingerprint is the parser's.
#![no_main]

use flotte_agent::access::boundary::key_verdict;
use flotte_agent::access::policy::LocalKey;
use flotte_proto::ssh_keys::{
    fingerprint_of_key_text, key_in_authorized_keys_line, parse_public_key,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = parse_public_key(text) {
        let _ = key.openssh_line();
        let reparsed = parse_public_key(&key.key_text()).expect("a key's own text parses");
        assert_eq!(reparsed.fingerprint(), key.fingerprint());
    }
    for line in text.lines() {
        if let Some(found) = key_in_authorized_keys_line(line) {
            assert!(!found.contains('\n'));
        }
    }
    let (user, public_key) = text.split_once('\t').unwrap_or(("alice", text));
    let verdict = key_verdict(&LocalKey {
        public_key: public_key.to_owned(),
        user: user.to_owned(),
        grant_id: "grant-1".to_owned(),
        expires_at: None,
    });
    if let Ok(fingerprint) = verdict {
        assert!(!public_key.chars().any(char::is_control), "{public_key:?}");
        assert_eq!(public_key.split(' ').count(), 2, "{public_key:?}");
        assert!(!user
            .chars()
            .any(|character| character.is_control() || character == ' ' || character == ','));
        assert_eq!(fingerprint_of_key_text(public_key), Some(fingerprint));
    }
});
