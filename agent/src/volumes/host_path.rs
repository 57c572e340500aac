//! `hostPath` volumes: the `type` check (with creation for the `...OrCreate` types), in upstream's words.
//! A path with no type that does not exist is created as a directory, as the CRI runtimes do.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// What is at `path`, named as `hostPath.type` names it (following symlinks, as upstream's `os.Stat`).
fn file_type(path: &Path) -> Result<&'static str, String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("path {:?} does not exist", path.display().to_string()));
        }
        Err(e) => return Err(e.to_string()),
    };
    let t = meta.file_type();
    Ok(if t.is_dir() {
        "Directory"
    } else if t.is_socket() {
        "Socket"
    } else if t.is_char_device() {
        "CharDevice"
    } else if t.is_block_device() {
        "BlockDevice"
    } else if t.is_file() {
        "File"
    } else {
        "unknown"
    })
}

fn matches(path: &Path, want: &str, expected: &str) -> Result<(), String> {
    match file_type(path) {
        Ok(t) if t == want => Ok(()),
        Ok(t) => Err(format!("hostPath type check failed: {} is not a {expected}, it's a {t}", path.display())),
        Err(e) => Err(format!(
            "hostPath type check failed, {} is not a {expected}, unable to determine its type: {e}",
            path.display()
        )),
    }
}

/// Checks (and for the `...OrCreate` types, makes) what `type_` asks for at `path`.
pub fn check(path: &Path, type_: Option<&str>) -> Result<(), String> {
    let exists = fs::metadata(path).is_ok();
    match type_.unwrap_or("") {
        "" => {
            if !exists {
                fs::create_dir_all(path).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        "DirectoryOrCreate" if !exists => fs::create_dir_all(path).map_err(|e| e.to_string()),
        "DirectoryOrCreate" | "Directory" => matches(path, "Directory", "directory"),
        "FileOrCreate" if !exists => {
            let created = fs::OpenOptions::new().write(true).create(true).truncate(false).open(path);
            created.map(drop).map_err(|e| e.to_string())
        }
        "FileOrCreate" | "File" => matches(path, "File", "file"),
        "Socket" => matches(path, "Socket", "socket file"),
        "CharDevice" => matches(path, "CharDevice", "character device"),
        "BlockDevice" => matches(path, "BlockDevice", "block device"),
        other => Err(format!("{other} is an invalid volume type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_as_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = d.join("f");
        fs::write(&file, "x").unwrap();
        assert_eq!(check(d, Some("Directory")), Ok(()));
        assert_eq!(check(&file, Some("File")), Ok(()));
        assert_eq!(
            check(&file, Some("Directory")).unwrap_err(),
            format!("hostPath type check failed: {} is not a directory, it's a File", file.display())
        );
        assert_eq!(
            check(d, Some("FileOrCreate")).unwrap_err(),
            format!("hostPath type check failed: {} is not a file, it's a Directory", d.display())
        );
        let missing = d.join("missing");
        let err = check(&missing, Some("Directory")).unwrap_err();
        assert!(err.starts_with("hostPath type check failed, "), "{err}");
        assert!(err.ends_with("does not exist"), "{err}");
        check(&d.join("made"), Some("DirectoryOrCreate")).unwrap();
        assert!(d.join("made").is_dir());
        check(&d.join("made-file"), Some("FileOrCreate")).unwrap();
        assert!(d.join("made-file").is_file());
        check(&d.join("plain/sub"), None).unwrap();
        assert!(d.join("plain/sub").is_dir());
        assert!(check(Path::new("/dev/null"), Some("CharDevice")).is_ok());
        assert!(check(Path::new("/dev/null"), Some("BlockDevice")).unwrap_err().contains("is not a block device"));
        assert!(check(&file, Some("Socket")).unwrap_err().contains("is not a socket file"));
        assert_eq!(check(d, Some("Bogus")).unwrap_err(), "Bogus is an invalid volume type");
    }
}
