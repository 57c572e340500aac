//! Certificates from the API server: a key and a PKCS#10 request made here, a CertificateSigningRequest sent,
//! and its outcome awaited on a watch of that object (approved and issued, denied, or failed), as client-go's
//! `RequestCertificate` and `WaitForCertificate` do.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use kube::Api;
use kube::api::PostParams;
use kube::runtime::watcher;
use rcgen::PublicKeyData;
use sha2::Digest;

/// The signer of kubelet client certificates (`system:node:<name>` in `system:nodes`).
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The signer of kubelet serving certificates.
pub const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";

/// What a certificate asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub signer: &'static str,
    pub common_name: String,
    pub organization: String,
    /// Subject alternative names (serving certificates): DNS names and IP addresses.
    pub dns_names: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub usages: Vec<&'static str>,
}

impl Request {
    /// A kubelet client certificate for `node`.
    pub fn client(node: &str) -> Request {
        Request {
            signer: CLIENT_SIGNER,
            common_name: format!("system:node:{node}"),
            organization: "system:nodes".into(),
            dns_names: Vec::new(),
            ips: Vec::new(),
            // An ECDSA key: no key encipherment (upstream adds it for RSA keys only).
            usages: vec!["digital signature", "client auth"],
        }
    }

    /// A kubelet serving certificate for `node`, valid for its host names and addresses.
    pub fn serving(node: &str, dns_names: Vec<String>, ips: Vec<std::net::IpAddr>) -> Request {
        Request {
            signer: SERVING_SIGNER,
            common_name: format!("system:node:{node}"),
            organization: "system:nodes".into(),
            dns_names,
            ips,
            usages: vec!["digital signature", "server auth"],
        }
    }

    /// The PKCS#10 request for `key`, PEM.
    pub fn pkcs10(&self, key: &rcgen::KeyPair) -> Result<String, CsrError> {
        let mut params = rcgen::CertificateParams::new(self.dns_names.clone()).map_err(CsrError::Build)?;
        params.subject_alt_names.extend(self.ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, self.organization.clone());
        params.distinguished_name.push(rcgen::DnType::CommonName, self.common_name.clone());
        let csr = params.serialize_request(key).map_err(CsrError::Build)?;
        csr.pem().map_err(CsrError::Build)
    }

    /// A name for the request that is the same for the same key and subject (upstream's `node-csr-<digest>`),
    /// so that an agent restarted while waiting finds the request it sent.
    pub fn digested_name(&self, key: &rcgen::KeyPair) -> String {
        use base64::Engine;
        let mut h = sha2::Sha256::new();
        h.update(key.subject_public_key_info());
        h.update(self.common_name.as_bytes());
        h.update(self.organization.as_bytes());
        for u in &self.usages {
            h.update(u.as_bytes());
        }
        format!("node-csr-{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize()))
    }
}

/// A new private key: ECDSA P-256, as upstream's kubelet makes.
pub fn new_key() -> Result<rcgen::KeyPair, CsrError> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CsrError::Build)
}

/// Why no certificate came.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("building the certificate request: {0}")]
    Build(rcgen::Error),
    #[error("sending the certificate signing request: {0}")]
    Send(kube::Error),
    #[error("certificate signing request is denied, reason: {reason}, message: {message}")]
    Denied { reason: String, message: String },
    #[error("certificate signing request failed, reason: {reason}, message: {message}")]
    Failed { reason: String, message: String },
    #[error("timed out after {0:?} waiting for the certificate signing request {1} to be approved and issued")]
    Timeout(Duration, String),
    #[error("watching the certificate signing request: {0}")]
    Watch(String),
}

/// Where a CertificateSigningRequest stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Issued(String),
    Denied { reason: String, message: String },
    Failed { reason: String, message: String },
}

/// The outcome a CertificateSigningRequest's status shows (a denial or failure wins over an approval).
pub fn outcome(csr: &CertificateSigningRequest) -> Outcome {
    let status = csr.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let find = |t: &str| conditions.iter().find(|c| c.type_ == t && c.status != "False");
    let words = |c: &k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition| {
        (c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default())
    };
    if let Some(c) = find("Denied") {
        let (reason, message) = words(c);
        return Outcome::Denied { reason, message };
    }
    if let Some(c) = find("Failed") {
        let (reason, message) = words(c);
        return Outcome::Failed { reason, message };
    }
    match status.certificate {
        Some(ByteString(cert)) if find("Approved").is_some() && !cert.is_empty() => {
            Outcome::Issued(String::from_utf8_lossy(&cert).into_owned())
        }
        _ => Outcome::Pending,
    }
}

