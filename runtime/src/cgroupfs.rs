//! A container's `/sys/fs/cgroup` on v1 and hybrid hosts, built on the host side before the container is created.
//!
//! Given a `cgroup` mount, libcontainer's init mounts every v1 hierarchy one by one, each through hardened procfs
//! checks, after scanning mountinfo and `/proc/<pid>/cgroup`: ~1,100 system calls and ~2 ms per container on
//! this host's 9 hierarchies, a fifth of a whole create. Here the same view is assembled with plain mount calls
//! (a tmpfs with a bind mount of the container's own cgroup in each hierarchy, read-only unless privileged, and
//! the comount links) and handed to the container as a single recursive bind mount. It is what a cgroup
//! namespace shows: the container's cgroup as each hierarchy's root. It also works when the PID namespace is
//! shared, where libcontainer reads the wrong process's cgroups and gives the container no cgroupfs at all.
//!
//! The host copy is only needed while the init sets up its mounts: it is unmounted as soon as `create` returns
//! (the container keeps its own copy), and leftovers of a crashed agent are swept at startup.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The controllers libcontainer's v1 manager places a container in; in other hierarchies (named ones such as
/// `name=systemd`, `rdma`, `misc`) the container stays where the agent is, and its view shows that cgroup.
const MANAGED: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// A v1 hierarchy mounted at `/sys/fs/cgroup/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    /// The directory name under `/sys/fs/cgroup` (`memory`, `cpu,cpuacct`, `systemd`).
    name: String,
    /// The cgroup the mount shows as its root (`/` unless a bind mount of a subtree, as in test sandboxes).
    root: String,
    /// Controllers (and `name=` for named hierarchies) from the super block options.
    controllers: Vec<String>,
}

/// One line of `/proc/self/mountinfo`: what is mounted where, and which subtree of it.
pub(crate) struct MountEntry<'a> {
    /// The subtree of the file system shown at the mount point (unescaped).
    pub root: String,
    pub point: PathBuf,
    pub fstype: &'a str,
    pub super_options: &'a str,
}

/// The lines of a mountinfo file, in mount order (a later mount at a path hides the earlier ones).
pub(crate) fn mounts(mountinfo: &str) -> impl Iterator<Item = MountEntry<'_>> {
    mountinfo.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        Some(MountEntry {
            root: unescape(fields.get(3)?),
            point: PathBuf::from(unescape(fields.get(4)?)),
            fstype: fields.get(sep + 1)?,
            super_options: fields.get(sep + 3)?,
        })
    })
}

/// The v1 hierarchies directly under `/sys/fs/cgroup`, from mountinfo (the last mount at a path is the visible
/// one).
fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut found: Vec<Hierarchy> = Vec::new();
    for m in mounts(mountinfo) {
        if m.fstype != "cgroup" || m.point.parent() != Some(Path::new(CGROUP_ROOT)) {
            continue;
        }
        let Some(name) = m.point.file_name().and_then(|n| n.to_str()) else { continue };
        let controllers = m.super_options.split(',').filter(|o| !is_mount_option(o)).map(str::to_string).collect();
        let h = Hierarchy { name: name.to_string(), root: m.root, controllers };
        found.retain(|f| f.name != h.name);
        found.push(h);
    }
    found
}

/// Super block options of a v1 cgroup mount that are not controllers.
fn is_mount_option(o: &str) -> bool {
    matches!(o, "rw" | "ro" | "noprefix" | "clone_children" | "xattr" | "favordynmods" | "cpuset_v2_mode")
        || o.starts_with("release_agent=")
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// This process's cgroup per hierarchy, keyed by its controller list as in `/proc/self/cgroup` (`cpu,cpuacct`,
/// `name=systemd`).
fn own_cgroups(proc_cgroup: &str) -> HashMap<String, String> {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            (!controllers.is_empty()).then(|| (controllers.to_string(), path.to_string()))
        })
        .collect()
}

