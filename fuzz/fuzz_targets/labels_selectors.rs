//! Labels and selectors (`flotte_proto::labels`) and hostnames
//! (`flotte_proto::names`): any text is parsed or refused; parsed labels
//! print back to the same labels, every parsed label passes
//! `validate_label`, and a selector made of a machine's own labels matches
//! that machine.
#![no_main]

use std::collections::HashMap;

use flotte_proto::labels::{format_labels, parse_labels, validate_label, Selector};
use flotte_proto::names::{quoted_prefix, validate_hostname, QUOTED_PREFIX_MAX_OUTPUT_CHARS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = validate_hostname(text);
    assert!(quoted_prefix(text).chars().count() <= QUOTED_PREFIX_MAX_OUTPUT_CHARS);
    let (labels_text, selector_text) = text.split_once('\n').unwrap_or((text, text));
    if let Ok(labels) = parse_labels(labels_text) {
        for (key, value) in &labels {
            validate_label(key, value).expect("a parsed label is valid");
        }
        let printed = format_labels(&labels);
        assert_eq!(
            parse_labels(&printed).expect("printed labels parse"),
            labels
        );
        let own = Selector::parse(&printed).expect("printed labels are a selector");
        let map: HashMap<String, String> = labels.clone().into_iter().collect();
        let zone = labels.get("zone").cloned().unwrap_or_default();
        assert!(own.matches_map(&map, &zone));
        if let Ok(selector) = Selector::parse(selector_text) {
            let _ = selector.matches_map(&map, "z1");
            assert!(!selector.is_empty() || selector.matches_map(&map, "z1"));
        }
    }
});
