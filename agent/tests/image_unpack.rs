//! Layer unpacking: hostile layers are rejected and write nothing outside the layer directory; well-formed
//! layers keep ownership, modes, xattrs, links and devices; whiteouts and opaque directories work through a
//! real overlay mount of a two-layer image.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nodelet::images::UnpackError;
use nodelet::images::unpack::{Limits, unpack_tar};
use nodelet_integration::layers::Layer;
use nodelet_integration::testbed::{Need, ready};

const LIMITS: Limits = Limits { max_bytes: 1 << 30 };

/// A sandbox: `<tmp>/outside/secret` that hostile layers aim at, and `<tmp>/layer` to unpack into.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("outside")).unwrap();
        fs::write(dir.path().join("outside/secret"), "keep me").unwrap();
        fs::create_dir(dir.path().join("layer")).unwrap();
        Sandbox { dir }
    }

    fn layer(&self) -> PathBuf {
        self.dir.path().join("layer")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn unpack(&self, tar: Vec<u8>) -> Result<u64, UnpackError> {
        unpack_tar(&mut tar.as_slice(), &self.layer(), LIMITS)
    }

    /// Nothing but the sentinel is outside the layer dir, and the sentinel is untouched.
    fn assert_nothing_escaped(&self, case: &str) {
        let mut top: Vec<String> =
            fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        top.sort();
        assert_eq!(top, ["layer", "outside"], "{case}: something was written beside the layer dir");
        let outside: Vec<_> = fs::read_dir(self.outside()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(outside, ["secret"], "{case}: something was written into the outside dir");
        assert_eq!(fs::read_to_string(self.outside().join("secret")).unwrap(), "keep me", "{case}");
        assert_eq!(fs::metadata(self.outside().join("secret")).unwrap().nlink(), 1, "{case}: hardlinked");
        assert!(!Path::new("/evil").exists() && !Path::new("/tmp/evil").exists(), "{case}: wrote to /");
    }
}

#[test]
fn hostile_layers_are_rejected_and_nothing_escapes() {
    if !ready("hostile_layers_are_rejected_and_nothing_escapes", &[Need::Root]) {
        return;
    }
    type Case = (&'static str, fn(&Sandbox) -> Vec<u8>, fn(&UnpackError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "dot-dot path",
            |_| Layer::new().file("../outside/evil", b"x", 0o644).tar(),
            |e| matches!(e, UnpackError::ParentTraversal { .. }),
        ),
        (
            "nested dot-dot",
            |_| Layer::new().dir("a", 0o755).file("a/../../evil", b"x", 0o644).tar(),
            |e| matches!(e, UnpackError::ParentTraversal { .. }),
        ),
        (
            "absolute path",
            |_| Layer::new().file("/tmp/evil", b"x", 0o644).tar(),
            |e| matches!(e, UnpackError::AbsolutePath { .. }),
        ),
        (
            "symlink to an absolute dir, then written through",
            |s| {
                let target = s.outside().display().to_string();
                Layer::new().symlink("link", &target).file("link/evil", b"x", 0o644).tar()
            },
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "relative symlink out, then written through",
            |_| Layer::new().symlink("up", "../outside").file("up/evil", b"x", 0o644).tar(),
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "symlink replaced by a directory entry of the same name",
            |_| Layer::new().symlink("d", "../outside").dir("d", 0o755).file("d/evil", b"x", 0o644).tar(),
            |e| matches!(e, UnpackError::Duplicate { .. }),
        ),
        (
            "hardlink to a file outside via ..",
            |_| Layer::new().hardlink("h", "../outside/secret").tar(),
            |e| matches!(e, UnpackError::BadHardlink { .. }),
        ),
        (
            "hardlink to an absolute path",
            |s| {
                let target = s.outside().join("secret").display().to_string();
                Layer::new().hardlink("h", &target).tar()
            },
            |e| matches!(e, UnpackError::BadHardlink { .. }),
        ),
        (
            "hardlink through a symlink out",
            |_| Layer::new().symlink("up", "../outside").hardlink("h", "up/secret").tar(),
            |e| matches!(e, UnpackError::BadHardlink { .. }),
        ),
        (
            "hardlink to a symlink that points out",
            |s| {
                let target = s.outside().join("secret").display().to_string();
                Layer::new().symlink("s", &target).hardlink("h", "s").tar()
            },
            |e| matches!(e, UnpackError::BadHardlink { .. }),
        ),
        (
            "sparse file of 1 TiB",
            |_| Layer::new().sparse_bomb("bomb", 1 << 40).tar(),
            |e| matches!(e, UnpackError::TooLarge { size, .. } if *size == 1 << 40),
        ),
        (
            "duplicate file entry",
            |_| Layer::new().file("f", b"first", 0o644).file("f", b"second", 0o644).tar(),
            |e| matches!(e, UnpackError::Duplicate { .. }),
        ),
        (
            "file replaced by a symlink out",
            |_| Layer::new().file("f", b"x", 0o644).symlink("f", "../outside/secret").tar(),
            |e| matches!(e, UnpackError::Duplicate { .. }),
        ),
        (
            "whiteout and file of the same name",
            |_| Layer::new().file("f", b"x", 0o644).file(".wh.f", b"", 0o644).tar(),
            |e| matches!(e, UnpackError::Duplicate { .. }),
        ),
    ];
    for (case, build, expected) in cases {
        let sandbox = Sandbox::new();
        let tar = build(&sandbox);
        let err = sandbox.unpack(tar).expect_err(case);
        assert!(expected(&err), "{case}: unexpected error {err}");
        assert!(!err.to_string().is_empty());
        sandbox.assert_nothing_escaped(case);
    }
}

