//! Pulling an image from a registry into the [`Store`]: resolve the name (an index to this node's platform),
//! fetch and verify manifest, config and layers (each blob once, however many pulls want it), unpack layers
//! in order as they arrive, and record the image.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::credentials::Credential;
use super::digest::Digest;
use super::error::{ImageError, Result};
use super::locks::KeyedLocks;
use super::manifest::{self, Manifest, node_platform, parse_json};
use super::store::{ImageRecord, LayerRecord, Store};

const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Manifests and configs are small; a bigger one is refused rather than read into memory.
const MAX_JSON_BYTES: u64 = 16 << 20;
/// Layers downloaded at once per pull (containerd's default is 3).
const PARALLEL_DOWNLOADS: usize = 3;

/// Bytes fetched so far and expected in total, for `Pulling` progress.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// Registry access settings of the node.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host` or `host:port`) reached over plain HTTP. Everything else is HTTPS.
    pub insecure_registries: Vec<String>,
    /// Bound on the bytes one layer may unpack to; `None` = the free space of the image filesystem.
    pub max_layer_bytes: Option<u64>,
}

/// Fetches images into the store. One per node; shares HTTP clients (one per credential, so a pod never rides
/// on another pod's cached token) and the per-key locks.
pub struct Puller {
    store: Store,
    config: RegistryConfig,
    clients: Mutex<HashMap<CredentialKey, Arc<Client>>>,
    names: KeyedLocks,
    blobs: Arc<KeyedLocks>,
    layers: KeyedLocks,
}

/// Which credential a client was made for (`None`: anonymous).
type CredentialKey = Option<(String, String)>;

impl Puller {
    pub fn new(store: Store, config: RegistryConfig) -> Puller {
        Puller {
            store,
            config,
            clients: Mutex::default(),
            names: KeyedLocks::default(),
            blobs: Arc::default(),
            layers: KeyedLocks::default(),
        }
    }

    fn client(&self, credential: Option<&Credential>) -> Arc<Client> {
        let key = credential.map(|c| (c.username.clone(), c.password.clone()));
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Client::new(oci_client::client::ClientConfig {
                    protocol: oci_client::client::ClientProtocol::HttpsExcept(self.config.insecure_registries.clone()),
                    ..Default::default()
                }))
            })
            .clone()
    }

    /// Pulls `reference` (already normalised) and returns the stored image.
    pub async fn pull(
        &self,
        reference: &Reference,
        credential: Option<&Credential>,
        progress: Arc<Progress>,
    ) -> Result<ImageRecord> {
        let _name = self.names.lock(&reference.whole()).await;
        let client = self.client(credential);
        let auth = match credential {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let shown = reference.whole();
        let (raw, _) = client.pull_manifest_raw(reference, &auth, ACCEPT).await.map_err(|e| classify(&shown, e))?;
        let resolved = match reference.digest() {
            Some(d) => verified(Digest::parse(d)?, &raw, "manifest")?,
            None => Digest::of(&raw),
        };
        let (manifest_digest, raw) = self.platform_manifest(&client, reference, &auth, resolved.clone(), raw).await?;
        let (config_desc, layer_descs) = manifest::parts(&raw)?;
        self.store.put_blob("manifest", &manifest_digest, &raw)?;
        let config_digest = Digest::parse(&config_desc.digest)?;
        if !self.store.has_blob(&config_digest) {
            let bytes = fetch_small(&client, reference, &config_desc).await?;
            self.store.put_blob("config", &config_digest, &bytes)?;
        }
        let layers = manifest::layer_records(&self.store.read_blob(&config_digest)?, &layer_descs)?;
        progress.total.store(layers.iter().map(|l| l.size).sum(), Ordering::Relaxed);

        // Downloads run as tasks (bounded); unpacking follows in layer order as each blob lands.
        let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL_DOWNLOADS));
        let mut downloads = Vec::new();
        for (layer, desc) in layers.iter().zip(&layer_descs) {
            if self.store.has_layer(&layer.chain_id) && self.store.has_blob(&layer.digest) {
                progress.done.fetch_add(layer.size, Ordering::Relaxed);
                downloads.push(None);
                continue;
            }
            let task = Download {
                store: self.store.clone(),
                locks: self.blobs.clone(),
                client: client.clone(),
                reference: reference.clone(),
                desc: desc.clone(),
                digest: layer.digest.clone(),
                progress: progress.clone(),
            };
            let permits = permits.clone();
            downloads.push(Some(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                task.run().await
            })));
        }
        let mut failure = None;
        for (layer, download) in layers.iter().zip(downloads) {
            let Some(download) = download else { continue };
            let done = match download.await {
                Ok(r) => r,
                Err(e) => {
                    Err(ImageError::Fetch { what: "layer", digest: layer.digest.to_string(), message: e.to_string() })
                }
            };
            if failure.is_none() {
                failure = done.and(self.unpack(layer).await).err();
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }

        manifest::record_image(
            &self.store,
            manifest::Pulled {
                reference,
                resolved: &resolved,
                manifest: manifest_digest,
                manifest_len: raw.len(),
                config: config_digest,
                config_size: config_desc.size,
                layers,
            },
        )
    }

    /// For an index / manifest list: the manifest for this node's platform, fetched and verified.
    async fn platform_manifest(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        digest: Digest,
        raw: bytes::Bytes,
    ) -> Result<(Digest, bytes::Bytes)> {
        let parsed: Manifest = parse_json("manifest", &raw)?;
        if !parsed.is_index() {
            return Ok((digest, raw));
        }
        let entry = parsed.platform_entry().ok_or_else(|| ImageError::NoPlatform {
            reference: reference.whole(),
            platform: format!("linux/{}", node_platform().0),
        })?;
        let platform_digest = Digest::parse(&entry.digest)?;
        let by_digest = reference.clone_with_digest(platform_digest.to_string());
        let (raw, _) =
            client.pull_manifest_raw(&by_digest, auth, ACCEPT).await.map_err(|e| classify(&by_digest.whole(), e))?;
        let digest = verified(platform_digest, &raw, "manifest")?;
        Ok((digest, raw))
    }

    /// Unpacks one layer into the store unless it is there already (its parent is there: layers go in order).
    async fn unpack(&self, layer: &LayerRecord) -> Result<()> {
        let _lock = self.layers.lock(layer.chain_id.as_str()).await;
        if self.store.has_layer(&layer.chain_id) {
            return Ok(());
        }
        let store = self.store.clone();
        let layer = layer.clone();
        let max = self.config.max_layer_bytes;
        tokio::task::spawn_blocking(move || manifest::unpack_into_store(&store, &layer, max)).await.map_err(|e| {
            ImageError::Unpack {
                digest: String::new(),
                source: super::error::UnpackError::io("unpack task", "", std::io::Error::other(e.to_string())),
            }
        })?
    }
}

