//! Upstream's own conformance specs (`e2e.test`, Ginkgo) against a cluster whose only node is nodelet: the
//! suite a Kubernetes user would judge a node by. Not part of `cargo test` (the NodeConformance specs take
//! hours); run by hand:
//!
//!     integration/scripts/build-e2e.sh
//!     cargo test -p nodelet --test conformance -- --ignored --nocapture
//!
//! `E2E_FOCUS` and `E2E_SKIP` are Ginkgo regexes (default: every `[NodeConformance]` spec, skipping the ones that
//! need what this test bed has not: images it cannot build offline, more than one node); focuses separated by
//! ` ;; ` run side by side, each in an `e2e.test` of its own. The JUnit report and
//! the node's log land in `E2E_REPORT_DIR` (default a temp dir, printed). `E2E_LOOPBACK_NETWORK=1` gives the pods
//! loopback only, for a second run beside one that has nodelet's pod network (bridge `nodelet0`).
//!
//! The images upstream's specs name (`registry.k8s.io/e2e-test-images/...`) come from the test bed's registry,
//! through e2e's own `KUBE_TEST_REPO_LIST` mapping: agnhost is built from upstream's source at the release's
//! tag (with a `/bin/bash` that runs busybox's `sh`), busybox is the test bed's, `pause` is agnhost's,
//! `nonewprivs` upstream's program on busybox, `nonroot` busybox with user 1234.

mod support;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use nodelet_integration::cluster::Cluster;
use nodelet_integration::layers::{Layer, extend_image, push_image_with_cmd};
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, cache_dir, control_plane_bin, k8s_version, ready};
use support::{HostAddress, Nodelet, wait_node_ready};

/// Specs that cannot pass on any single offline node, whatever the node does: they need images the test bed
/// cannot build without a container registry (nginx, httpd, the private-registry ones), or a second node.
const DEFAULT_SKIP: &str = r"\[Serial\]|\[Disruptive\]|\[Flaky\]|\[Feature:|private registry|nginx|httpd";

/// `(source, alias)`: the test bed's images under the names upstream's image manifest gives them. Stand-ins as
/// busybox: nginx (specs that only swap images, e.g. the back-off reset on an image update) and glibc-dns-testing
/// (the hostname specs run `hostname` and `hostname -f` in it).
const ALIASES: &[(&str, &str)] = &[
    ("busybox:latest", "e2e-test-images/busybox:1.37.0-2"),
    ("busybox:latest", "e2e-test-images/nginx:1.27.0-2"),
    ("busybox:latest", "e2e-test-images/nginx:1.28.0-2"),
    ("busybox:latest", "e2e-test-images/glibc-dns-testing:2.1.1"),
];

/// `curl [-g -q -s] [--max-time N] [--connect-timeout N] URL`, as the networking specs call it, with wget (under
/// `timeout`: Debian's busybox wget crashes with its own `-T`).
const CURL: &str = r#"#!/bin/sh
t=15; url=
while [ $# -gt 0 ]; do
  case "$1" in --max-time) t=$2; shift ;; --connect-timeout) shift ;; -*) ;; *) url=$1 ;; esac
  shift
done
exec timeout "$t" wget -q -O - "$url"
"#;

fn e2e_binary() -> Result<PathBuf> {
    let bin = cache_dir().join(format!("k8s-{}/bin/e2e.test", k8s_version()));
    ensure!(bin.exists(), "{} is missing: run integration/scripts/build-e2e.sh", bin.display());
    Ok(bin)
}

/// The kubelet's port, 10250, unless something listens there (another node): some specs reach the kubelet API
/// through the API server's node proxy at that port by name.
fn kubelet_port() -> Result<u16> {
    match std::net::TcpListener::bind(("0.0.0.0", 10250)) {
        Ok(_) => Ok(10250),
        Err(_) => nodelet_integration::ports::free_port(),
    }
}

