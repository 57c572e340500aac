//! Unpacks one image layer (an untrusted tar stream, unpacked as root) into its own directory in overlayfs form.
//!
//! Safety rests on never following a symlink inside the layer: every parent directory is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to the layer root, and every entry is created with
//! `*at` calls on that parent's fd, so neither `../`, absolute paths, symlinked parents, nor hardlinks can reach
//! outside the layer directory. Entries that try are rejected with an [`UnpackError`], as are duplicates and
//! entries bigger than the layer's byte bound (sparse-file bombs). Whiteouts become overlayfs whiteouts (a 0/0
//! character device) and opaque markers the `trusted.overlay.opaque` xattr.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dev, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags, makedev};
use sha2::{Digest as _, Sha256};

use super::error::UnpackError;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer media type, or `None` for a media type that is not a layer we can unpack.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// What one unpack may write.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Upper bound on the sum of all regular files' sizes (holes of sparse files included, they are written out).
    pub max_bytes: u64,
}

/// Unpacks the layer blob at `blob` into the existing empty directory `dest`, checking that the uncompressed
/// stream's digest is `diff_id`. Returns the number of file bytes written.
pub fn unpack_layer(
    blob: &Path,
    compression: Compression,
    dest: &Path,
    diff_id: &str,
    limits: Limits,
) -> Result<u64, UnpackError> {
    let file = File::open(blob).map_err(|e| UnpackError::io("open", &blob.display().to_string(), e))?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::Decoder::with_buffer(reader).map_err(|e| UnpackError::io("zstd", "", e))?),
    };
    let mut hashing = HashingReader { inner: decoded, hasher: Sha256::new() };
    let written = unpack_tar(&mut hashing, dest, limits)?;
    // The tar reader stops at the end-of-archive marker; the diff ID covers the whole stream.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| UnpackError::io("read", "", e))?;
    let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    if actual != diff_id {
        return Err(UnpackError::DiffId { expected: diff_id.to_owned(), actual });
    }
    Ok(written)
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks an uncompressed tar stream into `dest`. Public for the hostile-layer tests.
pub fn unpack_tar(stream: &mut dyn Read, dest: &Path, limits: Limits) -> Result<u64, UnpackError> {
    let root = rustix::fs::open(dest, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| UnpackError::io("open", &dest.display().to_string(), e))?;
    let mut archive = tar::Archive::new(stream);
    let mut written = 0u64;
    let mut dir_times: Vec<(Vec<Vec<u8>>, i64)> = Vec::new();
    let entries = archive.entries().map_err(|e| UnpackError::io("read tar", "", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| UnpackError::io("read tar", "", e))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let attrs = xattrs(&mut entry, &shown)?;
        let mut components = clean_path(&raw, &shown)?;
        let Some(name) = components.pop() else {
            // The layer root itself ("./"): only its metadata applies.
            if kind.is_dir() {
                apply_metadata(&root, entry.header(), &attrs, &shown)?;
                dir_times.push((Vec::new(), mtime(&entry)));
            }
            continue;
        };
        let parent = open_dir(&root, &components, true, &shown)?;
        if let Some(rest) = name.strip_prefix(b".wh.") {
            whiteout(&parent, rest, &shown)?;
            continue;
        }
        let existing = rustix::fs::statat(&parent, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).ok();
        if let Some(st) = existing {
            let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
            if !(is_dir && kind.is_dir()) {
                return Err(UnpackError::Duplicate { path: shown });
            }
        }
        let name_os = OsStr::from_bytes(&name);
        let header = entry.header().clone();
        let mode = Mode::from_bits_truncate(header.mode().unwrap_or(0o644) & 0o7777);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = header.size().map_err(|e| UnpackError::io("read header", &shown, e))?;
                if size > limits.max_bytes.saturating_sub(written) {
                    return Err(UnpackError::TooLarge { path: shown, size, limit: limits.max_bytes });
                }
                let fd = rustix::fs::openat(
                    &parent,
                    name_os,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| UnpackError::io("create", &shown, e))?;
                let mut file = File::from(fd);
                written += io::copy(&mut (&mut entry).take(size), &mut file)
                    .map_err(|e| UnpackError::io("write", &shown, e))?;
                let fd = OwnedFd::from(file);
                apply_metadata(&fd, entry.header(), &attrs, &shown)?;
                set_times(&fd, mtime(&entry), &shown)?;
            }
            tar::EntryType::Directory => {
                if existing.is_none() {
                    rustix::fs::mkdirat(&parent, name_os, Mode::from_bits_truncate(0o700))
                        .map_err(|e| UnpackError::io("mkdir", &shown, e))?;
                }
                let mut path = components.clone();
                path.push(name.clone());
                let fd = open_dir(&root, &path, false, &shown)?;
                apply_metadata(&fd, entry.header(), &attrs, &shown)?;
                dir_times.push((path, mtime(&entry)));
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::io("symlink", &shown, io::Error::other("symlink without a target")))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, name_os)
                    .map_err(|e| UnpackError::io("symlink", &shown, e))?;
                own_at(&parent, name_os, &header, &shown)?;
                set_xattrs_at(&parent, name_os, &attrs, &shown)?;
                let t = timestamps(mtime(&entry));
                rustix::fs::utimensat(&parent, name_os, &t, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| UnpackError::io("utimensat", &shown, e))?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let target_shown = String::from_utf8_lossy(&target).into_owned();
                let bad = || UnpackError::BadHardlink { path: shown.clone(), target: target_shown.clone() };
                let mut tcomps = clean_path(&target, &target_shown).map_err(|_| bad())?;
                let tname = tcomps.pop().ok_or_else(bad)?;
                let tparent = open_dir(&root, &tcomps, false, &target_shown).map_err(|_| bad())?;
                let st =
                    rustix::fs::statat(&tparent, tname.as_slice(), AtFlags::SYMLINK_NOFOLLOW).map_err(|_| bad())?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(bad());
                }
                rustix::fs::linkat(&tparent, tname.as_slice(), &parent, name_os, AtFlags::empty())
                    .map_err(|e| UnpackError::io("link", &shown, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (file_type, dev) = match kind {
                    tar::EntryType::Char => (FileType::CharacterDevice, device(&header)),
                    tar::EntryType::Block => (FileType::BlockDevice, device(&header)),
                    _ => (FileType::Fifo, 0),
                };
                rustix::fs::mknodat(&parent, name_os, file_type, mode, dev)
                    .map_err(|e| UnpackError::io("mknod", &shown, e))?;
                let fd = rustix::fs::openat(&parent, name_os, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty())
                    .map_err(|e| UnpackError::io("open", &shown, e))?;
                own_at(&parent, name_os, &header, &shown)?;
                // chmod after chown (chown clears set-id bits); fchmodat, as fchmod refuses O_PATH fds.
                rustix::fs::chmodat(&parent, name_os, mode, AtFlags::empty())
                    .map_err(|e| UnpackError::io("chmod", &shown, e))?;
                drop(fd);
                let t = timestamps(mtime(&entry));
                rustix::fs::utimensat(&parent, name_os, &t, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| UnpackError::io("utimensat", &shown, e))?;
            }
            other => return Err(UnpackError::EntryType { path: shown, kind: format!("{other:?}") }),
        }
    }
    // Directory times last (children change them), deepest first.
    dir_times.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    for (path, time) in dir_times {
        let shown = String::from_utf8_lossy(&path.join(&b'/')).into_owned();
        let fd = open_dir(&root, &path, false, &shown)?;
        set_times(&fd, time, &shown)?;
    }
    Ok(written)
}

