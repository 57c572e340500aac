//! The test images: built without a daemon by `scripts/build-images.sh`, pushed once into a registry storage
//! directory in the cache, described by its `images.json`. Each [`crate::registry::Registry`] serves a copy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::testbed::cache_dir;

/// One image (or index) in the prebuilt registry storage.
#[derive(Debug, Clone, Deserialize)]
pub struct TestImage {
    /// Repository name, e.g. `busybox`.
    pub name: String,
    /// Tag, e.g. `latest`.
    pub tag: String,
    /// Manifest media type: OCI manifest, Docker schema2 manifest, or OCI index.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>` of the manifest as the registry serves it.
    pub digest: String,
}

/// Directory holding `registry/` (docker-registry filesystem storage) and `images.json`, as built last.
pub fn store() -> Result<PathBuf> {
    let link = cache_dir().join("images/current");
    let dir = std::fs::canonicalize(&link)
        .with_context(|| format!("{} is missing: run integration/scripts/setup.sh", link.display()))?;
    Ok(dir)
}

/// Every image in the store.
pub fn catalogue() -> Result<Vec<TestImage>> {
    let path = store()?.join("images.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The image `name:tag` from the store.
pub fn find(name: &str, tag: &str) -> Result<TestImage> {
    catalogue()?
        .into_iter()
        .find(|i| i.name == name && i.tag == tag)
        .with_context(|| format!("test image {name}:{tag} is not in the store; rebuild with build-images.sh"))
}
