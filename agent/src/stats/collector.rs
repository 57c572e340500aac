//! Builds a [`Summary`] from what the node's files say ([`Readings`]) and the pods the status manager last
//! reported: which pods and containers exist comes from status (running containers only, as upstream drops
//! terminated ones), their usage from their cgroups. Decisions only; every read goes through [`Readings`], so a
//! fake drives the tests.
//!
//! Cheap numbers (cgroup files, PSI, statvfs, `/proc/*/net/dev`) are read every housekeeping round. Disk usage
//! that needs a walk of a directory tree (writable layers, logs, volumes, the image store) is read at most once
//! per `volumeStatsAggPeriod`, as upstream's du-based volume metrics are cached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nodelet_cgroups::psi::{Pressure, PressureLine};
use nodelet_cgroups::qos::{self, QosClass};
use nodelet_cgroups::stats::{CgroupStats, CpuRate, NodeStats as HostStats, PressureStats};

use super::summary::*;

/// A filesystem's size and free space (statvfs), and which device it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filesystem {
    pub device: u64,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

/// What a directory tree holds (a walk: blocks and inodes, one filesystem only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub bytes: u64,
    pub inodes: u64,
}

/// The node's files, as the collector reads them. `rel` names a cgroup below the node's cgroup root.
pub trait Readings: Send + Sync {
    fn host(&self) -> Option<HostStats>;
    fn host_pressure(&self) -> Option<PressureStats>;
    fn cgroup(&self, rel: &str) -> Option<CgroupStats>;
    fn pressure(&self, rel: &str) -> Option<PressureStats>;
    /// The agent's own cgroup (`kubelet` system container): usage and PSI.
    fn agent(&self) -> Option<(CgroupStats, Option<PressureStats>)>;
    fn filesystem(&self, path: &Path) -> Option<Filesystem>;
    fn disk_usage(&self, path: &Path) -> Option<DiskUsage>;
    /// The interfaces of the network namespace of the processes in cgroup `rel`; `None`: the host's.
    fn interfaces(&self, rel: Option<&str>) -> Vec<InterfaceStats>;
    /// The volume directories of a pod: (volume name, path).
    fn volumes(&self, pod_dir: &Path) -> Vec<(String, PathBuf)>;
    /// (`kernel.pid_max`, processes running).
    fn processes(&self) -> (Option<i64>, Option<i64>);
}

/// Where the node keeps what the summary measures.
#[derive(Debug, Clone)]
pub struct Layout {
    pub node_name: String,
    pub root_dir: PathBuf,
    pub log_dir: PathBuf,
    /// How long a disk-usage walk is reused (`volumeStatsAggPeriod`).
    pub disk_usage_period: Duration,
}

impl Layout {
    fn rootfs(&self) -> PathBuf {
        crate::images::rootfs_dir(&self.root_dir)
    }
    fn images(&self) -> PathBuf {
        crate::images::store_dir(&self.root_dir)
    }
}

/// A running container, from status.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerInput {
    pub name: String,
    pub id: String,
    pub image: String,
    pub start_time: Option<Time>,
}

/// A pod with a cgroup, from status.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInput {
    pub reference: PodReference,
    pub start_time: Option<Time>,
    pub cgroup: String,
    pub containers: Vec<ContainerInput>,
}

/// The pods to measure: those with a QoS class in status (their cgroup is named by it), with their running
/// containers (init, app and ephemeral).
pub fn inputs(pods: &[Pod]) -> Vec<PodInput> {
    pods.iter()
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let qos = QosClass::parse(status.qos_class.as_deref()?)?;
            let uid = pod.metadata.uid.clone()?;
            let containers = crate::status::all_container_statuses(status)
                .filter_map(|c| {
                    let running = c.state.as_ref()?.running.as_ref()?;
                    let id = c.container_id.as_deref()?.strip_prefix("nodelet://")?.to_string();
                    Some(ContainerInput {
                        name: c.name.clone(),
                        id,
                        image: c.image.clone(),
                        start_time: running.started_at.clone(),
                    })
                })
                .collect();
            Some(PodInput {
                reference: PodReference {
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    uid: uid.clone(),
                },
                start_time: status.start_time.clone(),
                cgroup: qos::pod_cgroup(qos, &uid),
                containers,
            })
        })
        .collect()
}

