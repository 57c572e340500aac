//! A throwaway PKI for one cluster: a CA (also the cluster-signing CA of the controller-manager), serving and client
//! certificates, and the service-account signing key. ECDSA P-256 throughout: every component accepts it and it is
//! fast to generate.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Paths of a certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// The private key (mode 0600).
    pub key: PathBuf,
}

/// The cluster's certificate authority, writing everything it issues into one directory.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_files: CertFiles,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish()
    }
}

impl Pki {
    /// Creates a new CA in `dir` (`ca.crt`, `ca.key`).
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "nodelet-test-ca");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key_pem = key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(params, key)?;
        let ca_files = write_pair(dir, "ca", &ca.pem(), &key_pem)?;
        Ok(Self { dir: dir.to_path_buf(), ca, ca_files })
    }

    /// The CA's certificate and key files.
    pub fn ca(&self) -> &CertFiles {
        &self.ca_files
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A TLS serving certificate for `sans` (DNS names or IP addresses), saved as `<name>.crt`/`<name>.key`.
    pub fn server(&self, name: &str, sans: &[&str]) -> Result<CertFiles> {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.issue(name, params)
    }

    /// A client certificate with user `cn` and groups `orgs` (how Kubernetes reads x509 identities).
    pub fn client(&self, name: &str, cn: &str, orgs: &[&str]) -> Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        for org in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *org);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.issue(name, params)
    }

    /// A bare key pair (`<name>.key` private PKCS#8, `<name>.pub` public), for service-account token signing.
    pub fn key_pair(&self, name: &str) -> Result<CertFiles> {
        let key = KeyPair::generate()?;
        let public = self.dir.join(format!("{name}.pub"));
        std::fs::write(&public, key.public_key_pem()).with_context(|| format!("writing {}", public.display()))?;
        let private = write_private_key(&self.dir, name, &key.serialize_pem())?;
        Ok(CertFiles { cert: public, key: private })
    }

    fn issue(&self, name: &str, params: CertificateParams) -> Result<CertFiles> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca).with_context(|| format!("signing {name}"))?;
        write_pair(&self.dir, name, &cert.pem(), &key.serialize_pem())
    }
}

fn write_pair(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> Result<CertFiles> {
    let cert = dir.join(format!("{name}.crt"));
    std::fs::write(&cert, cert_pem).with_context(|| format!("writing {}", cert.display()))?;
    let key = write_private_key(dir, name, key_pem)?;
    Ok(CertFiles { cert, key })
}

fn write_private_key(dir: &Path, name: &str, key_pem: &str) -> Result<PathBuf> {
    let key = dir.join(format!("{name}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key)
        .with_context(|| format!("writing {}", key.display()))?;
    std::io::Write::write_all(&mut f, key_pem.as_bytes())?;
    Ok(key)
}
