//! The eviction manager, as upstream's: every housekeeping interval it reads the node's signals, compares them
//! with the thresholds (`evictionHard` with upstream's defaults, `evictionSoft` with grace periods,
//! `evictionMinimumReclaim`), keeps the pressure conditions (with
//! `evictionPressureTransitionPeriod`), and while a threshold is met evicts one pod per round, ranked as
//! upstream ranks them. The pod workers carry the eviction out (`Failed`, `Evicted`, upstream's message, the
//! `DisruptionTarget` condition, an `Evicted` event); the node status and admission read the conditions.
//!
//! Decisions are pure (`thresholds`, `ranking`); this module only reads and sends.
//!
//! Under disk pressure, unused images are removed first; pods are evicted only if that was not enough.
//!
//! Beyond upstream, pressure stall thresholds (`psi`) wake it the moment the kernel's PSI trigger fires, and the
//! memory watch (`memory_watch`) when a memory threshold is met between rounds.
//!
//! Not built yet (issue 20): `imagefs`/`containerfs` signals.

pub mod local_storage;
pub mod memory_watch;
pub mod psi;
pub mod ranking;
pub mod thresholds;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::node::conditions::{Pressure, Signals};
use crate::stats::StatsProvider;
use crate::stats::collector::Snapshot;
use crate::status::view::PodView;
use ranking::Candidate;
use thresholds::{Met, Starved};

/// How long a hard eviction lets the pod's containers stop (upstream's `immediateEvictionGracePeriodSeconds`).
pub const HARD_EVICTION_GRACE: Duration = Duration::from_secs(1);

/// A pod to evict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub uid: String,
    /// Upstream's message (the status's and the event's).
    pub message: String,
    /// How long its containers may take to stop (the pod's own grace period if shorter).
    pub grace: Duration,
    /// Whether the pod gets the `DisruptionTarget` condition (node pressure: yes; its own storage limits: no,
    /// as upstream).
    pub disruption: bool,
}

/// How long the manager waits for an evicted pod to be cleaned up (its containers gone, its volumes torn down:
/// what it used is back) before it evicts another (upstream's `podCleanupTimeout`).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Frees disk at the node level; the bytes freed.
pub type Reclaim = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The eviction manager's configuration.
#[derive(Clone)]
pub struct Settings {
    pub root_dir: PathBuf,
    /// The thresholds in force.
    pub thresholds: Vec<thresholds::Threshold>,
    /// `evictionMaxPodGracePeriod`: the most a soft eviction lets a pod's containers stop.
    pub max_pod_grace: Duration,
    pub interval: Duration,
    /// The pods' cgroup when allocatable is enforced on it (`allocatableMemory.available`).
    pub pods_memory: Option<crate::node::conditions::PodsMemory>,
    /// The memory watch's interval (see [`memory_watch`]); `None`: memory is read at each round only.
    pub memory_watch: Option<Duration>,
    /// Where the memory watch keeps its readings for OOM records.
    pub oom_sampler: Option<memory_watch::Sampler>,
    pub transition_period: Duration,
    /// Frees disk at the node level before pods are evicted for disk (image GC of every unused image): the bytes
    /// freed.
    pub reclaim_disk: Option<Reclaim>,
    /// Pressure stall thresholds (nodelet's own; see [`psi`]).
    pub stall_thresholds: Vec<psi::StallThreshold>,
}

/// A container's name, usage and request of what is starved (for the message).
type Usage = (String, u64, u64);

/// What a round asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    /// Free disk at the node level, then look again.
    ReclaimDisk,
}

