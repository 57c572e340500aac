//! The sync loop's liveness for `/healthz/syncloop`: the pod workers' dispatcher beats every second; the check
//! fails when it has not beaten for upstream's limit (5 minutes), e.g. when the dispatcher is stuck or gone.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How often the dispatcher beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// Upstream's `syncLoop` health limit (twice the resync interval, at least 5 minutes).
const LIMIT_SECONDS: i64 = 300;

/// Unix seconds of the last beat (0: never).
static LAST_BEAT: AtomicI64 = AtomicI64::new(0);

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Records that the sync loop ran.
pub fn beat() {
    LAST_BEAT.store(now(), Ordering::Relaxed);
}

/// Ok while the loop has beaten within the limit. Before the first beat (the agent is starting) it is healthy,
/// as upstream's check is before its first sync.
pub fn sync_loop() -> Result<(), String> {
    check(LAST_BEAT.load(Ordering::Relaxed), now())
}

fn check(last: i64, now: i64) -> Result<(), String> {
    if last == 0 || now - last <= LIMIT_SECONDS {
        return Ok(());
    }
    Err(format!("sync Loop took longer than expected: last ran {}s ago", now - last))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fails_after_five_minutes_without_a_beat() {
        assert!(super::check(0, 1_000).is_ok());
        assert!(super::check(1_000, 1_300).is_ok());
        let e = super::check(1_000, 1_301).unwrap_err();
        assert!(e.contains("sync Loop took longer than expected"), "{e}");
    }
}
