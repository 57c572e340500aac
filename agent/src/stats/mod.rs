//! The stats provider: the node's and pods' resource usage for `/stats/summary`, `/metrics/resource`,
//! `/metrics/cadvisor` and `nodelet top`. A housekeeping task reads the cgroup files every interval (cAdvisor's
//! `--housekeeping-interval`, 10 s by default) and keeps the latest [`Summary`]; requests serve that copy, so a
//! scrape costs a serialization, not a walk of every cgroup.

pub mod collector;
pub mod readings;
pub mod summary;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use collector::{Collector, Layout, Readings, Snapshot};

use crate::status::view::PodView;

/// The latest summary, refreshed by the housekeeping task (and on demand: [`StatsProvider::fresh`]).
#[derive(Clone)]
pub struct StatsProvider {
    latest: Arc<RwLock<Option<Arc<Snapshot>>>>,
    /// Asks the housekeeping task for a round now; it answers when that round is in `latest`.
    now: Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>,
}

impl StatsProvider {
    /// Starts housekeeping: a round at once, then one per `interval`.
    pub fn start(layout: Layout, readings: Arc<dyn Readings>, pods: PodView, interval: Duration) -> StatsProvider {
        let (now_tx, mut now_rx) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
        let provider = StatsProvider { latest: Arc::default(), now: Some(now_tx) };
        let latest = provider.latest.clone();
        let started = jiff::Timestamp::now();
        let mut collector = Collector::new(layout.clone(), started);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut waiting = Vec::new();
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(reply) = now_rx.recv() => waiting.push(reply),
                }
                // Requests that came meanwhile are answered by this round too.
                while let Ok(reply) = now_rx.try_recv() {
                    waiting.push(reply);
                }
                let inputs = collector::inputs(&pods.list());
                let readings = readings.clone();
                // File reads and directory walks: off the async threads.
                let round = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let summary = collector.collect(readings.as_ref(), &inputs, started, jiff::Timestamp::now());
                    crate::metrics::kubelet::METRICS.housekeeping(started.elapsed());
                    (collector, summary)
                })
                .await;
                match round {
                    Ok((back, summary)) => {
                        collector = back;
                        *latest.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(summary));
                        for reply in waiting {
                            let _ = reply.send(());
                        }
                    }
                    // A round that panicked lost its samples: the next starts afresh (rates after two rounds).
                    Err(e) => {
                        tracing::error!(error = %e, "a stats housekeeping round failed");
                        collector = Collector::new(layout.clone(), started);
                    }
                }
            }
        });
        provider
    }

    /// A provider that always has `snapshot` (tests of the endpoints).
    pub fn fixed(snapshot: Snapshot) -> StatsProvider {
        StatsProvider { latest: Arc::new(RwLock::new(Some(Arc::new(snapshot)))), now: None }
    }

    /// A round taken now (the eviction manager ranks pods on it when a pressure stall fires: CPU rates since
    /// the previous round, memory as it is); the latest one if that cannot be had.
    pub async fn fresh(&self) -> Option<Arc<Snapshot>> {
        if let Some(now) = &self.now {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if now.send(tx).is_ok() {
                let _ = rx.await;
            }
        }
        self.latest()
    }

    /// The latest round; `None` until the first housekeeping round is done.
    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.latest.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
