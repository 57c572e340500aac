//! `/metrics`: the agent's own series, under upstream kubelet's names where they mean the same thing, plus
//! nodelet's under `nodelet_`. One process-wide registry (as the kubelet's legacy registry): pod workers, the
//! runtime wrapper, the image manager and the API server record into it where things happen; gauges of what the
//! node runs are computed at scrape time from the pods the status manager reports.

use std::sync::LazyLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, HistogramOpts, HistogramVec, Opts, Registry, Result};

use super::Family;

/// Upstream's buckets for `kubelet_pod_start_sli_duration_seconds` (seconds).
const POD_START_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0,
    600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
];

/// The process-wide registry and its instruments (`None` if they could not be made: then nothing is recorded,
/// and the failure is logged once).
pub struct KubeletMetrics {
    registry: Registry,
    instruments: Option<Instruments>,
}

struct Instruments {
    pod_worker_duration: HistogramVec,
    pod_start_sli: HistogramVec,
    runtime_operations: CounterVec,
    runtime_operation_errors: CounterVec,
    runtime_operation_duration: HistogramVec,
    evictions: CounterVec,
    http_requests: CounterVec,
    http_duration: HistogramVec,
    image_pull_bytes: CounterVec,
    image_pull_duration: HistogramVec,
    rest_client_requests: CounterVec,
    housekeeping_duration: HistogramVec,
    oom_event_latency: HistogramVec,
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> Result<HistogramVec> {
    let vec = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<CounterVec> {
    let vec = CounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

impl Instruments {
    fn new(registry: &Registry) -> Result<Instruments> {
        let default_buckets = prometheus::DEFAULT_BUCKETS.to_vec();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Instruments {
            pod_worker_duration: histogram(
                registry,
                "kubelet_pod_worker_duration_seconds",
                "Duration in seconds to sync a single pod. Broken down by operation type: create, update, or sync",
                &["operation_type"],
                default_buckets.clone(),
            )?,
            pod_start_sli: histogram(
                registry,
                "kubelet_pod_start_sli_duration_seconds",
                "Duration in seconds to start a pod, excluding time to pull images and run init containers, measured from pod creation timestamp to when all its containers are reported as started and observed via watch",
                &[],
                POD_START_BUCKETS.to_vec(),
            )?,
            runtime_operations: counter(
                registry,
                "kubelet_runtime_operations_total",
                "Cumulative number of runtime operations by operation type.",
                &["operation_type"],
            )?,
            runtime_operation_errors: counter(
                registry,
                "kubelet_runtime_operations_errors_total",
                "Cumulative number of runtime operation errors by operation type.",
                &["operation_type"],
            )?,
            runtime_operation_duration: histogram(
                registry,
                "kubelet_runtime_operations_duration_seconds",
                "Duration in seconds of runtime operations. Broken down by operation type.",
                &["operation_type"],
                prometheus::exponential_buckets(0.005, 2.5, 14)?,
            )?,
            evictions: counter(
                registry,
                "kubelet_evictions",
                "Cumulative number of pod evictions by eviction signal",
                &["eviction_signal"],
            )?,
            http_requests: counter(
                registry,
                "kubelet_http_requests_total",
                "Number of the http requests received since the server started",
                &["method", "path", "server_type", "long_running"],
            )?,
            http_duration: histogram(
                registry,
                "kubelet_http_requests_duration_seconds",
                "Duration in seconds to serve http requests",
                &["method", "path", "server_type", "long_running"],
                default_buckets,
            )?,
            image_pull_bytes: counter(
                registry,
                "nodelet_image_pull_bytes_total",
                "Bytes of image layers downloaded, by result",
                &["result"],
            )?,
            image_pull_duration: histogram(
                registry,
                "nodelet_image_pull_duration_seconds",
                "Duration in seconds of image pulls that downloaded something, by result",
                &["result"],
                POD_START_BUCKETS.to_vec(),
            )?,
            housekeeping_duration: histogram(
                registry,
                "nodelet_housekeeping_duration_seconds",
                "Duration in seconds of one stats housekeeping round (reading every pod's and container's usage)",
                &[],
                prometheus::exponential_buckets(0.001, 2.0, 14)?,
            )?,
            oom_event_latency: histogram(
                registry,
                "nodelet_oom_event_latency_seconds",
                "Time from the kernel's OOM kill in a container (its log's record) to the pod worker hearing of it",
                &[],
                prometheus::exponential_buckets(0.0005, 2.0, 16)?,
            )?,
            rest_client_requests: counter(
                registry,
                "rest_client_requests_total",
                "Number of HTTP requests, partitioned by status code, method, and host.",
                &["code", "host", "method"],
            )?,
        })
    }
}

impl KubeletMetrics {
    fn new() -> KubeletMetrics {
        let registry = Registry::new();
        let instruments = Instruments::new(&registry)
            .map_err(|e| tracing::error!(error = %e, "the agent's metrics could not be made; /metrics will lack them"))
            .ok();
        KubeletMetrics { registry, instruments }
    }

    /// One pod worker round (`create`: the pod's first, `update`: after a spec change, `sync`: otherwise).
    pub fn pod_worker(&self, operation: &str, took: Duration) {
        if let Some(i) = &self.instruments {
            i.pod_worker_duration.with_label_values(&[operation]).observe(took.as_secs_f64());
        }
    }

    /// A pod whose containers all started, `seconds` after its creation, image pulls left out.
    pub fn pod_started(&self, seconds: f64) {
        if let Some(i) = &self.instruments {
            i.pod_start_sli.with_label_values(&[] as &[&str]).observe(seconds.max(0.0));
        }
    }

    /// Records one runtime operation.
    pub fn runtime_operation(&self, operation: &str, took: Duration, ok: bool) {
        let Some(i) = &self.instruments else { return };
        i.runtime_operations.with_label_values(&[operation]).inc();
        i.runtime_operation_duration.with_label_values(&[operation]).observe(took.as_secs_f64());
        if !ok {
            i.runtime_operation_errors.with_label_values(&[operation]).inc();
        }
    }

    /// A pod evicted for `signal` (`memory.available`, ...).
    pub fn eviction(&self, signal: &str) {
        if let Some(i) = &self.instruments {
            i.evictions.with_label_values(&[signal]).inc();
        }
    }

    /// Records one kubelet API request. `path` is the first segment, as upstream labels it (`pods`, `stats`...).
    pub fn http_request(&self, method: &str, path: &str, long_running: bool, took: Duration) {
        let Some(i) = &self.instruments else { return };
        let labels = [method, path, "readwrite", if long_running { "true" } else { "false" }];
        i.http_requests.with_label_values(&labels).inc();
        i.http_duration.with_label_values(&labels).observe(took.as_secs_f64());
    }

    /// An image pull that downloaded `bytes` (`result`: `success` or `failure`).
    pub fn image_pull(&self, result: &str, bytes: u64, took: Duration) {
        let Some(i) = &self.instruments else { return };
        i.image_pull_bytes.with_label_values(&[result]).inc_by(bytes as f64);
        i.image_pull_duration.with_label_values(&[result]).observe(took.as_secs_f64());
    }

    /// One stats housekeeping round.
    pub fn housekeeping(&self, took: Duration) {
        if let Some(i) = &self.instruments {
            i.housekeeping_duration.with_label_values(&[] as &[&str]).observe(took.as_secs_f64());
        }
    }

    /// How long after the kernel's OOM kill the pod worker heard of it.
    pub fn oom_event(&self, latency: Duration) {
        if let Some(i) = &self.instruments {
            i.oom_event_latency.with_label_values(&[] as &[&str]).observe(latency.as_secs_f64());
        }
    }

    /// One API request's outcome (`code`: the HTTP status, or `<error>`).
    pub fn rest_client_request(&self, code: &str, host: &str, method: &str) {
        if let Some(i) = &self.instruments {
            i.rest_client_requests.with_label_values(&[code, host, method]).inc();
        }
    }

    /// Every family: the registered instruments and the gauges of what runs now.
    pub fn gather(&self, pods: &[Pod]) -> Vec<MetricFamily> {
        let mut families = self.registry.gather();
        families.extend(running(pods));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }
}

/// `kubelet_running_pods` (pods with a running container, as upstream counts pods with a ready sandbox) and
/// `kubelet_running_containers` by state.
fn running(pods: &[Pod]) -> Vec<MetricFamily> {
    let mut running_pods = 0u64;
    let mut states =
        std::collections::BTreeMap::from([("created", 0u64), ("exited", 0), ("running", 0), ("unknown", 0)]);
    for pod in pods {
        let Some(status) = &pod.status else { continue };
        let mut any_running = false;
        for c in crate::status::all_container_statuses(status) {
            let state = c.state.as_ref();
            let name = if state.is_some_and(|s| s.running.is_some()) {
                any_running = true;
                "running"
            } else if state.is_some_and(|s| s.terminated.is_some()) {
                "exited"
            } else if c.container_id.is_some() {
                "created"
            } else {
                continue;
            };
            *states.entry(name).or_default() += 1;
        }
        running_pods += u64::from(any_running);
    }
    let mut pods_family = Family::gauge("kubelet_running_pods", "Number of pods that have a running pod sandbox");
    pods_family.add(&[], running_pods as f64, None);
    let mut containers = Family::gauge("kubelet_running_containers", "Number of containers currently running");
    for (state, n) in states {
        containers.add(&[("container_state", state)], n as f64, None);
    }
    vec![pods_family.done(), containers.done()]
}

/// The process-wide instruments.
pub static METRICS: LazyLock<KubeletMetrics> = LazyLock::new(KubeletMetrics::new);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_registered_and_computed_families() {
        let m = KubeletMetrics::new();
        m.runtime_operation("start_container", Duration::from_millis(3), true);
        m.runtime_operation("start_container", Duration::from_millis(3), false);
        m.http_request("GET", "stats", false, Duration::from_millis(1));
        m.pod_worker("create", Duration::from_millis(200));
        m.eviction("memory.available");
        m.image_pull("success", 1000, Duration::from_secs(1));
        m.oom_event(Duration::from_millis(3));
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "status": {"containerStatuses": [
                {"name": "a", "image": "i", "imageID": "", "ready": true, "restartCount": 0, "containerID": "nodelet://1",
                 "state": {"running": {}}},
                {"name": "b", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "containerID": "nodelet://2",
                 "state": {"terminated": {"exitCode": 1}}},
                {"name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ErrImagePull"}}}
            ]}
        }))
        .unwrap();
        let text = super::super::encode(&m.gather(&[pod]));
        let samples = super::super::tests::parse(&text);
        let value = |name: &str, label: Option<(&str, &str)>| {
            samples
                .iter()
                .find(|s| s.0 == name && label.is_none_or(|(k, v)| s.1.contains(&(k.to_string(), v.to_string()))))
                .map(|s| s.2)
                .unwrap_or_else(|| panic!("{name} {label:?} in {text}"))
        };
        assert_eq!(value("kubelet_running_pods", None), 1.0);
        assert_eq!(value("kubelet_running_containers", Some(("container_state", "running"))), 1.0);
        assert_eq!(value("kubelet_running_containers", Some(("container_state", "exited"))), 1.0);
        assert_eq!(value("kubelet_running_containers", Some(("container_state", "created"))), 0.0);
        assert_eq!(value("kubelet_runtime_operations_total", Some(("operation_type", "start_container"))), 2.0);
        assert_eq!(value("kubelet_runtime_operations_errors_total", Some(("operation_type", "start_container"))), 1.0);
        assert_eq!(value("kubelet_pod_worker_duration_seconds_count", Some(("operation_type", "create"))), 1.0);
        assert_eq!(value("kubelet_http_requests_total", Some(("path", "stats"))), 1.0);
        assert_eq!(value("kubelet_evictions", Some(("eviction_signal", "memory.available"))), 1.0);
        assert_eq!(value("nodelet_image_pull_bytes_total", Some(("result", "success"))), 1000.0);
        assert_eq!(value("nodelet_oom_event_latency_seconds_count", None), 1.0);
        assert!(value("process_resident_memory_bytes", None) > 0.0);
    }
}
