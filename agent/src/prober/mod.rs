//! The prober: startup, liveness and readiness probes of running containers, with upstream's semantics.
//!
//! One task per probe of a container instance (a timer and a handler; tokio tasks cost a few hundred bytes, not
//! a goroutine stack), started when the instance starts and aborted when it ends. A task reports only
//! *transitions* (after `failureThreshold` failures or `successThreshold` successes in a row) and every failed
//! run (for the `Unhealthy` event) to its pod worker, which owns the container's `ready` and `started` and kills a
//! container whose liveness or startup probe failed. Liveness and readiness wait until the startup probe has
//! succeeded (a shared flag), as upstream.
//!
//! The handlers (`handlers.rs`) open their connections from inside the pod's network namespace, so probes work
//! whether or not the node can route to the pod's IP (with a loopback-only or an overlay network too).

pub mod handlers;
pub mod hooks;
pub mod http1;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use tokio::sync::{mpsc, watch};

use crate::pods::services::ContainerRuntime;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    /// As upstream's events name it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

/// One run's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A success with a warning (a redirect to another host): upstream's `ProbeWarning` event.
    Warning(String),
    /// The probe ran and failed; its output (truncated) for the event.
    Failure(String),
}

/// What a probe task tells its pod worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A run failed (not yet a transition, unless `failureThreshold` is reached too).
    Failed { kind: Kind, output: String },
    /// A run succeeded with a warning.
    Warned { kind: Kind, output: String },
    /// The probe's result changed (true: healthy).
    Result { kind: Kind, healthy: bool },
}

impl Report {
    /// Which probe it is about.
    pub fn kind(&self) -> Kind {
        match self {
            Report::Failed { kind, .. } | Report::Warned { kind, .. } | Report::Result { kind, .. } => *kind,
        }
    }
}

/// A report about container instance `id` (named `container`).
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub container: String,
    pub id: String,
    pub report: Report,
}

/// A probe's timing and thresholds, with upstream's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Timing {
        let secs = |v: Option<i32>, default: i32, min: i32| {
            Duration::from_secs(v.unwrap_or(default).max(min).unsigned_abs().into())
        };
        let count = |v: Option<i32>, default: i32| v.unwrap_or(default).max(1).unsigned_abs();
        Timing {
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: count(p.success_threshold, 1),
            failure_threshold: count(p.failure_threshold, 3),
        }
    }
}

/// Counts consecutive outcomes and says when the result flips (upstream's worker: a result changes after
/// `failureThreshold` failures or `successThreshold` successes in a row).
#[derive(Debug, Clone)]
pub struct Counter {
    timing: Timing,
    healthy: Option<bool>,
    run: u32,
    last: Option<bool>,
}

impl Counter {
    /// `healthy`: the result before any run (readiness: false; liveness: true; startup: none, so that it flips
    /// either way at its threshold).
    pub fn new(timing: Timing, healthy: Option<bool>) -> Counter {
        Counter { timing, healthy, run: 0, last: None }
    }

    /// Records an outcome; `Some(new result)` when the result changes.
    pub fn record(&mut self, success: bool) -> Option<bool> {
        if self.last == Some(success) {
            self.run = self.run.saturating_add(1);
        } else {
            self.run = 1;
            self.last = Some(success);
        }
        let threshold = if success { self.timing.success_threshold } else { self.timing.failure_threshold };
        if self.healthy != Some(success) && self.run >= threshold {
            self.healthy = Some(success);
            return Some(success);
        }
        None
    }
}

/// Probes tick on a grid of this step (from the first probe of the process): each probe keeps its own phase and
/// period (a whole number of seconds, so every tick stays on the grid), but the probes of a node that fall
/// in one step run together, and the node wakes up once per step instead of once per probe: at 1,000 probes
/// a second, 100 wake-ups instead of 1,000. A probe's first run moves by less than a step.
const GRID: Duration = Duration::from_millis(10);

/// The first point of the probe grid at or after `t`.
fn on_grid(t: tokio::time::Instant) -> tokio::time::Instant {
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| t);
    let step = GRID.as_nanos();
    let ahead = match t.checked_duration_since(origin) {
        Some(since) => since.as_nanos().div_ceil(step) * step - since.as_nanos(),
        None => (origin - t).as_nanos() % step,
    };
    t + Duration::from_nanos(u64::try_from(ahead).unwrap_or(0))
}

/// A random part of `period`.
fn jitter(period: Duration) -> Duration {
    period.mul_f64(crate::backoff::random_fraction())
}

/// Where a container's probes connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pod's network namespace (`None`: the host's, hostNetwork pods).
    pub netns: Option<PathBuf>,
    /// The pod's IP (the default host of httpGet and tcpSocket probes).
    pub pod_ip: String,
}

