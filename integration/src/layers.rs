//! Hand-made image layers and images for the image service's tests: well-formed tar layers (whiteouts and
//! opaque directories included) and hostile ones that a layer builder would refuse to write (`../` paths,
//! absolute paths, sparse bombs), pushed to a [`Registry`] with `oci-client`.

use std::io::Write;

use anyhow::{Context, Result};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::registry::Registry;

/// Builds an uncompressed tar layer entry by entry. Names are written raw into the header, so any path can be
/// produced, including the ones `tar::Builder` refuses.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer { builder: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        let slot = &mut h.as_old_mut().name;
        let bytes = name.as_bytes();
        assert!(bytes.len() < slot.len(), "test entry names stay below 100 bytes");
        slot[..bytes.len()].copy_from_slice(bytes);
        h
    }

    fn link_header(kind: tar::EntryType, name: &str, target: &str) -> tar::Header {
        let mut h = Layer::header(kind, name, 0o777, 0);
        let slot = &mut h.as_old_mut().linkname;
        slot[..target.len()].copy_from_slice(target.as_bytes());
        h
    }

    fn append(mut self, mut h: tar::Header, data: &[u8]) -> Layer {
        h.set_cksum();
        self.builder.append(&h, data).expect("appending to an in-memory tar");
        self
    }

    pub fn file(self, name: &str, content: &[u8], mode: u32) -> Layer {
        let h = Layer::header(tar::EntryType::Regular, name, mode, content.len() as u64);
        self.append(h, content)
    }

    /// A file owned by `uid:gid`.
    pub fn owned_file(self, name: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Layer {
        let mut h = Layer::header(tar::EntryType::Regular, name, mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.append(h, content)
    }

    pub fn dir(self, name: &str, mode: u32) -> Layer {
        let h = Layer::header(tar::EntryType::Directory, name, mode, 0);
        self.append(h, &[])
    }

    pub fn symlink(self, name: &str, target: &str) -> Layer {
        let h = Layer::link_header(tar::EntryType::Symlink, name, target);
        self.append(h, &[])
    }

    pub fn hardlink(self, name: &str, target: &str) -> Layer {
        let h = Layer::link_header(tar::EntryType::Link, name, target);
        self.append(h, &[])
    }

    pub fn char_device(self, name: &str, major: u32, minor: u32) -> Layer {
        let mut h = Layer::header(tar::EntryType::Char, name, 0o666, 0);
        h.set_device_major(major).expect("gnu header has device fields");
        h.set_device_minor(minor).expect("gnu header has device fields");
        self.append(h, &[])
    }

    /// A named pipe.
    pub fn fifo(self, name: &str) -> Layer {
        let h = Layer::header(tar::EntryType::Fifo, name, 0o644, 0);
        self.append(h, &[])
    }

    /// A file with a PAX `SCHILY.xattr.<key>` record.
    pub fn file_with_xattr(mut self, name: &str, content: &[u8], key: &str, value: &[u8]) -> Layer {
        let record = format!("SCHILY.xattr.{key}");
        self.builder.append_pax_extensions([(record.as_str(), value)]).expect("appending to an in-memory tar");
        self.file(name, content, 0o644)
    }

    /// A GNU sparse file claiming `real_size` bytes with one 512-byte data block at the end: a few hundred
    /// bytes in the archive, `real_size` on disk if unpacked naively.
    pub fn sparse_bomb(self, name: &str, real_size: u64) -> Layer {
        let mut h = Layer::header(tar::EntryType::GNUSparse, name, 0o644, 512);
        let gnu = h.as_gnu_mut().expect("gnu header");
        // Octal when it fits (11 digits), else GNU base-256: 0x80 then the value big-endian.
        let octal = |slot: &mut [u8], v: u64| {
            let s = format!("{v:0width$o}", width = slot.len() - 1);
            if s.len() < slot.len() {
                slot[..s.len()].copy_from_slice(s.as_bytes());
            } else {
                slot.fill(0);
                slot[0] = 0x80;
                let n = slot.len();
                slot[n - 8..].copy_from_slice(&v.to_be_bytes());
            }
        };
        octal(&mut gnu.realsize, real_size);
        octal(&mut gnu.sparse[0].offset, real_size - 512);
        octal(&mut gnu.sparse[0].numbytes, 512);
        self.append(h, &[7u8; 512])
    }

    /// The uncompressed tar bytes.
    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().expect("finishing an in-memory tar")
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Gzip-compresses a layer.
pub fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(tar).expect("compressing in memory");
    enc.finish().expect("compressing in memory")
}

/// Pushes an image made of `layers` (uncompressed tars, pushed gzip-compressed, bottom first) as
/// `<registry>/<name>:<tag>`; returns the manifest digest.
pub async fn push_image(registry: &Registry, name: &str, tag: &str, layers: &[Vec<u8>]) -> Result<String> {
    push_image_with_cmd(registry, name, tag, layers, &["/bin/sh"]).await
}

/// [`push_image`] with the image's default command `cmd`.
pub async fn push_image_with_cmd(
    registry: &Registry,
    name: &str,
    tag: &str,
    layers: &[Vec<u8>],
    cmd: &[&str],
) -> Result<String> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let image_layers: Vec<ImageLayer> = layers.iter().map(|l| ImageLayer::oci_v1_gzip(gzip(l), None)).collect();
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    let reference: Reference = registry.reference(name, tag).parse()?;
    let client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let auth = match registry.credentials() {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let pushed = client
        .push(&reference, &image_layers, config, &auth, None)
        .await
        .with_context(|| format!("pushing {reference}"))?;
    let manifest_url = pushed.manifest_url;
    let (_, digest) = client
        .pull_manifest_raw(&reference, &auth, &["application/vnd.oci.image.manifest.v1+json"])
        .await
        .with_context(|| format!("reading back {manifest_url}"))?;
    Ok(digest)
}

/// Pushes image `from` (`name:tag` in `registry`) with one more layer on top (`tar`, uncompressed) and its config
/// changed by `edit` (e.g. its `config.Cmd`) as `to`: an image with a file added, e.g. a stand-in for a tool the
/// test image lacks.
pub async fn extend_image(
    registry: &Registry,
    from: (&str, &str),
    to: (&str, &str),
    tar: &[u8],
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<String> {
    let client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let auth = match registry.credentials() {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let source: Reference = registry.reference(from.0, from.1).parse()?;
    let accepted = [
        oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
        oci_client::manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
        oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE,
    ];
    let image = client.pull(&source, &auth, accepted.to_vec()).await.with_context(|| format!("pulling {source}"))?;
    let mut config: serde_json::Value = serde_json::from_slice(&image.config.data)?;
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("the image config has no rootfs.diff_ids")?
        .push(serde_json::Value::String(sha256(tar)));
    edit(&mut config);
    let mut layers = image.layers;
    layers.push(ImageLayer::oci_v1_gzip(gzip(tar), None));
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    let target: Reference = registry.reference(to.0, to.1).parse()?;
    let pushed =
        client.push(&target, &layers, config, &auth, None).await.with_context(|| format!("pushing {target}"))?;
    Ok(pushed.manifest_url)
}
