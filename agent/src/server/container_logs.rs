//! `GET /containerLogs/{namespace}/{pod}/{container}`: which log file a request means (upstream's
//! `validateContainerLogStatus`: the running instance, the last terminated one, or `previous`), and the query options.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use crate::logs::read::LogOptions;

/// A request the kubelet refuses, with upstream's status code and message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub message: String,
}

fn refuse(code: u16, message: String) -> Refusal {
    Refusal { code, message }
}

/// Parses `PodLogOptions` from the query string.
pub fn options(query: Option<&str>) -> Result<(LogOptions, bool), Refusal> {
    let mut options = LogOptions::default();
    let mut previous = false;
    let bad = |key: &str, value: &str| refuse(400, format!("invalid {key} {value:?}"));
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let flag = || parse_bool(&value).ok_or_else(|| bad(&key, &value));
        let positive = || value.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| bad(&key, &value));
        match key.as_ref() {
            "follow" => options.follow = flag()?,
            "previous" => previous = flag()?,
            "timestamps" => options.timestamps = flag()?,
            "tailLines" => options.tail_lines = Some(value.parse().map_err(|_| bad(&key, &value))?),
            "limitBytes" => options.limit_bytes = Some(positive()?),
            "sinceSeconds" => {
                let seconds = i64::try_from(positive()?).map_err(|_| bad(&key, &value))?;
                options.since = Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(seconds)).ok();
            }
            "sinceTime" => options.since = Some(value.parse().map_err(|_| bad(&key, &value))?),
            // `container` repeats the path; `insecureSkipTLSVerifyBackend` and `stream` are the API server's.
            _ => {}
        }
    }
    Ok((options, previous))
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// The container ID (`nodelet://…`) whose log the request means.
pub fn container_id(pod: &Pod, container: &str, previous: bool) -> Result<String, Refusal> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let ephemeral = spec.ephemeral_containers.iter().flatten().map(|e| &e.name);
    let in_spec = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| &c.name)
        .chain(ephemeral)
        .any(|c| c == container);
    if !in_spec {
        return Err(refuse(404, format!("container {container:?} not found in pod {name:?}")));
    }
    let status = pod.status.clone().unwrap_or_default();
    let statuses: Vec<ContainerStatus> = status
        .container_statuses
        .into_iter()
        .chain(status.init_container_statuses)
        .chain(status.ephemeral_container_statuses)
        .flatten()
        .collect();
    let Some(status) = statuses.into_iter().find(|s| s.name == container) else {
        return Err(refuse(400, format!("container {container:?} in pod {name:?} is waiting to start")));
    };
    let state = status.state.unwrap_or_default();
    let last = status.last_state.and_then(|s| s.terminated).and_then(|t| t.container_id).filter(|id| !id.is_empty());
    let terminated = || refuse(400, format!("container {container:?} in pod {name:?} is terminated"));
    if previous {
        return last.ok_or_else(|| {
            refuse(400, format!("previous terminated container {container:?} in pod {name:?} not found"))
        });
    }
    if state.running.is_some() {
        return status.container_id.ok_or_else(terminated);
    }
    if let Some(t) = state.terminated {
        return t.container_id.filter(|id| !id.is_empty()).or(last).ok_or_else(terminated);
    }
    if let Some(id) = last {
        return Ok(id);
    }
    let why = match state.waiting.and_then(|w| w.reason).as_deref() {
        Some("ErrImagePull") => "image can't be pulled".to_string(),
        Some("ImagePullBackOff") => "trying and failing to pull image".to_string(),
        other => other.unwrap_or_default().to_string(),
    };
    Err(refuse(400, format!("container {container:?} in pod {name:?} is waiting to start: {why}")))
}

/// The CRI log file of a container ID: pod workers name instances `<uid>-<container>-<restart>`.
pub fn log_path(pod_logs_dir: &Path, pod: &Pod, container: &str, id: &str) -> Option<PathBuf> {
    let restart: u32 = id.rsplit_once('-')?.1.parse().ok()?;
    let meta = &pod.metadata;
    let dir = crate::logs::pod_log_dir(
        pod_logs_dir,
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref()?,
        meta.uid.as_deref()?,
    );
    Some(crate::logs::container_log_path(&dir, container, restart))
}

