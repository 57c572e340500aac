//! `/metrics/resource`: upstream's resource metrics collector, from the CPU and memory part of the summary. The
//! metrics-server reads this, so names, labels, units (core-seconds, bytes) and per-sample timestamps are
//! upstream's.

use prometheus::proto::MetricFamily;

use super::Family;
use crate::stats::summary::Summary;

/// The families, from the latest summary; without one (housekeeping has not run yet), only the scrape error.
pub fn families(summary: Option<&Summary>) -> Vec<MetricFamily> {
    let error = if summary.is_some() { 0.0 } else { 1.0 };
    let mut scrape =
        Family::gauge("scrape_error", "1 if there was an error while getting container metrics, 0 otherwise");
    scrape.add(&[], error, None);
    let mut resource_scrape =
        Family::gauge("resource_scrape_error", "1 if there was an error while getting container metrics, 0 otherwise");
    resource_scrape.add(&[], error, None);
    let Some(s) = summary else { return vec![scrape.done(), resource_scrape.done()] };

    let seconds = |ns: u64| ns as f64 / 1e9;
    let mut node_cpu =
        Family::counter("node_cpu_usage_seconds_total", "Cumulative cpu time consumed by the node in core-seconds");
    let mut node_memory = Family::gauge("node_memory_working_set_bytes", "Current working set of the node in bytes");
    let mut node_swap = Family::gauge(
        "node_swap_usage_bytes",
        "Current swap usage of the node in bytes. Reported only on non-windows systems",
    );
    let mut start =
        Family::gauge("container_start_time_seconds", "Start time of the container since unix epoch in seconds");
    let mut container_cpu = Family::counter(
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the container in core-seconds",
    );
    let mut container_memory =
        Family::gauge("container_memory_working_set_bytes", "Current working set of the container in bytes");
    let mut container_swap = Family::gauge(
        "container_swap_usage_bytes",
        "Current amount of the container swap usage in bytes. Reported only on non-windows systems",
    );
    let mut pod_cpu =
        Family::counter("pod_cpu_usage_seconds_total", "Cumulative cpu time consumed by the pod in core-seconds");
    let mut pod_memory = Family::gauge("pod_memory_working_set_bytes", "Current working set of the pod in bytes");
    let mut pod_swap = Family::gauge(
        "pod_swap_usage_bytes",
        "Current amount of the pod swap usage in bytes. Reported only on non-windows systems",
    );

    if let Some(cpu) = &s.node.cpu
        && let Some(ns) = cpu.usage_core_nano_seconds
    {
        node_cpu.add(&[], seconds(ns), Some(cpu.time.0));
    }
    if let Some(m) = &s.node.memory
        && let Some(ws) = m.working_set_bytes
    {
        node_memory.add(&[], ws as f64, Some(m.time.0));
    }
    if let Some(swap) = &s.node.swap
        && let Some(used) = swap.swap_usage_bytes
    {
        node_swap.add(&[], used as f64, Some(swap.time.0));
    }
    for pod in &s.pods {
        let (name, ns) = (pod.pod_ref.name.as_str(), pod.pod_ref.namespace.as_str());
        for c in &pod.containers {
            let labels = [("container", c.name.as_str()), ("namespace", ns), ("pod", name)];
            if let Some(t) = &c.start_time {
                start.add(&labels, t.0.as_nanosecond() as f64 / 1e9, None);
            }
            if let Some(cpu) = &c.cpu
                && let Some(v) = cpu.usage_core_nano_seconds
            {
                container_cpu.add(&labels, seconds(v), Some(cpu.time.0));
            }
            if let Some(m) = &c.memory
                && let Some(v) = m.working_set_bytes
            {
                container_memory.add(&labels, v as f64, Some(m.time.0));
            }
            if let Some(swap) = &c.swap
                && let Some(v) = swap.swap_usage_bytes
            {
                container_swap.add(&labels, v as f64, Some(swap.time.0));
            }
        }
        let labels = [("namespace", ns), ("pod", name)];
        if let Some(cpu) = &pod.cpu
            && let Some(v) = cpu.usage_core_nano_seconds
        {
            pod_cpu.add(&labels, seconds(v), Some(cpu.time.0));
        }
        if let Some(m) = &pod.memory
            && let Some(v) = m.working_set_bytes
        {
            pod_memory.add(&labels, v as f64, Some(m.time.0));
        }
        if let Some(swap) = &pod.swap
            && let Some(v) = swap.swap_usage_bytes
        {
            pod_swap.add(&labels, v as f64, Some(swap.time.0));
        }
    }
    [
        start,
        container_cpu,
        container_memory,
        container_swap,
        node_cpu,
        node_memory,
        node_swap,
        pod_cpu,
        pod_memory,
        pod_swap,
        resource_scrape,
        scrape,
    ]
    .into_iter()
    .map(Family::done)
    .collect()
}