/// One blob download into the store's ingest area, verified before it is committed.
struct Download {
    store: Store,
    locks: Arc<KeyedLocks>,
    client: Arc<Client>,
    reference: Reference,
    desc: OciDescriptor,
    digest: Digest,
    progress: Arc<Progress>,
}

impl Download {
    async fn run(self) -> Result<()> {
        let _lock = self.locks.lock(self.digest.as_str()).await;
        let expected = u64::try_from(self.desc.size).unwrap_or(0);
        if self.store.has_blob(&self.digest) {
            self.progress.done.fetch_add(expected, Ordering::Relaxed);
            return Ok(());
        }
        let path = self.store.ingest_path();
        let result = self.fetch(&path, expected).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        result
    }

    async fn fetch(&self, path: &PathBuf, expected: u64) -> Result<()> {
        let fetch_err = |message: String| ImageError::Fetch { what: "layer", digest: self.digest.to_string(), message };
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, &self.desc)
            .await
            .map_err(|e| fetch_err(classify(&self.reference.whole(), e).to_string()))?;
        let mut file = tokio::fs::File::create(path).await.map_err(|e| ImageError::io("create", path, e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream_error = None;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            };
            size += chunk.len() as u64;
            if size > expected {
                return Err(ImageError::SizeMismatch {
                    what: "layer",
                    digest: self.digest.to_string(),
                    expected,
                    actual: size,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| ImageError::io("write", path, e))?;
            self.progress.done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let actual = Digest::from_sha256(&hasher.finalize());
        if size == expected && actual != self.digest {
            // Also the case when the client's own verification ended the stream with an error.
            return Err(ImageError::DigestMismatch {
                what: "layer",
                expected: self.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        if let Some(e) = stream_error {
            return Err(fetch_err(e.to_string()));
        }
        if size != expected {
            return Err(ImageError::SizeMismatch {
                what: "layer",
                digest: self.digest.to_string(),
                expected,
                actual: size,
            });
        }
        file.sync_all().await.map_err(|e| ImageError::io("fsync", path, e))?;
        drop(file);
        let store = self.store.clone();
        let (path, digest) = (path.clone(), self.digest.clone());
        tokio::task::spawn_blocking(move || store.commit_blob(&path, "layer", &digest, Some(expected)))
            .await
            .map_err(|e| fetch_err(e.to_string()))?
    }
}

async fn fetch_small(client: &Client, reference: &Reference, desc: &OciDescriptor) -> Result<Vec<u8>> {
    let size = u64::try_from(desc.size).unwrap_or(u64::MAX);
    if size > MAX_JSON_BYTES {
        return Err(ImageError::Malformed { what: "config", message: format!("{size} bytes is too large") });
    }
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    client.pull_blob(reference, desc, &mut out).await.map_err(|e| match e {
        OciDistributionError::DigestError(_) => ImageError::DigestMismatch {
            what: "config",
            expected: desc.digest.clone(),
            actual: Digest::of(&out).to_string(),
        },
        other => ImageError::Fetch {
            what: "config",
            digest: desc.digest.clone(),
            message: classify(&reference.whole(), other).to_string(),
        },
    })?;
    Ok(out)
}

pub(crate) fn verified(digest: Digest, raw: &[u8], what: &'static str) -> Result<Digest> {
    let actual = Digest::of(raw);
    if actual != digest {
        return Err(ImageError::DigestMismatch { what, expected: digest.to_string(), actual: actual.to_string() });
    }
    Ok(digest)
}

/// Maps a registry client error onto what a user needs to know: denied, not found, or something else.
fn classify(reference: &str, e: OciDistributionError) -> ImageError {
    let reference = reference.to_owned();
    match e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            ImageError::Unauthorized { reference, message: format!("{e}: authorization failed") }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound { reference },
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                ImageError::Unauthorized { reference, message: e.to_string() }
            } else if codes.iter().any(|c| {
                matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound)
            }) {
                ImageError::NotFound { reference }
            } else {
                ImageError::Resolve { reference, message: e.to_string() }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => ImageError::NotFound { reference },
        OciDistributionError::ServerError { code: 401 | 403, .. } => {
            ImageError::Unauthorized { reference, message: e.to_string() }
        }
        other => ImageError::Resolve { reference, message: error_chain(&other) },
    }
}

/// An error with its sources, so "connection refused" is not hidden behind "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