/// Sends the request for `key` (named `name`, or a generated `csr-` name) and waits up to `timeout` for the
/// certificate chain (PEM). A request of that name that exists already is waited on instead.
pub async fn request_certificate(
    client: &kube::Client,
    request: &Request,
    key: &rcgen::KeyPair,
    name: Option<String>,
    timeout: Duration,
) -> Result<String, CsrError> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let mut csr = CertificateSigningRequest {
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.pkcs10(key)?.into_bytes()),
            signer_name: request.signer.to_string(),
            usages: Some(request.usages.iter().map(|u| u.to_string()).collect()),
            ..Default::default()
        },
        ..Default::default()
    };
    match &name {
        Some(n) => csr.metadata.name = Some(n.clone()),
        None => csr.metadata.generate_name = Some("csr-".into()),
    }
    let created = match api.create(&PostParams::default(), &csr).await {
        Ok(c) => c,
        Err(kube::Error::Api(s)) if s.code == 409 && name.is_some() => {
            api.get(name.as_deref().unwrap_or_default()).await.map_err(CsrError::Send)?
        }
        Err(e) => return Err(CsrError::Send(e)),
    };
    let name = created.metadata.name.clone().unwrap_or_default();
    tracing::info!(csr = %name, signer = request.signer, "certificate signing request sent, waiting for approval");
    let wait = async {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(api.clone(), config).boxed();
        while let Some(event) = events.next().await {
            let objects = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![o],
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "watching the certificate signing request (retried)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            for o in objects {
                match outcome(&o) {
                    Outcome::Pending => {}
                    Outcome::Issued(chain) => return Ok(chain),
                    Outcome::Denied { reason, message } => return Err(CsrError::Denied { reason, message }),
                    Outcome::Failed { reason, message } => return Err(CsrError::Failed { reason, message }),
                }
            }
        }
        Err(CsrError::Watch("the watch ended".into()))
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| CsrError::Timeout(timeout, name))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    fn csr(conditions: serde_json::Value, certificate: Option<&str>) -> CertificateSigningRequest {
        use base64::Engine;
        let cert = certificate.map(|c| base64::engine::general_purpose::STANDARD.encode(c));
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"}, "spec": {"request": "", "signerName": CLIENT_SIGNER},
            "status": {"conditions": conditions, "certificate": cert}
        }))
        .unwrap()
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(&csr(serde_json::json!([]), None)), Outcome::Pending);
        let approved = serde_json::json!([{"type": "Approved", "status": "True"}]);
        assert_eq!(outcome(&csr(approved.clone(), None)), Outcome::Pending, "approved, not issued yet");
        assert_eq!(outcome(&csr(approved, Some("PEM"))), Outcome::Issued("PEM".into()));
        let denied = serde_json::json!([{"type": "Denied", "status": "True", "reason": "Nope", "message": "no"}]);
        assert_eq!(outcome(&csr(denied, None)), Outcome::Denied { reason: "Nope".into(), message: "no".into() });
        let failed = serde_json::json!([{"type": "Approved", "status": "True"},
            {"type": "Failed", "status": "True", "reason": "SignerError", "message": "broken"}]);
        assert_eq!(
            outcome(&csr(failed, Some("PEM"))),
            Outcome::Failed { reason: "SignerError".into(), message: "broken".into() }
        );
    }

    #[test]
    fn requests_carry_the_node_identity() {
        let key = new_key().unwrap();
        let request = Request::client("node-a");
        let pem = request.pkcs10(&key).unwrap();
        let der = pem::parse(&pem).unwrap().into_contents();
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        let subject = parsed.certification_request_info.subject.to_string();
        assert_eq!(subject, "O=system:nodes, CN=system:node:node-a");
        assert_eq!(request.digested_name(&key), request.digested_name(&key));
        assert_ne!(request.digested_name(&key), request.digested_name(&new_key().unwrap()));
        assert!(request.digested_name(&key).starts_with("node-csr-"));
        let serving = Request::serving("node-a", vec!["node-a".into()], vec!["10.0.0.7".parse().unwrap()]);
        let der = pem::parse(serving.pkcs10(&key).unwrap()).unwrap().into_contents();
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        let sans = format!("{:?}", parsed.requested_extensions().map(|e| e.collect::<Vec<_>>()));
        assert!(sans.contains("node-a") && sans.contains("10, 0, 0, 7"), "{sans}");
    }
}