/// Starts the probes of container instance `id` (`taken_over`: its readiness under the previous agent); their
/// tasks, each with its kind, end when aborted (the instance ended).
pub fn start(
    c: &Container,
    id: &str,
    target: Target,
    runtime: Arc<dyn ContainerRuntime>,
    tx: mpsc::UnboundedSender<ProbeReport>,
    taken_over: Option<bool>,
) -> Vec<(Kind, tokio::task::JoinHandle<()>)> {
    let started = Arc::new(watch::Sender::new(c.startup_probe.is_none()));
    let probes =
        [(Kind::Startup, &c.startup_probe), (Kind::Liveness, &c.liveness_probe), (Kind::Readiness, &c.readiness_probe)];
    probes
        .into_iter()
        .filter_map(|(kind, p)| Some((kind, p.clone()?)))
        .map(|(kind, probe)| {
            let task = Task {
                kind,
                probe,
                container: c.clone(),
                id: id.to_string(),
                target: target.clone(),
                runtime: runtime.clone(),
                tx: tx.clone(),
                started: started.clone(),
                taken_over,
            };
            (kind, tokio::spawn(task.run()))
        })
        .collect()
}

struct Task {
    kind: Kind,
    probe: Probe,
    container: Container,
    id: String,
    target: Target,
    runtime: Arc<dyn ContainerRuntime>,
    tx: mpsc::UnboundedSender<ProbeReport>,
    /// Whether the startup probe has succeeded (true from the start without one).
    started: Arc<watch::Sender<bool>>,
    /// For an instance taken over from the previous agent: the readiness it had, kept until probed.
    taken_over: Option<bool>,
}