#[test]
fn a_sparse_file_within_the_bound_is_written_out() {
    if !ready("a_sparse_file_within_the_bound_is_written_out", &[Need::Root]) {
        return;
    }
    let sandbox = Sandbox::new();
    let written = sandbox.unpack(Layer::new().sparse_bomb("small", 1 << 20).tar()).unwrap();
    assert_eq!(written, 1 << 20);
    let data = fs::read(sandbox.layer().join("small")).unwrap();
    assert_eq!(data.len(), 1 << 20);
    assert!(data[..(1 << 20) - 512].iter().all(|b| *b == 0));
    assert!(data[(1 << 20) - 512..].iter().all(|b| *b == 7));
    // The bound covers the sum of the layer's files, not each file alone.
    let sandbox = Sandbox::new();
    let tar = Layer::new().file("a", &[1; 600], 0o644).file("b", &[2; 600], 0o644).tar();
    let err = unpack_tar(&mut tar.as_slice(), &sandbox.layer(), Limits { max_bytes: 1000 }).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
}

#[test]
fn metadata_links_devices_and_xattrs_are_preserved() {
    if !ready("metadata_links_devices_and_xattrs_are_preserved", &[Need::Root]) {
        return;
    }
    let sandbox = Sandbox::new();
    let tar = Layer::new()
        .dir("bin", 0o755)
        .owned_file("bin/suid", b"#!/bin/sh\n", 0o4755, 1000, 2000)
        .hardlink("bin/suid-link", "bin/suid")
        .symlink("bin/sh", "/bin/busybox")
        .dir("dev", 0o755)
        .char_device("dev/null", 1, 3)
        .dir("ro", 0o555)
        .file("ro/inside", b"still written", 0o400)
        .file_with_xattr("attr", b"x", "user.nodelet", b"yes")
        .file("implicit/parent/file", b"y", 0o600)
        .tar();
    sandbox.unpack(tar).unwrap();
    let root = sandbox.layer();
    let suid = fs::metadata(root.join("bin/suid")).unwrap();
    assert_eq!((suid.uid(), suid.gid()), (1000, 2000));
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755, "set-uid survives chown");
    assert_eq!(suid.mtime(), 1_700_000_000);
    let link = fs::metadata(root.join("bin/suid-link")).unwrap();
    assert_eq!((link.ino(), link.nlink()), (suid.ino(), 2), "hardlink is the same inode");
    assert_eq!(fs::read_link(root.join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
    let dev = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(dev.file_type().is_char_device());
    assert_eq!(dev.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(fs::metadata(root.join("ro")).unwrap().permissions().mode() & 0o777, 0o555);
    assert_eq!(fs::read_to_string(root.join("ro/inside")).unwrap(), "still written");
    assert_eq!(fs::metadata(root.join("ro")).unwrap().mtime(), 1_700_000_000, "dir times set last");
    let mut value = [0u8; 16];
    let len = rustix::fs::getxattr(root.join("attr"), "user.nodelet", &mut value).unwrap();
    assert_eq!(&value[..len], b"yes");
    assert_eq!(fs::read_to_string(root.join("implicit/parent/file")).unwrap(), "y");
}