/// What one hierarchy of the view shows, relative to its mount point: the container's cgroup where libcontainer
/// puts it, else the agent's own (`None` when that is outside the mounted subtree).
fn source_in(h: &Hierarchy, cgroups_path: &str, own: &HashMap<String, String>) -> Option<PathBuf> {
    if h.controllers.iter().any(|c| MANAGED.contains(&c.as_str())) {
        return Some(PathBuf::from(cgroups_path.trim_start_matches('/')));
    }
    let mine = own.get(&h.controllers.join(","))?;
    let rel = Path::new(mine).strip_prefix(&h.root).ok()?;
    Some(rel.to_path_buf())
}

/// What one container's view shows: the directory bound at each hierarchy's name, and the comount aliases.
#[derive(Debug)]
pub(crate) struct Plan {
    binds: Vec<(String, PathBuf)>,
    aliases: Vec<(String, String)>,
}

/// The host's v1 hierarchies and the agent's cgroup in each: read once, when the runtime starts.
#[derive(Debug)]
pub(crate) struct Hierarchies {
    list: Vec<Hierarchy>,
    own: HashMap<String, String>,
}

impl Hierarchies {
    pub(crate) fn detect() -> io::Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let own = own_cgroups(&std::fs::read_to_string("/proc/self/cgroup")?);
        Ok(Self { list: hierarchies(&mountinfo), own })
    }
}

impl Plan {
    /// Plans the view of the container whose cgroup is `cgroups_path`, creating that cgroup in each managed
    /// hierarchy (libcontainer finds it there).
    pub(crate) fn new(host: &Hierarchies, cgroups_path: &str) -> io::Result<Self> {
        let hierarchies = &host.list;
        let mut binds = Vec::new();
        for h in hierarchies {
            let Some(rel) = source_in(h, cgroups_path, &host.own) else { continue };
            let source = Path::new(CGROUP_ROOT).join(&h.name).join(rel);
            std::fs::create_dir_all(&source)?;
            binds.push((h.name.clone(), source));
        }
        // Comounted controllers are also reachable by each name (`cpu` -> `cpu,cpuacct`), as on the host.
        let mut aliases = Vec::new();
        for h in hierarchies.iter().filter(|h| h.name.contains(',')) {
            for alias in h.name.split(',').filter(|a| !hierarchies.iter().any(|o| o.name == *a)) {
                aliases.push((alias.to_string(), h.name.clone()));
            }
        }
        Ok(Self { binds, aliases })
    }

    /// Replaces the spec's `cgroup` mount (if any) with the view, assembled in `dir`, keeping its options.
    pub(crate) fn replace_mount(&self, spec: &mut oci_spec::runtime::Spec, dir: &Path) -> io::Result<Option<View>> {
        let Some(mut mounts) = spec.mounts().clone() else { return Ok(None) };
        let Some(m) = mounts.iter_mut().find(|m| m.typ().as_deref() == Some("cgroup")) else { return Ok(None) };
        let view = self.mount(dir, m.options().iter().flatten().any(|o| o == "ro"))?;
        *m = view.spec_mount(m);
        spec.set_mounts(Some(mounts));
        Ok(Some(view))
    }

