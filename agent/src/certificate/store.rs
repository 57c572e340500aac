//! The kubelet's certificate files, in upstream's layout: each issued certificate with its key in one PEM file,
//! `<dir>/<prefix>-<YYYY-MM-DD-HH-MM-SS>.pem` (mode 0600), and `<dir>/<prefix>-current.pem`, a symlink to the
//! one in use. Kubeconfigs and the TLS server name the `-current` link, so they follow rotations.
//!
//! Crash rules: a new pair is written to a temporary file, synced and renamed into place before the link moves
//! ([`super::write_private`]);
//! the link moves by renaming a fresh link over it. A crash at any point leaves `-current` naming a complete
//! pair (the old or the new one); a half-written temporary file is never named and is replaced next time.
//! Older pairs stay, as upstream keeps them.

use std::path::{Path, PathBuf};

use jiff::Timestamp;

/// A certificate chain with its private key, and the leaf's validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The chain, leaf first, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

impl Credential {
    /// Parses a PEM text holding certificates and one private key (in any order, as upstream's store reads).
    pub fn parse(text: &str) -> Result<Credential, String> {
        let blocks = pem::parse_many(text).map_err(|e| e.to_string())?;
        let (certs, keys): (Vec<_>, Vec<_>) = blocks.into_iter().partition(|b| b.tag() == "CERTIFICATE");
        let key = keys.into_iter().find(|b| b.tag().ends_with("PRIVATE KEY")).ok_or("no private key")?;
        let leaf = certs.first().ok_or("no certificate")?;
        let (not_before, not_after) = validity(leaf.contents())?;
        let encode = |b: &pem::Pem| super::pem_block(b.tag(), b.contents().to_vec());
        Ok(Credential { cert_pem: certs.iter().map(encode).collect(), key_pem: encode(&key), not_before, not_after })
    }

    /// The leaf certificate's DER.
    pub fn leaf_der(&self) -> Vec<u8> {
        pem::parse(&self.cert_pem).map(pem::Pem::into_contents).unwrap_or_default()
    }
}

/// A certificate's notBefore and notAfter.
pub fn validity(der: &[u8]) -> Result<(Timestamp, Timestamp), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("parsing the certificate: {e}"))?;
    let at = |t: x509_parser::time::ASN1Time| Timestamp::from_second(t.timestamp()).map_err(|e| e.to_string());
    Ok((at(cert.validity().not_before)?, at(cert.validity().not_after)?))
}

/// One kind of certificate's files (`kubelet-client`, `kubelet-server`) in a directory.
#[derive(Debug, Clone)]
pub struct CertStore {
    dir: PathBuf,
    prefix: &'static str,
}

impl CertStore {
    pub fn new(dir: &Path, prefix: &'static str) -> CertStore {
        CertStore { dir: dir.to_path_buf(), prefix }
    }

    /// `<dir>/<prefix>-current.pem`.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(format!("{}-current.pem", self.prefix))
    }

    /// The pair in use; `None` when there is none yet.
    pub fn current(&self) -> Result<Option<Credential>, StoreError> {
        let path = self.current_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => Credential::parse(&text).map(Some).map_err(|e| StoreError::Invalid(path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io(path, e)),
        }
    }

    /// Writes a new pair and makes it current; returns its file.
    pub fn update(&self, cert_pem: &str, key_pem: &str) -> Result<PathBuf, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e| StoreError::Io(path, e)
        };
        Credential::parse(&format!("{cert_pem}{key_pem}")).map_err(|e| StoreError::Invalid(self.current_path(), e))?;
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let stamp = Timestamp::now().strftime("%Y-%m-%d-%H-%M-%S").to_string();
        let mut file = self.dir.join(format!("{}-{stamp}.pem", self.prefix));
        if file.exists() {
            // Two in one second (a test's rotation): keep both.
            file = self.dir.join(format!("{}-{stamp}-{}.pem", self.prefix, std::process::id()));
        }
        super::write_private(&file, format!("{cert_pem}{key_pem}").as_bytes()).map_err(io(&file))?;
        let link_tmp = self.dir.join(format!(".{}-current.tmp", self.prefix));
        let _ = std::fs::remove_file(&link_tmp);
        let name = file.file_name().map(PathBuf::from).unwrap_or_default();
        std::os::unix::fs::symlink(&name, &link_tmp).map_err(io(&link_tmp))?;
        std::fs::rename(&link_tmp, self.current_path()).map_err(io(&self.current_path()))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed pair (rcgen's default validity, 1975 to 4096).
    pub fn pair(cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn update_writes_a_file_and_moves_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::new(dir.path(), "kubelet-client");
        assert_eq!(store.current().unwrap(), None);
        let (cert, key) = pair("first");
        let first = store.update(&cert, &key).unwrap();
        let current = store.current().unwrap().unwrap();
        assert_eq!(current.cert_pem, cert.replace("\r\n", "\n"));
        assert!(current.not_after > Timestamp::now());
        let link = std::fs::read_link(store.current_path()).unwrap();
        assert_eq!(link, PathBuf::from(first.file_name().unwrap()), "relative, as upstream");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&first).unwrap().permissions().mode() & 0o777, 0o600);
        let (cert2, key2) = pair("second");
        let second = store.update(&cert2, &key2).unwrap();
        assert_ne!(first, second);
        assert!(first.exists(), "older pairs stay");
        assert_eq!(store.current().unwrap().unwrap().cert_pem, cert2.replace("\r\n", "\n"));
        // A pair that does not parse is refused and changes nothing.
        assert!(store.update("junk", &key2).is_err());
        assert_eq!(std::fs::read_link(store.current_path()).unwrap(), PathBuf::from(second.file_name().unwrap()));
    }

    #[test]
    fn a_crash_before_the_link_moves_leaves_the_old_pair_current() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::new(dir.path(), "kubelet-client");
        let (cert, key) = pair("first");
        store.update(&cert, &key).unwrap();
        // A half-written temporary file and a stray link from an interrupted update.
        std::fs::write(dir.path().join(".kubelet-client-x.pem.tmp"), "-----BEGIN CERT").unwrap();
        std::os::unix::fs::symlink("nowhere.pem", dir.path().join(".kubelet-client-current.tmp")).unwrap();
        assert_eq!(store.current().unwrap().unwrap().cert_pem, cert.replace("\r\n", "\n"));
        let (cert2, key2) = pair("second");
        store.update(&cert2, &key2).unwrap();
        assert_eq!(store.current().unwrap().unwrap().cert_pem, cert2.replace("\r\n", "\n"));
    }

    #[test]
    fn parse_reads_either_order() {
        let (cert, key) = pair("x");
        let a = Credential::parse(&format!("{cert}{key}")).unwrap();
        let b = Credential::parse(&format!("{key}{cert}")).unwrap();
        assert_eq!(a, b);
        assert!(Credential::parse(&cert).unwrap_err().contains("no private key"));
        assert!(Credential::parse(&key).unwrap_err().contains("no certificate"));
    }
}
