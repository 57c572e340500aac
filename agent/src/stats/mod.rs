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

/// The latest summary, refreshed by [`StatsProvider::run`].
#[derive(Clone)]
pub struct StatsProvider {
    latest: Arc<RwLock<Option<Arc<Snapshot>>>>,
}

impl StatsProvider {
    /// Starts housekeeping: a round at once, then one per `interval`.
    pub fn start(layout: Layout, readings: Arc<dyn Readings>, pods: PodView, interval: Duration) -> StatsProvider {
        let provider = StatsProvider { latest: Arc::default() };
        let latest = provider.latest.clone();
        let started = jiff::Timestamp::now();
        let mut collector = Collector::new(layout.clone(), started);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
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
        StatsProvider { latest: Arc::new(RwLock::new(Some(Arc::new(snapshot)))) }
    }

    /// The latest round; `None` until the first housekeeping round is done.
    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.latest.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
