//! Getting the shards back after their processes died (the launcher restarts the group): connect
//! again, clear, Warmup with the startup's request, and check the cache still holds what the
//! scheduler hands out. The batcher keeps every request meanwhile and resumes them afterwards.

use crate::client::ShardedClient;
use crate::error::{Result, RouterError};
use std::path::PathBuf;
use std::time::Duration;
use tessera_proto::v3;

/// How long one attempt waits for rank 0's socket.
const ATTEMPT: Duration = Duration::from_secs(2);

/// What reconnecting takes: where rank 0 listens and the startup's Warmup.
#[derive(Debug, Clone)]
pub struct Rejoin {
    pub master: PathBuf,
    pub warmup: v3::WarmupRequest,
    /// KV tokens the scheduler was sized for: the restarted shards must hold at least as many.
    pub max_batch_total_tokens: u32,
    pub rpc_timeout: Duration,
    /// How long requests are held while the shards are away before they fail.
    pub patience: Duration,
}

impl Rejoin {
    /// One attempt: a warmed-up client for the restarted shards, or why not yet.
    pub async fn connect(&self) -> Result<ShardedClient> {
        let client = ShardedClient::connect_with_retry(&self.master, ATTEMPT).await?;
        client.clear_cache(None).await?;
        let warmup = client.warmup(self.warmup.clone()).await?;
        let supported = warmup
            .max_supported_total_tokens
            .unwrap_or(self.max_batch_total_tokens);
        if supported < self.max_batch_total_tokens {
            return Err(RouterError::Config(format!(
                "the restarted shards hold {supported} KV tokens, fewer than the {} the router was started with",
                self.max_batch_total_tokens
            )));
        }
        Ok(client.with_rpc_timeout(self.rpc_timeout))
    }
}

/// Whether a failed shard call means the shard processes are gone (the connection failed or
/// broke), rather than a refusal or a failure of one forward.
pub fn shards_lost(error: &RouterError) -> bool {
    match error {
        RouterError::Shard(status) => matches!(
            status.code,
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        _ => false,
    }
}