/// What cAdvisor's series label by and the summary has no field for: one per pod and per container measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupInfo {
    pub pod: PodReference,
    /// `None` for the pod's own cgroup.
    pub container: Option<String>,
    /// The container's ID (empty for the pod).
    pub id: String,
    pub image: String,
    /// The cgroup's path from the node's cgroup root, with a leading `/` (cAdvisor's `id` label).
    pub cgroup: String,
    pub oom_kills: u64,
}

/// One housekeeping round's result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub summary: Summary,
    pub cgroups: Vec<CgroupInfo>,
}

/// State kept between rounds: CPU samples for rates and disk-usage walks for reuse.
#[derive(Debug)]
pub struct Collector {
    layout: Layout,
    started: Time,
    rates: HashMap<String, CpuRate>,
    walks: HashMap<PathBuf, (Instant, Option<DiskUsage>)>,
}

fn psi(p: &Pressure) -> PsiStats {
    let line = |l: &PressureLine| PsiData { total: l.total_us, avg10: l.avg10, avg60: l.avg60, avg300: l.avg300 };
    PsiStats { full: line(&p.full), some: line(&p.some) }
}

fn fs_stats(time: &Time, fs: Option<Filesystem>, used: Option<DiskUsage>) -> Option<FsStats> {
    if fs.is_none() && used.is_none() {
        return None;
    }
    Some(FsStats {
        time: time.clone(),
        available_bytes: fs.map(|f| f.available_bytes),
        capacity_bytes: fs.map(|f| f.capacity_bytes),
        used_bytes: used.map(|u| u.bytes),
        inodes_free: fs.map(|f| f.inodes_free),
        inodes: fs.map(|f| f.inodes),
        inodes_used: used.map(|u| u.inodes),
    })
}

/// `eth0` at the top level (upstream's default interface; without one the top level is empty, as upstream's),
/// every interface in `interfaces`.
fn network(time: &Time, interfaces: Vec<InterfaceStats>) -> Option<NetworkStats> {
    if interfaces.is_empty() {
        return None;
    }
    let default = interfaces.iter().find(|i| i.name == "eth0").cloned().unwrap_or_default();
    Some(NetworkStats { time: time.clone(), default, interfaces })
}

impl Collector {
    pub fn new(layout: Layout, started: Timestamp) -> Collector {
        Collector { layout, started: Time(started), rates: HashMap::new(), walks: HashMap::new() }
    }

    /// A directory tree's usage, walked again only once the last walk is older than the period.
    fn walk(&mut self, readings: &dyn Readings, path: &Path, now: Instant) -> Option<DiskUsage> {
        let period = self.layout.disk_usage_period;
        if let Some((at, usage)) = self.walks.get(path)
            && now.saturating_duration_since(*at) < period
        {
            return *usage;
        }
        let usage = readings.disk_usage(path);
        self.walks.insert(path.to_path_buf(), (now, usage));
        usage
    }

    fn cpu(
        &mut self,
        key: &str,
        time: &Time,
        now: Instant,
        usage_ns: u64,
        pressure: Option<&PressureStats>,
    ) -> CpuStats {
        let rate = self.rates.entry(key.to_string()).or_default().sample(now, usage_ns);
        CpuStats {
            time: time.clone(),
            usage_nano_cores: rate,
            usage_core_nano_seconds: Some(usage_ns),
            psi: pressure.map(|p| psi(&p.cpu)),
        }
    }