/// Splits an archive path into components, dropping `.` and empty ones; rejects absolute paths and `..`.
fn clean_path(raw: &[u8], shown: &str) -> Result<Vec<Vec<u8>>, UnpackError> {
    if raw.starts_with(b"/") {
        return Err(UnpackError::AbsolutePath { path: shown.to_owned() });
    }
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(UnpackError::ParentTraversal { path: shown.to_owned() }),
            p => out.push(p.to_vec()),
        }
    }
    Ok(out)
}

/// Opens (and with `create`, first makes, mode 0755) the directory `components` below the layer root without
/// following any symlink.
fn open_dir(root: &OwnedFd, components: &[Vec<u8>], create: bool, shown: &str) -> Result<OwnedFd, UnpackError> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir =
        rustix::fs::openat2(root, ".", flags, Mode::empty(), resolve).map_err(|e| UnpackError::io("open", ".", e))?;
    for part in components {
        let part = OsStr::from_bytes(part);
        if create {
            match rustix::fs::mkdirat(&dir, part, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(UnpackError::io("mkdir", shown, e)),
            }
        }
        dir = match rustix::fs::openat2(&dir, part, flags, Mode::empty(), resolve) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV) => {
                return Err(UnpackError::ThroughSymlink { path: shown.to_owned() });
            }
            Err(e) => return Err(UnpackError::io("open", shown, e)),
        };
    }
    Ok(dir)
}

