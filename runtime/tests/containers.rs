//! The runtime end to end, as root, inside a cgroup sandbox (a private mount namespace whose cgroup roots are
//! test-owned children: `integration/scripts/cgroup-sandbox.sh`). Own `main`: the zygote is forked before tokio.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use nodelet_runtime::{
    ContainerConfig, ContainerIo, ExecConfig, Mount, Namespace, Resources, Runtime, SandboxConfig, Security, Zygote,
};

#[path = "containers/security.rs"]
mod security;
mod support;
#[path = "containers/userns.rs"]
mod userns;

use support::{SANDBOX_ENV, busybox_rootfs, rerun_in_sandbox};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Helper modes for the re-adoption test: a fresh, single-threaded process acting as a restarted agent.
    if args.iter().any(|a| a == "--reexec-probe") {
        std::process::exit(security::reexec_probe());
    }
    if let Some(pos) = args.iter().position(|a| a == "--agent") {
        let code = agent_mode(&args[pos + 1], &args[pos + 2], Path::new(&args[pos + 3]));
        std::process::exit(code);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("CI").is_some() {
            eprintln!("containers: needs root, and CI must run it");
            std::process::exit(1);
        }
        eprintln!("containers: skipped: needs root");
        println!("0 passed, 0 failed, 1 skipped");
        return;
    }
    if std::env::var_os(SANDBOX_ENV).is_none() {
        std::process::exit(rerun_in_sandbox(&args));
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    // RUST_LOG=debug shows libcontainer's own logs (from the zygote too: the subscriber is set before the fork).
    let log_filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into());
    tracing_subscriber::fmt().with_env_filter(log_filter).with_writer(std::io::stderr).init();
    let zygote = Zygote::fork().expect("forking the zygote (first thing, single-threaded)");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let (passed, failed) = rt.block_on(run_all(zygote, filter));
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

type TestFn = fn(Runtime, Env) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

macro_rules! tests {
    ($($name:path),* $(,)?) => { vec![$((stringify!($name), (|rt, env| Box::pin($name(rt, env))) as TestFn)),*] };
}

/// Shared fixture: a busybox root filesystem and the runtime's state dir.
#[derive(Clone)]
struct Env {
    rootfs: PathBuf,
    state: PathBuf,
}

async fn run_all(zygote: Zygote, filter: Option<String>) -> (usize, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = Env { rootfs: dir.path().join("rootfs"), state: dir.path().join("state") };
    busybox_rootfs(&env.rootfs).expect("building the busybox rootfs");
    let rt = Runtime::new(zygote, &env.state).expect("runtime");
    let all = tests![
        exit_codes_and_output,
        signals_and_grace,
        oom_kill_is_reported,
        exec_runs_in_the_container,
        user_and_capabilities_are_applied,
        read_only_root_filesystem,
        bad_input_fails_cleanly,
        containers_survive_an_agent_restart_and_are_readopted,
        containers_share_the_pod_sandbox,
        terminals_for_containers_and_exec,
        shared_process_namespace,
        containers_see_their_own_cgroups,
        security::privileged_containers_get_the_host,
        security::unprivileged_containers_cannot_reach_the_host,
        security::exec_is_confined_like_the_init,
        security::leaked_descriptors_do_not_reach_the_host,
        security::hostile_images_cannot_redirect_the_setup,
        security::mounts_into_proc_and_sys_are_refused,
        security::localhost_seccomp_profiles_are_enforced,
        security::supplemental_groups_policy_and_the_reported_user,
        security::the_runtime_binary_cannot_be_overwritten,
        userns::pods_get_their_own_user_namespace,
        many_cycles_leak_nothing,
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in all {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let started = Instant::now();
        let result = tokio::spawn(test(rt.clone(), env.clone())).await;
        let secs = started.elapsed().as_secs_f64();
        match result {
            Ok(Ok(())) => {
                passed += 1;
                println!("test {name} ... ok ({secs:.2}s)");
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("test {name} ... FAILED ({secs:.2}s): {e:#}");
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED (panicked): {e}");
            }
        }
    }
    (passed, failed)
}

fn config(env: &Env, id: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        id: id.into(),
        rootfs: env.rootfs.clone(),
        command: command.iter().map(|s| s.to_string()).collect(),
        cgroups_path: format!("/nodelet-test/{id}"),
        hostname: Some(id.into()),
        ..Default::default()
    }
}