/// Whether the pod is finished, as the kubelet last reported it (a worker reports the terminal phase once its
/// pod is torn down).
fn terminal(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// The manager: started with [`EvictionManager::start`].
pub struct EvictionManager {
    settings: Settings,
    tracker: thresholds::Tracker,
    view: PodView,
    stats: StatsProvider,
    evict: mpsc::UnboundedSender<Eviction>,
    pressure: watch::Sender<Pressure>,
    /// The pod evicted last, until it is cleaned up (or [`CLEANUP_TIMEOUT`]).
    cleaning: Option<(String, Instant)>,
    /// Pods evicted for their local storage lately (not evicted again while they terminate).
    storage_evicted: std::collections::HashMap<String, Instant>,
    /// The stats round in hand when a threshold was first met or the last pod was picked: pods are ranked on a
    /// later one, so that their usage includes what took the node past the threshold (a pod that just filled its
    /// emptyDir is not ranked on the round before it did).
    seen: Option<Arc<Snapshot>>,
    /// When the last pod was evicted for a pressure stall.
    last_stall: Option<Instant>,
}

impl EvictionManager {
    /// Starts the manager; the pressure conditions it keeps. `stalls` carries the pressure stall triggers'
    /// firings ([`psi::arm`]).
    pub fn start(
        settings: Settings,
        view: PodView,
        stats: StatsProvider,
        evict: mpsc::UnboundedSender<Eviction>,
        stalls: mpsc::UnboundedReceiver<psi::Stalled>,
    ) -> watch::Receiver<Pressure> {
        let (pressure, conditions_rx) = watch::channel(Pressure::default());
        let (wake, wakes) = mpsc::unbounded_channel();
        if let Some(interval) = settings.memory_watch {
            let (pods, sampler) = (settings.pods_memory.clone(), settings.oom_sampler.clone());
            memory_watch::start(interval, &settings.thresholds, pods, wake, sampler);
        }
        let tracker = thresholds::Tracker::new(settings.thresholds.clone(), settings.transition_period);
        let manager = EvictionManager {
            settings,
            tracker,
            view,
            stats,
            evict,
            pressure,
            cleaning: None,
            storage_evicted: Default::default(),
            seen: None,
            last_stall: None,
        };
        tokio::spawn(manager.run(stalls, wakes));
        conditions_rx
    }

    /// The node's signals read now.
    async fn signals(&self) -> Option<Signals> {
        let (root, pods) = (self.settings.root_dir.clone(), self.settings.pods_memory.clone());
        tokio::task::spawn_blocking(move || Signals::read(&root, pods.as_ref())).await.ok()
    }

    async fn run(mut self, mut stalls: mpsc::UnboundedReceiver<psi::Stalled>, mut wakes: mpsc::UnboundedReceiver<()>) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = wakes.recv() => {
                    // A memory threshold was met between rounds: a round now, its pods ranked on usage read now.
                    let Some(signals) = self.signals().await else { continue };
                    let memory = thresholds::met(&signals, &self.settings.thresholds);
                    if memory.iter().any(|m| m.starved == Starved::Memory) {
                        let snapshot = self.stats.fresh().await;
                        self.round(&signals, Instant::now(), false, snapshot);
                    }
                    continue;
                }
                Some(stalled) = stalls.recv() => {
                    if let Some(threshold) = self.stalled(stalled, Instant::now()) {
                        // Ranked on usage read now, not on a round from before the stall began.
                        let snapshot = self.stats.fresh().await;
                        self.evict_for_stall(&threshold, Instant::now(), snapshot);
                    }
                    continue;
                }
            }
            let Some(signals) = self.signals().await else { continue };
            if self.round(&signals, Instant::now(), true, None) == Step::ReclaimDisk
                && let Some(reclaim) = self.settings.reclaim_disk.clone()
            {
                // Upstream's order: node-level resources first; pods only if that was not enough.
                let freed = tokio::task::spawn_blocking(move || reclaim()).await.unwrap_or(0);
                tracing::info!(freed, "disk pressure: removed unused images before evicting");
                let Some(signals) = self.signals().await else { continue };
                self.round(&signals, Instant::now(), false, None);
            }
        }
    }

    /// One round: conditions; pods past their local storage limits; else at most one eviction for pressure (for
    /// disk, when `may_reclaim`, first [`Step::ReclaimDisk`]). Pods are ranked on `fresh`, a stats round taken
    /// after the signals were read, when given; else on the latest round if it is newer than the one in hand
    /// when the threshold was first met.
    fn round(&mut self, signals: &Signals, now: Instant, may_reclaim: bool, fresh: Option<Arc<Snapshot>>) -> Step {
        let (conditions, met) = self.tracker.observe(signals, now);
        self.pressure.send_if_modified(|p| std::mem::replace(p, conditions) != conditions);
        if self.local_storage_evictions(now) {
            return Step::Done;
        }
        if self.cleaning_up(now) {
            return Step::Done;
        }
        let Some(first) = met.first() else {
            self.seen = None;
            return Step::Done;
        };
        let disk = matches!(first.starved, Starved::EphemeralStorage | Starved::Inodes);
        if disk && may_reclaim && self.settings.reclaim_disk.is_some() {
            return Step::ReclaimDisk;
        }
        let fresh_ranked = fresh.is_some();
        let Some(snapshot) = fresh.or_else(|| self.stats.latest()) else { return Step::Done };
        let taken_after = self.seen.as_ref().is_some_and(|seen| !Arc::ptr_eq(seen, &snapshot));
        if !taken_after && !fresh_ranked {
            self.seen = Some(snapshot);
            return Step::Done;
        }
        self.seen = Some(snapshot.clone());
        match self.pick(first, &snapshot) {
            Some(eviction) => {
                tracing::warn!(signal = first.signal, uid = %eviction.uid, message = %eviction.message, "evicting a pod");
                crate::metrics::kubelet::METRICS.eviction(first.signal);
                self.cleaning = Some((eviction.uid.clone(), now));
                let _ = self.evict.send(eviction);
            }
            None => tracing::warn!(signal = first.signal, "under pressure, but no pod can be evicted"),
        }
        Step::Done
    }

    /// Evicts every pod past its local storage limits (upstream does this before looking at the thresholds, and
    /// then evicts nothing else that round); whether any was.
    fn local_storage_evictions(&mut self, now: Instant) -> bool {
        self.storage_evicted.retain(|_, at| now.saturating_duration_since(*at) < CLEANUP_TIMEOUT);
        let Some(snapshot) = self.stats.latest() else { return false };
        let mut evicted = false;
        for pod in self.view.list().iter().filter(|p| !terminal(p) && !ranking::is_critical(p)) {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if self.storage_evicted.contains_key(&uid) {
                continue;
            }
            let Some(stats) = snapshot.summary.pods.iter().find(|p| p.pod_ref.uid == uid) else { continue };
            let Some((signal, message)) = local_storage::violation(pod, stats) else { continue };
            tracing::warn!(%signal, %uid, %message, "evicting a pod for its local storage");
            crate::metrics::kubelet::METRICS.eviction(signal);
            self.storage_evicted.insert(uid.clone(), now);
            let _ = self.evict.send(Eviction { uid, message, grace: HARD_EVICTION_GRACE, disruption: false });
            evicted = true;
        }
        evicted
    }

    /// The first pod in upstream's order for what `met` starves, with its message.
    fn pick(&self, met: &Met, snapshot: &Snapshot) -> Option<Eviction> {
        let (uid, usage) = self.first_ranked(met.starved, snapshot, false)?;
        // Hard: at once (upstream's one second); soft: the pod's grace period, at most evictionMaxPodGracePeriod.
        let grace = if met.hard { HARD_EVICTION_GRACE } else { self.settings.max_pod_grace };
        Some(Eviction { message: thresholds::message(met, &usage), uid, grace, disruption: true })
    }

    /// The first pod in upstream's order for `starved` (with `over_requests`, among those whose stats show them
    /// using more than they requested), and its containers' (usage, request) of it.
    fn first_ranked(&self, starved: Starved, snapshot: &Snapshot, over_requests: bool) -> Option<(String, Vec<Usage>)> {
        let stats_of = |uid: &str| snapshot.summary.pods.iter().find(|p| p.pod_ref.uid == uid).cloned();
        let active = self.view.list().into_iter().filter(|p| !terminal(p));
        let candidates: Vec<Candidate> = active
            .map(|p| Candidate::of(&p, stats_of(p.metadata.uid.as_deref().unwrap_or_default()).as_ref()))
            .filter(|c| !over_requests || ranking::known_excess(c, starved))
            .collect();
        let victim = ranking::rank(candidates, starved).into_iter().next()?;
        let usage = victim.containers.iter().filter_map(|c| {
            let (used, request) = match starved {
                Starved::Memory => c.memory,
                Starved::EphemeralStorage => c.disk,
                Starved::Cpu => c.cpu,
                Starved::Inodes | Starved::Pids => return None,
            };
            Some((c.name.clone(), used, request))
        });
        Some((victim.uid, usage.collect()))
    }

    /// A pressure stall threshold was exceeded (the kernel's trigger fired): `PSIPressure` and, for a memory
    /// stall, memory count as met for the node conditions, and a pod using more than it requested is evicted at once, ranked on a stats round taken when
    /// the trigger fired (not on the last periodic one: the pod causing the stall may have started since).
    /// Returns the threshold when a pod may be evicted for it now.
    fn stalled(&mut self, stalled: psi::Stalled, now: Instant) -> Option<psi::StallThreshold> {
        let threshold = self.settings.stall_thresholds.get(stalled.0).cloned()?;
        let met = Pressure { memory: threshold.starved == Starved::Memory, stall: true, ..Default::default() };
        let conditions = self.tracker.mark(now, met);
        self.pressure.send_if_modified(|p| std::mem::replace(p, conditions) != conditions);
        // The trigger fires at most once per window while the stall lasts: a firing within two windows of the
        // last stall eviction may still be about the pod that went.
        let recent = self.last_stall.is_some_and(|at| now.saturating_duration_since(at) < 2 * threshold.window);
        (!recent && !self.cleaning_up(now)).then_some(threshold)
    }

    /// Evicts the pod taken for the cause of `threshold`'s stall, ranked on `snapshot`.
    fn evict_for_stall(&mut self, threshold: &psi::StallThreshold, now: Instant, snapshot: Option<Arc<Snapshot>>) {
        let Some(snapshot) = snapshot else { return };
        // Only a pod whose stats show it using more than it requested is taken for the cause of a stall (unlike a
        // threshold, which evicts within requests, and pods without stats, too). A pod too new for a CPU rate has
        // one at the trigger's next firing: each firing takes a round.
        let Some((uid, usage)) = self.first_ranked(threshold.starved, &snapshot, true) else {
            tracing::info!(signal = %threshold.signal, "pressure stall, but no pod uses more than it requested");
            return;
        };
        let quantity = |n: u64| match threshold.starved {
            Starved::Cpu => format!("{}m", n / 1_000_000),
            _ => thresholds::binary_quantity(n),
        };
        let message = psi::message(threshold, &usage, quantity);
        tracing::warn!(signal = %threshold.signal, %uid, %message, "evicting a pod for a pressure stall");
        crate::metrics::kubelet::METRICS.eviction(&threshold.signal);
        self.cleaning = Some((uid.clone(), now));
        self.last_stall = Some(now);
        let _ = self.evict.send(Eviction { uid, message, grace: HARD_EVICTION_GRACE, disruption: true });
    }

    /// Whether the pod evicted last is still being cleaned up (then nothing else is evicted yet).
    fn cleaning_up(&mut self, now: Instant) -> bool {
        let Some((uid, since)) = &self.cleaning else { return false };
        let gone = !self.view.list().iter().any(|p| p.metadata.uid.as_deref() == Some(uid.as_str()) && !terminal(p));
        if gone || now.saturating_duration_since(*since) >= CLEANUP_TIMEOUT {
            self.cleaning = None;
            return false;
        }
        true
    }
}