    /// Usage of one cgroup as the summary's cpu/memory/io/swap blocks (`available`: the limit minus working set,
    /// where there is a limit).
    fn cgroup_blocks(
        &mut self,
        key: &str,
        time: &Time,
        now: Instant,
        stats: &CgroupStats,
        pressure: Option<&PressureStats>,
    ) -> (CpuStats, MemoryStats, Option<IoStats>, Option<SwapStats>) {
        let cpu = self.cpu(key, time, now, stats.cpu_usage_ns, pressure);
        let memory = MemoryStats {
            time: time.clone(),
            available_bytes: stats.memory_limit_bytes.map(|l| l.saturating_sub(stats.memory_working_set_bytes)),
            usage_bytes: Some(stats.memory_usage_bytes),
            working_set_bytes: Some(stats.memory_working_set_bytes),
            rss_bytes: Some(stats.memory_rss_bytes),
            page_faults: Some(stats.page_faults),
            major_page_faults: Some(stats.major_page_faults),
            psi: pressure.map(|p| psi(&p.memory)),
        };
        let io = pressure.map(|p| IoStats { time: time.clone(), psi: Some(psi(&p.io)) });
        let swap = stats.swap_usage_bytes.map(|used| SwapStats {
            time: time.clone(),
            swap_available_bytes: None,
            swap_usage_bytes: Some(used),
        });
        (cpu, memory, io, swap)
    }

    /// One round: reads everything and returns the summary. `now`/`wall` are the same moment.
    pub fn collect(&mut self, readings: &dyn Readings, pods: &[PodInput], now: Instant, wall: Timestamp) -> Snapshot {
        let round = OneRound { readings, filesystems: Default::default() };
        let readings: &dyn Readings = &round;
        let time = Time(wall);
        let node = self.node(readings, &time, now);
        let mut out = Vec::with_capacity(pods.len());
        let mut cgroups = Vec::new();
        for pod in pods {
            if let Some(stats) = self.pod(readings, pod, &time, now, &mut cgroups) {
                out.push(stats);
            }
        }
        // Rates and walks of pods and containers that are gone are dropped.
        let mut live: std::collections::HashSet<String> = ["node", "kubelet", "pods"].map(String::from).into();
        for pod in pods {
            live.insert(pod.reference.uid.clone());
            live.extend(pod.containers.iter().map(|c| c.id.clone()));
        }
        self.rates.retain(|k, _| live.contains(k));
        let period = self.layout.disk_usage_period;
        self.walks.retain(|_, (at, _)| now.saturating_duration_since(*at) < period * 2);
        Snapshot { summary: Summary { node, pods: out }, cgroups }
    }