fn skopeo_alias(registry: &Registry, from: &str, to: &str) -> Result<()> {
    let out = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{}/{from}", registry.host()))
        .arg(format!("docker://{}/{to}", registry.host()))
        .output()
        .context("running skopeo")?;
    ensure!(out.status.success(), "skopeo {from} -> {to}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test]
#[ignore = "hours: run by hand (see the module's doc)"]
async fn upstream_node_conformance() -> Result<()> {
    if !ready("upstream_node_conformance", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let e2e = e2e_binary()?;
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    for (from, to) in ALIASES {
        skopeo_alias(&registry, from, to)?;
    }
    // Upstream's agnhost image has bash, which some specs run scripts with; the test bed's has busybox's sh,
    // which runs them as well.
    let tls = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    // Nor has it curl, which the networking specs GET pod addresses with: busybox's wget stands in.
    let bash = Layer::new()
        .dir("bin", 0o755)
        .file("bin/bash", b"#!/bin/sh\nexec /bin/sh \"$@\"\n", 0o755)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/curl", CURL.as_bytes(), 0o755)
        // And the self-signed pair its image carries for `netexec --tls-cert-file` (the HTTPS hook specs).
        .file("localhost.crt", tls.cert.pem().as_bytes(), 0o644)
        .file("localhost.key", tls.signing_key.serialize_pem().as_bytes(), 0o644)
        .tar();
    for tag in ["2.66.1", "2.55"] {
        // Upstream's runs `pause` when given no arguments (Deployments in the apps specs rely on it).
        extend_image(&registry, ("agnhost", "2.66.1"), ("e2e-test-images/agnhost", tag), &bash, |config| {
            config["config"]["Cmd"] = serde_json::json!(["pause"]);
        })
        .await?;
    }
    // Upstream's nonewprivs image: its `nnp` (built by build-e2e.sh), setuid root, run by default.
    let nnp = std::fs::read(control_plane_bin("nnp")?)?;
    let nnp = Layer::new()
        .dir("usr", 0o755)
        .dir("usr/local", 0o755)
        .dir("usr/local/bin", 0o755)
        .owned_file("usr/local/bin/nnp", &nnp, 0o6755, 0, 0)
        .tar();
    extend_image(&registry, ("busybox", "latest"), ("e2e-test-images/nonewprivs", "1.4"), &nnp, |config| {
        config["config"]["Entrypoint"] = serde_json::Value::Null;
        config["config"]["Cmd"] = serde_json::json!(["nnp"]);
        config["config"]["Env"] =
            serde_json::json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    })
    .await?;
    // Upstream's nonroot image: busybox whose default user is 1234.
    let etc = Layer::new().dir("etc", 0o755).tar();
    extend_image(&registry, ("busybox", "latest"), ("e2e-test-images/nonroot", "1.5"), &etc, |config| {
        config["config"]["User"] = serde_json::json!("1234");
    })
    .await?;
    // Upstream's pause image, as agnhost's `pause` (the same behaviour: sleep until a signal ends it).
    let agnhost = std::fs::read(control_plane_bin("agnhost")?)?;
    let layer = Layer::new().file("agnhost", &agnhost, 0o755).tar();
    push_image_with_cmd(&registry, "pause", "3.10.2", &[layer], &["/agnhost", "pause"]).await?;
    let report = match std::env::var_os("E2E_REPORT_DIR") {
        Some(d) => PathBuf::from(d),
        None => tempfile::Builder::new().prefix("nodelet-conformance-").tempdir()?.keep(),
    };
    std::fs::create_dir_all(&report)?;
    let repo_list = report.join("repo-list.yaml");
    let host = registry.host();
    std::fs::write(
        &repo_list,
        format!(
            "promoterE2eRegistry: {host}/e2e-test-images\nbuildImageRegistry: {host}/build-image\n\
             gcRegistry: {host}\ngcEtcdRegistry: {host}\nsigStorageRegistry: {host}/sig-storage\n\
             privateRegistry: {host}/private\ndockerLibraryRegistry: {host}/library\n\
             cloudProviderGcpRegistry: {host}/cloud-provider-gcp\n"
        ),
    )?;

    // An address other than loopback, which the API server proxies to (`nodes/proxy` refuses loopback), and
    // nodelet's own pod network (bridge and addresses on the host), as on a real node.
    // Named by the process: two runs side by side have a node (and cgroup sandbox) each.
    let id = std::process::id();
    let node_name = format!("nodelet-conformance-{id}");
    let address = HostAddress::create(&format!("conf{id}"), 200 + u8::try_from(id % 50)?)?;
    let kubeconfig = cluster.node_kubeconfig(&node_name)?;
    let args = vec![
        "--kubeconfig".to_string(),
        kubeconfig.display().to_string(),
        "--port".into(),
        kubelet_port()?.to_string(),
        "--client-ca-file".into(),
        cluster.pki().ca().cert.display().to_string(),
        "--insecure-registry".into(),
        host.clone(),
    ];
    // E2E_LOOPBACK_NETWORK=1: pods get loopback only (for a second run beside one that has the pod network).
    let loopback = match std::env::var("E2E_LOOPBACK_NETWORK").as_deref() {
        Ok("1") => Some(support::loopback_only_network()?),
        _ => None,
    };
    let mut args = args;
    if let Some(net_d) = &loopback {
        args.extend(["--cni-conf-dir".into(), net_d.path().display().to_string()]);
    }
    let node = Nodelet::start_with_ip(&node_name, "", &address.ip, &args)?;
    wait_node_ready(&cluster.admin().await?, &node_name).await?;

    // Each focus its own e2e.test process, side by side (a compiled Ginkgo suite runs its specs one at a time;
    // most of a node spec's time is waiting).
    let focuses = std::env::var("E2E_FOCUS").unwrap_or_else(|_| r"\[NodeConformance\]".into());
    let skip = std::env::var("E2E_SKIP").unwrap_or_else(|_| DEFAULT_SKIP.into());
    println!("conformance: report in {}", report.display());
    let mut runs = Vec::new();
    for (i, focus) in focuses.split(" ;; ").enumerate() {
        let log = std::fs::File::create(report.join(format!("e2e-{i}.log")))?;
        let child = Command::new(&e2e)
            .env("KUBE_TEST_REPO_LIST", &repo_list)
            .arg(format!("--kubeconfig={}", cluster.admin_kubeconfig().display()))
            .arg("--provider=skeleton")
            .arg(format!("--report-dir={}", report.join(format!("junit-{i}")).display()))
            .arg(format!("--ginkgo.focus={focus}"))
            .arg(format!("--ginkgo.skip={skip}"))
            .args(["--ginkgo.no-color", "--ginkgo.timeout=6h"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("running e2e.test")?;
        runs.push((focus.to_string(), support::ChildGuard(child)));
    }
    let mut failed = Vec::new();
    for (focus, mut run) in runs {
        if !run.0.wait()?.success() {
            failed.push(focus);
        }
    }
    std::fs::write(report.join("nodelet.log"), node.log())?;
    ensure!(failed.is_empty(), "specs failed under {failed:?}: see e2e-*.log and nodelet.log in {}", report.display());
    Ok(())
}