impl Task {
    async fn run(self) {
        let timing = Timing::of(&self.probe);
        let initial = match self.kind {
            Kind::Startup => None,
            Kind::Liveness => Some(true),
            Kind::Readiness => Some(self.taken_over.unwrap_or(false)),
        };
        let mut counter = Counter::new(timing, initial);
        if self.taken_over.is_some() {
            // After an agent restart every probe would fire at once: spread them over their first period
            // (upstream does the same for probes that start right after the kubelet does).
            tokio::time::sleep(jitter(timing.period)).await;
        } else {
            tokio::time::sleep(timing.initial_delay).await;
        }
        // Upstream's ticker: runs at a fixed period from here; a run that overruns its period is followed by
        // one run at once and the missed ones are skipped, never run in a burst to catch up (which would only
        // add load to an overloaded node). Its beat is on the node's probe grid (see `on_grid`).
        let mut ticker = tokio::time::interval_at(on_grid(tokio::time::Instant::now()), timing.period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut started = self.started.subscribe();
        loop {
            // A readiness probe held back by the startup probe runs as soon as that succeeds, not at its next
            // tick (upstream triggers a run when the pod's status has no readiness result yet).
            let waiting = self.kind == Kind::Readiness && !*started.borrow_and_update();
            tokio::select! {
                _ = ticker.tick() => {}
                _ = started.wait_for(|s| *s), if waiting => {}
            }
            // Liveness and readiness wait for the startup probe; the startup probe stops once it succeeded.
            let gated = self.kind != Kind::Startup && !*self.started.borrow();
            if !gated {
                let outcome =
                    handlers::run(&self.probe, &self.container, &self.id, &self.target, &self.runtime, timing.timeout)
                        .await;
                let success = !matches!(outcome, Outcome::Failure(_));
                match outcome {
                    Outcome::Failure(output) => self.send(Report::Failed { kind: self.kind, output }),
                    Outcome::Warning(output) => self.send(Report::Warned { kind: self.kind, output }),
                    Outcome::Success => {}
                }
                if let Some(healthy) = counter.record(success) {
                    if self.kind == Kind::Startup && healthy {
                        self.started.send_replace(true);
                    }
                    self.send(Report::Result { kind: self.kind, healthy });
                    if self.kind == Kind::Startup && healthy {
                        return;
                    }
                }
            }
        }
    }

    fn send(&self, report: Report) {
        let _ = self.tx.send(ProbeReport { container: self.container.name.clone(), id: self.id.clone(), report });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(success: u32, failure: u32) -> Timing {
        Timing {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn results_flip_only_at_the_thresholds() {
        // Readiness: starts unready; 2 successes in a row make it ready, 3 failures in a row unready again.
        let mut c = Counter::new(timing(2, 3), Some(false));
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(true));
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(false));
        assert_eq!(c.record(false), None, "reported once");
        // Liveness: starts healthy; a single success after failures below the threshold changes nothing.
        let mut l = Counter::new(timing(1, 2), Some(true));
        assert_eq!(l.record(false), None);
        assert_eq!(l.record(true), None);
        assert_eq!(l.record(false), None);
        assert_eq!(l.record(false), Some(false));
        // Startup: no result before it runs; it flips either way at its threshold.
        let mut s = Counter::new(timing(1, 2), None);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), Some(false));
        let mut s = Counter::new(timing(1, 2), None);
        assert_eq!(s.record(true), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn an_overrun_is_followed_by_one_run_not_a_burst() {
        use crate::pods::services::fake::FakeRuntime;
        let fake = Arc::new(FakeRuntime::default());
        // The first run takes 4.5 periods; the rest are instant.
        fake.delay_execs("c", &[Duration::from_millis(4500)]);
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1, "timeoutSeconds": 10},
        }))
        .unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let target = Target { netns: None, pod_ip: "10.0.0.2".into() };
        let t0 = tokio::time::Instant::now();
        let tasks = start(&container, "uid-c-1", target, fake.clone(), tx, None);
        tokio::time::sleep(Duration::from_millis(7900)).await;
        tasks.iter().for_each(|(_, t)| t.abort());
        let starts: Vec<u128> = fake.exec_starts("c").iter().map(|t| (*t - t0).as_millis()).collect();
        // Upstream's ticker: at once (on the probe grid: within a step, which tokio's timer, in whole
        // milliseconds, may round up to a full step), then at once when the slow run ends (4.5 s later), then on
        // the period's own beat; the ticks missed during the slow run are not made up for.
        let first = starts[0];
        assert!(first <= GRID.as_millis(), "{starts:?}");
        let after_first: Vec<u128> = starts.iter().map(|s| s - first).collect();
        assert_eq!(after_first, vec![0, 4500, 5000, 6000, 7000]);
    }

    /// Upstream's "should be ready immediately after startupProbe succeeds": a readiness probe with a long period
    /// runs as soon as the startup probe succeeds, not at its next tick.
    #[tokio::test(start_paused = true)]
    async fn readiness_runs_as_soon_as_the_startup_probe_succeeds() {
        use crate::pods::services::fake::FakeRuntime;
        let fake = Arc::new(FakeRuntime::default());
        fake.set_exec("c", 1);
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "startupProbe": {"exec": {"command": ["started"]}, "periodSeconds": 1, "failureThreshold": 100},
            "readinessProbe": {"exec": {"command": ["ready"]}, "periodSeconds": 30},
        }))
        .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let target = Target { netns: None, pod_ip: "10.0.0.2".into() };
        let t0 = tokio::time::Instant::now();
        let tasks = start(&container, "uid-c-1", target, fake.clone(), tx, None);
        // The startup probe fails at 0, 1 and 2 s and succeeds at 3 s.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        fake.set_exec("c", 0);
        let mut results = Vec::new();
        while results.len() < 2 {
            let report = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.unwrap().unwrap();
            if let Report::Result { kind, healthy } = report.report {
                results.push((kind, healthy, (tokio::time::Instant::now() - t0).as_millis()));
            }
        }
        tasks.iter().for_each(|(_, t)| t.abort());
        assert_eq!((results[0].0, results[0].1), (Kind::Startup, true), "{results:?}");
        assert_eq!((results[1].0, results[1].1), (Kind::Readiness, true), "{results:?}");
        assert!(results[1].2 - results[0].2 <= GRID.as_millis(), "readiness ran late: {results:?}");
    }

    #[test]
    fn ticks_fall_on_the_grid() {
        let origin = on_grid(tokio::time::Instant::now());
        for offset_us in [-123_456i64, -10_001, -1, 0, 1, 2_500, 9_999, 10_000, 10_001, 123_456] {
            let t = match u64::try_from(offset_us) {
                Ok(after) => origin + Duration::from_micros(after),
                Err(_) => origin - Duration::from_micros(offset_us.unsigned_abs()),
            };
            let g = on_grid(t);
            let ahead = g - t;
            assert!(ahead < GRID, "{offset_us}: {ahead:?}");
            let from_origin = g.checked_duration_since(origin).unwrap_or_else(|| origin - g);
            assert_eq!(from_origin.as_nanos() % GRID.as_nanos(), 0, "{offset_us}");
        }
    }

    #[test]
    fn jitter_stays_within_the_period() {
        let period = Duration::from_secs(10);
        let samples: Vec<Duration> = (0..50).map(|_| jitter(period)).collect();
        assert!(samples.iter().all(|d| *d < period));
        assert!(samples.iter().any(|d| *d != samples[0]), "not always the same: {samples:?}");
    }

    #[test]
    fn upstream_defaults() {
        let t = Timing::of(&Probe::default());
        assert_eq!(
            t,
            Timing {
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
            }
        );
    }
}