    fn node(&mut self, readings: &dyn Readings, time: &Time, now: Instant) -> NodeStats {
        let host = readings.host();
        let pressure = readings.host_pressure();
        let mut system_containers = Vec::new();
        if let Some((stats, pressure)) = readings.agent() {
            // The runtime is in the agent's process: `runtime` is the same cgroup as `kubelet` (as upstream's
            // two are when containerd shares the kubelet's cgroup).
            let (cpu, memory, io, _) = self.cgroup_blocks("kubelet", time, now, &stats, pressure.as_ref());
            for name in ["kubelet", "runtime"] {
                let mut c = system_container(name, &self.started, cpu.clone(), memory.clone());
                c.io.clone_from(&io);
                system_containers.push(c);
            }
        }
        if let Some(stats) = readings.cgroup("kubepods") {
            let pressure = readings.pressure("kubepods");
            let (cpu, mut memory, io, _) = self.cgroup_blocks("pods", time, now, &stats, pressure.as_ref());
            // kubepods is limited to the node's capacity: available against that where it has no limit.
            if memory.available_bytes.is_none() {
                memory.available_bytes =
                    host.map(|h| h.memory_capacity_bytes.saturating_sub(stats.memory_working_set_bytes));
            }
            let mut pods = system_container("pods", &self.started, cpu, memory);
            pods.io = io;
            system_containers.push(pods);
        }
        let root = readings.filesystem(&self.layout.root_dir);
        let used = |fs: Filesystem| DiskUsage {
            bytes: fs.capacity_bytes.saturating_sub(fs.available_bytes),
            inodes: fs.inodes.saturating_sub(fs.inodes_free),
        };
        let images_dir = self.layout.images();
        let image_fs = fs_stats(time, readings.filesystem(&images_dir), self.walk(readings, &images_dir, now));
        let rootfs_dir = self.layout.rootfs();
        let container_fs = fs_stats(time, readings.filesystem(&rootfs_dir), self.walk(readings, &rootfs_dir, now));
        let (maxpid, curproc) = readings.processes();
        NodeStats {
            node_name: self.layout.node_name.clone(),
            system_containers,
            start_time: Some(self.started.clone()),
            cpu: host.map(|h| self.cpu("node", time, now, h.cpu_usage_ns, pressure.as_ref())),
            memory: host.map(|h| MemoryStats {
                time: time.clone(),
                available_bytes: Some(h.memory_available_bytes),
                usage_bytes: Some(h.memory_usage_bytes),
                working_set_bytes: Some(h.memory_working_set_bytes),
                rss_bytes: Some(h.memory_rss_bytes),
                page_faults: Some(h.page_faults),
                major_page_faults: Some(h.major_page_faults),
                psi: pressure.map(|p| psi(&p.memory)),
            }),
            io: pressure.map(|p| IoStats { time: time.clone(), psi: Some(psi(&p.io)) }),
            network: network(time, readings.interfaces(None)),
            fs: fs_stats(time, root, root.map(used)),
            runtime: Some(RuntimeStats { image_fs, container_fs }),
            rlimit: Some(RlimitStats { time: time.clone(), maxpid, curproc }),
            swap: host.filter(|h| h.swap_total_bytes > 0).map(|h| SwapStats {
                time: time.clone(),
                swap_available_bytes: Some(h.swap_free_bytes),
                swap_usage_bytes: Some(h.swap_total_bytes.saturating_sub(h.swap_free_bytes)),
            }),
        }
    }

    /// A pod whose cgroup exists; `None` otherwise (not started yet, or already gone).
    fn pod(
        &mut self,
        readings: &dyn Readings,
        pod: &PodInput,
        time: &Time,
        now: Instant,
        cgroups: &mut Vec<CgroupInfo>,
    ) -> Option<PodStats> {
        let stats = readings.cgroup(&pod.cgroup)?;
        let info = |container: Option<&ContainerInput>, rel: &str, oom_kills| CgroupInfo {
            pod: pod.reference.clone(),
            container: container.map(|c| c.name.clone()),
            id: container.map(|c| c.id.clone()).unwrap_or_default(),
            image: container.map(|c| c.image.clone()).unwrap_or_default(),
            cgroup: format!("/{rel}"),
            oom_kills,
        };
        cgroups.push(info(None, &pod.cgroup, stats.oom_kills));
        let pressure = readings.pressure(&pod.cgroup);
        let (cpu, memory, io, swap) = self.cgroup_blocks(&pod.reference.uid, time, now, &stats, pressure.as_ref());
        let rootfs_fs = readings.filesystem(&self.layout.rootfs());
        let log_dir = crate::logs::pod_log_dir(
            &self.layout.log_dir,
            &pod.reference.namespace,
            &pod.reference.name,
            &pod.reference.uid,
        );
        let log_fs = readings.filesystem(&self.layout.log_dir);
        let mut containers = Vec::new();
        let mut ephemeral = DiskUsage::default();
        for c in &pod.containers {
            let rel = format!("{}/{}", pod.cgroup, c.id);
            let Some(stats) = readings.cgroup(&rel) else { continue };
            cgroups.push(info(Some(c), &rel, stats.oom_kills));
            let pressure = readings.pressure(&rel);
            let (cpu, memory, io, swap) = self.cgroup_blocks(&c.id, time, now, &stats, pressure.as_ref());
            let rootfs = self.walk(readings, &self.layout.rootfs().join(&c.id).join("upper"), now);
            let logs = self.walk(readings, &log_dir.join(&c.name), now);
            for u in [rootfs, logs].into_iter().flatten() {
                ephemeral.bytes += u.bytes;
                ephemeral.inodes += u.inodes;
            }
            containers.push(ContainerStats {
                name: c.name.clone(),
                start_time: c.start_time.clone(),
                cpu: Some(cpu),
                memory: Some(memory),
                io,
                rootfs: fs_stats(time, rootfs_fs, rootfs),
                logs: fs_stats(time, log_fs, logs),
                swap,
            });
        }
        let pod_dir = self.layout.root_dir.join("pods").join(&pod.reference.uid);
        let mut volume_stats = Vec::new();
        for (name, path) in readings.volumes(&pod_dir) {
            let usage = self.walk(readings, &path, now);
            if let Some(u) = usage.filter(|_| !is_memory_backed(readings, &path, &self.layout.root_dir)) {
                ephemeral.bytes += u.bytes;
                ephemeral.inodes += u.inodes;
            }
            if let Some(fs) = fs_stats(time, readings.filesystem(&path), usage) {
                volume_stats.push(VolumeStats { fs, name });
            }
        }
        let root_fs = readings.filesystem(&self.layout.root_dir);
        Some(PodStats {
            pod_ref: pod.reference.clone(),
            start_time: pod.start_time.clone(),
            containers,
            cpu: Some(cpu),
            memory: Some(memory),
            io,
            network: network(time, readings.interfaces(Some(&pod.cgroup))),
            volume_stats,
            ephemeral_storage: fs_stats(time, root_fs, Some(ephemeral)),
            process_stats: Some(ProcessStats { process_count: Some(stats.pids) }),
            swap,
        })
    }
}

