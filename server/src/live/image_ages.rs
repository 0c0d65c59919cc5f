//! The creation time of every pushed image, in memory: loaded from the
//! store at start and added to at each push, so that listings, fleet
//! status and the `/metrics` scrape (which cannot wait on the store) know
//! how old the image each machine runs is. The decisions are in
//! `domain::image_age`.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::domain::image_age::manifest_created_at;
use crate::live::health::TrackedMachine;
use crate::store::{Store, StoreError, UnixSeconds};

#[derive(Debug, Default)]
pub struct ImageAges {
    /// (name, version) → creation time from the signed manifest.
    created: RwLock<HashMap<(String, String), UnixSeconds>>,
}

impl ImageAges {
    pub async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let ages = ImageAges::default();
        for image in store.images(None).await? {
            ages.record(&image.name, &image.version, &image.manifest_json);
        }
        Ok(ages)
    }

    /// Remembers a pushed image's creation time.
    pub fn record(&self, name: &str, version: &str, manifest_json: &[u8]) {
        let created_at = manifest_created_at(manifest_json);
        self.created
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((name.to_owned(), version.to_owned()), created_at);
    }

    /// When the image a machine last reported running was built, if known.
    pub fn of_machine(&self, machine: &TrackedMachine) -> Option<UnixSeconds> {
        let report = machine.last_report.as_ref()?;
        let image = report.current_image()?;
        self.created
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(image.name.clone(), image.version.clone()))
            .copied()
            .filter(|created_at| *created_at > 0)
    }
}
