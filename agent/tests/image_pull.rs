//! The image service against real registries (Debian's docker-registry on loopback): manifest formats, auth,
//! tampered blobs, pull policies and reasons, shared downloads, overlay rootfs with whiteouts, crash recovery
//! and GC.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use nodelet::images::manager::reason;
use nodelet::images::pull::{Progress, RegistryConfig};
use nodelet::images::store::Store;
use nodelet::images::{ImageEvent, ImageManager, ImagesConfig, PullPolicy};
use nodelet_integration::images;
use nodelet_integration::layers::{Layer, push_image};
use nodelet_integration::proxy::Proxy;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};

fn manager(root: &Path, insecure: &[&str]) -> ImageManager {
    ImageManager::open(ImagesConfig {
        root_dir: root.to_owned(),
        registry: RegistryConfig {
            insecure_registries: insecure.iter().map(|s| s.to_string()).collect(),
            max_layer_bytes: None,
        },
        ..Default::default()
    })
    .unwrap()
}

/// Events recorded by one `ensure` call.
#[derive(Default)]
struct Events(Mutex<Vec<ImageEvent>>);

impl Events {
    fn reasons(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().iter().map(|e| e.reason).collect()
    }
    fn take(&self) -> Vec<ImageEvent> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

async fn ensure(
    m: &ImageManager,
    image: &str,
    policy: PullPolicy,
    secrets: &[Vec<u8>],
    events: &Events,
) -> Result<nodelet::images::ReadyImage, nodelet::images::ImageFailure> {
    let record = |e: ImageEvent| events.0.lock().unwrap().push(e);
    m.ensure(image, policy, secrets, &format!("pod_{image}"), Arc::new(Progress::default()), &record).await
}

fn docker_config(host: &str, user: &str, password: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"auths": {host: {"username": user, "password": password}}})).unwrap()
}

