//! Standalone mode, as the README runs it: no API server, the shipped example manifests as static pods, the
//! image imported from an OCI layout; `nodelet ps`, `nodelet logs` and `nodelet exec` reach the pods; manifests
//! added, changed, broken and removed while the node runs.

mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{Netns, Nodelet, wait_for};

use support::nodelet_cli as nodelet;

/// The `nodelet ps` row of a pod whose name starts with `name`.
fn row(ps: &str, name: &str) -> Option<String> {
    ps.lines()
        .find(|l| l.split_whitespace().nth(1).is_some_and(|n| n.starts_with(&format!("{name}-"))))
        .map(str::to_owned)
}

/// Runs `nodelet exec` with `stdin` fed: (exit code, stdout, stderr).
fn exec(args: &[&str], stdin: &[u8]) -> Result<(i32, String, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nodelet"))
        .arg("exec")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr)))
}

/// `nodelet exec` on the running static pod `hello` (named by the part before its node-name suffix): output,
/// exit code, stdin to EOF, a terminal with its size, and the errors for a pod or container that is not there.
fn check_exec(root: &str) -> Result<()> {
    let (code, out, err) =
        exec(&["--root-dir", root, "hello", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3"], b"")?;
    ensure!((code, out.as_str(), err.as_str()) == (3, "to-out\n", "to-err\n"), "{code} {out:?} {err:?}");
    let (code, out, err) =
        exec(&["--root-dir", root, "-i", "hello", "-c", "hello", "--", "sh", "-c", "cat; echo eof"], b"typed\n")?;
    ensure!(code == 0 && out == "typed\neof\n", "-i: {code} {out:?} {err:?}");
    let (code, _, err) = exec(&["--root-dir", root, "nothing", "--", "true"], b"")?;
    ensure!(code == 1 && err.contains("pod \"nothing\" not found"), "{code} {err:?}");
    let (code, _, err) = exec(&["--root-dir", root, "hello", "-c", "ghost", "--", "true"], b"")?;
    ensure!(code == 1 && err.contains("ghost"), "{code} {err:?}");
    // A terminal, through script(1): its size reaches the command (set right after the process started, as for
    // kubectl exec: the command reads it a moment later).
    let inner = format!(
        "stty cols 83 rows 29; {} exec --root-dir {root} -it hello -- sh -c 'tty; sleep 0.5; stty size'",
        env!("CARGO_BIN_EXE_nodelet")
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("/dev/pts/") && text.contains("29 83"), "-it: {text:?}");
    Ok(())
}

/// `nodelet top` and `nodelet raw` on the local socket: the running pod measured, with its own network namespace's
/// interface (the built-in network's `eth0`) and the pressure columns.
async fn check_stats(root: &str) -> Result<()> {
    let summary: serde_json::Value = wait_for("hello in the summary", Duration::from_secs(20), || async {
        let summary: serde_json::Value =
            serde_json::from_str(&nodelet(&["raw", "--root-dir", root, "/stats/summary"])?)?;
        let found = summary["pods"].as_array().is_some_and(|pods| {
            pods.iter().any(|p| {
                p["podRef"]["name"].as_str().is_some_and(|n| n.starts_with("hello-"))
                    && p["cpu"]["usageNanoCores"].is_u64()
            })
        });
        Ok(found.then_some(summary))
    })
    .await?;
    let hello = summary["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["podRef"]["name"].as_str().is_some_and(|n| n.starts_with("hello-"))))
        .context("hello")?;
    ensure!(hello["network"]["name"] == "eth0" && hello["network"]["rxBytes"].is_u64(), "{hello}");
    ensure!(
        hello["containers"][0]["name"] == "hello" && hello["containers"][0]["logs"]["usedBytes"].is_u64(),
        "{hello}"
    );
    let top = nodelet(&["top", "--root-dir", root, "--containers"])?;
    let row = top.lines().find(|l| l.contains(" hello-")).with_context(|| format!("hello in {top}"))?;
    ensure!(row.split_whitespace().nth(2) == Some("hello") && row.contains("Mi"), "{top}");
    ensure!(top.starts_with("NODE") && top.contains("MEM-SOME%"), "{top}");
    match nodelet(&["raw", "--root-dir", root, "/nothing"]) {
        Err(e) => ensure!(format!("{e:#}").contains("404"), "{e:#}"),
        Ok(out) => anyhow::bail!("nodelet raw /nothing answered {out:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn standalone_node_runs_the_example_manifests() -> Result<()> {
    if !ready("standalone_node_runs_the_example_manifests", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let work = tempfile::tempdir()?;
    let manifests = work.path().join("pods");
    std::fs::create_dir(&manifests)?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pods");
    for file in ["hello.yaml", "countdown.yaml"] {
        std::fs::copy(examples.join(file), manifests.join(file))?;
    }
    let root_dir = work.path().join("root");
    let root = root_dir.display().to_string();
    support::import_busybox(&registry, work.path(), &root_dir)?;
    // Its own network namespace: the built-in pod network (bridge, veths, iptables rules) is made there.
    let netns = Netns::create("standalone", "192.168.78.1")?;
    let mut node = Nodelet::start_in_netns(
        "standalone",
        "",
        &root_dir,
        &netns,
        &[
            "--pod-manifest-path".into(),
            manifests.display().to_string(),
            "--cni-conf-dir".into(),
            work.path().join("net.d").display().to_string(),
            "--housekeeping-interval".into(),
            "1s".into(),
        ],
    )?;

    let ps = || nodelet(&["ps", "--root-dir", &root]);
    let logs_dir = node.pod_logs_dir().display().to_string();
    let logs = |pod: &str, c: &str| nodelet(&["logs", pod, "-c", c, "--pod-logs-dir", &logs_dir]);
    wait_for("hello Running and countdown Succeeded", Duration::from_secs(60), || async {
        let ps = ps()?;
        let hello = row(&ps, "hello").filter(|r| r.contains(" Running ") && r.contains("hello=Running"));
        let countdown = row(&ps, "countdown").filter(|r| r.contains(" Succeeded ") && r.contains("count=Completed(0)"));
        Ok(hello.and(countdown))
    })
    .await
    .with_context(|| node.log())?;
    let hello = wait_for("hello's output", Duration::from_secs(20), || async {
        Ok(logs("hello", "hello").ok().filter(|l| l.contains("hello from nodelet #1")))
    })
    .await?;
    ensure!(hello.starts_with("hello from nodelet #1\n"), "{hello}");
    ensure!(logs("countdown", "count")? == "3\n2\n1\nliftoff\n");
    ensure!(logs("countdown", "prepare")? == "preparing\n");
    check_exec(&root).with_context(|| node.log())?;
    check_stats(&root).await.with_context(|| node.log())?;

    // A malformed manifest is logged with its file name and skipped; the other pods keep running.
    std::fs::write(manifests.join("broken.yaml"), "apiVersion: v1\nkind: Pod\nspec: [not, a, spec]\n")?;
    wait_for("the broken manifest to be reported", Duration::from_secs(20), || async {
        Ok(node.log().contains("broken.yaml").then_some(()))
    })
    .await?;
    node.ensure_running()?;
    // An invalid pod (a quantity that does not parse) never runs with its limit dropped: it fails validation,
    // and goes with its manifest.
    std::fs::write(
        manifests.join("invalid.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: invalid}\nspec:\n  containers:\n  - name: main\n    image: nodelet.local/busybox:latest\n    resources: {limits: {memory: 12 parsecs}}\n",
    )?;
    wait_for("the invalid pod to fail validation", Duration::from_secs(20), || async {
        Ok(row(&ps()?, "invalid").filter(|r| r.contains(" Failed ")))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(node.log().contains("12 parsecs"), "the reason is logged");
    std::fs::remove_file(manifests.join("invalid.yaml"))?;
    wait_for("the invalid pod's status to go", Duration::from_secs(20), || async {
        Ok(row(&ps()?, "invalid").is_none().then_some(()))
    })
    .await?;

    // A changed manifest replaces the pod; a removed one stops it.
    let old = row(&ps()?, "hello").context("hello row")?;
    let changed =
        std::fs::read_to_string(manifests.join("hello.yaml"))?.replace("hello from nodelet", "changed manifest");
    std::fs::write(manifests.join("hello.yaml"), changed)?;
    wait_for("the changed pod's output", Duration::from_secs(30), || async {
        Ok(logs("hello", "hello").ok().filter(|l| l.contains("changed manifest #1")))
    })
    .await?;
    // The old pod stops within its grace period and its status goes; the new one runs.
    wait_for("only the new hello", Duration::from_secs(30), || async {
        let ps_now = ps()?;
        let one = ps_now.lines().filter(|l| l.contains(" hello-")).count() == 1;
        let dirs = std::fs::read_dir(node.root_dir().join("pods"))?.count();
        Ok((one && dirs == 2 && row(&ps_now, "hello").is_some_and(|r| r.contains(" Running "))).then_some(()))
    })
    .await
    .with_context(|| format!("before: {old}"))?;
    std::fs::remove_file(manifests.join("hello.yaml"))?;
    wait_for("hello to be gone", Duration::from_secs(30), || async {
        Ok(row(&ps()?, "hello").is_none().then_some(()))
    })
    .await
    .with_context(|| format!("{}\n{}", ps().unwrap_or_default(), node.log()))?;
    ensure!(row(&ps()?, "countdown").is_some());
    Ok(())
}
