//! `nodelet oom [--pod NAME]`: the OOM kills the agent recorded (`/debug/oom`), one line each: when, where, which
//! process, the limit and anonymous memory at the kill, the memory PSI `some` avg10 of the container, and how long
//! nodelet took to hear of it.

use crate::oom::OomKill;

/// A table of `kills`, oldest first.
pub fn render(kills: &[OomKill]) -> String {
    if kills.is_empty() {
        return "No OOM kills recorded.\n".into();
    }
    let mib = |b: Option<u64>| b.map_or_else(|| "-".into(), |b| format!("{}Mi", b >> 20));
    let mut rows = vec![
        ["HEARD AT", "NAMESPACE", "POD", "CONTAINER", "PROCESS", "LIMIT", "ANON", "MEM-SOME%", "LATENCY"]
            .map(String::from)
            .to_vec(),
    ];
    for k in kills {
        let cgroup = k.cgroup.as_ref();
        let anon = cgroup.and_then(|c| c.memory_stat.get("anon").or(c.memory_stat.get("total_rss")).copied());
        rows.push(vec![
            k.heard_at.clone(),
            k.namespace.clone(),
            k.pod.clone(),
            k.container.clone(),
            k.process.as_ref().map_or_else(|| "-".into(), |p| format!("{} ({})", p.pid, p.name)),
            mib(cgroup.and_then(|c| c.memory_limit_bytes)),
            mib(anon),
            cgroup.and_then(|c| c.pressure.as_ref()).map_or_else(|| "-".into(), |p| format!("{:.2}", p.some.avg10)),
            k.latency_ms.map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
        ]);
    }
    super::table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kill() {
        assert_eq!(render(&[]), "No OOM kills recorded.\n");
        let kill: OomKill = serde_json::from_value(serde_json::json!({
            "namespace": "ns", "pod": "p", "podUid": "u", "container": "c", "containerId": "id",
            "qosClass": "Burstable", "heardAt": "2026-12-01T00:00:00Z",
            "process": {"pid": 42, "name": "tail"}, "latencyMs": 2.25,
            "cgroup": {"cgroup": "/x", "captured_at_ms": 1, "kills": 1, "memory_limit_bytes": 25165824,
                       "memory_stat": {"anon": 24117248}, "oom_counters": {}, "pressure": null}
        }))
        .unwrap();
        let text = render(&[kill]);
        let line = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            ["2026-12-01T00:00:00Z", "ns", "p", "c", "42", "(tail)", "24Mi", "23Mi", "-", "2.2ms"],
            "{text}"
        );
    }
}
