//! `/metrics/cadvisor`: the container series people graph most, under cAdvisor's names and labels (`container`,
//! `id` = cgroup path, `image`, `name` = container ID, `namespace`, `pod`; a pod's own cgroup has an empty
//! `container`, the machine `id="/"`), from the same housekeeping round as the summary. Series nodelet does not
//! measure (per-CPU time, schedstat, per-device I/O, TCP tables) are not emitted.

use prometheus::proto::MetricFamily;

use super::Family;
use crate::stats::collector::Snapshot;
use crate::stats::summary::{ContainerStats, CpuStats, MemoryStats, NetworkStats, PsiStats};

/// The families of one round.
pub fn families(snapshot: &Snapshot) -> Vec<MetricFamily> {
    let mut f = Families::new();
    let s = &snapshot.summary;
    let root = [("container", ""), ("id", "/"), ("image", ""), ("name", ""), ("namespace", ""), ("pod", "")];
    f.cpu(&root, s.node.cpu.as_ref());
    f.memory(&root, s.node.memory.as_ref());
    for info in &snapshot.cgroups {
        let Some(pod) = s.pods.iter().find(|p| p.pod_ref.uid == info.pod.uid) else { continue };
        let labels = [
            ("container", info.container.as_deref().unwrap_or("")),
            ("id", info.cgroup.as_str()),
            ("image", info.image.as_str()),
            ("name", info.id.as_str()),
            ("namespace", info.pod.namespace.as_str()),
            ("pod", info.pod.name.as_str()),
        ];
        match &info.container {
            None => {
                f.cpu(&labels, pod.cpu.as_ref());
                f.memory(&labels, pod.memory.as_ref());
                f.network(&labels, pod.network.as_ref());
                if let Some(n) = pod.process_stats.as_ref().and_then(|p| p.process_count) {
                    f.processes.add(&labels, n as f64, None);
                }
            }
            Some(name) => {
                let Some(c) = pod.containers.iter().find(|c| &c.name == name) else { continue };
                f.container(&labels, c);
            }
        }
        f.oom.add(&labels, info.oom_kills as f64, None);
    }
    f.done()
}

struct Families {
    cpu: Family,
    working_set: Family,
    usage: Family,
    rss: Family,
    swap: Family,
    fs_usage: Family,
    fs_limit: Family,
    rx_bytes: Family,
    rx_errors: Family,
    tx_bytes: Family,
    tx_errors: Family,
    oom: Family,
    processes: Family,
    start: Family,
    /// (stalled = full, waiting = some) per resource.
    pressure: [(Family, Family); 3],
}

impl Families {
    fn new() -> Families {
        let pressure = |resource: &str, what: &str| {
            (
                Family::counter(
                    &format!("container_pressure_{resource}_stalled_seconds_total"),
                    &format!(
                        "Total time duration no tasks in the container could make progress due to {what} congestion."
                    ),
                ),
                Family::counter(
                    &format!("container_pressure_{resource}_waiting_seconds_total"),
                    &format!("Total time duration tasks in the container have waited due to {what} congestion."),
                ),
            )
        };
        Families {
            cpu: Family::counter("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds."),
            working_set: Family::gauge("container_memory_working_set_bytes", "Current working set in bytes."),
            usage: Family::gauge(
                "container_memory_usage_bytes",
                "Current memory usage in bytes, including all memory regardless of when it was accessed",
            ),
            rss: Family::gauge("container_memory_rss", "Size of RSS in bytes."),
            swap: Family::gauge("container_memory_swap", "Container swap usage in bytes."),
            fs_usage: Family::gauge(
                "container_fs_usage_bytes",
                "Number of bytes that are consumed by the container on this filesystem.",
            ),
            fs_limit: Family::gauge(
                "container_fs_limit_bytes",
                "Number of bytes that can be consumed by the container on this filesystem.",
            ),
            rx_bytes: Family::counter("container_network_receive_bytes_total", "Cumulative count of bytes received"),
            rx_errors: Family::counter(
                "container_network_receive_errors_total",
                "Cumulative count of errors encountered while receiving",
            ),
            tx_bytes: Family::counter(
                "container_network_transmit_bytes_total",
                "Cumulative count of bytes transmitted",
            ),
            tx_errors: Family::counter(
                "container_network_transmit_errors_total",
                "Cumulative count of errors encountered while transmitting",
            ),
            oom: Family::counter(
                "container_oom_events_total",
                "Count of out of memory events observed for the container",
            ),
            processes: Family::gauge("container_processes", "Number of processes running inside the container."),
            start: Family::gauge(
                "container_start_time_seconds",
                "Start time of the container since unix epoch in seconds.",
            ),
            pressure: [pressure("cpu", "CPU"), pressure("memory", "memory"), pressure("io", "IO")],
        }
    }

    fn psi(&mut self, index: usize, labels: &[(&str, &str)], psi: Option<&PsiStats>, at: jiff::Timestamp) {
        if let Some(p) = psi {
            // The kernel counts microseconds.
            self.pressure[index].0.add(labels, p.full.total as f64 / 1e6, Some(at));
            self.pressure[index].1.add(labels, p.some.total as f64 / 1e6, Some(at));
        }
    }

