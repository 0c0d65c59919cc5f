//! Pushed images and trusted release keys.

use super::ContractBackend;
use crate::store::{ImageRecord, ReleaseKeyRecord, StoreError};

fn image(name: &str, version: &str, pushed_at: i64) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        version: version.into(),
        digest: format!("digest-{name}-{version}"),
        size: 4096,
        manifest_json: b"{}".to_vec(),
        signature: vec![1, 2, 3],
        signing_key: "ci".into(),
        pushed_at,
        pushed_by: "alice".into(),
    }
}

pub(crate) async fn images_and_release_keys_round_trip<B: ContractBackend>(store: B) {
    let first = image("app", "1.0.0", 10);
    let second = image("app", "2.0.0", 20);
    let other = image("db", "1.0.0", 15);
    for record in [&first, &second, &other] {
        assert!(store.insert_image(record).await.unwrap());
    }
    assert!(
        !store.insert_image(&first).await.unwrap(),
        "name@version is unique"
    );
    assert_eq!(
        store.images(None).await.unwrap(),
        vec![second.clone(), other.clone(), first.clone()],
        "newest push first"
    );
    assert_eq!(
        store.images(Some("app")).await.unwrap(),
        vec![second, first.clone()]
    );
    assert_eq!(store.image("app", "1.0.0").await.unwrap(), Some(first));
    assert!(store.image("app", "3.0.0").await.unwrap().is_none());

    let key = ReleaseKeyRecord {
        id: "abc".into(),
        name: "ci".into(),
        public_key_base64: "AAAA".into(),
        added_at: 3,
        added_by: "admin".into(),
    };
    store.insert_release_key(&key).await.unwrap();
    assert!(matches!(
        store.insert_release_key(&key).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(store.release_keys().await.unwrap(), vec![key.clone()]);
    assert_eq!(store.remove_release_key("abc").await.unwrap(), Some(key));
    assert!(store.remove_release_key("abc").await.unwrap().is_none());
    assert!(store.release_keys().await.unwrap().is_empty());
}
