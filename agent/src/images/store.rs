//! The image store under `<root-dir>/images`, content-addressed like containerd's:
//!
//! ```text
//! blobs/sha256/<hex>      verified manifests, configs and compressed layers
//! ingest/                 downloads in progress (discarded on open)
//! layers/<chain-id hex>/  one unpacked layer each, an overlayfs lower dir; `.tmp-*` while unpacking
//! images/<hex>.json       one record per image manifest: config, layers, chain IDs, names, last use
//! ```
//! Every file appears by `rename` after `fsync` (and a layer after `syncfs`), so after a crash at any point
//! a name either is complete or does not exist. [`Store::open`] removes what a crash left half-written and
//! records whose content is gone; [`Store::check`] verifies everything (tests use it after kills).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::digest::Digest;
use super::error::{ImageError, Result};

/// One layer of an image as the store remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub diff_id: Digest,
    pub chain_id: Digest,
}

/// An image in the store, keyed by its platform manifest's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest: Digest,
    pub config: Digest,
    pub layers: Vec<LayerRecord>,
    /// Normalised names (`docker.io/library/busybox:latest`) that point at this image.
    pub names: Vec<String>,
    /// `repo@digest` forms, the digest being what the name resolved to (an index digest for multi-arch images).
    pub repo_digests: Vec<String>,
    /// Bytes of manifest, config and compressed layers.
    pub size: u64,
    /// Unix seconds.
    pub pulled_at: u64,
    pub last_used: u64,
}

impl ImageRecord {
    /// The chain IDs of the layers, bottom first.
    pub fn chain_ids(&self) -> impl Iterator<Item = &Digest> {
        self.layers.iter().map(|l| &l.chain_id)
    }
}

