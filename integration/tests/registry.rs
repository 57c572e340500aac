//! The registry fixture serves the prebuilt test images, with the manifest formats the image service must handle,
//! and its authenticated flavour really rejects wrong credentials.

use anyhow::Result;
use nodelet_integration::images;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// A fresh client per identity: `oci-client` caches credentials per registry.
fn client() -> Client {
    Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() })
}

#[tokio::test]
async fn serves_every_test_image_with_its_manifest_format() -> Result<()> {
    if !ready("serves_every_test_image_with_its_manifest_format", &[Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let catalogue = images::catalogue()?;
    let kinds: Vec<&str> = catalogue.iter().map(|i| i.media_type.as_str()).collect();
    for kind in [ACCEPT[0], ACCEPT[1], ACCEPT[2]] {
        assert!(kinds.contains(&kind), "the store has no {kind} image: {kinds:?}");
    }
    for image in &catalogue {
        let reference: Reference = registry.reference(&image.name, &image.tag).parse()?;
        let (raw, digest) = client().pull_manifest_raw(&reference, &RegistryAuth::Anonymous, ACCEPT).await?;
        assert_eq!(digest, image.digest, "{}:{}", image.name, image.tag);
        let manifest: serde_json::Value = serde_json::from_slice(&raw)?;
        let media_type = manifest["mediaType"].as_str().unwrap_or(ACCEPT[0]);
        assert_eq!(media_type, image.media_type, "{}:{}", image.name, image.tag);
    }

    // The index resolves to this node's platform, and the amd64 image carries its marker file.
    let index: Reference = registry.reference("multiarch", "latest").parse()?;
    let (manifest, _digest, config) = client().pull_manifest_and_config(&index, &RegistryAuth::Anonymous).await?;
    let config: serde_json::Value = serde_json::from_str(&config)?;
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(manifest.layers.len(), 1);

    // agnhost runs /agnhost on top of the busybox layer, which it shares with busybox:latest.
    let agnhost = catalogue.iter().find(|i| i.name == "agnhost").expect("agnhost is in the store");
    let reference: Reference = registry.reference("agnhost", &agnhost.tag).parse()?;
    let (manifest, _, config) = client().pull_manifest_and_config(&reference, &RegistryAuth::Anonymous).await?;
    let config: serde_json::Value = serde_json::from_str(&config)?;
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/agnhost"]));
    let busybox: Reference = registry.reference("busybox", "latest").parse()?;
    let (busybox, _) = client().pull_image_manifest(&busybox, &RegistryAuth::Anonymous).await?;
    assert_eq!(manifest.layers.len(), 2);
    assert_eq!(manifest.layers[0].digest, busybox.layers[0].digest);
    Ok(())
}

#[tokio::test]
async fn authenticated_registry_accepts_right_and_rejects_wrong_credentials() -> Result<()> {
    if !ready("authenticated_registry_accepts_right_and_rejects_wrong_credentials", &[Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start_with_auth("tester", "s3cret").await?;
    let image = images::find("busybox", "latest")?;
    let reference: Reference = registry.reference("busybox", "latest").parse()?;

    let right = RegistryAuth::Basic("tester".into(), "s3cret".into());
    let (_, digest) = client().pull_manifest_raw(&reference, &right, ACCEPT).await?;
    assert_eq!(digest, image.digest);

    for wrong in [RegistryAuth::Basic("tester".into(), "wrong".into()), RegistryAuth::Anonymous] {
        let err = client().pull_manifest_raw(&reference, &wrong, ACCEPT).await.expect_err("must be refused");
        assert!(
            matches!(&err, OciDistributionError::UnauthorizedError { .. })
                || matches!(&err, OciDistributionError::ServerError { code: 401, .. }),
            "expected 401 Unauthorized, got {err:?}"
        );
    }
    Ok(())
}
