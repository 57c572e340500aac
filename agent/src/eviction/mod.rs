//! The eviction manager, as upstream's: every housekeeping interval it reads the node's signals, compares them
//! with the hard thresholds (`evictionHard`, upstream's defaults), keeps the pressure conditions (with
//! `evictionPressureTransitionPeriod`), and while a threshold is met evicts one pod per round, ranked as
//! upstream ranks them. The pod workers carry the eviction out (`Failed`, `Evicted`, upstream's message, the
//! `DisruptionTarget` condition, an `Evicted` event); the node status and admission read the conditions.
//!
//! Decisions are pure (`thresholds`, `ranking`); this module only reads and sends.
//!
//! Not built yet (issue 20): soft thresholds, minimum reclaim, reclaiming disk by image GC before evicting,
//! `imagefs`/`containerfs` signals, local storage limits, PSI-driven eviction and event-driven wake-ups.

pub mod local_storage;
pub mod ranking;
pub mod thresholds;

use std::collections::BTreeMap;
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
    /// Whether the pod gets the `DisruptionTarget` condition (node pressure: yes; its own storage limits: no,
    /// as upstream).
    pub disruption: bool,
}

/// How long the manager waits for an evicted pod to be cleaned up (its containers gone, its volumes torn down:
/// what it used is back) before it evicts another (upstream's `podCleanupTimeout`).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The eviction manager's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub root_dir: PathBuf,
    /// Hard thresholds in force (configured, else upstream's defaults).
    pub thresholds: BTreeMap<String, String>,
    pub interval: Duration,
    pub transition_period: Duration,
}

/// Whether the pod is finished, as the kubelet last reported it (a worker reports the terminal phase once its
/// pod is torn down).
fn terminal(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// The manager: started with [`EvictionManager::start`].
pub struct EvictionManager {
    settings: Settings,
    conditions: thresholds::Conditions,
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
}

impl EvictionManager {
    /// Starts the manager; the pressure conditions it keeps.
    pub fn start(
        settings: Settings,
        view: PodView,
        stats: StatsProvider,
        evict: mpsc::UnboundedSender<Eviction>,
    ) -> watch::Receiver<Pressure> {
        let (pressure, conditions_rx) = watch::channel(Pressure::default());
        let conditions = thresholds::Conditions::new(settings.transition_period);
        let manager = EvictionManager {
            settings,
            conditions,
            view,
            stats,
            evict,
            pressure,
            cleaning: None,
            storage_evicted: Default::default(),
            seen: None,
        };
        tokio::spawn(manager.run());
        conditions_rx
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let root = self.settings.root_dir.clone();
            let Ok(signals) = tokio::task::spawn_blocking(move || Signals::read(&root)).await else { continue };
            self.round(&signals, Instant::now());
        }
    }

    /// One round: conditions; pods past their local storage limits; else at most one eviction for pressure.
    fn round(&mut self, signals: &Signals, now: Instant) {
        let met = thresholds::met(signals, &self.settings.thresholds);
        let conditions = self.conditions.observe(now, thresholds::pressure_of(&met));
        self.pressure.send_if_modified(|p| std::mem::replace(p, conditions) != conditions);
        if self.local_storage_evictions(now) {
            return;
        }
        if let Some((uid, since)) = &self.cleaning {
            let gone =
                !self.view.list().iter().any(|p| p.metadata.uid.as_deref() == Some(uid.as_str()) && !terminal(p));
            if gone || now.saturating_duration_since(*since) >= CLEANUP_TIMEOUT {
                self.cleaning = None;
            } else {
                return;
            }
        }
        let Some(first) = met.first() else {
            self.seen = None;
            return;
        };
        let Some(snapshot) = self.stats.latest() else { return };
        if self.seen.as_ref().is_none_or(|seen| Arc::ptr_eq(seen, &snapshot)) {
            self.seen = Some(snapshot);
            return;
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
            let _ = self.evict.send(Eviction { uid, message, disruption: false });
            evicted = true;
        }
        evicted
    }

    /// The first pod in upstream's order for what `met` starves, with its message.
    fn pick(&self, met: &Met, snapshot: &Snapshot) -> Option<Eviction> {
        let stats_of = |uid: &str| snapshot.summary.pods.iter().find(|p| p.pod_ref.uid == uid).cloned();
        let active = self.view.list().into_iter().filter(|p| !terminal(p));
        let candidates: Vec<Candidate> = active
            .map(|p| Candidate::of(&p, stats_of(p.metadata.uid.as_deref().unwrap_or_default()).as_ref()))
            .collect();
        let victim = ranking::rank(candidates, met.starved).into_iter().next()?;
        let usage: Vec<(String, u64, u64)> = match met.starved {
            Starved::Memory => victim.containers.iter().map(|c| (c.name.clone(), c.memory.0, c.memory.1)).collect(),
            Starved::EphemeralStorage => {
                victim.containers.iter().map(|c| (c.name.clone(), c.disk.0, c.disk.1)).collect()
            }
            Starved::Inodes | Starved::Pids => Vec::new(),
        };
        Some(Eviction { message: thresholds::message(met, &usage), uid: victim.uid, disruption: true })
    }
}
