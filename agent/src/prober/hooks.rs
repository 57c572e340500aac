//! Lifecycle hook actions (`postStart`, `preStop`): `exec` in the container, `httpGet` from inside the pod's
//! network namespace, `sleep` in the agent. Failures come back as messages; the pod worker records upstream's
//! `FailedPostStartHook` / `FailedPreStopHook` events (without the message, as upstream: it may hold secrets).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler};

use super::{Outcome, Target, handlers};
use crate::pods::services::ContainerRuntime;

/// How long an `exec` or `httpGet` hook may take when nothing else bounds it (a `postStart` hook; a `preStop`
/// hook is bounded by the grace period).
pub const UNBOUNDED: Duration = Duration::from_secs(24 * 3600);

/// Runs a hook action for container instance `id`, for at most `timeout`.
pub async fn run(
    handler: &LifecycleHandler,
    c: &Container,
    id: &str,
    target: &Target,
    runtime: &Arc<dyn ContainerRuntime>,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(exec) = &handler.exec {
        let args = exec.command.clone().unwrap_or_default();
        return match runtime.exec_sync(id, &args, timeout).await {
            Ok((Some(0), _)) => Ok(()),
            Ok((Some(code), output)) => Err(format!(
                "Exec lifecycle hook ({args:?}) for Container {:?} failed - error: command exited with {code}, message: {:?}",
                c.name,
                String::from_utf8_lossy(&output)
            )),
            Ok((None, _)) => Err(format!("Exec lifecycle hook ({args:?}) for Container {:?} timed out", c.name)),
            Err(e) => Err(e.to_string()),
        };
    }
    if let Some(http) = &handler.http_get {
        return match tokio::time::timeout(timeout, handlers::http_get(http, c, target, timeout)).await {
            Ok(Outcome::Success | Outcome::Warning(_)) => Ok(()),
            Ok(Outcome::Failure(e)) => Err(format!(
                "HTTP lifecycle hook ({}) for Container {:?} failed - error: {e}",
                http.path.clone().unwrap_or_default(),
                c.name
            )),
            Err(_) => Err(format!("HTTP lifecycle hook for Container {:?} timed out", c.name)),
        };
    }
    if let Some(sleep) = &handler.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0).unsigned_abs()).min(timeout)).await;
        return Ok(());
    }
    if handler.tcp_socket.is_some() {
        return Err("tcpSocket is not supported as a lifecycle handler".into());
    }
    Err(format!("Cannot run handler: invalid handler for Container {:?}", c.name))
}
