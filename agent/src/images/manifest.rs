//! Image manifests, indexes and configs as the store needs them, wherever they come from (a registry or an OCI
//! layout on disk), and unpacking a layer into the store.

use oci_client::manifest::OciDescriptor;
use serde::Deserialize;

use super::digest::Digest;
use super::error::{ImageError, Result};
use super::reference::{repo_digest, repository_name};
use super::store::{ImageRecord, LayerRecord, Store, now_secs};
use super::unpack::{Compression, Limits, unpack_layer};

/// Manifests and configs are small; a bigger one is refused rather than read into memory.
pub(crate) const MAX_JSON_BYTES: u64 = 16 << 20;

/// An image manifest or an index / manifest list (whichever fields are present).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub schema_version: Option<i64>,
    pub media_type: Option<String>,
    pub config: Option<OciDescriptor>,
    pub layers: Option<Vec<OciDescriptor>>,
    pub manifests: Option<Vec<IndexEntry>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IndexEntry {
    pub digest: String,
    pub platform: Option<Platform>,
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
}

impl Manifest {
    pub fn is_index(&self) -> bool {
        self.manifests.is_some()
            || self.media_type.as_deref().is_some_and(|m| m.contains("index") || m.contains("manifest.list"))
    }

    /// The index entry for this node's platform.
    pub fn platform_entry(&self) -> Option<&IndexEntry> {
        let (arch, variant) = node_platform();
        self.manifests.iter().flatten().find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os == "linux"
                    && p.architecture == arch
                    && (variant.is_none() || p.variant.is_none() || p.variant.as_deref() == variant)
            })
        })
    }
}

#[derive(Deserialize)]
struct ImageConfig {
    os: Option<String>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(what: &'static str, raw: &[u8]) -> Result<T> {
    if raw.len() as u64 > MAX_JSON_BYTES {
        return Err(ImageError::Malformed { what, message: "too large".into() });
    }
    serde_json::from_slice(raw).map_err(|e| ImageError::Malformed { what, message: e.to_string() })
}

/// The config and layer descriptors of a (platform) image manifest.
pub(crate) fn parts(raw: &[u8]) -> Result<(OciDescriptor, Vec<OciDescriptor>)> {
    let manifest: Manifest = parse_json("manifest", raw)?;
    if manifest.schema_version != Some(2) {
        return Err(ImageError::Unsupported {
            what: "manifest schema version",
            value: format!("{:?}", manifest.schema_version),
        });
    }
    match (manifest.config, manifest.layers) {
        (Some(config), Some(layers)) => Ok((config, layers)),
        _ => Err(ImageError::Malformed { what: "manifest", message: "no config or no layers".into() }),
    }
}

/// The layers with their diff and chain IDs, checked against the image config.
pub(crate) fn layer_records(config_json: &[u8], descs: &[OciDescriptor]) -> Result<Vec<LayerRecord>> {
    let config: ImageConfig = parse_json("image config", config_json)?;
    if config.os.as_deref().is_some_and(|os| os != "linux") {
        return Err(ImageError::Unsupported { what: "image OS", value: config.os.unwrap_or_default() });
    }
    if config.rootfs.diff_ids.len() != descs.len() {
        return Err(ImageError::Malformed {
            what: "image config",
            message: format!("{} diff IDs for {} layers", config.rootfs.diff_ids.len(), descs.len()),
        });
    }
    let mut layers = Vec::new();
    let mut parent: Option<Digest> = None;
    for (desc, diff_id) in descs.iter().zip(&config.rootfs.diff_ids) {
        let diff_id = Digest::parse(diff_id)?;
        let chain_id = Digest::chain(parent.as_ref(), &diff_id);
        if Compression::from_media_type(&desc.media_type).is_none() {
            return Err(ImageError::Unsupported { what: "layer media type", value: desc.media_type.clone() });
        }
        layers.push(LayerRecord {
            digest: Digest::parse(&desc.digest)?,
            size: u64::try_from(desc.size).unwrap_or(0),
            media_type: desc.media_type.clone(),
            diff_id,
            chain_id: chain_id.clone(),
        });
        parent = Some(chain_id);
    }
    Ok(layers)
}

/// Unpacks a stored layer blob into the store's layer directory for its chain ID (blocking).
pub(crate) fn unpack_into_store(store: &Store, layer: &LayerRecord, max: Option<u64>) -> Result<()> {
    let compression = Compression::from_media_type(&layer.media_type)
        .ok_or_else(|| ImageError::Unsupported { what: "layer media type", value: layer.media_type.clone() })?;
    let temp = store.begin_layer()?;
    let free = rustix::fs::statvfs(&temp).map(|s| s.f_bavail * s.f_frsize).unwrap_or(u64::MAX);
    let limits = Limits { max_bytes: max.map_or(free, |m| m.min(free)) };
    let unpacked = unpack_layer(&store.blob_path(&layer.digest), compression, &temp, layer.diff_id.as_str(), limits)
        .map_err(|source| ImageError::Unpack { digest: layer.digest.to_string(), source })
        .and_then(|_| store.commit_layer(&temp, &layer.chain_id));
    if unpacked.is_err() {
        store.abort_layer(&temp);
    }
    unpacked
}

/// What an image is called and what it is made of, for [`record_image`].
pub(crate) struct Pulled<'a> {
    pub reference: &'a oci_client::Reference,
    /// The digest the name resolved to (an index's for multi-arch images): the repo digest.
    pub resolved: &'a Digest,
    pub manifest: Digest,
    pub manifest_len: usize,
    pub config: Digest,
    pub config_size: i64,
    pub layers: Vec<LayerRecord>,
}

/// Records (or updates) the image in the store: its name (unless pulled by digest) moves to it, and its repo
/// digest for this repository replaces any older one.
pub(crate) fn record_image(store: &Store, p: Pulled<'_>) -> Result<ImageRecord> {
    let now = now_secs();
    let mut record = store.image(&p.manifest)?.unwrap_or(ImageRecord {
        manifest: p.manifest.clone(),
        config: p.config,
        layers: p.layers,
        names: Vec::new(),
        repo_digests: Vec::new(),
        size: 0,
        pulled_at: now,
        last_used: now,
    });
    record.size =
        record.layers.iter().map(|l| l.size).sum::<u64>() + p.manifest_len as u64 + p.config_size.max(0).unsigned_abs();
    let name = p.reference.whole();
    if p.reference.digest().is_none() && !record.names.contains(&name) {
        record.names.push(name);
    }
    record.repo_digests.retain(|d| !d.starts_with(&format!("{}@", repository_name(p.reference))));
    record.repo_digests.push(repo_digest(p.reference, p.resolved.as_str()));
    store.put_image(&record)?;
    Ok(record)
}

/// The node's platform in OCI terms (`amd64`, `arm64` + variant `v8`, ...).
pub(crate) fn node_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", None),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" => ("ppc64le", None),
        other => (other, None),
    }
}