/// Handle on the store directory. Cheap to clone; all state is on disk. The process that opened it holds an
/// exclusive lock on `<root>/lock` while any clone lives: recovery deletes other writers' temp files, so two
/// processes must never use one store at once.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    _lock: std::sync::Arc<File>,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temporary name (process id + counter) for files and directories that are renamed into place.
fn temp_name(prefix: &str) -> String {
    format!("{prefix}{}-{}", std::process::id(), TEMP_COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Store {
    /// Opens (creating) the store and repairs what a crash may have left: partial downloads, half-unpacked
    /// layers, and image records whose blobs or layers are missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for dir in ["blobs/sha256", "ingest", "layers", "images"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(|e| ImageError::io("create", &path, e))?;
        }
        let lock_path = root.join("lock");
        let lock = File::create(&lock_path).map_err(|e| ImageError::io("create", &lock_path, e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            let busy = std::io::Error::new(e.kind(), "the image store is in use by another nodelet process");
            ImageError::io("lock", &lock_path, busy)
        })?;
        let store = Store { root, _lock: std::sync::Arc::new(lock) };
        store.recover()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn recover(&self) -> Result<()> {
        // No other process uses the store while it is opened: everything in ingest/ and every .tmp-* is stale.
        for entry in read_dir(&self.root.join("ingest"))? {
            remove_any(&entry)?;
        }
        for dir in ["layers", "images", "blobs/sha256"] {
            for entry in read_dir(&self.root.join(dir))? {
                if file_name(&entry).starts_with(".tmp-") {
                    remove_any(&entry)?;
                }
            }
        }
        for record in self.images()? {
            if let Some(problem) = self.missing_content(&record) {
                tracing::warn!(image = %record.manifest, %problem, "dropping incomplete image record");
                self.remove_record(&record.manifest)?;
            }
        }
        Ok(())
    }

    fn missing_content(&self, record: &ImageRecord) -> Option<String> {
        let blobs = [&record.manifest, &record.config].into_iter().chain(record.layers.iter().map(|l| &l.digest));
        for digest in blobs {
            if !self.has_blob(digest) {
                return Some(format!("blob {digest} missing"));
            }
        }
        record.chain_ids().find(|c| !self.has_layer(c)).map(|c| format!("layer {c} missing"))
    }

    // ---- blobs ----

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// A new file in `ingest/` to download into; [`Store::commit_blob`] verifies and moves it into place.
    pub fn ingest_path(&self) -> PathBuf {
        self.root.join("ingest").join(temp_name("dl-"))
    }

    /// Checks the ingested file's size and digest, then fsyncs and renames it to its content address.
    pub fn commit_blob(&self, ingested: &Path, what: &'static str, digest: &Digest, size: Option<u64>) -> Result<()> {
        let verified = (|| {
            let actual_size = fs::metadata(ingested).map_err(|e| ImageError::io("stat", ingested, e))?.len();
            if let Some(expected) = size.filter(|s| *s != actual_size) {
                return Err(ImageError::SizeMismatch {
                    what,
                    digest: digest.to_string(),
                    expected,
                    actual: actual_size,
                });
            }
            let actual = hash_file(ingested)?;
            if &actual != digest {
                return Err(ImageError::DigestMismatch {
                    what,
                    expected: digest.to_string(),
                    actual: actual.to_string(),
                });
            }
            let file = File::open(ingested).map_err(|e| ImageError::io("open", ingested, e))?;
            file.sync_all().map_err(|e| ImageError::io("fsync", ingested, e))?;
            rename_durably(ingested, &self.blob_path(digest))
        })();
        if verified.is_err() {
            let _ = fs::remove_file(ingested);
        }
        verified
    }

    /// Stores small content (manifest, config) after checking it hashes to `digest`.
    pub fn put_blob(&self, what: &'static str, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let actual = Digest::of(bytes);
        if &actual != digest {
            return Err(ImageError::DigestMismatch { what, expected: digest.to_string(), actual: actual.to_string() });
        }
        if self.has_blob(digest) {
            return Ok(());
        }
        write_atomically(&self.blob_path(digest), bytes)
    }

    /// Reads a small blob and checks its digest (a corrupted manifest or config is never used).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(|e| ImageError::io("read", &path, e))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(ImageError::DigestMismatch {
                what: "blob",
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    // ---- layers ----

    pub fn layer_path(&self, chain_id: &Digest) -> PathBuf {
        self.root.join("layers").join(chain_id.hex())
    }

    pub fn has_layer(&self, chain_id: &Digest) -> bool {
        self.layer_path(chain_id).is_dir()
    }

    /// An empty directory to unpack into, renamed into place by [`Store::commit_layer`].
    pub fn begin_layer(&self) -> Result<PathBuf> {
        let path = self.root.join("layers").join(temp_name(".tmp-"));
        fs::create_dir(&path).map_err(|e| ImageError::io("create", &path, e))?;
        Ok(path)
    }

    /// Flushes the unpacked files (one `syncfs`) and renames the directory to the layer's chain ID.
    pub fn commit_layer(&self, temp: &Path, chain_id: &Digest) -> Result<()> {
        let dir = File::open(temp).map_err(|e| ImageError::io("open", temp, e))?;
        rustix::fs::syncfs(&dir).map_err(|e| ImageError::io("syncfs", temp, e.into()))?;
        rename_durably(temp, &self.layer_path(chain_id))
    }

    /// Removes an unfinished layer directory.
    pub fn abort_layer(&self, temp: &Path) {
        if let Err(e) = fs::remove_dir_all(temp) {
            tracing::warn!(path = %temp.display(), error = %e, "removing unfinished layer");
        }
    }

    // ---- image records ----

    fn record_path(&self, manifest: &Digest) -> PathBuf {
        self.root.join("images").join(format!("{}.json", manifest.hex()))
    }

    /// Writes (replaces) an image record and moves each of its names away from any other image.
    pub fn put_image(&self, record: &ImageRecord) -> Result<()> {
        for mut other in self.images()? {
            if other.manifest != record.manifest && other.names.iter().any(|n| record.names.contains(n)) {
                other.names.retain(|n| !record.names.contains(n));
                self.write_record(&other)?;
            }
        }
        self.write_record(record)
    }

    fn write_record(&self, record: &ImageRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| ImageError::Malformed { what: "image record", message: e.to_string() })?;
        write_atomically(&self.record_path(&record.manifest), &json)
    }

    pub fn image(&self, manifest: &Digest) -> Result<Option<ImageRecord>> {
        let path = self.record_path(manifest);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| ImageError::Malformed {
                what: "image record",
                message: format!("{}: {e}", path.display()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("read", &path, e)),
        }
    }

    /// The image a normalised name or `repo@digest` points at.
    pub fn resolve(&self, name: &str) -> Result<Option<ImageRecord>> {
        Ok(self.images()?.into_iter().find(|r| r.names.iter().chain(&r.repo_digests).any(|n| n == name)))
    }

    /// Every image record. Unreadable records are skipped with a warning (and removed by the next open).
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let mut out = Vec::new();
        for path in read_dir(&self.root.join("images"))? {
            let Some(hex) = file_name(&path).strip_suffix(".json").map(str::to_owned) else { continue };
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else { continue };
            match self.image(&digest) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping unreadable image record"),
            }
        }
        Ok(out)
    }

    /// Records a use of the image now (for GC's least-recently-used order).
    pub fn touch(&self, manifest: &Digest) -> Result<()> {
        if let Some(mut record) = self.image(manifest)? {
            record.last_used = now_secs();
            self.write_record(&record)?;
        }
        Ok(())
    }

    /// Forgets an image; its blobs and layers go at the next [`Store::sweep`] unless another image shares them.
    pub fn remove_record(&self, manifest: &Digest) -> Result<()> {
        let path = self.record_path(manifest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("remove", &path, e)),
        }
    }

    /// Deletes blobs and layers no image record references (`keep` adds layers in use by other means).
    /// Returns the bytes freed (apparent sizes).
    pub fn sweep(&self, keep_layers: &HashSet<Digest>) -> Result<u64> {
        let mut blobs = HashSet::new();
        let mut layers = keep_layers.clone();
        for r in self.images()? {
            blobs.insert(r.manifest.clone());
            blobs.insert(r.config.clone());
            for l in &r.layers {
                blobs.insert(l.digest.clone());
                layers.insert(l.chain_id.clone());
            }
        }
        let mut freed = 0;
        for path in read_dir(&self.root.join("blobs/sha256"))? {
            let keep = Digest::parse(&format!("sha256:{}", file_name(&path))).is_ok_and(|d| blobs.contains(&d));
            if !keep && !file_name(&path).starts_with(".tmp-") {
                freed += fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
                remove_any(&path)?;
            }
        }
        for path in read_dir(&self.root.join("layers"))? {
            let keep = Digest::parse(&format!("sha256:{}", file_name(&path))).is_ok_and(|d| layers.contains(&d));
            if !keep && !file_name(&path).starts_with(".tmp-") {
                freed += disk_usage(&path);
                remove_any(&path)?;
            }
        }
        Ok(freed)
    }

    /// Verifies the whole store: every blob hashes to its name, every record's content is present. Returns the
    /// problems found (empty when consistent).
    pub fn check(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for path in read_dir(&self.root.join("blobs/sha256"))? {
            let name = file_name(&path);
            match hash_file(&path) {
                Ok(d) if d.hex() == name => {}
                Ok(d) => problems.push(format!("blob {name} hashes to {d}")),
                Err(e) => problems.push(format!("blob {name}: {e}")),
            }
        }
        for dir in ["ingest", "layers", "images"] {
            for path in read_dir(&self.root.join(dir))? {
                if dir == "ingest" || file_name(&path).starts_with(".tmp-") {
                    problems.push(format!("leftover {}", path.display()));
                }
            }
        }
        for record in self.images()? {
            if let Some(p) = self.missing_content(&record) {
                problems.push(format!("image {}: {p}", record.manifest));
            }
        }
        Ok(problems)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).map_err(|e| ImageError::io("list", dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        out.push(entry.map_err(|e| ImageError::io("list", dir, e))?.path());
    }
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn remove_any(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| ImageError::io("remove", path, e))
}

/// Bytes allocated under a directory (files counted once per inode would be more exact; close enough for GC).
pub(crate) fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    }
    fs::read_dir(path).map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum()).unwrap_or(0)
}

fn hash_file(path: &Path) -> Result<Digest> {
    let mut file = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| ImageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from_sha256(&hasher.finalize()))
}

/// Write to a temp file beside `path`, fsync, rename over `path`, fsync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(temp_name(".tmp-"));
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(ImageError::io("write", &temp, e));
    }
    rename_durably(&temp, path)
}

fn rename_durably(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| ImageError::io("rename", to, e))?;
    let dir = to.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ImageError::io("fsync", dir, e))
}
