//! Security contexts as the runtime applies them, and the known container escapes tried by hostile containers
//! and images: each test is what an attacker would do, and a check from the host or from inside that it failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nodelet_runtime::{ContainerIo, ExecConfig, Mount, Runtime, RuntimeError, Seccomp, SpecError};

use super::{Env, assert_clean, config, run, run_tty};

/// A field of `/proc/self/status` in `text`.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string())
}

/// The host's value of a file (to compare before and after a hostile container ran).
fn host(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A copy of the test rootfs to make hostile (symlinks where the runtime mounts things).
fn hostile_rootfs(env: &Env, name: &str) -> Result<PathBuf> {
    let root = env.state.parent().context("state dir")?.join(format!("rootfs-{name}"));
    let status = std::process::Command::new("cp").arg("-a").arg(&env.rootfs).arg(&root).status()?;
    ensure!(status.success(), "copying the rootfs");
    Ok(root)
}

/// Descriptor numbers listed by `ls /proc/self/fd` (which itself holds one open: the directory it reads).
fn descriptors(out: &str) -> Vec<u32> {
    out.split_whitespace().filter_map(|s| s.parse().ok()).collect()
}

pub async fn privileged_containers_get_the_host(rt: Runtime, env: Env) -> Result<()> {
    let script = "grep -E '^(CapEff|Seccomp):' /proc/self/status; [ -c /dev/kmsg ] && echo kmsg-device; \
        for p in /proc/keys /proc/timer_list /proc/sched_debug /proc/kcore; do \
            [ -e $p ] && { stat -c 'masked=%F' $p; break; }; done; awk '$5 == \"/sys\" {print \"sys=\" substr($6, 1, 2)}' /proc/self/mountinfo; \
        echo nodelet.test > /proc/sys/kernel/domainname && echo procsys-writable";
    let mut cfg = config(&env, "privileged", &["sh", "-c", script]);
    cfg.security.privileged = true;
    cfg.security.seccomp = Seccomp::RuntimeDefault; // a privileged container is unconfined regardless
    let (exit, out, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0, "{exit:?} {out} {err}");
    // Every capability this process may hand on (the test's own bounding set).
    let bounding = field(&host("/proc/self/status"), "CapBnd:").context("CapBnd")?;
    ensure!(field(&out, "CapEff:") == Some(bounding), "all capabilities: {out}");
    ensure!(field(&out, "Seccomp:").as_deref() == Some("0"), "no seccomp filter: {out}");
    ensure!(out.contains("kmsg-device"), "the host's devices: {out}");
    ensure!(out.contains("masked=regular"), "no masked paths: {out}");
    ensure!(out.contains("sys=rw") && out.contains("procsys-writable"), "writable /sys and /proc/sys: {out}");
    Ok(())
}

/// An exec'd process (nodelet's own exec path, not libcontainer's) is confined exactly as the container's init:
/// same user and groups, capabilities, no_new_privs, seccomp mode, namespaces, cgroups and oom_score_adj, and
/// neither has a signal ignored or blocked (the agent ignores SIGPIPE; a container must not inherit that).
pub async fn exec_is_confined_like_the_init(rt: Runtime, env: Env) -> Result<()> {
    let mut cfg = config(&env, "exec-confined", &["sleep", "100"]);
    cfg.image.user = Some("app".into());
    cfg.security.supplemental_groups = vec![3000];
    cfg.security.capabilities_drop = vec!["ALL".into()];
    cfg.security.capabilities_add = vec!["NET_BIND_SERVICE".into(), "KILL".into()];
    cfg.security.allow_privilege_escalation = Some(false);
    cfg.security.seccomp = Seccomp::RuntimeDefault;
    cfg.oom_score_adj = Some(937);
    cfg.working_dir = Some("/tmp".into());
    let c = rt.create(&cfg, ContainerIo::default()).await?;
    rt.start(&c).await?;
    let exec = |args: &[&str]| ExecConfig { args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    let facts = "for f in status cgroup oom_score_adj; do echo \"== $f\"; cat /proc/$1/$f; done; \
        for n in mnt net ipc uts pid cgroup; do echo ns-$n $(readlink /proc/$1/ns/$n); done; echo cwd $(readlink /proc/$1/cwd)";
    let result = async {
        let (code, init) = rt.exec_sync(&c, &exec(&["sh", "-c", facts, "-", "1"]), Duration::from_secs(10)).await?;
        ensure!(code == Some(0), "reading the init's facts: {code:?} {}", String::from_utf8_lossy(&init));
        // The exec'd process reads its own status with grep (a direct child of nothing that changes dispositions).
        let (code, own) = rt
            .exec_sync(
                &c,
                &exec(&[
                    "grep",
                    "-E",
                    "^(Uid|Gid|Groups|Cap...|NoNewPrivs|Seccomp|SigIgn|SigBlk):",
                    "/proc/self/status",
                ]),
                Duration::from_secs(10),
            )
            .await?;
        ensure!(code == Some(0), "reading its own status: {code:?} {}", String::from_utf8_lossy(&own));
        let (code, shell) = rt.exec_sync(&c, &exec(&["sh", "-c", facts, "-", "self"]), Duration::from_secs(10)).await?;
        ensure!(code == Some(0), "reading its own facts");
        Ok::<_, anyhow::Error>((
            String::from_utf8_lossy(&init).into_owned(),
            String::from_utf8_lossy(&own).into_owned(),
            String::from_utf8_lossy(&shell).into_owned(),
        ))
    }
    .await;
    let _ = rt.delete(&c).await;
    let (init, own, shell) = result?;
    for name in
        ["Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:"]
    {
        ensure!(
            field(&own, name).is_some() && field(&own, name) == field(&init, name),
            "{name} differs: exec'd {:?}, init {:?}\n{own}\n{init}",
            field(&own, name),
            field(&init, name)
        );
    }
    ensure!(field(&own, "Uid:").is_some_and(|u| u.starts_with("1000")), "the image's user: {own}");
    ensure!(field(&own, "Groups:").is_some_and(|g| g.contains("2000") && g.contains("3000")), "groups: {own}");
    ensure!(
        field(&own, "NoNewPrivs:").as_deref() == Some("1") && field(&own, "Seccomp:").as_deref() == Some("2"),
        "{own}"
    );
    for (who, text) in [("exec'd", &own), ("init", &init)] {
        ensure!(field(text, "SigIgn:").as_deref() == Some("0000000000000000"), "{who} ignores signals: {text}");
        ensure!(field(text, "SigBlk:").as_deref() == Some("0000000000000000"), "{who} blocks signals: {text}");
    }
    // Namespaces, cgroups (as the container's cgroup namespace shows them), oom_score_adj and working directory.
    let section = |text: &str, from: &str| -> String {
        let start = text.find(from).map_or(text.len(), |i| i + from.len());
        text[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("==") && !l.starts_with("ns-"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let tail = |text: &str| {
        text.lines().filter(|l| l.starts_with("ns-") || l.starts_with("cwd")).collect::<Vec<_>>().join("\n")
    };
    ensure!(section(&shell, "== cgroup") == section(&init, "== cgroup"), "cgroups differ:\n{shell}\n{init}");
    ensure!(section(&shell, "== oom_score_adj").trim() == "937", "oom_score_adj: {shell}");
    ensure!(section(&init, "== oom_score_adj").trim() == "937", "the init's oom_score_adj: {init}");
    ensure!(
        tail(&shell) == tail(&init) && tail(&init).contains("cwd /tmp"),
        "namespaces or cwd differ:\n{shell}\n{init}"
    );
    Ok(())
}

pub async fn unprivileged_containers_cannot_reach_the_host(rt: Runtime, env: Env) -> Result<()> {
    let core_pattern = host("/proc/sys/kernel/core_pattern");
    // Everything here is something root in a container tries; each success prints ESCAPE.
    let script = r#"
        mknod /tmp/mem c 1 1 && head -c1 /tmp/mem >/dev/null 2>&1 && echo ESCAPE:device-use
        mkdir -p /tmp/m; mount -t tmpfs t /tmp/m 2>/dev/null && echo ESCAPE:mount
        echo x > /proc/sys/kernel/domainname 2>/dev/null && echo ESCAPE:proc-sys-write
        echo h > /proc/sysrq-trigger 2>/dev/null && echo ESCAPE:sysrq
        awk '$5 == "/sys" && substr($6, 1, 2) != "ro" {print "ESCAPE:sys-writable"}' /proc/self/mountinfo
        for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats; do
            [ -e $p ] && [ "$(stat -c %t:%T $p)" != "1:3" ] && echo ESCAPE:unmasked:$p
        done
        [ -e /dev/kmsg ] && echo ESCAPE:host-device
        [ $(ls -d /proc/[0-9]* | wc -l) -gt 8 ] && echo ESCAPE:host-pids
        tr '\0' ' ' < /proc/1/cmdline | grep -q '^sh -c' || echo ESCAPE:pid1-not-ours
        echo fds: $(ls /proc/self/fd)
        echo done"#;
    let cfg = config(&env, "hostile", &["sh", "-c", script]);
    let (exit, out, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0 && out.contains("done"), "{exit:?} {out} {err}");
    ensure!(!out.contains("ESCAPE"), "{out}");
    let fds = descriptors(out.lines().find(|l| l.starts_with("fds:")).unwrap_or_default());
    ensure!(fds.iter().all(|fd| *fd <= 3), "an agent descriptor reached the container (CVE-2024-21626): {out}");
    ensure!(host("/proc/sys/kernel/core_pattern") == core_pattern, "the host's core_pattern changed");
    Ok(())
}

/// CVE-2024-21626: a working directory of `/proc/self/fd/<n>` naming a descriptor the runtime leaked would put
/// the process in the host's filesystem. Each attempt must fail or stay in the container; an exec'd process
/// inherits no descriptor either.
pub async fn leaked_descriptors_do_not_reach_the_host(rt: Runtime, env: Env) -> Result<()> {
    let climb = "r=$(stat -c %d:%i /); d=.; for i in $(seq 32); do d=$d/..; done; \
        [ \"$(stat -c %d:%i $d)\" = \"$r\" ] && echo contained || echo ESCAPED";
    let (mut refused, mut contained) = (0, 0);
    for n in 3..=12 {
        let mut cfg = config(&env, &format!("fd-cwd-{n}"), &["sh", "-c", climb]);
        cfg.working_dir = Some(format!("/proc/self/fd/{n}"));
        match run(&rt, &cfg).await {
            Err(_) => refused += 1,
            Ok((exit, out, _)) if exit.code != 0 => refused += usize::from(!out.contains("ESCAPED")),
            Ok((_, out, err)) => {
                ensure!(out.trim() == "contained", "working dir /proc/self/fd/{n}: {out} {err}");
                contained += 1;
            }
        }
        assert_clean(&env, &format!("fd-cwd-{n}"))?;
    }
    ensure!(refused + contained == 10, "refused {refused}, contained {contained}");

    let cfg = config(&env, "fd-exec", &["sleep", "100"]);
    let c = rt.create(&cfg, ContainerIo::default()).await?;
    rt.start(&c).await?;
    let exec = ExecConfig { args: vec!["ls".into(), "/proc/self/fd".into()], ..Default::default() };
    let (code, out) = rt.exec_sync(&c, &exec, Duration::from_secs(5)).await?;
    rt.delete(&c).await?;
    let out = String::from_utf8_lossy(&out).into_owned();
    ensure!(code == Some(0), "{code:?} {out}");
    ensure!(descriptors(&out).iter().all(|fd| *fd <= 3), "an exec'd process inherited descriptors: {out}");
    Ok(())
}

/// The November 2025 runc set: an image whose `/dev/null` (CVE-2025-31133: bind-mounted over the masked paths)
/// or `/dev/console` (CVE-2025-52565: the console's mount target) is a symlink to a writable procfs file, and an
/// image whose `/proc` is a symlink (procfs and the masks would land elsewhere; the redirected writes of
/// CVE-2025-52881). None may unmask a path or make a host procfs file writable.
pub async fn hostile_images_cannot_redirect_the_setup(rt: Runtime, env: Env) -> Result<()> {
    let core_pattern = host("/proc/sys/kernel/core_pattern");
    let root = hostile_rootfs(&env, "devlinks")?;
    for name in ["null", "console", "ptmx", "zero"] {
        std::os::unix::fs::symlink("/proc/sys/kernel/core_pattern", root.join("dev").join(name))?;
    }
    let check = "for p in /proc/kcore /proc/keys /proc/timer_list; do \
            [ -e $p ] && [ \"$(stat -c %t:%T $p)\" != \"1:3\" ] && echo ESCAPE:unmasked:$p; done; \
        [ -c /dev/null ] || echo ESCAPE:null-not-a-device; \
        echo x > /proc/sys/kernel/core_pattern 2>/dev/null && echo ESCAPE:core_pattern; \
        [ -t 0 ] && { [ \"$(stat -c %t /dev/console)\" = 88 ] || echo ESCAPE:console; }; echo done";
    let mut cfg = config(&env, "devlinks", &["sh", "-c", check]);
    cfg.rootfs = root.clone();
    let (exit, out, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0 && out.contains("done") && !out.contains("ESCAPE"), "{exit:?} {out} {err}");

    // With a terminal: /dev/console is the container's pty (major 136 = 0x88), whatever the image put there.
    let mut cfg = config(&env, "consolelink", &["sh", "-c", check]);
    cfg.rootfs = root;
    let (exit, out) = run_tty(&rt, &cfg).await?;
    ensure!(exit.code == 0 && out.contains("done") && !out.contains("ESCAPE"), "{exit:?} {out}");

    // /proc a symlink in the image: refused, or a real procfs at /proc with its masks.
    let root = hostile_rootfs(&env, "proclink")?;
    std::fs::remove_dir(root.join("proc"))?;
    std::fs::create_dir_all(root.join("tmp/p"))?;
    std::os::unix::fs::symlink("/tmp/p", root.join("proc"))?;
    let probe = "[ \"$(stat -f -c %T /proc)\" = proc ] || echo ESCAPE:not-procfs; \
        for p in /proc/keys /proc/timer_list; do [ -e $p ] && [ \"$(stat -c %t:%T $p)\" != 1:3 ] && echo ESCAPE:$p; \
        done; echo done";
    let mut cfg = config(&env, "proclink", &["sh", "-c", probe]);
    cfg.rootfs = root;
    match run(&rt, &cfg).await {
        Err(_) => assert_clean(&env, "proclink")?,
        Ok((exit, out, err)) => {
            ensure!(exit.code == 0 && out.contains("done") && !out.contains("ESCAPE"), "{exit:?} {out} {err}")
        }
    }
    ensure!(host("/proc/sys/kernel/core_pattern") == core_pattern, "the host's core_pattern changed");
    Ok(())
}

pub async fn mounts_into_proc_and_sys_are_refused(rt: Runtime, env: Env) -> Result<()> {
    let source = env.state.parent().context("state dir")?.join("volume");
    std::fs::create_dir_all(&source)?;
    let bind = |destination: &str| Mount::Bind {
        source: source.clone(),
        destination: destination.into(),
        read_only: false,
        recursive: false,
        propagation: Default::default(),
    };
    for (id, destination) in [("mount-proc", "/proc/sys/kernel"), ("mount-sys", "/sys/fs/cgroup/x")] {
        let mut cfg = config(&env, id, &["true"]);
        cfg.mounts = vec![bind(destination)];
        let err = rt.create(&cfg, ContainerIo::default()).await.err().context("a mount into /proc or /sys")?;
        ensure!(matches!(err, RuntimeError::Spec(SpecError::ForbiddenMount { .. })), "{err}");
        assert_clean(&env, id)?;
    }
    // Through a symlink in the image.
    let root = hostile_rootfs(&env, "mountlink")?;
    std::os::unix::fs::symlink("/proc/sys", root.join("data/sys"))?;
    let mut cfg = config(&env, "mount-link", &["true"]);
    cfg.rootfs = root;
    cfg.mounts = vec![bind("/data/sys/kernel")];
    let err = rt.create(&cfg, ContainerIo::default()).await.err().context("a mount through a symlink into /proc")?;
    ensure!(err.to_string().contains("resolves to /proc/sys/kernel"), "{err}");
    // A privileged container may have the host's /sys.
    let mut cfg = config(&env, "mount-sys-privileged", &["true"]);
    cfg.security.privileged = true;
    cfg.mounts = vec![bind("/sys/kernel/security")];
    let (exit, _, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0, "{exit:?} {err}");
    Ok(())
}

pub async fn localhost_seccomp_profiles_are_enforced(rt: Runtime, env: Env) -> Result<()> {
    let dir = env.state.parent().context("state dir")?.join("seccomp");
    std::fs::create_dir_all(&dir)?;
    // Docker's format, as the Kubernetes tutorials ship them.
    let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#;
    std::fs::write(dir.join("no-mkdir.json"), profile)?;
    let script = "grep Seccomp: /proc/self/status; mkdir /tmp/x 2>&1; echo rc=$?";
    let mut cfg = config(&env, "seccomp-local", &["sh", "-c", script]);
    cfg.security.seccomp = Seccomp::Localhost(dir.join("no-mkdir.json"));
    let (exit, out, err) = run(&rt, &cfg).await?;
    ensure!(exit.code == 0, "{exit:?} {err}");
    ensure!(field(&out, "Seccomp:").as_deref() == Some("2"), "{out}");
    ensure!(out.contains("Operation not permitted") && out.contains("rc=1"), "mkdir denied: {out}");

    let mut cfg = config(&env, "seccomp-missing", &["true"]);
    cfg.security.seccomp = Seccomp::Localhost(dir.join("missing.json"));
    let err = rt.create(&cfg, ContainerIo::default()).await.err().context("a missing profile")?;
    ensure!(err.to_string().contains("cannot load seccomp profile"), "{err}");
    assert_clean(&env, "seccomp-missing")?;
    Ok(())
}

pub async fn supplemental_groups_policy_and_the_reported_user(rt: Runtime, env: Env) -> Result<()> {
    for (strict, expected) in [(false, "1000 2000 3000"), (true, "1000 3000")] {
        let mut cfg = config(&env, "groups", &["id", "-G"]);
        cfg.security.run_as_user = Some(1000);
        cfg.security.supplemental_groups = vec![3000];
        cfg.security.strict_supplemental_groups = strict;
        let (io, pipes) = ContainerIo::pipes(false)?;
        let c = rt.create(&cfg, io).await?;
        let user = c.user.clone().context("the user of a created container")?;
        rt.start(&c).await?;
        let out = tokio::task::spawn_blocking(move || super::read_all(pipes.stdout));
        rt.wait(&c).await;
        rt.delete(&c).await?;
        let out = out.await?;
        ensure!(out.trim() == expected, "strict={strict}: id -G printed {out:?}");
        let reported: Vec<String> = user.additional_gids.iter().map(u32::to_string).collect();
        ensure!(user.uid == 1000 && user.gid == 1000 && reported.join(" ") == expected, "{user:?}");
    }
    Ok(())
}

/// `--reexec-probe`: this binary re-executed as the agent does at startup; prints whether its binary is now on a
/// read-only mount and whether a write through `/proc/self/exe` fails.
pub fn reexec_probe() -> i32 {
    if let Err(e) = nodelet_runtime::exe::reexec_read_only() {
        println!("not re-executed: {e}");
        return 1;
    }
    let write = std::fs::OpenOptions::new().write(true).open("/proc/self/exe");
    println!("read-only={} write={:?}", nodelet_runtime::exe::is_read_only(), write.map_err(|e| e.kind()));
    0
}

/// CVE-2019-5736: the agent's binary, as every process forked from it sees it, cannot be written.
pub async fn the_runtime_binary_cannot_be_overwritten(_rt: Runtime, _env: Env) -> Result<()> {
    let exe = std::env::current_exe()?;
    let before = std::fs::metadata(&exe)?.modified()?;
    let out = std::process::Command::new(&exe).arg("--reexec-probe").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("re-executing from a read-only mount: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    ensure!(text.contains("read-only=true") && text.contains("write=Err("), "{text}");
    ensure!(std::fs::metadata(Path::new(&exe))?.modified()? == before);
    Ok(())
}