    /// Assembles the view in `dir` (created; must not exist). On failure nothing is left mounted.
    fn mount(&self, dir: &Path, read_only: bool) -> io::Result<View> {
        std::fs::create_dir_all(dir)?;
        let view = View { dir: dir.to_path_buf() };
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some("mode=755,size=64k"))?;
        // Private before anything is mounted in it: the container's copy must not see the host copy go away.
        mount(None::<&str>, dir, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)?;
        for (name, source) in &self.binds {
            let target = dir.join(name);
            std::fs::create_dir(&target)?;
            mount(Some(source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
            if read_only {
                let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags;
                mount(None::<&str>, &target, None::<&str>, ro, None::<&str>)?;
            }
        }
        for (alias, target) in &self.aliases {
            std::os::unix::fs::symlink(target, dir.join(alias))?;
        }
        Ok(view)
    }
}

/// The host side of one container's cgroupfs view; unmounted and removed on drop.
#[derive(Debug)]
pub(crate) struct View {
    dir: PathBuf,
}

impl View {
    /// The spec mount replacing `cgroup`: the view, recursively, with the original mount's options.
    fn spec_mount(&self, original: &oci_spec::runtime::Mount) -> oci_spec::runtime::Mount {
        let mut options = vec!["rbind".to_string()];
        options.extend(original.options().iter().flatten().filter(|o| *o != "relatime").cloned());
        let mut m = original.clone();
        m.set_typ(Some("bind".into())).set_source(Some(self.dir.clone())).set_options(Some(options));
        m
    }
}

impl Drop for View {
    fn drop(&mut self) {
        remove(&self.dir);
    }
}

fn remove(dir: &Path) {
    if let Err(e) = umount2(dir, MntFlags::MNT_DETACH)
        && e != nix::errno::Errno::EINVAL
    {
        tracing::warn!(dir = %dir.display(), error = %e, "unmounting a cgroupfs view");
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes the views a crashed agent left in `parent`.
pub(crate) fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        remove(&e.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 29 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
37 30 0:33 / /sys/fs/cgroup/rdma rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,rdma
90 36 0:32 /sandbox\\040x /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn finds_v1_hierarchies_and_the_visible_mount() {
        let found = hierarchies(HYBRID);
        let names: Vec<_> = found.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["systemd", "cpu,cpuacct", "rdma", "memory"]);
        let memory = found.iter().find(|h| h.name == "memory").unwrap();
        assert_eq!(memory.root, "/sandbox x", "the later mount at a path hides the earlier one");
        let systemd = &found[0];
        assert_eq!(systemd.controllers, ["name=systemd"]);
        assert_eq!(found[1].controllers, ["cpu", "cpuacct"]);
    }

    #[test]
    fn sources_are_the_containers_cgroup_or_the_agents() {
        let found = hierarchies(HYBRID);
        let own = own_cgroups("12:rdma:/agent\n1:name=systemd:/system.slice/nodelet.service\n0::/\n");
        let by = |n: &str| found.iter().find(|h| h.name == n).unwrap();
        assert_eq!(source_in(by("memory"), "/kubepods/pod1/c1", &own), Some(PathBuf::from("kubepods/pod1/c1")));
        assert_eq!(source_in(by("cpu,cpuacct"), "/kubepods/c", &own), Some(PathBuf::from("kubepods/c")));
        assert_eq!(source_in(by("systemd"), "/k/c", &own), Some(PathBuf::from("system.slice/nodelet.service")));
        assert_eq!(source_in(by("rdma"), "/k/c", &own), Some(PathBuf::from("agent")));
        // Outside the mounted subtree: not shown.
        let rooted = Hierarchy { name: "rdma".into(), root: "/other".into(), controllers: vec!["rdma".into()] };
        assert_eq!(source_in(&rooted, "/k/c", &own), None);
    }

    #[test]
    fn the_spec_mount_keeps_the_original_options() {
        let original: oci_spec::runtime::Mount = serde_json::from_value(serde_json::json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]
        }))
        .unwrap();
        let view = std::mem::ManuallyDrop::new(View { dir: PathBuf::from("/state/cgroupfs/c1") });
        let m = view.spec_mount(&original);
        assert_eq!(m.typ().as_deref(), Some("bind"));
        assert_eq!(m.source().as_deref(), Some(Path::new("/state/cgroupfs/c1")));
        assert_eq!(m.destination(), Path::new("/sys/fs/cgroup"));
        assert_eq!(m.options().as_deref().unwrap(), ["rbind", "nosuid", "noexec", "nodev", "ro"]);
    }
}
