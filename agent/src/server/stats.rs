//! The kubelet API's read-only node endpoints: `/stats/summary`, `/metrics`, `/metrics/resource`,
//! `/metrics/cadvisor`, `/spec`, `/configz`, `/runningpods/` and `/healthz[/ping|/log|/syncloop]`, with
//! upstream's paths, shapes and status codes; and nodelet's `/debug/oom`.

use hyper::{Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;

use super::{Body, KubeletApi, json, text, with_type};

/// Whether a query has `key=true`.
fn flag(query: Option<&str>, key: &str) -> bool {
    form_urlencoded::parse(query.unwrap_or("").as_bytes()).any(|(k, v)| k == key && v == "true")
}

impl KubeletApi {
    /// `/stats/summary`: the latest housekeeping round; 503 before the first one.
    pub(super) fn summary(&self, query: Option<&str>) -> Response<Body> {
        let Some(snapshot) = self.stats.latest() else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "Internal Error: stats are not collected yet".into());
        };
        if flag(query, "only_cpu_and_memory") {
            return json(&snapshot.summary.cpu_and_memory());
        }
        json(&snapshot.summary)
    }

    pub(super) fn metrics(&self, which: &str) -> Response<Body> {
        let latest = self.stats.latest();
        let families = match which {
            "resource" => crate::metrics::resource::families(latest.as_ref().map(|s| &s.summary)),
            "cadvisor" => latest.as_ref().map(|s| crate::metrics::cadvisor::families(s)).unwrap_or_default(),
            _ => crate::metrics::kubelet::METRICS.gather(&self.pods.list()),
        };
        with_type(StatusCode::OK, crate::metrics::encode(&families).into_bytes(), crate::metrics::CONTENT_TYPE)
    }

    /// `/debug/oom[?pod=NAME|NS/NAME]`: the last OOM kill records, oldest first (nodelet's own; authorized as
    /// `nodes/proxy`).
    pub(super) fn oom_kills(&self, query: Option<&str>) -> Response<Body> {
        let pod = form_urlencoded::parse(query.unwrap_or("").as_bytes()).find(|(k, _)| k == "pod").map(|(_, v)| v);
        json(&self.oom.recent(pod.as_deref()))
    }

    /// `/configz`: the configuration in effect, as upstream wraps it.
    pub(super) fn configz(&self) -> Response<Body> {
        json(&serde_json::json!({ "kubeletconfig": &*self.node.configz }))
    }

    /// `/spec`: the machine, cAdvisor's `MachineInfo` fields that nodelet knows.
    pub(super) fn spec(&self) -> Response<Body> {
        json(&*self.node.spec)
    }

    /// `/runningpods/`: the pods with a running container, with only their names, UIDs and running containers
    /// (upstream lists them from the runtime in the same shape).
    pub(super) fn running_pods(&self) -> Response<Body> {
        json(&serde_json::json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {},
            "items": running_pods(&self.pods.list()),
        }))
    }

    /// `/healthz` and its checks (`ping`, `log`, `syncloop`): 200 `ok`, or 500 listing the failed check.
    pub(super) fn healthz(&self, check: Option<&str>) -> Response<Body> {
        let sync = crate::pods::health::sync_loop();
        let checks = [("ping", Ok(())), ("log", Ok(())), ("syncloop", sync)];
        match check {
            Some(name) => match checks.iter().find(|(n, _)| *n == name) {
                Some((_, Ok(()))) => text(StatusCode::OK, "ok".into()),
                Some((_, Err(e))) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("internal server error: {e}")),
                None => text(StatusCode::NOT_FOUND, "404 page not found".into()),
            },
            None if checks.iter().all(|(_, r)| r.is_ok()) => text(StatusCode::OK, "ok".into()),
            None => {
                let mut body = String::new();
                for (name, result) in &checks {
                    match result {
                        Ok(()) => body.push_str(&format!("[+]{name} ok\n")),
                        Err(_) => body.push_str(&format!("[-]{name} failed: reason withheld\n")),
                    }
                }
                body.push_str("healthz check failed");
                text(StatusCode::INTERNAL_SERVER_ERROR, body)
            }
        }
    }
}

fn running_pods(pods: &[Pod]) -> Vec<serde_json::Value> {
    pods.iter()
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let containers: Vec<_> = [&status.init_container_statuses, &status.container_statuses]
                .into_iter()
                .flatten()
                .flatten()
                .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                .map(|c| serde_json::json!({"name": c.name, "image": c.image, "resources": {}}))
                .collect();
            (!containers.is_empty()).then(|| {
                serde_json::json!({
                    "metadata": {
                        "name": pod.metadata.name,
                        "namespace": pod.metadata.namespace,
                        "uid": pod.metadata.uid,
                        "creationTimestamp": null,
                    },
                    "spec": {"containers": containers},
                    "status": {},
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_pods_list_only_running_containers() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "status": {"containerStatuses": [
                {"name": "a", "image": "img", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "image": "img", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}
            ]}
        }))
        .unwrap();
        let mut done = pod.clone();
        done.status.as_mut().unwrap().container_statuses.as_mut().unwrap().remove(0);
        let list = running_pods(&[pod, done]);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["spec"]["containers"], serde_json::json!([{"name": "a", "image": "img", "resources": {}}]));
        assert!(flag(Some("a=1&only_cpu_and_memory=true"), "only_cpu_and_memory"));
        assert!(!flag(Some("only_cpu_and_memory=false"), "only_cpu_and_memory"));
    }
}
