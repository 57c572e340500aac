//! `nodelet top`: the node's and its pods' (or containers') CPU and memory, as `kubectl top` shows them, with
//! the pressure stall figures next to them: the `some` share over the last 10 s for CPU, memory and I/O, and for
//! memory the `full` share too. From the agent's `/stats/summary` (its last housekeeping round).

use crate::stats::summary::{CpuStats, IoStats, MemoryStats, PsiStats, Summary};

/// What to show.
#[derive(Debug, Clone, Default)]
pub struct TopOptions {
    /// One row per container instead of per pod.
    pub containers: bool,
    /// Only this namespace (all when `None`).
    pub namespace: Option<String>,
}

/// `123m` (millicores), as kubectl shows CPU; `-` until a rate exists (two housekeeping rounds).
fn cores(cpu: Option<&CpuStats>) -> String {
    cpu.and_then(|c| c.usage_nano_cores).map_or_else(|| "-".into(), |n| format!("{}m", n / 1_000_000))
}

/// `64Mi`, as kubectl shows memory (the working set).
fn mebibytes(memory: Option<&MemoryStats>) -> String {
    memory.and_then(|m| m.working_set_bytes).map_or_else(|| "-".into(), |b| format!("{}Mi", b >> 20))
}

fn share(psi: Option<&PsiStats>, full: bool) -> String {
    psi.map_or_else(|| "-".into(), |p| format!("{:.2}", if full { p.full.avg10 } else { p.some.avg10 }))
}

fn pressure(cpu: Option<&CpuStats>, memory: Option<&MemoryStats>, io: Option<&IoStats>) -> [String; 4] {
    let memory = memory.and_then(|m| m.psi.as_ref());
    [
        share(cpu.and_then(|c| c.psi.as_ref()), false),
        share(memory, false),
        share(memory, true),
        share(io.and_then(|i| i.psi.as_ref()), false),
    ]
}

/// The node's line, then one line per pod (or container).
pub fn render(summary: &Summary, options: &TopOptions) -> String {
    const PSI: [&str; 4] = ["CPU-SOME%", "MEM-SOME%", "MEM-FULL%", "IO-SOME%"];
    let node = &summary.node;
    let mut head = vec!["NODE".to_string(), "CPU(cores)".into(), "MEMORY(bytes)".into()];
    head.extend(PSI.map(String::from));
    let mut node_row = vec![node.node_name.clone(), cores(node.cpu.as_ref()), mebibytes(node.memory.as_ref())];
    node_row.extend(pressure(node.cpu.as_ref(), node.memory.as_ref(), node.io.as_ref()));
    let mut out = super::table(&[head, node_row]);
    out.push('\n');

    let mut head = vec!["NAMESPACE".to_string(), "POD".into()];
    if options.containers {
        head.push("CONTAINER".into());
    }
    head.extend(["CPU(cores)".to_string(), "MEMORY(bytes)".into()]);
    head.extend(PSI.map(String::from));
    let mut rows = vec![head];
    let mut pods: Vec<_> = summary
        .pods
        .iter()
        .filter(|p| options.namespace.as_ref().is_none_or(|ns| *ns == p.pod_ref.namespace))
        .collect();
    pods.sort_by(|a, b| (&a.pod_ref.namespace, &a.pod_ref.name).cmp(&(&b.pod_ref.namespace, &b.pod_ref.name)));
    for pod in pods {
        let start = vec![pod.pod_ref.namespace.clone(), pod.pod_ref.name.clone()];
        if options.containers {
            for c in &pod.containers {
                let mut row = start.clone();
                row.extend([c.name.clone(), cores(c.cpu.as_ref()), mebibytes(c.memory.as_ref())]);
                row.extend(pressure(c.cpu.as_ref(), c.memory.as_ref(), c.io.as_ref()));
                rows.push(row);
            }
        } else {
            let mut row = start;
            row.extend([cores(pod.cpu.as_ref()), mebibytes(pod.memory.as_ref())]);
            row.extend(pressure(pod.cpu.as_ref(), pod.memory.as_ref(), pod.io.as_ref()));
            rows.push(row);
        }
    }
    if rows.len() == 1 {
        out.push_str("No pods are measured yet.\n");
    } else {
        out.push_str(&super::table(&rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_units_and_psi_columns() {
        let summary = crate::metrics::resource::tests::summary();
        let text = render(&summary, &TopOptions::default());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NODE") && lines[0].contains("MEM-FULL%"), "{text}");
        assert!(lines[1].starts_with("n ") && lines[1].contains("1024Mi"), "{text}");
        let pod = lines.iter().find(|l| l.starts_with("ns ")).expect("pod row");
        let cells: Vec<&str> = pod.split_whitespace().collect();
        // 1 nanocore rounds down to 0m; 65 MiB; memory some avg10 3.00, full 0.00; no CPU or I/O PSI.
        assert_eq!(cells, ["ns", "web", "0m", "65Mi", "-", "3.00", "0.00", "-"], "{text}");
        let containers = render(&summary, &TopOptions { containers: true, namespace: Some("ns".into()) });
        assert!(
            containers.lines().any(|l| l.split_whitespace().take(4).eq(["ns", "web", "app", "0m"])),
            "{containers}"
        );
        let other = render(&summary, &TopOptions { containers: false, namespace: Some("other".into()) });
        assert!(other.contains("No pods are measured yet."), "{other}");
    }
}