/// The readings of one round, with each filesystem's statvfs taken once (every pod asks for the root dir's,
/// the writable layers' and the logs' filesystem).
struct OneRound<'a> {
    readings: &'a dyn Readings,
    filesystems: std::sync::Mutex<HashMap<PathBuf, Option<Filesystem>>>,
}

impl Readings for OneRound<'_> {
    fn host(&self) -> Option<HostStats> {
        self.readings.host()
    }
    fn host_pressure(&self) -> Option<PressureStats> {
        self.readings.host_pressure()
    }
    fn cgroup(&self, rel: &str) -> Option<CgroupStats> {
        self.readings.cgroup(rel)
    }
    fn pressure(&self, rel: &str) -> Option<PressureStats> {
        self.readings.pressure(rel)
    }
    fn agent(&self) -> Option<(CgroupStats, Option<PressureStats>)> {
        self.readings.agent()
    }
    fn filesystem(&self, path: &Path) -> Option<Filesystem> {
        let mut known = self.filesystems.lock().unwrap_or_else(|e| e.into_inner());
        *known.entry(path.to_path_buf()).or_insert_with(|| self.readings.filesystem(path))
    }
    fn disk_usage(&self, path: &Path) -> Option<DiskUsage> {
        self.readings.disk_usage(path)
    }
    fn interfaces(&self, rel: Option<&str>) -> Vec<InterfaceStats> {
        self.readings.interfaces(rel)
    }
    fn volumes(&self, pod_dir: &Path) -> Vec<(String, PathBuf)> {
        self.readings.volumes(pod_dir)
    }
    fn processes(&self) -> (Option<i64>, Option<i64>) {
        self.readings.processes()
    }
}

/// A volume on a filesystem of its own that is not the node's (a `medium: Memory` emptyDir's tmpfs, a secret's)
/// does not count as ephemeral storage, as upstream counts only disk-backed volumes.
fn is_memory_backed(readings: &dyn Readings, path: &Path, root_dir: &Path) -> bool {
    match (readings.filesystem(path), readings.filesystem(root_dir)) {
        (Some(volume), Some(root)) => volume.device != root.device,
        _ => false,
    }
}

