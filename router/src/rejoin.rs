//! Getting the shards back after their processes died (the launcher restarts the group): connect
//! again, clear, Warmup with the startup's request, and learn the KV cache the new group measured (it
//! sizes itself from free memory, so it may differ a little). The batcher keeps every request
//! meanwhile and resumes them afterwards.

use crate::client::ShardedClient;
use crate::error::{Result, RouterError};
use std::path::PathBuf;
use std::time::Duration;
use tessera_proto::v3;

/// How long one attempt may take to reach every rank (a serving shard answers in milliseconds; a
/// restarted one whose socket exists before it serves is tried again rather than waited on).
const ATTEMPT: Duration = Duration::from_secs(1);

/// What reconnecting takes: where rank 0 listens and the startup's Warmup.
#[derive(Debug, Clone)]
pub struct Rejoin {
    pub master: PathBuf,
    pub warmup: v3::WarmupRequest,
    /// KV tokens of the shards when the Warmup does not say (TGI's non-paged answer).
    pub max_batch_total_tokens: u32,
    pub rpc_timeout: Duration,
    /// How long requests are held while the shards are away before they fail.
    pub patience: Duration,
}

impl Rejoin {
    /// One attempt: a warmed-up client for the restarted shards and the KV tokens they hold, or why
    /// not yet.
    pub async fn connect(&self) -> Result<(ShardedClient, u32)> {
        let client = tokio::time::timeout(ATTEMPT, ShardedClient::connect(&self.master))
            .await
            .map_err(|_| RouterError::Connect("the shards did not answer yet".into()))??;
        client.clear_cache(None).await?;
        let warmup = client.warmup(self.warmup.clone()).await?;
        let tokens = warmup
            .max_supported_total_tokens
            .unwrap_or(self.max_batch_total_tokens);
        Ok((client.with_rpc_timeout(self.rpc_timeout), tokens))
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
