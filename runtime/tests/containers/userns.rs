//! Pods in a user namespace of their own (`hostUsers: false`): the sandbox makes the namespace and the pod's
//! other namespaces inside it, containers and exec'd processes join it, and volumes are idmapped. Root in the
//! container is an unprivileged id on the node.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, ensure};
use nodelet_runtime::{ContainerIo, ExecConfig, IdMapping, Mount, Runtime, SandboxConfig};

use super::{Env, assert_clean, config, ns_id, run};

/// A range no test host's users have.
const MAPPING: IdMapping = IdMapping { host_id: 65536 * 7, size: 65536 };

/// A small ext4 filesystem mounted at `<top>/userns-ext4`, with a copy of the test rootfs: where the test's own
/// directory cannot be idmapped (the cgroup v2 guest's `/tmp` is an overlay, its kernel 6.1 cannot idmap tmpfs).
fn ext4_scratch(top: &Path, rootfs: &Path) -> Result<std::path::PathBuf> {
    let image = top.join("userns-ext4.img");
    let dir = top.join("userns-ext4");
    std::fs::create_dir_all(&dir)?;
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    let run = |cmd: &mut std::process::Command| -> Result<()> {
        let out = cmd.output()?;
        ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    run(std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
    run(std::process::Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&dir))?;
    run(std::process::Command::new("cp").arg("-a").arg(rootfs).arg(dir.join("rootfs")))?;
    Ok(dir)
}

pub async fn pods_get_their_own_user_namespace(rt: Runtime, env: Env) -> Result<()> {
    let top = env.state.parent().context("state dir")?.to_path_buf();
    // Where the rootfs and the volume live: beside the state, or on a scratch ext4 where that cannot be idmapped.
    let (base, source) = match nodelet_runtime::idmap::supported(&env.rootfs) {
        Ok(()) => (top.clone(), env.rootfs.clone()),
        Err(e) => {
            let scratch = ext4_scratch(&top, &env.rootfs).with_context(|| format!("{e}; and an ext4 scratch"))?;
            (scratch.clone(), scratch.join("rootfs"))
        }
    };
    let sb_config = SandboxConfig {
        id: "userns-pod".into(),
        hostname: Some("userns-pod".into()),
        network: true,
        ipc: true,
        uts: true,
        share_pid: false,
        user: Some(MAPPING),
    };
    let sb = rt.create_sandbox(&sb_config).await?;
    let user_file = sb.user.clone().context("the sandbox has no user namespace file")?;
    let userns = std::fs::File::open(&user_file)?;

    // The rootfs the agent would make: the image's files (owned by 0 on disk) idmapped into the pod's range.
    let rootfs = top.join("userns-rootfs");
    std::fs::create_dir_all(&rootfs)?;
    nodelet_runtime::idmap::mount(&source, &rootfs, &userns)?;
    // A volume, and a node file in it that belongs to an id outside the pod's range.
    let volume = base.join("userns-volume");
    std::fs::create_dir_all(&volume)?;
    std::fs::write(volume.join("secret"), "node only\n")?;
    std::os::unix::fs::chown(volume.join("secret"), Some(200_000), Some(200_000))?;
    std::fs::set_permissions(volume.join("secret"), std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(volume.join("root-owned"), "")?;

    let in_pod = |id: &str, script: &str| {
        let mut c = config(&env, id, &["sh", "-c", script]);
        c.rootfs = rootfs.clone();
        c.namespaces = sb.namespaces(false);
        c.hostname = None;
        c.mounts = vec![Mount::Bind {
            source: volume.clone(),
            destination: "/data".into(),
            read_only: false,
            recursive: false,
            propagation: Default::default(),
        }];
        c
    };
    let script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; readlink /proc/self/ns/user; \
        stat -c 'root=%u' /; stat -c 'owned=%u' /data/root-owned; echo made > /data/made; \
        cat /data/secret 2>/dev/null || echo secret-denied; mknod /tmp/null c 1 3 2>/dev/null || echo mknod-denied; \
        awk '$5 == \"/sys\" {print \"sys=\" $9} $5 == \"/proc/keys\" {print \"keys-masked\"}' /proc/self/mountinfo";
    let (exit, out, err) = run(&rt, &in_pod("userns-main", script)).await?;
    ensure!(exit.code == 0, "{exit:?} {out:?} {err:?}");
    let line = |l: &str| out.lines().any(|o| o.split_whitespace().collect::<Vec<_>>().join(" ") == l);
    ensure!(line("0 458752 65536"), "uid and gid maps: {out}");
    ensure!(out.lines().nth(2) == Some("0"), "the container's user is not its root: {out}");
    ensure!(line(&ns_id("user", &user_file)?), "not in the pod's user namespace: {out}");
    ensure!(line("root=0") && line("owned=0"), "idmapped rootfs and volume show the owners as they are on disk: {out}");
    ensure!(line("secret-denied"), "the pod's root read a node file outside its range: {out}");
    ensure!(line("mknod-denied"), "the pod's root made a device node: {out}");
    ensure!(line("sys=sysfs"), "no sysfs of the pod's network namespace: {out}");
    ensure!(line("keys-masked"), "the masked paths are not masked: {out}");
    // What the pod's root wrote through the idmapped volume is stored as its own id, 0, on disk.
    let made = std::fs::metadata(volume.join("made"))?;
    ensure!(made.uid() == 0 && made.gid() == 0, "written as {}:{}", made.uid(), made.gid());
    assert_clean(&env, "userns-main")?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(!mounts.contains("/idmapped/"), "staged idmapped mounts left behind");

    // The init runs as the range's first id on the node, and an exec'd process joins the same namespace.
    let (io, _pipes) = ContainerIo::pipes(false)?;
    let c = rt.create(&in_pod("userns-exec", "sleep 30"), io).await?;
    rt.start(&c).await?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid))?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).context("Uid")?.split_whitespace().next();
    ensure!(uid == Some("458752"), "the init's uid on the node: {uid:?}");
    let exec = ExecConfig {
        args: ["sh", "-c", "id -u; readlink /proc/self/ns/user; cat /proc/self/uid_map"].map(String::from).to_vec(),
        ..Default::default()
    };
    let (code, out) = rt.exec_sync(&c, &exec, std::time::Duration::from_secs(10)).await?;
    ensure!(code == Some(0), "exec: {code:?} {out:?}");
    let out = String::from_utf8_lossy(&out);
    ensure!(out.starts_with("0\n") && out.contains(&ns_id("user", &user_file)?), "exec: {out}");
    ensure!(out.contains("458752"), "exec's uid map: {out}");
    rt.delete(&c).await?;

    rt.remove_sandbox(&sb).await?;
    nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH)?;
    if base != top {
        nix::mount::umount2(&base, nix::mount::MntFlags::MNT_DETACH)?;
    }
    ensure!(!Path::new(&user_file).exists(), "the user namespace file is left");
    Ok(())
}