fn system_container(name: &str, started: &Time, cpu: CpuStats, memory: MemoryStats) -> ContainerStats {
    ContainerStats {
        name: name.into(),
        start_time: Some(started.clone()),
        cpu: Some(cpu),
        memory: Some(memory),
        io: None,
        rootfs: None,
        logs: None,
        swap: None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Readings from maps the test fills.
    #[derive(Default)]
    struct Fake {
        cgroups: Mutex<HashMap<String, CgroupStats>>,
        pressure: HashMap<String, PressureStats>,
        filesystems: HashMap<PathBuf, Filesystem>,
        usage: HashMap<PathBuf, DiskUsage>,
        walks: Mutex<Vec<PathBuf>>,
        volumes: Vec<(String, PathBuf)>,
    }

    impl Readings for Fake {
        fn host(&self) -> Option<HostStats> {
            Some(HostStats {
                cpu_usage_ns: 10_000_000_000,
                memory_capacity_bytes: 8 << 30,
                memory_usage_bytes: 3 << 30,
                memory_working_set_bytes: 2 << 30,
                memory_available_bytes: 6 << 30,
                memory_rss_bytes: 1 << 30,
                page_faults: 5,
                major_page_faults: 1,
                swap_total_bytes: 0,
                swap_free_bytes: 0,
            })
        }
        fn host_pressure(&self) -> Option<PressureStats> {
            self.pressure.get("").copied()
        }
        fn cgroup(&self, rel: &str) -> Option<CgroupStats> {
            self.cgroups.lock().unwrap().get(rel).copied()
        }
        fn pressure(&self, rel: &str) -> Option<PressureStats> {
            self.pressure.get(rel).copied()
        }
        fn agent(&self) -> Option<(CgroupStats, Option<PressureStats>)> {
            None
        }
        fn filesystem(&self, path: &Path) -> Option<Filesystem> {
            self.filesystems
                .iter()
                .filter(|(p, _)| path.starts_with(p))
                .max_by_key(|(p, _)| p.as_os_str().len())
                .map(|(_, f)| *f)
        }
        fn disk_usage(&self, path: &Path) -> Option<DiskUsage> {
            self.walks.lock().unwrap().push(path.to_path_buf());
            self.usage.get(path).copied()
        }
        fn interfaces(&self, rel: Option<&str>) -> Vec<InterfaceStats> {
            let name = if rel.is_some() { "eth0" } else { "ens3" };
            vec![
                InterfaceStats { name: "cni0".into(), rx_bytes: Some(1), ..Default::default() },
                InterfaceStats { name: name.into(), rx_bytes: Some(100), tx_bytes: Some(50), ..Default::default() },
            ]
        }
        fn volumes(&self, _: &Path) -> Vec<(String, PathBuf)> {
            self.volumes.clone()
        }
        fn processes(&self) -> (Option<i64>, Option<i64>) {
            (Some(4_194_304), Some(300))
        }
    }

    fn layout() -> Layout {
        Layout {
            node_name: "n1".into(),
            root_dir: "/r".into(),
            log_dir: "/logs".into(),
            disk_usage_period: Duration::from_secs(60),
        }
    }

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "spec": {"containers": [{"name": "app", "image": "i"}, {"name": "done", "image": "i"}]},
            "status": {
                "qosClass": "Burstable",
                "startTime": "2026-12-01T10:00:00Z",
                "containerStatuses": [
                    {"name": "app", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                     "containerID": "nodelet://c1", "state": {"running": {"startedAt": "2026-12-01T10:00:01Z"}}},
                    {"name": "done", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                     "containerID": "nodelet://c2", "state": {"terminated": {"exitCode": 0}}}
                ]
            }
        }))
        .unwrap()
    }

    fn cgroup(cpu_s: u64, mem: u64) -> CgroupStats {
        CgroupStats {
            cpu_usage_ns: cpu_s * 1_000_000_000,
            memory_usage_bytes: mem + 100,
            memory_working_set_bytes: mem,
            memory_limit_bytes: Some(4096),
            pids: 3,
            ..Default::default()
        }
    }

    #[test]
    fn running_containers_of_pods_with_a_qos_class() {
        let mut no_status = pod();
        no_status.status = None;
        let inputs = inputs(&[pod(), no_status]);
        assert_eq!(inputs.len(), 1);
        assert_eq!(inputs[0].cgroup, "kubepods/burstable/podu1");
        assert_eq!(inputs[0].containers.len(), 1, "terminated containers are not measured");
        assert_eq!((inputs[0].containers[0].name.as_str(), inputs[0].containers[0].id.as_str()), ("app", "c1"));
    }

    #[test]
    fn rates_volumes_psi_and_ephemeral_storage() {
        let memory =
            Pressure { some: PressureLine { avg10: 12.5, total_us: 900, ..Default::default() }, ..Default::default() };
        let mut fake = Fake {
            pressure: [("kubepods/burstable/podu1".to_string(), PressureStats { memory, ..Default::default() })].into(),
            filesystems: [
                (
                    PathBuf::from("/r"),
                    Filesystem { device: 1, capacity_bytes: 1000, available_bytes: 400, inodes: 50, inodes_free: 20 },
                ),
                (
                    PathBuf::from("/r/pods/u1/volumes/kubernetes.io~secret"),
                    Filesystem { device: 2, capacity_bytes: 9, ..Default::default() },
                ),
            ]
            .into(),
            usage: [
                (PathBuf::from("/r/rootfs/c1/upper"), DiskUsage { bytes: 10, inodes: 1 }),
                (PathBuf::from("/logs/ns_web_u1/app"), DiskUsage { bytes: 5, inodes: 2 }),
                (PathBuf::from("/r/pods/u1/volumes/kubernetes.io~empty-dir/data"), DiskUsage { bytes: 64, inodes: 3 }),
                (PathBuf::from("/r/pods/u1/volumes/kubernetes.io~secret/s"), DiskUsage { bytes: 7, inodes: 4 }),
            ]
            .into(),
            volumes: vec![
                ("data".into(), "/r/pods/u1/volumes/kubernetes.io~empty-dir/data".into()),
                ("s".into(), "/r/pods/u1/volumes/kubernetes.io~secret/s".into()),
            ],
            ..Default::default()
        };
        fake.cgroups.get_mut().unwrap().extend([
            ("kubepods".to_string(), cgroup(4, 2000)),
            ("kubepods/burstable/podu1".to_string(), cgroup(2, 1000)),
            ("kubepods/burstable/podu1/c1".to_string(), cgroup(1, 900)),
        ]);
        let pods = inputs(&[pod()]);
        let mut c = Collector::new(layout(), Timestamp::UNIX_EPOCH);
        let t0 = Instant::now();
        let first = c.collect(&fake, &pods, t0, Timestamp::UNIX_EPOCH).summary;
        assert_eq!(first.pods[0].cpu.as_ref().unwrap().usage_nano_cores, None, "no rate from one sample");
        assert_eq!(first.node.system_containers[0].name, "pods");

        fake.cgroups.get_mut().unwrap().extend([
            ("kubepods/burstable/podu1".to_string(), cgroup(4, 1000)),
            ("kubepods/burstable/podu1/c1".to_string(), cgroup(2, 900)),
        ]);
        let snapshot = c.collect(&fake, &pods, t0 + Duration::from_secs(2), Timestamp::UNIX_EPOCH);
        let cgroups: Vec<_> =
            snapshot.cgroups.iter().map(|i| (i.cgroup.as_str(), i.id.as_str(), i.image.as_str())).collect();
        assert_eq!(cgroups, [("/kubepods/burstable/podu1", "", ""), ("/kubepods/burstable/podu1/c1", "c1", "i")]);
        let s = snapshot.summary;
        let p = &s.pods[0];
        assert_eq!(p.pod_ref.name, "web");
        assert_eq!(p.cpu.as_ref().unwrap().usage_nano_cores, Some(1_000_000_000), "2 s of CPU in 2 s");
        assert_eq!(p.containers[0].cpu.as_ref().unwrap().usage_nano_cores, Some(500_000_000));
        assert_eq!(p.containers[0].memory.as_ref().unwrap().working_set_bytes, Some(900));
        assert_eq!(p.containers[0].memory.as_ref().unwrap().available_bytes, Some(4096 - 900), "limit - working set");
        let psi = p.memory.as_ref().unwrap().psi.unwrap();
        assert_eq!((psi.some.avg10, psi.some.total), (12.5, 900));
        assert!(p.containers[0].memory.as_ref().unwrap().psi.is_none(), "no PSI files: no psi block");
        assert_eq!(p.containers[0].rootfs.as_ref().unwrap().used_bytes, Some(10));
        assert_eq!(p.containers[0].logs.as_ref().unwrap().used_bytes, Some(5));
        assert_eq!(p.volume_stats.len(), 2);
        assert_eq!(p.volume_stats[0].fs.used_bytes, Some(64));
        assert_eq!(p.volume_stats[0].fs.capacity_bytes, Some(1000));
        // rootfs + logs + the disk-backed emptyDir; the secret's tmpfs does not count.
        let eph = p.ephemeral_storage.as_ref().unwrap();
        assert_eq!((eph.used_bytes, eph.inodes_used), (Some(10 + 5 + 64), Some(1 + 2 + 3)));
        assert_eq!(p.process_stats.as_ref().unwrap().process_count, Some(3));
        let net = p.network.as_ref().unwrap();
        assert_eq!((net.default.name.as_str(), net.interfaces.len()), ("eth0", 2));
        let node = &s.node;
        assert_eq!(node.fs.as_ref().unwrap().used_bytes, Some(600));
        let node_network = node.network.as_ref().unwrap();
        assert_eq!((node_network.default.name.as_str(), node_network.interfaces.len()), ("", 2), "no eth0");
        assert_eq!(node.memory.as_ref().unwrap().available_bytes, Some(6 << 30));
        assert!(node.swap.is_none(), "no swap configured");
        assert_eq!(node.system_containers[0].memory.as_ref().unwrap().available_bytes, Some(4096 - 2000));
        // Walks are reused within the period: one walk per directory over both rounds.
        let walks = fake.walks.lock().unwrap().clone();
        assert_eq!(walks.iter().filter(|p| p.ends_with("c1/upper")).count(), 1);

        // JSON as upstream names it.
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["pods"][0]["ephemeral-storage"]["usedBytes"].is_u64());
        assert_eq!(json["pods"][0]["process_stats"]["process_count"], 3);
        assert_eq!(json["pods"][0]["volume"][0]["name"], "data");
        assert_eq!(json["pods"][0]["network"]["name"], "eth0");
        assert_eq!(json["pods"][0]["memory"]["psi"]["some"]["avg10"], 12.5);
        assert!(json["node"].get("swap").is_none());

        let small = s.cpu_and_memory();
        assert!(small.pods[0].network.is_none() && small.pods[0].containers[0].rootfs.is_none());
        assert!(small.pods[0].cpu.is_some() && small.node.fs.is_none());
    }

    #[test]
    fn pods_without_a_cgroup_are_left_out_and_their_samples_dropped() {
        let fake = Fake::default();
        fake.cgroups.lock().unwrap().insert("kubepods/burstable/podu1".into(), cgroup(1, 1));
        let mut c = Collector::new(layout(), Timestamp::UNIX_EPOCH);
        let t0 = Instant::now();
        assert_eq!(c.collect(&fake, &inputs(&[pod()]), t0, Timestamp::UNIX_EPOCH).summary.pods.len(), 1);
        assert!(c.rates.contains_key("u1"));
        fake.cgroups.lock().unwrap().clear();
        assert!(c.collect(&fake, &inputs(&[pod()]), t0, Timestamp::UNIX_EPOCH).summary.pods.is_empty());
        c.collect(&fake, &[], t0, Timestamp::UNIX_EPOCH);
        assert!(!c.rates.contains_key("u1"), "the pod's CPU samples go with it");
    }
}