/// Whether the instance `id` of `container` is still running.
pub fn is_running(pod: Option<Pod>, container: &str, id: &str) -> bool {
    let Some(status) = pod.and_then(|p| p.status) else { return false };
    status
        .container_statuses
        .into_iter()
        .chain(status.init_container_statuses)
        .chain(status.ephemeral_container_statuses)
        .flatten()
        .find(|s| s.name == container)
        .is_some_and(|s| s.container_id.as_deref() == Some(id) && s.state.is_some_and(|st| st.running.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "spec": {"containers": [{"name": "main"}], "initContainers": [{"name": "init"}]},
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn picks_the_instance_like_upstream() {
        let running = pod(serde_json::json!({"containerStatuses": [{
            "name": "main", "image": "", "imageID": "", "ready": true, "restartCount": 2,
            "containerID": "nodelet://u1-main-2", "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": "nodelet://u1-main-1"}}
        }]}));
        assert_eq!(container_id(&running, "main", false).unwrap(), "nodelet://u1-main-2");
        assert_eq!(container_id(&running, "main", true).unwrap(), "nodelet://u1-main-1");
        assert!(is_running(Some(running.clone()), "main", "nodelet://u1-main-2"));
        assert!(!is_running(Some(running.clone()), "main", "nodelet://u1-main-1"));
        let path = log_path(Path::new("/logs"), &running, "main", "nodelet://u1-main-2").unwrap();
        assert_eq!(path, Path::new("/logs/ns_web_u1/main/2.log"));
        let missing = container_id(&running, "nope", false).unwrap_err();
        assert_eq!(missing, refuse(404, "container \"nope\" not found in pod \"web\"".into()));

        let backoff = pod(serde_json::json!({"containerStatuses": [{
            "name": "main", "image": "", "imageID": "", "ready": false, "restartCount": 1,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 3, "containerID": "nodelet://u1-main-1"}}
        }]}));
        assert_eq!(container_id(&backoff, "main", false).unwrap(), "nodelet://u1-main-1");

        let pulling = pod(serde_json::json!({"containerStatuses": [{
            "name": "main", "image": "", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff"}}
        }]}));
        let err = container_id(&pulling, "main", false).unwrap_err();
        assert_eq!(
            err.message,
            "container \"main\" in pod \"web\" is waiting to start: trying and failing to pull image"
        );
        let err = container_id(&pulling, "main", true).unwrap_err();
        assert_eq!(err.message, "previous terminated container \"main\" in pod \"web\" not found");
        assert_eq!(container_id(&pod(serde_json::json!({})), "init", false).unwrap_err().code, 400);

        // `kubectl logs -c` of an ephemeral container (`kubectl debug`).
        let mut debugged = pod(serde_json::json!({"ephemeralContainerStatuses": [{
            "name": "debugger", "image": "", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "containerID": "nodelet://u1-debugger-0"}}
        }]}));
        debugged.spec.as_mut().unwrap().ephemeral_containers =
            Some(vec![serde_json::from_value(serde_json::json!({"name": "debugger"})).unwrap()]);
        assert_eq!(container_id(&debugged, "debugger", false).unwrap(), "nodelet://u1-debugger-0");
    }

    #[test]
    fn query_options() {
        let (o, previous) =
            options(Some("follow=true&tailLines=10&timestamps=1&limitBytes=100&previous=false&container=main"))
                .unwrap();
        assert!(o.follow && o.timestamps && !previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(10), Some(100)));
        let (o, _) = options(Some("sinceSeconds=60")).unwrap();
        let ago = Timestamp::now().duration_since(o.since.unwrap()).as_secs();
        assert!((59..=61).contains(&ago), "{ago}");
        let (o, _) = options(Some("sinceTime=2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(o.since.unwrap().to_string(), "2026-01-01T00:00:00Z");
        for bad in ["follow=maybe", "tailLines=-1", "limitBytes=0", "sinceSeconds=x", "sinceTime=yesterday"] {
            assert_eq!(options(Some(bad)).unwrap_err().code, 400, "{bad}");
        }
        assert_eq!(options(None).unwrap(), (LogOptions::default(), false));
    }
}