#[tokio::test]
async fn pulls_oci_schema2_and_multiarch_images_and_stores_shared_layers_once() -> Result<()> {
    if !ready("pulls_oci_schema2_and_multiarch_images", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let root = tempfile::tempdir()?;
    let m = manager(root.path(), &[&registry.host()]);
    let events = Events::default();
    for (name, tag) in
        [("busybox", "latest"), ("busybox-docker", "latest"), ("multiarch", "latest"), ("agnhost", "2.66.1")]
    {
        let image = registry.reference(name, tag);
        let ready = ensure(&m, &image, PullPolicy::Always, &[], &events).await.map_err(|f| anyhow::anyhow!("{f:?}"))?;
        let served = images::find(name, tag)?;
        // imageID is the digest the name resolved to: the index's for the multi-arch image.
        assert_eq!(ready.image_id, format!("{}/{name}@{}", registry.host(), served.digest));
        assert_eq!(ready.image, image);
        assert!(m.store().has_blob(&ready.record.manifest));
        let reasons = events.reasons();
        assert_eq!(&reasons[reasons.len() - 2..], ["Pulling", "Pulled"]);
        let pulled = events.take().pop().unwrap().message;
        assert!(pulled.starts_with(&format!("Successfully pulled image {image:?} in ")), "{pulled}");
        assert!(pulled.ends_with(&format!("Image size: {} bytes.", ready.record.size)), "{pulled}");
    }
    // The multi-arch index resolved to the amd64 image: its marker file says so.
    let multiarch = m.find(&registry.reference("multiarch", "latest"))?.unwrap();
    let rootfs = m.prepare_rootfs("multiarch-ctr", &multiarch, None)?;
    assert_eq!(std::fs::read_to_string(rootfs.join("platform"))?.trim(), "linux/amd64");
    m.rootfs().remove("multiarch-ctr")?;
    assert!(!rootfs.exists());

    // agnhost's first layer is busybox's: one blob and one unpacked layer for both.
    let busybox = m.find(&registry.reference("busybox", "latest"))?.unwrap().record;
    let agnhost = m.find(&registry.reference("agnhost", "2.66.1"))?.unwrap().record;
    assert_eq!(busybox.layers[0].chain_id, agnhost.layers[0].chain_id);
    let layer_dirs = std::fs::read_dir(root.path().join("images/layers"))?.count();
    let distinct: HashSet<_> = m.store().images()?.iter().flat_map(|r| r.layers.clone()).map(|l| l.chain_id).collect();
    assert_eq!(layer_dirs, distinct.len());
    assert_eq!(m.store().check()?, Vec::<String>::new());

    // A container on agnhost sees both layers merged and writes only to its own upper dir.
    let ready = m.find(&registry.reference("agnhost", "2.66.1"))?.unwrap();
    let rootfs = m.prepare_rootfs("c1", &ready, None)?;
    assert!(rootfs.join("agnhost").is_file() && rootfs.join("bin/busybox").is_file());
    std::fs::write(rootfs.join("written"), "by the container")?;
    assert!(root.path().join("rootfs/c1/upper/written").is_file());
    assert!(!m.store().layer_path(&agnhost.layers[1].chain_id).join("written").exists());
    m.rootfs().remove("c1")?;
    Ok(())
}

#[tokio::test]
async fn whiteouts_and_opaque_directories_hide_lower_files_in_the_overlay() -> Result<()> {
    if !ready("whiteouts_and_opaque_directories", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let lower = Layer::new()
        .dir("a", 0o755)
        .file("a/keep", b"kept", 0o644)
        .file("a/gone", b"deleted above", 0o644)
        .dir("opq", 0o755)
        .file("opq/old", b"hidden by opaque", 0o644)
        .file("opq/sub/deep", b"hidden too", 0o644)
        .tar();
    let upper = Layer::new()
        .dir("a", 0o755)
        .file("a/.wh.gone", b"", 0o644)
        .dir("opq", 0o755)
        .file("opq/.wh..wh..opq", b"", 0o644)
        .file("opq/new", b"fresh", 0o644)
        .tar();
    push_image(&registry, "two-layers", "v1", &[lower, upper]).await?;
    let root = tempfile::tempdir()?;
    let m = manager(root.path(), &[&registry.host()]);
    let ready = ensure(&m, &registry.reference("two-layers", "v1"), PullPolicy::IfNotPresent, &[], &Events::default())
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    let rootfs = m.prepare_rootfs("c", &ready, None)?;
    let list = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(rootfs.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(list("a"), ["keep"]);
    assert_eq!(list("opq"), ["new"]);
    assert_eq!(std::fs::read_to_string(rootfs.join("a/keep"))?, "kept");
    // Deleting a lower file inside the container is a whiteout in its upper dir only.
    std::fs::remove_file(rootfs.join("a/keep"))?;
    assert!(!rootfs.join("a/keep").exists());
    assert!(m.store().layer_path(&ready.record.layers[0].chain_id).join("a/keep").exists());
    m.rootfs().remove("c")?;
    Ok(())
}

#[tokio::test]
async fn credentials_from_pull_secrets_and_clear_errors_without_them() -> Result<()> {
    if !ready("credentials_from_pull_secrets", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start_with_auth("puller", "right-password").await?;
    let image = registry.reference("busybox", "latest");
    let root = tempfile::tempdir()?;
    let m = manager(root.path(), &[&registry.host()]);

    let events = Events::default();
    let wrong = docker_config(&registry.host(), "puller", "wrong-password");
    let failure = ensure(&m, &image, PullPolicy::Always, &[wrong], &events).await.unwrap_err();
    assert_eq!(failure.reason, reason::ERR_IMAGE_PULL);
    assert!(failure.message.contains("pull access denied"), "{}", failure.message);
    let failed = events.take().pop().unwrap();
    assert!(failed.warning && failed.reason == "Failed");
    assert!(failed.message.starts_with(&format!("Failed to pull image {image:?}: failed to pull and unpack")));

    let root2 = tempfile::tempdir()?;
    let m = manager(root2.path(), &[&registry.host()]);
    let failure = ensure(&m, &image, PullPolicy::Always, &[], &events).await.unwrap_err();
    assert!(failure.message.contains("pull access denied"), "anonymous: {}", failure.message);

    // A wrong secret first, the right one second: the second is tried after the registry refuses the first.
    let root3 = tempfile::tempdir()?;
    let m = manager(root3.path(), &[&registry.host()]);
    let secrets = [
        docker_config(&registry.host(), "puller", "wrong-password"),
        docker_config(&format!("http://{}/busybox", registry.host()), "puller", "right-password"),
    ];
    let ready =
        ensure(&m, &image, PullPolicy::Always, &secrets, &events).await.map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert!(ready.image_id.contains("@sha256:"));

    // The node's own credentials file works the same way.
    let root4 = tempfile::tempdir()?;
    let creds = root4.path().join("config.json");
    std::fs::write(&creds, docker_config(&registry.host(), "puller", "right-password"))?;
    let m = ImageManager::open(ImagesConfig {
        root_dir: root4.path().join("root"),
        registry: RegistryConfig { insecure_registries: vec![registry.host()], max_layer_bytes: None },
        credentials_file: Some(creds.clone()),
        ..Default::default()
    })?;
    ensure(&m, &image, PullPolicy::Always, &[], &events).await.map_err(|f| anyhow::anyhow!("{f:?}"))?;
    drop(m);
    // A credentials file that is not a docker config is a startup error.
    std::fs::write(&creds, "{not json")?;
    let err = ImageManager::open(ImagesConfig {
        root_dir: root4.path().join("root"),
        credentials_file: Some(creds),
        ..Default::default()
    })
    .err()
    .expect("a broken credentials file is refused");
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn a_tampered_blob_is_rejected_and_never_stored() -> Result<()> {
    if !ready("a_tampered_blob_is_rejected", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let root = tempfile::tempdir()?;
    let m = manager(root.path(), &[&registry.host()]);
    // Read the layer digest through a clean pull elsewhere, then flip one byte of that blob in the registry.
    let probe = tempfile::tempdir()?;
    let ready = ensure(
        &manager(probe.path(), &[&registry.host()]),
        &registry.reference("busybox", "latest"),
        PullPolicy::Always,
        &[],
        &Events::default(),
    )
    .await
    .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    let layer = ready.record.layers[0].digest.clone();
    let path = registry.blob_path(layer.as_str());
    let mut data = std::fs::read(&path)?;
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&path, &data)?;

    let failure = ensure(&m, &registry.reference("busybox", "latest"), PullPolicy::Always, &[], &Events::default())
        .await
        .unwrap_err();
    assert_eq!(failure.reason, reason::ERR_IMAGE_PULL);
    assert!(failure.message.contains(&format!("layer {layer} failed verification")), "{}", failure.message);
    assert!(!m.store().has_blob(&layer));
    assert!(m.store().images()?.is_empty());
    assert_eq!(m.store().check()?, Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn pull_policies_back_off_and_upstream_reasons() -> Result<()> {
    if !ready("pull_policies_back_off_and_upstream_reasons", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let root = tempfile::tempdir()?;
    let m = manager(root.path(), &[&registry.host()]);
    let events = Events::default();
    let image = registry.reference("busybox", "latest");

    let f = ensure(&m, &image, PullPolicy::Never, &[], &events).await.unwrap_err();
    assert_eq!(f.reason, reason::ERR_IMAGE_NEVER_PULL);
    assert_eq!(f.message, format!("Container image {image:?} is not present with pull policy of Never"));

    let f = ensure(&m, "Not/A:Valid:Name", PullPolicy::IfNotPresent, &[], &events).await.unwrap_err();
    assert_eq!(f.reason, reason::INVALID_IMAGE_NAME);
    assert!(f.message.starts_with("Failed to apply default image tag \"Not/A:Valid:Name\""), "{}", f.message);

    ensure(&m, &image, PullPolicy::IfNotPresent, &[], &events).await.map_err(|f| anyhow::anyhow!("{f:?}"))?;
    events.take();
    ensure(&m, &image, PullPolicy::IfNotPresent, &[], &events).await.map_err(|f| anyhow::anyhow!("{f:?}"))?;
    ensure(&m, &image, PullPolicy::Never, &[], &events).await.map_err(|f| anyhow::anyhow!("{f:?}"))?;
    let present = events.take();
    assert_eq!(present.len(), 2);
    assert!(present.iter().all(|e| e.message == format!("Container image {image:?} already present on machine")));

    // A missing image: ErrImagePull, then ImagePullBackOff (no registry call) until the back-off passes.
    let missing = registry.reference("no-such-image", "1.0");
    let f = ensure(&m, &missing, PullPolicy::IfNotPresent, &[], &events).await.unwrap_err();
    assert_eq!(f.reason, reason::ERR_IMAGE_PULL);
    assert!(f.message.contains("not found"), "{}", f.message);
    let f = ensure(&m, &missing, PullPolicy::IfNotPresent, &[], &events).await.unwrap_err();
    assert_eq!(f.reason, reason::IMAGE_PULL_BACK_OFF);
    assert!(f.message.starts_with(&format!("Back-off pulling image {missing:?}: ErrImagePull: ")), "{}", f.message);
    assert_eq!(events.reasons(), ["Pulling", "Failed", "BackOff"]);

    // An unreachable registry is a clear ErrImagePull too (plain HTTP to a closed port).
    let closed = format!("127.0.0.1:{}", nodelet_integration::ports::free_port()?);
    let root2 = tempfile::tempdir()?;
    let m2 = manager(root2.path(), &[&closed]);
    let f = ensure(&m2, &format!("{closed}/busybox:1"), PullPolicy::IfNotPresent, &[], &events).await.unwrap_err();
    assert_eq!(f.reason, reason::ERR_IMAGE_PULL);
    assert!(f.message.to_lowercase().contains("connect"), "{}", f.message);
    Ok(())
}

#[tokio::test]
async fn concurrent_pulls_share_one_download() -> Result<()> {
    if !ready("concurrent_pulls_share_one_download", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.host()).await?;
    let root = tempfile::tempdir()?;
    let m = Arc::new(manager(root.path(), &[proxy.host()]));
    let image = format!("{}/agnhost:2.66.1", proxy.host());
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (m, image) = (m.clone(), image.clone());
        tasks.push(tokio::spawn(async move {
            let progress = Arc::new(Progress::default());
            let ignore = |_e: ImageEvent| {};
            let r = m.ensure(&image, PullPolicy::Always, &[], &format!("pod{i}"), progress.clone(), &ignore).await;
            (r.map(|r| r.record.size), progress)
        }));
    }
    let mut size = 0;
    for t in tasks {
        let (r, progress) = t.await?;
        size = r.map_err(|f| anyhow::anyhow!("{f:?}"))?;
        let (done, total) = (
            progress.done.load(std::sync::atomic::Ordering::SeqCst),
            progress.total.load(std::sync::atomic::Ordering::SeqCst),
        );
        assert_eq!(done, total, "progress ends complete");
    }
    // One process at a time: a second opener gets a clear error instead of racing the first one's recovery.
    let second = Store::open(root.path().join("images")).unwrap_err().to_string();
    assert!(second.contains("in use by another nodelet process"), "{second}");
    let served = proxy.served();
    assert!(served < size + size / 2, "4 concurrent pulls of {size} bytes moved {served} bytes");
    assert_eq!(m.store().check()?, Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn a_pull_killed_at_any_point_leaves_a_consistent_store_and_completes_later() -> Result<()> {
    if !ready("a_pull_killed_at_any_point", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.host()).await?;
    let root = tempfile::tempdir()?;
    let nodelet = env!("CARGO_BIN_EXE_nodelet");
    let pull = |host: &str| {
        let mut cmd = tokio::process::Command::new(nodelet);
        cmd.arg("image")
            .arg("pull")
            .arg(format!("{host}/agnhost:2.66.1"))
            .arg("--root-dir")
            .arg(root.path())
            .arg("--insecure-registry")
            .arg(host)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd
    };

    // Mid-download: the proxy stalls after 5 MB, the pull sits on a half-written blob, and is killed.
    proxy.stall_after(5 << 20);
    let mut child = pull(proxy.host()).spawn()?;
    let ingest = root.path().join("images/ingest");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while proxy.served() < 5 << 20 || dir_bytes(&ingest) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the pull never got 5 MB into a blob");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await?;
    assert!(dir_bytes(&ingest) > 0, "a partial download was on disk when killed");
    let store = Store::open(root.path().join("images"))?;
    assert_eq!(store.check()?, Vec::<String>::new(), "open repairs the store");
    assert_eq!(dir_bytes(&ingest), 0);

    // Killed at spread-out moments (download, unpack, commit): each time the store is consistent after open.
    for delay_ms in [50, 150, 300, 450, 600, 800, 1000] {
        std::fs::remove_dir_all(root.path())?;
        let mut child = pull(&registry.host()).spawn()?;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let _ = child.kill().await;
        let store = Store::open(root.path().join("images"))?;
        assert_eq!(store.check()?, Vec::<String>::new(), "after a kill at {delay_ms} ms");
        for image in store.images()? {
            assert!(image.chain_ids().all(|c| store.has_layer(c)), "a recorded image is complete");
        }
    }
    // And the pull then completes, reusing what was committed.
    let status = pull(&registry.host()).status().await?;
    assert!(status.success());
    let store = Store::open(root.path().join("images"))?;
    assert_eq!(store.check()?, Vec::<String>::new());
    assert_eq!(store.images()?.len(), 1);
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// A tmpfs of `size_mib` mounted on a temp dir, unmounted on drop: a small image filesystem for GC.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mib: u64) -> Result<SmallFs> {
        let dir = tempfile::tempdir()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "nodelet-gc-test"])
            .arg(dir.path())
            .status()?;
        anyhow::ensure!(status.success(), "mounting a tmpfs failed");
        Ok(SmallFs { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn gc_frees_space_from_unused_images_only() -> Result<()> {
    if !ready("gc_frees_space_from_unused_images_only", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    use nodelet::images::gc::{GcPolicy, filesystem_usage};
    let registry = Registry::start().await?;
    let fs = SmallFs::mount(256)?;
    let open = |minimum_age: Duration| {
        ImageManager::open(ImagesConfig {
            root_dir: fs.dir.path().to_owned(),
            registry: RegistryConfig { insecure_registries: vec![registry.host()], max_layer_bytes: None },
            gc: GcPolicy { minimum_age, ..Default::default() },
            ..Default::default()
        })
    };
    let m = open(Duration::ZERO)?;
    let events = Events::default();
    let mut pulled = Vec::new();
    for (name, tag) in
        [("agnhost", "2.66.1"), ("multiarch", "latest"), ("busybox-docker", "latest"), ("busybox", "latest")]
    {
        let r = ensure(&m, &registry.reference(name, tag), PullPolicy::Always, &[], &events)
            .await
            .map_err(|f| anyhow::anyhow!("{f:?}"))?;
        pulled.push(r);
    }
    // busybox runs in a container; busybox-docker is in use by a container the caller knows of.
    m.prepare_rootfs("running", &pulled[3], None)?;
    let in_use: HashSet<_> = [pulled[2].record.manifest.clone()].into();

    // Below the high threshold nothing happens.
    let report = m.garbage_collect(&in_use)?;
    assert!(report.removed.is_empty() && report.bytes_to_free == 0, "{report:?}");

    // Fill the filesystem to 90%: GC must free down to 80%.
    let (used, capacity) = filesystem_usage(fs.dir.path())?;
    let filler = fs.dir.path().join("filler");
    std::fs::write(&filler, vec![1u8; usize::try_from(capacity * 90 / 100 - used)?])?;

    // Too young to collect (imageMinimumGCAge): nothing goes.
    let young = GcPolicy { minimum_age: Duration::from_secs(3600), ..Default::default() };
    let mut all_in_use = in_use.clone();
    all_in_use.extend(m.rootfs().images_in_use()?);
    let report = nodelet::images::gc::collect(m.store(), &young, &all_in_use)?;
    assert!(report.usage_percent_before >= 85 && report.removed.is_empty(), "{report:?}");

    let report = m.garbage_collect(&in_use)?;
    assert!(report.bytes_freed >= report.bytes_to_free, "{report:?}");
    let (used, capacity) = filesystem_usage(fs.dir.path())?;
    assert!(used * 100 / capacity <= 80, "usage after GC: {}%", used * 100 / capacity);
    let kept: HashSet<_> = m.store().images()?.into_iter().map(|r| r.manifest).collect();
    assert!(kept.contains(&pulled[3].record.manifest), "the image a container runs on stays");
    assert!(kept.contains(&pulled[2].record.manifest), "the image the caller marks in use stays");
    assert!(!report.removed.is_empty());
    for removed in &report.removed {
        assert!(!kept.contains(removed));
        assert!(!m.store().has_blob(removed));
    }
    // The shared busybox layer is still there for the running container; the store is consistent.
    assert!(m.store().has_layer(&pulled[3].record.layers[0].chain_id));
    assert_eq!(m.store().check()?, Vec::<String>::new());
    m.rootfs().remove("running")?;
    Ok(())
}