fn read_all(mut f: std::fs::File) -> String {
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

/// Creates, starts and waits for a container; returns (exit, stdout, stderr) after deleting it.
async fn run(rt: &Runtime, cfg: &ContainerConfig) -> Result<(nodelet_runtime::ContainerExit, String, String)> {
    let (io, pipes) = ContainerIo::pipes(false)?;
    let c = match rt.create(cfg, io).await {
        Ok(c) => c,
        Err(e) => {
            // What the container's init said on its stderr (libcontainer logs its setup errors there).
            let err = tokio::task::spawn_blocking(move || read_all(pipes.stderr)).await?;
            bail!("{e}; container stderr: {err}");
        }
    };
    rt.start(&c).await?;
    let out = tokio::task::spawn_blocking(move || (read_all(pipes.stdout), read_all(pipes.stderr)));
    let exit = rt.wait(&c).await;
    rt.delete(&c).await?;
    let (stdout, stderr) = out.await?;
    Ok((exit, stdout, stderr))
}

async fn exit_codes_and_output(rt: Runtime, env: Env) -> Result<()> {
    for (cmd, code) in [("true", 0), ("false", 1), ("exit 42", 42)] {
        let (exit, _, _) = run(&rt, &config(&env, "codes", &["sh", "-c", cmd])).await?;
        ensure!(exit.code == code && exit.signal.is_none() && !exit.oom_killed, "{cmd}: {exit:?}");
    }
    let (exit, out, err) = run(&rt, &config(&env, "output", &["sh", "-c", "echo out; echo err >&2; hostname"])).await?;
    ensure!(exit.code == 0, "{exit:?}");
    ensure!(out == "out\noutput\n", "stdout {out:?}");
    ensure!(err == "err\n", "stderr {err:?}");
    Ok(())
}

async fn signals_and_grace(rt: Runtime, env: Env) -> Result<()> {
    // SIGKILL: 128 + 9.
    let c = rt.create(&config(&env, "sigkill", &["sleep", "100"]), ContainerIo::default()).await?;
    rt.start(&c).await?;
    rt.signal(&c, Signal::SIGKILL)?;
    let exit = rt.wait(&c).await;
    rt.delete(&c).await?;
    ensure!(exit.code == 137 && exit.signal == Some(9) && !exit.oom_killed, "{exit:?}");

    // A process that handles SIGTERM exits within the grace period with its own code.
    let script = "trap 'exit 3' TERM; echo ready; while true; do sleep 0.05; done";
    let (io, pipes) = ContainerIo::pipes(false)?;
    let c = rt.create(&config(&env, "graceful", &["sh", "-c", script]), io).await?;
    rt.start(&c).await?;
    let mut first = [0u8; 6];
    let mut stdout = pipes.stdout;
    tokio::task::spawn_blocking(move || stdout.read_exact(&mut first)).await??;
    let started = Instant::now();
    let exit = rt.stop(&c, Duration::from_secs(10)).await;
    rt.delete(&c).await?;
    ensure!(exit.code == 3 && exit.signal.is_none(), "{exit:?}");
    ensure!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());

    // PID 1 without a TERM handler ignores SIGTERM: SIGKILL after the grace period.
    let c = rt.create(&config(&env, "stubborn", &["sleep", "100"]), ContainerIo::default()).await?;
    rt.start(&c).await?;
    let started = Instant::now();
    let exit = rt.stop(&c, Duration::from_secs(1)).await;
    let took = started.elapsed();
    rt.delete(&c).await?;
    ensure!(exit.code == 137 && exit.signal == Some(9), "{exit:?}");
    ensure!(took >= Duration::from_secs(1) && took < Duration::from_secs(4), "took {took:?}");
    Ok(())
}

async fn oom_kill_is_reported(rt: Runtime, env: Env) -> Result<()> {
    let mut cfg = config(&env, "oom", &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    cfg.resources = Resources { memory_limit: Some(16 << 20), ..Default::default() };
    let (exit, _, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 137 && exit.oom_killed, "{exit:?} stderr {err:?}");
    // A container under its limit is not flagged.
    cfg.command = vec!["dd".into(), "if=/dev/zero".into(), "of=/dev/null".into(), "bs=1M".into(), "count=1".into()];
    let (exit, _, _) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0 && !exit.oom_killed, "{exit:?}");
    // memory.oom.group (v2 only): the OOM of a child takes the whole container, init included; without it (and
    // on v1/hybrid hosts, where upstream does not set it) only the child dies and the init goes on.
    let script = "dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived";
    for oom_group in [false, true] {
        let mut cfg = config(&env, &format!("oomgroup{}", u8::from(oom_group)), &["sh", "-c", script]);
        cfg.resources = Resources { memory_limit: Some(16 << 20), oom_group, ..Default::default() };
        let (exit, out, _) = run(&rt, &cfg).await?;
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        ensure!(exit.oom_killed, "oom_group={oom_group}: {exit:?}");
        if oom_group && v2 {
            ensure!(exit.code == 137 && !out.contains("survived"), "group kill: {exit:?} {out:?}");
        } else {
            ensure!(exit.code == 0 && out.contains("survived"), "oom_group={oom_group}, v2={v2}: {exit:?} {out:?}");
        }
    }
    Ok(())
}