    fn cpu(&mut self, labels: &[(&str, &str)], cpu: Option<&CpuStats>) {
        let Some(cpu) = cpu else { return };
        if let Some(ns) = cpu.usage_core_nano_seconds {
            let mut with_cpu = labels.to_vec();
            with_cpu.insert(1, ("cpu", "total"));
            self.cpu.add(&with_cpu, ns as f64 / 1e9, Some(cpu.time.0));
        }
        self.psi(0, labels, cpu.psi.as_ref(), cpu.time.0);
    }

    fn memory(&mut self, labels: &[(&str, &str)], memory: Option<&MemoryStats>) {
        let Some(m) = memory else { return };
        let at = Some(m.time.0);
        for (family, value) in [
            (&mut self.working_set, m.working_set_bytes),
            (&mut self.usage, m.usage_bytes),
            (&mut self.rss, m.rss_bytes),
        ] {
            if let Some(v) = value {
                family.add(labels, v as f64, at);
            }
        }
        self.psi(1, labels, m.psi.as_ref(), m.time.0);
    }

    fn network(&mut self, labels: &[(&str, &str)], network: Option<&NetworkStats>) {
        let Some(n) = network else { return };
        for i in &n.interfaces {
            let mut with_interface = labels.to_vec();
            with_interface.insert(2, ("interface", i.name.as_str()));
            for (family, value) in [
                (&mut self.rx_bytes, i.rx_bytes),
                (&mut self.rx_errors, i.rx_errors),
                (&mut self.tx_bytes, i.tx_bytes),
                (&mut self.tx_errors, i.tx_errors),
            ] {
                if let Some(v) = value {
                    family.add(&with_interface, v as f64, Some(n.time.0));
                }
            }
        }
    }

    fn container(&mut self, labels: &[(&str, &str)], c: &ContainerStats) {
        self.cpu(labels, c.cpu.as_ref());
        self.memory(labels, c.memory.as_ref());
        if let Some(io) = &c.io {
            self.psi(2, labels, io.psi.as_ref(), io.time.0);
        }
        if let Some(swap) = &c.swap
            && let Some(v) = swap.swap_usage_bytes
        {
            self.swap.add(labels, v as f64, Some(swap.time.0));
        }
        if let Some(fs) = &c.rootfs {
            let mut with_device = labels.to_vec();
            with_device.insert(1, ("device", "rootfs"));
            if let Some(v) = fs.used_bytes {
                self.fs_usage.add(&with_device, v as f64, Some(fs.time.0));
            }
            if let Some(v) = fs.capacity_bytes {
                self.fs_limit.add(&with_device, v as f64, Some(fs.time.0));
            }
        }
        if let Some(t) = &c.start_time {
            self.start.add(labels, t.0.as_second() as f64, None);
        }
    }

    fn done(self) -> Vec<MetricFamily> {
        let [(cpu_full, cpu_some), (memory_full, memory_some), (io_full, io_some)] = self.pressure;
        [
            self.cpu,
            self.fs_limit,
            self.fs_usage,
            self.rss,
            self.swap,
            self.usage,
            self.working_set,
            self.rx_bytes,
            self.rx_errors,
            self.tx_bytes,
            self.tx_errors,
            self.oom,
            cpu_full,
            cpu_some,
            io_full,
            io_some,
            memory_full,
            memory_some,
            self.processes,
            self.start,
        ]
        .into_iter()
        .map(Family::done)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::collector::CgroupInfo;
    use crate::stats::summary::PodReference;

    #[test]
    fn cadvisor_names_and_labels() {
        let summary = super::super::resource::tests::summary();
        let pod = PodReference { name: "web".into(), namespace: "ns".into(), uid: "u1".into() };
        let info = |container: Option<&str>, id: &str, cgroup: &str, oom_kills| CgroupInfo {
            pod: pod.clone(),
            container: container.map(String::from),
            id: id.into(),
            image: if container.is_some() { "registry/app:1".into() } else { String::new() },
            cgroup: cgroup.into(),
            oom_kills,
        };
        let snapshot = Snapshot {
            summary,
            cgroups: vec![
                info(None, "", "/kubepods/burstable/podu1", 2),
                info(Some("app"), "c1", "/kubepods/burstable/podu1/c1", 2),
            ],
        };
        let text = super::super::encode(&families(&snapshot));
        let samples = super::super::tests::parse(&text);
        let get = |name: &str, id: &str| {
            samples
                .iter()
                .find(|s| s.0 == name && s.1.contains(&("id".to_string(), id.to_string())))
                .unwrap_or_else(|| panic!("{name} {id} in {text}"))
        };
        let cpu = get("container_cpu_usage_seconds_total", "/kubepods/burstable/podu1/c1");
        assert_eq!(cpu.2, 1.5);
        for label in
            [("cpu", "total"), ("container", "app"), ("image", "registry/app:1"), ("name", "c1"), ("pod", "web")]
        {
            assert!(cpu.1.contains(&(label.0.to_string(), label.1.to_string())), "{label:?} in {:?}", cpu.1);
        }
        assert_eq!(get("container_cpu_usage_seconds_total", "/").2, 5.0, "the machine");
        assert_eq!(get("container_memory_working_set_bytes", "/kubepods/burstable/podu1").2, (65u64 << 20) as f64);
        assert_eq!(get("container_oom_events_total", "/kubepods/burstable/podu1/c1").2, 2.0);
        assert_eq!(get("container_pressure_memory_waiting_seconds_total", "/kubepods/burstable/podu1/c1").2, 2.0);
        assert_eq!(get("container_pressure_memory_stalled_seconds_total", "/").2, 0.0);
    }
}
