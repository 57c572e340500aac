//! Importing an image from an OCI image layout directory (what `umoci`, `skopeo copy oci:` and
//! `docker buildx --output type=oci` write): for nodes without a registry, like the standalone example. Every
//! blob is verified and unpacked exactly as a pulled one.

use std::path::Path;

use oci_client::Reference;

use super::digest::Digest;
use super::error::{ImageError, Result};
use super::manifest::{self, Manifest, parse_json};
use super::store::{ImageRecord, Store};

/// Imports the image tagged `tag` in the layout at `layout` (or its only image when `tag` is `None`) under the
/// normalised name `reference`.
pub fn import_layout(store: &Store, layout: &Path, tag: Option<&str>, reference: &Reference) -> Result<ImageRecord> {
    let read = |digest: &Digest| -> Result<Vec<u8>> {
        let path = layout.join("blobs/sha256").join(digest.hex());
        std::fs::read(&path).map_err(|e| ImageError::io("read", &path, e))
    };
    let index_path = layout.join("index.json");
    let raw = std::fs::read(&index_path).map_err(|e| ImageError::io("read", &index_path, e))?;
    let index: Manifest = parse_json("OCI layout index", &raw)?;
    let entries = index.manifests.unwrap_or_default();
    let entry = match tag {
        Some(tag) => entries.iter().find(|e| {
            e.annotations.as_ref().and_then(|a| a.get("org.opencontainers.image.ref.name")).map(String::as_str)
                == Some(tag)
        }),
        None if entries.len() == 1 => entries.first(),
        None => None,
    }
    .ok_or_else(|| ImageError::NotPresent(format!("{}:{}", layout.display(), tag.unwrap_or("<only image>"))))?;
    let top = Digest::parse(&entry.digest)?;
    let mut digest = top.clone();
    let mut raw = read(&digest)?;
    super::pull::verified(digest.clone(), &raw, "manifest")?;
    let parsed: Manifest = parse_json("manifest", &raw)?;
    if parsed.is_index() {
        let platform = parsed.platform_entry().ok_or_else(|| ImageError::NoPlatform {
            reference: reference.whole(),
            platform: format!("linux/{}", manifest::node_platform().0),
        })?;
        digest = Digest::parse(&platform.digest)?;
        raw = read(&digest)?;
    }
    store.put_blob("manifest", &digest, &raw)?;
    let (config, descs) = manifest::parts(&raw)?;
    let config_digest = Digest::parse(&config.digest)?;
    store.put_blob("config", &config_digest, &read(&config_digest)?)?;
    let layers = manifest::layer_records(&store.read_blob(&config_digest)?, &descs)?;
    for layer in &layers {
        if !store.has_blob(&layer.digest) {
            let ingest = store.ingest_path();
            let source = layout.join("blobs/sha256").join(layer.digest.hex());
            std::fs::copy(&source, &ingest).map_err(|e| ImageError::io("copy", &source, e))?;
            store.commit_blob(&ingest, "layer", &layer.digest, Some(layer.size))?;
        }
        if !store.has_layer(&layer.chain_id) {
            manifest::unpack_into_store(store, layer, None)?;
        }
    }
    manifest::record_image(
        store,
        manifest::Pulled {
            reference,
            resolved: &top,
            manifest: digest,
            manifest_len: raw.len(),
            config: config_digest,
            config_size: config.size,
            layers,
        },
    )
}
