//! A real OCI registry (Debian's `docker-registry`) on a free loopback port, serving a private copy of the
//! prebuilt test images, without auth or with htpasswd basic auth.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::images;
use crate::ports::free_port;
use crate::process::Process;
use crate::testbed::system_bin;

/// Username and password for a registry with basic auth.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A running registry. Dropping it stops the process and removes its storage copy.
#[derive(Debug)]
pub struct Registry {
    proc: Process,
    port: u16,
    credentials: Option<Credentials>,
    dir: TempDir,
}

impl Registry {
    /// Starts a registry without auth.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts a registry that requires `credentials` (basic auth over plain HTTP, loopback only).
    pub async fn start_with_auth(username: &str, password: &str) -> Result<Self> {
        let creds = Credentials { username: username.into(), password: password.into() };
        Self::start_with(Some(creds)).await
    }

    async fn start_with(credentials: Option<Credentials>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("nodelet-registry-").tempdir()?;
        let storage = dir.path().join("storage");
        // A private copy: tests may tamper with blobs or push, and the cached store must stay pristine.
        let status = Command::new("cp")
            .arg("-a")
            .arg(images::store()?.join("registry"))
            .arg(&storage)
            .status()
            .context("running cp")?;
        if !status.success() {
            bail!("copying the image store into {} failed", storage.display());
        }
        let port = free_port()?;
        let mut config = format!(
            "version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
",
            storage.display()
        );
        if let Some(c) = &credentials {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new(system_bin("htpasswd")?)
                .args(["-Bbn", &c.username, &c.password])
                .output()
                .context("running htpasswd")?;
            if !out.status.success() {
                bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::fs::write(&htpasswd, &out.stdout)?;
            config
                .push_str(&format!("auth:\n  htpasswd:\n    realm: nodelet-test\n    path: {}\n", htpasswd.display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(system_bin("docker-registry")?);
        cmd.arg("serve").arg(&config_path);
        let mut proc = Process::spawn("docker-registry", cmd, dir.path())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            proc.ensure_running()?;
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on 127.0.0.1:{port}:\n{}", proc.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(Self { proc, port, credentials, dir })
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A full reference to `name:tag` in this registry.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.host())
    }

    /// The credentials it requires, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// The registry's storage root (`docker/registry/v2/...`), for tests that tamper with blobs.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The path of blob `digest` (`sha256:<hex>`) in the storage.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// The registry process ID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The fixture's directory; removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
