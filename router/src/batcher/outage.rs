//! A shard outage, as the batcher lives it: every request held (the scheduler queued the running
//! ones again with what they generated) while the restarted shards are reconnected and warmed up
//! (`rejoin.rs`), new requests and cancellations taken meanwhile, the held ones failed past the
//! patience.

use super::Batcher;
use crate::error::RouterError;
use std::time::{Duration, Instant};

impl Batcher {
    /// Holds every request (the scheduler has queued the running ones again) until the restarted
    /// shards are connected and warmed up, taking new requests and cancellations meanwhile. Held
    /// requests fail when the shards stay away longer than `rejoin.patience`.
    pub(super) async fn await_shards(&mut self) {
        let since = Instant::now();
        let mut held_since = since;
        let mut last_reason = String::new();
        tracing::warn!(
            held = self.requests.len(),
            "the shards are gone; holding every request until they are back"
        );
        self.health.record(Err(
            "the shards are gone; waiting for them to restart".into()
        ));
        loop {
            while let Ok(command) = self.commands.try_recv() {
                self.enqueue(command);
            }
            self.cancel_disconnected();
            self.publish_gauges();
            if held_since.elapsed() > self.rejoin.patience {
                let secs = self.rejoin.patience.as_secs();
                let error = RouterError::Generation(format!(
                    "the shards did not come back within {secs} s"
                ));
                for event in self.scheduler.fail_all(&error) {
                    self.deliver(event);
                }
                held_since = Instant::now();
            }
            match self.rejoin.connect().await {
                Ok((client, kv_tokens)) => {
                    self.client = client;
                    let num_blocks = kv_tokens / self.kv_capacity.block_size.max(1);
                    if num_blocks != self.kv_capacity.num_blocks {
                        tracing::info!(
                            before = self.kv_capacity.num_blocks,
                            now = num_blocks,
                            "the restarted shards measured another KV cache"
                        );
                        self.kv_capacity.num_blocks = num_blocks;
                        for event in self.scheduler.resize(num_blocks) {
                            self.deliver(event);
                        }
                    }
                    self.last_check = Instant::now();
                    self.health.record(Ok(()));
                    tracing::info!(
                        resuming = self.requests.len(),
                        "the shards are back after {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                    return;
                }
                Err(e) => {
                    let reason = e.to_string();
                    if reason != last_reason {
                        tracing::info!("the shards are not back yet: {reason}");
                        last_reason = reason;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
