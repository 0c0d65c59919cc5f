//! Image manifests (`flotte_proto::image::verify_manifest`): the signature
//! check, then parsing and validation. The first byte picks how: even, the
//! rest is a manifest signed here with a fixed release key (so that parsing
//! and validation of any text are reached); odd, the last 64 bytes are the
//! signature of the rest (forgeries must fail).
#![no_main]

use flotte_proto::image::verify_manifest;
use flotte_proto::release_keys::ReleasePublicKey;
use libfuzzer_sys::fuzz_target;
use ring::signature::{Ed25519KeyPair, KeyPair};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(pair) = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]) else {
        return;
    };
    let Ok(key) = pair.public_key().as_ref().try_into() else {
        return;
    };
    let trusted = [ReleasePublicKey {
        key,
        comment: String::new(),
    }];
    if mode % 2 == 0 {
        let signature = pair.sign(rest);
        if let Ok(manifest) = verify_manifest(rest, signature.as_ref(), &trusted) {
            manifest.validate().expect("a verified manifest is valid");
            assert_eq!(manifest.signing_key, trusted[0].id());
        }
    } else if rest.len() >= 64 {
        let (json, signature) = rest.split_at(rest.len() - 64);
        let genuine = pair.sign(json);
        if signature != genuine.as_ref() {
            assert!(verify_manifest(json, signature, &trusted).is_err());
        }
    }
});