/// `.wh..wh..opq` marks the parent opaque; `.wh.<name>` hides `<name>` of lower layers.
fn whiteout(parent: &OwnedFd, rest: &[u8], shown: &str) -> Result<(), UnpackError> {
    if rest == b".wh..opq" {
        return rustix::fs::fsetxattr(parent, "trusted.overlay.opaque", b"y", XattrFlags::empty())
            .map_err(|e| UnpackError::io("setxattr", shown, e));
    }
    if rest.starts_with(b".wh.") || rest.is_empty() || rest == b"." || rest == b".." {
        // Other `.wh..wh.` names are AUFS bookkeeping (hardlink dirs): nothing to do.
        return Ok(());
    }
    let name = OsStr::from_bytes(rest);
    if rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(UnpackError::Duplicate { path: shown.to_owned() });
    }
    rustix::fs::mknodat(parent, name, FileType::CharacterDevice, Mode::empty(), makedev(0, 0))
        .map_err(|e| UnpackError::io("mknod whiteout", shown, e))
}

fn device(header: &tar::Header) -> Dev {
    let major = header.device_major().ok().flatten().unwrap_or(0);
    let minor = header.device_minor().ok().flatten().unwrap_or(0);
    makedev(major, minor)
}

fn mtime<R: Read>(entry: &tar::Entry<'_, R>) -> i64 {
    entry.header().mtime().map(|t| i64::try_from(t).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn timestamps(secs: i64) -> Timestamps {
    let t = Timespec { tv_sec: secs, tv_nsec: 0 };
    Timestamps { last_access: t, last_modification: t }
}

fn set_times(fd: &OwnedFd, secs: i64, shown: &str) -> Result<(), UnpackError> {
    rustix::fs::futimens(fd, &timestamps(secs)).map_err(|e| UnpackError::io("futimens", shown, e))
}

/// Owner, then mode (chown clears set-id bits), then xattrs, on an open file or directory.
fn apply_metadata(fd: &OwnedFd, header: &tar::Header, attrs: &[Xattr], shown: &str) -> Result<(), UnpackError> {
    let (uid, gid) = owner(header);
    rustix::fs::fchown(fd, Some(uid), Some(gid)).map_err(|e| UnpackError::io("chown", shown, e))?;
    let mode = Mode::from_bits_truncate(header.mode().unwrap_or(0o644) & 0o7777);
    rustix::fs::fchmod(fd, mode).map_err(|e| UnpackError::io("chmod", shown, e))?;
    for (name, value) in attrs {
        rustix::fs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty())
            .map_err(|e| UnpackError::io("setxattr", shown, e))?;
    }
    Ok(())
}

fn own_at(parent: &OwnedFd, name: &OsStr, header: &tar::Header, shown: &str) -> Result<(), UnpackError> {
    let (uid, gid) = owner(header);
    rustix::fs::chownat(parent, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| UnpackError::io("chown", shown, e))
}

/// A symlink cannot be opened for `fsetxattr`: `lsetxattr` through the parent's fd path never follows `name`.
fn set_xattrs_at(parent: &OwnedFd, name: &OsStr, attrs: &[Xattr], shown: &str) -> Result<(), UnpackError> {
    let path = Path::new(&format!("/proc/self/fd/{}", parent.as_raw_fd())).join(name);
    for (key, value) in attrs {
        rustix::fs::lsetxattr(&path, key.as_slice(), value, XattrFlags::empty())
            .map_err(|e| UnpackError::io("setxattr", shown, e))?;
    }
    Ok(())
}

fn owner(header: &tar::Header) -> (rustix::fs::Uid, rustix::fs::Gid) {
    let uid = u32::try_from(header.uid().unwrap_or(0)).unwrap_or(u32::MAX - 1).min(u32::MAX - 1);
    let gid = u32::try_from(header.gid().unwrap_or(0)).unwrap_or(u32::MAX - 1).min(u32::MAX - 1);
    (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid))
}

type Xattr = (Vec<u8>, Vec<u8>);

/// PAX `SCHILY.xattr.<name>` records of an entry.
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, shown: &str) -> Result<Vec<Xattr>, UnpackError> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(|e| UnpackError::io("read pax", shown, e))? else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(|e| UnpackError::io("read pax", shown, e))?;
        if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            out.push((name.to_vec(), ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}