#[cfg(test)]
pub mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::stats::summary::*;

    pub fn summary() -> Summary {
        let t = Time(jiff::Timestamp::from_second(1_800_000_000).unwrap());
        let cpu =
            |ns| CpuStats { time: t.clone(), usage_nano_cores: Some(1), usage_core_nano_seconds: Some(ns), psi: None };
        let memory = |ws| MemoryStats {
            time: t.clone(),
            available_bytes: None,
            usage_bytes: Some(ws + 1),
            working_set_bytes: Some(ws),
            rss_bytes: Some(ws / 2),
            page_faults: None,
            major_page_faults: None,
            psi: Some(PsiStats {
                some: PsiData { total: 2_000_000, avg10: 3.0, ..Default::default() },
                ..Default::default()
            }),
        };
        Summary {
            node: NodeStats {
                node_name: "n".into(),
                cpu: Some(cpu(5_000_000_000)),
                memory: Some(memory(1 << 30)),
                ..Default::default()
            },
            pods: vec![PodStats {
                pod_ref: PodReference { name: "web".into(), namespace: "ns".into(), uid: "u1".into() },
                start_time: Some(t.clone()),
                containers: vec![ContainerStats {
                    name: "app".into(),
                    start_time: Some(t.clone()),
                    cpu: Some(cpu(1_500_000_000)),
                    memory: Some(memory(64 << 20)),
                    io: None,
                    rootfs: None,
                    logs: None,
                    swap: None,
                }],
                cpu: Some(cpu(2_000_000_000)),
                memory: Some(memory(65 << 20)),
                io: None,
                network: None,
                volume_stats: Vec::new(),
                ephemeral_storage: None,
                process_stats: None,
                swap: None,
            }],
        }
    }

    #[test]
    fn upstream_names_units_and_timestamps() {
        let text = super::super::encode(&families(Some(&summary())));
        let samples = super::super::tests::parse(&text);
        let find = |name: &str| samples.iter().find(|s| s.0 == name).unwrap_or_else(|| panic!("{name} in {text}"));
        assert_eq!(find("node_cpu_usage_seconds_total").2, 5.0);
        assert_eq!(find("node_cpu_usage_seconds_total").3, Some(1_800_000_000_000));
        assert_eq!(find("node_memory_working_set_bytes").2, (1u64 << 30) as f64);
        let c = find("container_cpu_usage_seconds_total");
        assert_eq!(c.2, 1.5);
        assert!(c.1.contains(&("container".into(), "app".into())) && c.1.contains(&("pod".into(), "web".into())));
        assert_eq!(find("pod_memory_working_set_bytes").2, (65u64 << 20) as f64);
        assert_eq!(find("container_start_time_seconds").2, 1_800_000_000.0);
        assert_eq!(find("scrape_error").2, 0.0);
        assert!(!text.contains("swap_usage"), "no swap: no swap series");

        let none = super::super::tests::parse(&super::super::encode(&families(None)));
        assert_eq!(
            none.iter().map(|s| (s.0.as_str(), s.2)).collect::<Vec<_>>(),
            [("scrape_error", 1.0), ("resource_scrape_error", 1.0)]
        );
    }
}