async fn exec_runs_in_the_container(rt: Runtime, env: Env) -> Result<()> {
    let mut cfg = config(&env, "exec", &["sh", "-c", "echo inside > /tmp/marker; sleep 100"]);
    cfg.env = vec![("GREETING".into(), "hello".into())];
    let c = rt.create(&cfg, ContainerIo::default()).await?;
    rt.start(&c).await?;
    let exec = |args: &[&str]| ExecConfig { args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    let mut marker = None;
    let mut last = None;
    for _ in 0..100 {
        let (code, out) = rt.exec_sync(&c, &exec(&["cat", "/tmp/marker"]), Duration::from_secs(5)).await?;
        if code == Some(0) {
            marker = Some(String::from_utf8(out)?);
            break;
        }
        last = Some((code, String::from_utf8_lossy(&out).into_owned()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if marker.as_deref() != Some("inside\n") {
        let debug = "ls -la /tmp; tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/1/status | head -3";
        let (_, out) = rt.exec_sync(&c, &exec(&["sh", "-c", debug]), Duration::from_secs(5)).await?;
        bail!("exec saw {marker:?}; last attempt: {last:?}; in the container: {}", String::from_utf8_lossy(&out));
    }
    // stdout and stderr as written, on one pipe.
    let (code, out) =
        rt.exec_sync(&c, &exec(&["sh", "-c", "echo $GREETING; echo oops >&2; exit 7"]), Duration::from_secs(5)).await?;
    ensure!(code == Some(7), "code {code:?}");
    ensure!(out == b"hello\noops\n", "output {:?}", String::from_utf8_lossy(&out));
    let started = Instant::now();
    let (code, _) = rt.exec_sync(&c, &exec(&["sleep", "100"]), Duration::from_millis(300)).await?;
    ensure!(code.is_none() && started.elapsed() < Duration::from_secs(3), "timeout not enforced: {code:?}");
    // A command that runs past the quick read and writes more than a pipe holds: read as it writes, never
    // blocked on a full pipe; only the first EXEC_OUTPUT bytes are kept.
    let (code, out) = rt
        .exec_sync(
            &c,
            &exec(&["sh", "-c", "sleep 1; head -c 1000000 /dev/zero; echo done >&2"]),
            Duration::from_secs(10),
        )
        .await?;
    ensure!(
        code == Some(0) && out.len() as u64 == nodelet_runtime::EXEC_OUTPUT && out.iter().all(|b| *b == 0),
        "large output: {code:?} {}",
        out.len()
    );
    // A background process that keeps the pipe open does not hold the exec past its deadline, and what the
    // command wrote before it exited is kept.
    let started = Instant::now();
    let (code, out) =
        rt.exec_sync(&c, &exec(&["sh", "-c", "echo before; sleep 100 & exit 3"]), Duration::from_millis(1500)).await?;
    ensure!(code == Some(3) && out == b"before\n", "background holder: {code:?} {:?}", String::from_utf8_lossy(&out));
    ensure!(started.elapsed() < Duration::from_secs(5), "held by the background process: {:?}", started.elapsed());
    let err = rt.exec_sync(&c, &exec(&["/no/such/binary"]), Duration::from_secs(5)).await;
    let err = err.err().context("exec of a missing binary succeeded")?;
    ensure!(err.to_string().contains("/no/such/binary"), "message does not name the binary: {err}");
    // The process starts in the zygote's memory (vfork-style): what it allocates there is freed, whether it
    // exec'd or failed, so the zygote does not grow with the execs it makes.
    let execs = |n: usize| {
        let (rt, c) = (&rt, &c);
        async move {
            for i in 0..n {
                let args: &[&str] = if i % 5 == 4 { &["/no/such/binary"] } else { &["true"] };
                let _ = rt.exec_sync(c, &exec(args), Duration::from_secs(5)).await;
            }
        }
    };
    execs(100).await;
    let before = zygote_anon_kib();
    execs(500).await;
    let after = zygote_anon_kib();
    ensure!(after <= before + 256, "the zygote grew from {before} KiB to {after} KiB over 500 execs");
    rt.delete(&c).await?;
    // The zygote keeps a container's exec template from its first exec on: an exec's own environment still
    // applies, and a new container under the same ID gets a template of its own.
    let mut cfg = config(&env, "exec", &["sleep", "100"]);
    cfg.env = vec![("GREETING".into(), "again".into())];
    let c = rt.create(&cfg, ContainerIo::default()).await?;
    rt.start(&c).await?;
    let with_env = ExecConfig {
        args: ["sh", "-c", "echo $GREETING $EXTRA"].map(String::from).to_vec(),
        env: vec!["EXTRA=more".into()],
        ..Default::default()
    };
    let (code, out) = rt.exec_sync(&c, &with_env, Duration::from_secs(5)).await?;
    ensure!(code == Some(0) && out == b"again more\n", "{code:?} {:?}", String::from_utf8_lossy(&out));
    // An init's exit is seen while execs into another container go on: the zygote reaps those by PID and
    // scans its other children within 100 ms of a SIGCHLD (which may carry the init's too).
    let ending =
        rt.create(&config(&env, "exec-ends", &["sh", "-c", "sleep 0.5; exit 9"]), ContainerIo::default()).await?;
    rt.start(&ending).await?;
    let started = Instant::now();
    let busy = async {
        while started.elapsed() < Duration::from_secs(3) {
            let _ = rt.exec_sync(&c, &exec(&["true"]), Duration::from_secs(5)).await;
        }
    };
    let seen =
        async { tokio::time::timeout(Duration::from_secs(10), rt.wait(&ending)).await.map(|e| (e, started.elapsed())) };
    let ((), seen) = tokio::join!(busy, seen);
    let (exit, after) = seen.context("the init's exit was never seen")?;
    rt.delete(&ending).await?;
    rt.delete(&c).await?;
    ensure!(exit.code == 9, "{exit:?}");
    ensure!(after < Duration::from_millis(1500), "the init's exit (at 0.5 s) was seen after {after:?}");
    Ok(())
}

/// Anonymous memory of this process's zygote (its child named `nodelet-zygote`), KiB.
fn zygote_anon_kib() -> u64 {
    let me = std::process::id();
    let children = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "nodelet-zygote"))
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .find_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn user_and_capabilities_are_applied(rt: Runtime, env: Env) -> Result<()> {
    let status = "grep -E '^(Uid|Gid|Groups|CapEff|NoNewPrivs|Seccomp):' /proc/self/status";
    let mut cfg = config(&env, "caps", &["sh", "-c", status]);
    cfg.security = Security {
        capabilities_drop: vec!["ALL".into()],
        capabilities_add: vec!["NET_ADMIN".into()],
        allow_privilege_escalation: Some(false),
        seccomp: nodelet_runtime::Seccomp::RuntimeDefault,
        ..Default::default()
    };
    let (exit, out, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0, "{exit:?} {err}");
    let field = |name: &str| out.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
    ensure!(field("CapEff:").as_deref() == Some("0000000000001000"), "NET_ADMIN only: {out}");
    ensure!(field("Uid:").is_some_and(|u| u.starts_with('0')), "{out}");
    ensure!(field("NoNewPrivs:").as_deref() == Some("1"), "{out}");
    ensure!(field("Seccomp:").as_deref() == Some("2"), "seccomp filter mode: {out}");

    // The image user by name, runAsGroup, and the user's groups from /etc/group plus supplementalGroups.
    let mut cfg = config(&env, "user", &["id"]);
    cfg.image.user = Some("app".into());
    cfg.security.supplemental_groups = vec![3000];
    let (exit, out, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0, "{exit:?} {err}");
    ensure!(
        out.contains("uid=1000(app) gid=1000(app)") && out.contains("2000(extra)") && out.contains("3000"),
        "{out}"
    );

    cfg.security.run_as_user = Some(4242);
    cfg.security.run_as_group = Some(4343);
    let (_, out, _) = run(&rt, &cfg).await?;
    ensure!(out.starts_with("uid=4242 gid=4343"), "{out}");
    Ok(())
}

async fn read_only_root_filesystem(rt: Runtime, env: Env) -> Result<()> {
    let mut cfg = config(&env, "ro", &["sh", "-c", "touch /data/x 2>/dev/null && exit 9; touch /scratch/x && echo ok"]);
    cfg.security.read_only_root_filesystem = true;
    cfg.mounts = vec![Mount::Tmpfs { destination: "/scratch".into(), size: Some(1 << 20) }];
    let (exit, out, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0 && out == "ok\n", "{exit:?} {out:?} {err:?}");
    ensure!(!env.rootfs.join("data/x").exists());
    Ok(())
}

/// Nothing of a failed create may be left: no libcontainer state, bundle, record or cgroup.
fn assert_clean(env: &Env, id: &str) -> Result<()> {
    for sub in ["libcontainer", "bundles"] {
        ensure!(!env.state.join(sub).join(id).exists(), "{sub}/{id} left behind");
    }
    ensure!(!env.state.join("records").join(format!("{id}.json")).exists(), "record of {id} left behind");
    // Every hierarchy: the v1 controllers libcontainer made the cgroup in (hybrid), the unified tree, or v2's root.
    let hierarchies = std::fs::read_dir("/sys/fs/cgroup")?.flatten().map(|e| e.path());
    for root in hierarchies.chain([PathBuf::from("/sys/fs/cgroup")]) {
        let dir = root.join("nodelet-test").join(id);
        ensure!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    Ok(())
}

async fn bad_input_fails_cleanly(rt: Runtime, env: Env) -> Result<()> {
    // A binary that does not exist: a typed error with a message a user can act on.
    let cfg = config(&env, "nobinary", &["/no/such/binary"]);
    let err = match rt.create(&cfg, ContainerIo::default()).await {
        Err(e) => e,
        Ok(c) => match rt.start(&c).await {
            Err(e) => {
                rt.delete(&c).await?;
                e
            }
            Ok(()) => bail!("a missing binary started"),
        },
    };
    ensure!(err.to_string().contains("/no/such/binary"), "message does not name the binary: {err}");
    assert_clean(&env, "nobinary")?;

    let mut cfg = config(&env, "badcap", &["true"]);
    cfg.security.capabilities_add = vec!["NOT_A_CAP".into()];
    let err = rt.create(&cfg, ContainerIo::default()).await.expect_err("unknown capability");
    ensure!(
        matches!(err, nodelet_runtime::RuntimeError::Spec(nodelet_runtime::SpecError::UnknownCapability(_))),
        "{err}"
    );
    assert_clean(&env, "badcap")?;

    let mut cfg = config(&env, "baduser", &["true"]);
    cfg.image.user = Some("nobody-here".into());
    let err = rt.create(&cfg, ContainerIo::default()).await.expect_err("unknown user");
    ensure!(err.to_string() == "unable to find user nobody-here: no matching entries in passwd file", "{err}");
    assert_clean(&env, "baduser")?;
    Ok(())
}

/// `--agent create|adopt ID STATE`: a fresh process that plays a (re)started agent on the same state dir.
fn agent_mode(action: &str, id: &str, state: &Path) -> i32 {
    let zygote = match Zygote::fork() {
        Ok(z) => z,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let result: Result<()> = rt.block_on(async {
        let runtime = Runtime::new(zygote, state)?;
        match action {
            "create" => {
                let env = Env { rootfs: state.parent().unwrap().join("rootfs"), state: state.to_path_buf() };
                // It writes all the time, also while no agent reads: it must not die of SIGPIPE.
                let (io, _pipes) = ContainerIo::pipes(false)?;
                let script = "echo first; while true; do echo tick; sleep 0.05; done";
                let c = runtime.create(&config(&env, id, &["sh", "-c", script]), io).await?;
                runtime.start(&c).await?;
                println!("{}", c.pid);
                Ok(())
            }
            "adopt" => {
                let found = runtime.list().await;
                ensure!(found.len() == 1 && found[0].id == id && found[0].adopted(), "list(): {found:?}");
                let c = &found[0];
                // Its output, written while no agent ran, is waiting in the pipe it was created with.
                let (mut stdout, _stderr) = runtime.reopen_output(c).context("reopening the output pipes")?;
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&seen);
                ensure!(text.starts_with("first\ntick\ntick\n"), "output kept while the agent was down: {text:?}");
                let (code, out) = runtime
                    .exec_sync(
                        c,
                        &ExecConfig { args: vec!["echo".into(), "adopted".into()], ..Default::default() },
                        Duration::from_secs(5),
                    )
                    .await?;
                ensure!(code == Some(0) && out == b"adopted\n", "exec into adopted: {code:?}");
                // Its old parent (the dead zygote) is gone and it was reparented to the nearest subreaper, which is
                // the test's main process here (systemd on a real node), not this agent: no status for us.
                let exit = runtime.stop(c, Duration::from_secs(1)).await;
                ensure!(!exit.status_known && exit.code == 255, "{exit:?}");
                runtime.delete(c).await?;
                Ok(())
            }
            other => bail!("unknown action {other}"),
        }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agent {action}: {e:#}");
            1
        }
    }
}

/// Runs this binary as an agent process (see [`agent_mode`]) on `state`.
fn agent(action: &str, state: &Path) -> std::io::Result<std::process::Output> {
    std::process::Command::new(std::env::current_exe()?)
        .args(["--agent", action, "survivor"])
        .arg(state)
        .env(SANDBOX_ENV, "1")
        .output()
}

async fn containers_survive_an_agent_restart_and_are_readopted(_rt: Runtime, env: Env) -> Result<()> {
    // A separate state dir: this test's "agents" are other processes.
    let state = env.state.parent().unwrap().join("state-restart");
    let st = state.clone();
    let out = tokio::task::spawn_blocking(move || agent("create", &st)).await??;
    ensure!(out.status.success(), "create agent: {}", String::from_utf8_lossy(&out.stderr));
    let pid: i32 = String::from_utf8(out.stdout)?.trim().parse()?;
    // The agent (and its zygote) are gone; the container is not.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(Path::new(&format!("/proc/{pid}")).exists(), "container {pid} died with its agent");
    // An agent that crashes while creating a container leaves its cgroupfs view mounted: the next one removes it.
    let leftover = state.join("cgroupfs/crashed");
    std::fs::create_dir_all(&leftover)?;
    nix::mount::mount(Some("tmpfs"), &leftover, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>)?;
    let st = state.clone();
    let out = tokio::task::spawn_blocking(move || agent("adopt", &st)).await??;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(!leftover.exists() && !mounts.contains("cgroupfs/crashed"), "a leftover cgroupfs view survived a restart");
    ensure!(out.status.success(), "adopting agent: {}", String::from_utf8_lossy(&out.stderr));
    let mut gone = false;
    for _ in 0..100 {
        if exited(pid) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(gone, "adopted container {pid} was not stopped");
    // The helper agents' zygotes died with them and were reparented to this process (the subreaper): reap them.
    while let Ok(status) = nix::sys::wait::waitpid(None::<nix::unistd::Pid>, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
    {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
    ensure!(!state.join("records/survivor.json").exists() && !state.join("libcontainer/survivor").exists());
    Ok(())
}

/// Whether `pid` has exited; a zombie reparented to this process (the subreaper) is reaped on the way, as PID 1
/// would reap it on a real node.
fn exited(pid: i32) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()));
    match state {
        None => true,
        Some('Z') => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            true
        }
        Some(_) => false,
    }
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn count_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo").map(|m| m.lines().count()).unwrap_or(0)
}

/// This process's zombie children (their `stat` lines).
fn zombies() -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let rest = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
            let mut fields = rest.split(' ');
            fields.next() == Some("Z") && fields.next() == Some(me.as_str())
        })
        .collect()
}

async fn many_cycles_leak_nothing(rt: Runtime, env: Env) -> Result<()> {
    // Warm up once so lazily opened descriptors (tokio, blocking pool) are counted in the baseline.
    run(&rt, &config(&env, "cycle", &["true"])).await?;
    let (fds, mounts) = (count_fds(), count_mounts());
    for i in 0..200 {
        let (exit, _, _) = run(&rt, &config(&env, "cycle", &["true"])).await?;
        ensure!(exit.code == 0, "cycle {i}: {exit:?}");
    }
    ensure!(count_fds() <= fds, "fds grew from {fds} to {}", count_fds());
    ensure!(count_mounts() == mounts, "mounts changed from {mounts} to {}", count_mounts());
    let zombies = zombies();
    ensure!(zombies.is_empty(), "zombie children left: {zombies:?}");
    assert_clean(&env, "cycle")?;
    Ok(())
}

/// `net:[4026532000]`, as `readlink /proc/self/ns/net` prints it, for a namespace file.
fn ns_id(kind: &str, file: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    Ok(format!("{kind}:[{}]", std::fs::metadata(file)?.ino()))
}

async fn containers_share_the_pod_sandbox(rt: Runtime, env: Env) -> Result<()> {
    let config_sb = SandboxConfig {
        id: "pod1".into(),
        hostname: Some("pod-one".into()),
        network: true,
        ipc: true,
        uts: true,
        share_pid: false,
        user: None,
    };
    let sb = rt.create_sandbox(&config_sb).await?;
    let in_pod = |id: &str, cmd: &[&str]| {
        let mut c = config(&env, id, cmd);
        c.namespaces = sb.namespaces(false);
        c.hostname = None;
        c
    };
    // Two containers of the pod talk over the pod's loopback.
    let server =
        rt.create(&in_pod("pod1-server", &["sh", "-c", "echo pong | nc -l -p 8080"]), ContainerIo::default()).await?;
    rt.start(&server).await?;
    let client = "for i in $(seq 100); do nc 127.0.0.1 8080 </dev/null && exit 0; sleep 0.05; done; exit 1";
    let (exit, out, err) = run(&rt, &in_pod("pod1-client", &["sh", "-c", client])).await?;
    ensure!(exit.code == 0 && out == "pong\n", "{exit:?} {out:?} {err:?}");
    rt.wait(&server).await;
    rt.delete(&server).await?;

    // Every container of the pod is in the sandbox's net, IPC and UTS namespaces (not the host's).
    let (exit, out, _) = run(
        &rt,
        &in_pod("pod1-ns", &["sh", "-c", "for n in net ipc uts; do readlink /proc/self/ns/$n; done; hostname"]),
    )
    .await?;
    ensure!(exit.code == 0, "{exit:?}");
    let want = format!(
        "{}\n{}\n{}\npod-one\n",
        ns_id("net", sb.net.as_ref().context("net ns")?)?,
        ns_id("ipc", sb.ipc.as_ref().context("ipc ns")?)?,
        ns_id("uts", sb.uts.as_ref().context("uts ns")?)?
    );
    ensure!(out == want, "container saw {out:?}, sandbox is {want:?}");
    ensure!(ns_id("net", sb.net.as_ref().unwrap())? != ns_id("net", Path::new("/proc/self/ns/net"))?);
    ensure!(rt.list_sandboxes() == vec![sb.clone()], "list_sandboxes: {:?}", rt.list_sandboxes());

    rt.remove_sandbox(&sb).await?;
    ensure!(!sb.dir.exists(), "sandbox dir left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(!mounts.contains(&sb.dir.to_string_lossy().to_string()), "namespace mounts left behind");

    // A hostname the kernel refuses: the child's own errno is reported, and nothing is left behind.
    let too_long = SandboxConfig { id: "pod3".into(), hostname: Some("h".repeat(70)), ..config_sb.clone() };
    let err = rt.create_sandbox(&too_long).await.err().context("a 70-character hostname was accepted")?.to_string();
    ensure!(err.contains("sethostname") && err.contains("EINVAL"), "{err}");
    ensure!(!rt.root().join("sandboxes/pod3").exists(), "a failed sandbox left its directory");

    // hostNetwork: the pod uses the host's network and UTS namespaces.
    let host = SandboxConfig {
        id: "pod2".into(),
        hostname: None,
        network: false,
        ipc: true,
        uts: false,
        share_pid: false,
        user: None,
    };
    let sb = rt.create_sandbox(&host).await?;
    let ns = sb.namespaces(false);
    ensure!(
        ns.network == Namespace::Host && ns.uts == Namespace::Host && matches!(ns.ipc, Namespace::Join(_)),
        "{ns:?}"
    );
    rt.remove_sandbox(&sb).await?;
    Ok(())
}

/// Everything a terminal master yields until the other side is closed (EIO).
fn read_pty(mut pty: std::fs::File) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pty.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Like [`run`] with a terminal (`tty: true`): (exit, what the terminal showed).
async fn run_tty(rt: &Runtime, cfg: &ContainerConfig) -> Result<(nodelet_runtime::ContainerExit, String)> {
    let cfg = ContainerConfig { tty: true, ..cfg.clone() };
    let c = rt.create(&cfg, ContainerIo::default()).await?;
    let pty = std::fs::File::from(c.pty().context("a tty container has a terminal")?.try_clone()?);
    rt.start(&c).await?;
    let out = tokio::task::spawn_blocking(move || read_pty(pty));
    let exit = rt.wait(&c).await;
    rt.delete(&c).await?;
    Ok((exit, out.await?))
}

async fn terminals_for_containers_and_exec(rt: Runtime, env: Env) -> Result<()> {
    use std::io::Write;
    // A container with `tty: true` gets a terminal whose master the runtime hands back.
    let (exit, out) = run_tty(&rt, &config(&env, "tty", &["sh", "-c", "tty; exit 4"])).await?;
    ensure!(exit.code == 4, "{exit:?}");
    ensure!(out.contains("/dev/pts/"), "tty printed {out:?}");

    // An interactive exec with a terminal, as the container's own user.
    let mut cfg = config(&env, "tty-exec", &["sleep", "100"]);
    cfg.image.user = Some("app".into());
    let c = rt.create(&cfg, ContainerIo::default()).await?;
    rt.start(&c).await?;
    let exec = ExecConfig { args: vec!["sh".into()], tty: true, ..Default::default() };
    let p = rt.exec(&c, &exec, ContainerIo::default()).await?;
    let mut pty = p.pty.context("exec with tty has a terminal")?;
    pty.write_all(b"echo $((6*7)) $(id -u); exit 9\n")?;
    let out = tokio::task::spawn_blocking(move || read_pty(pty));
    let code = rt.wait_exec(p.pid).await;
    let out = out.await?;
    ensure!(code == 9, "exit code {code}");
    ensure!(out.contains("42 1000"), "terminal showed {out:?}");
    rt.delete(&c).await?;
    Ok(())
}

async fn shared_process_namespace(rt: Runtime, env: Env) -> Result<()> {
    let sb = rt
        .create_sandbox(&SandboxConfig { id: "pod3".into(), network: true, share_pid: true, ..Default::default() })
        .await?;
    let in_pod = |id: &str, cmd: &[&str]| {
        let mut c = config(&env, id, cmd);
        c.namespaces = sb.namespaces(false);
        c
    };
    ensure!(matches!(in_pod("x", &[]).namespaces.pid, Namespace::Join(_)), "containers join the pod's PID namespace");
    let sleeper = rt.create(&in_pod("pod3-sleeper", &["sleep", "100"]), ContainerIo::default()).await?;
    rt.start(&sleeper).await?;
    // Another container of the pod sees the sleeper; PID 1 is the namespace holder, not an app container.
    let look = "cat /proc/1/comm; for p in /proc/[0-9]*; do cat $p/cmdline 2>/dev/null | tr '\\0' ' '; echo; done";
    let (exit, out, _) = run(&rt, &in_pod("pod3-looker", &["sh", "-c", look])).await?;
    ensure!(exit.code == 0, "{exit:?}");
    ensure!(out.starts_with("nodelet-pidns\n"), "PID 1 is {:?}", out.lines().next());
    ensure!(out.lines().any(|l| l.trim() == "sleep 100"), "the sleeper is not visible: {out}");
    // Killing a container does not end the namespace; removing the sandbox does.
    let holder: i32 = std::fs::read_to_string(sb.dir.join("pid.holder"))?.split(' ').next().unwrap_or("").parse()?;
    ensure!(!exited(holder), "holder died before the delete");
    rt.delete(&sleeper).await?;
    ensure!(!exited(holder), "holder died with the sleeper");
    let (exit, _, _) = run(&rt, &in_pod("pod3-after", &["true"])).await?;
    ensure!(exit.code == 0, "{exit:?}");
    rt.remove_sandbox(&sb).await?;
    for _ in 0..100 {
        if exited(holder) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(exited(holder), "the PID namespace holder {holder} outlived its sandbox");
    ensure!(!sb.dir.exists());
    Ok(())
}

/// `/sys/fs/cgroup` inside shows the container's own cgroups, read-only (v1 and hybrid hosts: assembled by the
/// runtime, also when the PID namespace is shared), with nothing left mounted on the host; on hybrid hosts the
/// init and exec'd processes are in the container's unified cgroup.
async fn containers_see_their_own_cgroups(rt: Runtime, env: Env) -> Result<()> {
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let (limit_file, cgroup_line) = if v2 {
        ("/sys/fs/cgroup/memory.max", "0::/")
    } else {
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", ":memory:/")
    };
    let script = format!(
        "cat {limit_file}; grep -F '{cgroup_line}' /proc/self/cgroup; ls /sys/fs/cgroup; \
         echo 1 > {limit_file} 2>/dev/null && echo writable; echo end; sleep 100"
    );
    let sb = rt
        .create_sandbox(&SandboxConfig { id: "pod4".into(), network: true, share_pid: true, ..Default::default() })
        .await?;
    for (id, shared_pid) in [("cgview", false), ("pod4-cgview", true)] {
        let mut cfg = config(&env, id, &["sh", "-c", &script]);
        cfg.resources = Resources { memory_limit: Some(64 << 20), ..Default::default() };
        if shared_pid {
            cfg.namespaces = sb.namespaces(false);
        }
        let (io, pipes) = ContainerIo::pipes(false)?;
        let c = rt.create(&cfg, io).await?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(!mounts.contains("/cgroupfs/"), "{id}: the host copy of its cgroupfs is still mounted: {mounts}");
        rt.start(&c).await?;
        let mut stdout = pipes.stdout;
        let out = tokio::task::spawn_blocking(move || {
            let mut out = String::new();
            let mut buf = [0u8; 4096];
            // Until the script is done (the container then sleeps).
            while !out.ends_with("end\n") {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            out
        })
        .await?;
        let on_hybrid = std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() && !v2;
        if on_hybrid {
            let exec = ExecConfig { args: vec!["sleep".into(), "100".into()], ..Default::default() };
            let p = rt.exec(&c, &exec, ContainerIo::default()).await?;
            for (what, pid) in [("init", c.pid), ("exec'd process", p.pid)] {
                let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
                let unified = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default();
                ensure!(unified.ends_with(&format!("/nodelet-test/{id}")), "{id}: {what} is in {unified:?}");
            }
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), Signal::SIGKILL);
            rt.wait_exec(p.pid).await;
        }
        rt.signal(&c, Signal::SIGKILL)?;
        rt.wait(&c).await;
        rt.delete(&c).await?;
        ensure!(out.starts_with("67108864\n"), "{id}: the memory limit is not visible: {out:?}");
        ensure!(out.lines().any(|l| l.ends_with(cgroup_line)), "{id}: not at its cgroup's root: {out:?}");
        ensure!(!out.contains("writable"), "{id}: cgroupfs is writable: {out:?}");
        if !v2 {
            for name in ["cpu", "cpuacct", "memory", "pids"] {
                ensure!(out.lines().any(|l| l == name), "{id}: no {name} in /sys/fs/cgroup: {out:?}");
            }
        }
        assert_clean(&env, id)?;
    }
    rt.remove_sandbox(&sb).await?;
    ensure!(std::fs::read_dir(env.state.join("cgroupfs"))?.next().is_none(), "a cgroupfs view left behind");
    Ok(())
}
