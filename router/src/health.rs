//! The batcher's health record, which `/health` reads without calling a shard: the last forward or
//! Health RPC, the step in flight against its deadline, and draining after a shutdown signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often an idle, healthy batcher re-checks the shards with the Health RPC.
pub(crate) const IDLE_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// How often it re-checks while the last check failed (so a transient failure clears quickly).
pub(crate) const UNHEALTHY_RETRY: Duration = Duration::from_secs(1);

/// The batcher's health record, shared with `/health` (which only reads it).
#[derive(Debug)]
pub struct Health {
    /// The last forward or Health RPC succeeded.
    ok: AtomicBool,
    /// Why the last one failed (for the log of `/health`'s 503).
    failure: Mutex<Option<String>>,
    /// The step in flight and when it started.
    step: Mutex<Option<(&'static str, Instant)>>,
    /// A step running longer than this is stuck (the RPC deadline, plus slack for delivering events).
    step_deadline: Duration,
    draining: AtomicBool,
}

impl Health {
    pub(crate) fn new(step_deadline: Duration) -> Self {
        Health {
            ok: AtomicBool::new(true),
            failure: Mutex::new(None),
            step: Mutex::new(None),
            step_deadline,
            draining: AtomicBool::new(false),
        }
    }

    pub(crate) fn record(&self, outcome: Result<(), String>) {
        let ok = outcome.is_ok();
        if ok != self.ok.swap(ok, Ordering::SeqCst) {
            match &outcome {
                Ok(()) => tracing::info!("shards healthy again"),
                Err(why) => tracing::error!("shards unhealthy: {why}"),
            }
        }
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = outcome.err();
    }

    pub(crate) fn step_started(&self, method: &'static str) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = Some((method, Instant::now()));
    }

    pub(crate) fn step_finished(&self) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) fn is_ok(&self) -> bool {
        self.ok.load(Ordering::SeqCst)
    }

    /// From now on the server reports 503 (it is shutting down).
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Why the server is not healthy now, if it is not.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.draining.load(Ordering::SeqCst) {
            return Some("draining after a shutdown signal".into());
        }
        if let Some((method, since)) = *self.step.lock().unwrap_or_else(|e| e.into_inner()) {
            if since.elapsed() > self.step_deadline {
                return Some(format!(
                    "{method} has run for {:.0} s, past its {:.0} s deadline",
                    since.elapsed().as_secs_f64(),
                    self.step_deadline.as_secs_f64()
                ));
            }
        }
        if !self.is_ok() {
            let why = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            return Some(
                why.clone()
                    .unwrap_or_else(|| "the last shard call failed".into()),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reports_failures_stuck_steps_and_draining_and_recovers() {
        let health = Health::new(Duration::from_millis(50));
        assert_eq!(health.problem(), None);
        health.record(Err("Decode: shard error: no answer within 3 s".into()));
        assert!(health.problem().unwrap().contains("no answer within 3 s"));
        health.record(Ok(()));
        assert_eq!(health.problem(), None);

        health.step_started("Prefill");
        assert_eq!(health.problem(), None, "a step within its deadline is fine");
        std::thread::sleep(Duration::from_millis(80));
        let stuck = health.problem().unwrap();
        assert!(stuck.contains("Prefill has run for"), "{stuck}");
        health.step_finished();
        assert_eq!(health.problem(), None);

        health.start_draining();
        assert!(health.problem().unwrap().contains("draining"));
    }
}
