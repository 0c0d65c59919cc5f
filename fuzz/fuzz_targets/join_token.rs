//! Join tokens (`flotte_proto::join_token`), as an agent's operator pastes
//! them: any text either parses or is refused, and a parsed token prints
//! back to a text that parses to the same token.
#![no_main]

use flotte_proto::join_token::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = text.parse::<JoinToken>() {
        let printed = token.to_string();
        let again: JoinToken = printed.parse().expect("a printed token parses");
        assert_eq!(again.id, token.id);
        assert_eq!(again.secret, token.secret);
        assert_eq!(again.ca_fingerprint, token.ca_fingerprint);
    }
});
