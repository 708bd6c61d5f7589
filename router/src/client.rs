//! One gRPC client over all shards (TGI's `ShardedClient`): every RPC goes to every rank concurrently and
//! the answers are merged by TGI's rules — except Health, which must succeed on every rank.
//!
//! Invariant: RPCs that run a forward (Health, Warmup, Prefill, Decode) reach every rank in the same
//! order — one at a time through `lockstep` — because the ranks' collectives pair up in call order.
//!
//! Every RPC but Warmup has a deadline (`--shard-rpc-timeout`): a rank that stops answering fails the
//! call with `DeadlineExceeded` naming the RPC and the rank, instead of holding the batcher forever.
//! Warmup (sizing the KV cache, compiling kernels) is bounded by the launcher's startup timeout.

use crate::error::{Result, RouterError, ShardStatus};
use futures::future::try_join_all;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tessera_proto::uds;
use tessera_proto::v3::*;
use tessera_proto::TextGenerationServiceClient;
use tessera_telemetry::TraceInjector;
use tokio::sync::Mutex;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Every call carries the current span's trace context, so the shard's spans join the request's trace.
type Client = TextGenerationServiceClient<InterceptedService<Channel, TraceInjector>>;

/// Shard-side timings of one forward (the slowest rank's).
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardTimings {
    pub forward_ns: u64,
    pub decode_ns: u64,
    pub total_ns: u64,
    pub concat_ns: Option<u64>,
}

/// The merged answer of a Prefill or Decode.
#[derive(Debug, Clone, Default)]
pub struct ForwardResult {
    pub generations: Vec<Generation>,
    pub batch: Option<CachedBatch>,
    pub timings: ForwardTimings,
}

#[derive(Debug, Clone)]
pub struct ShardedClient {
    clients: Vec<Client>,
    lockstep: Arc<Mutex<()>>,
    /// `None` until startup sets one (Warmup has none).
    rpc_timeout: Option<Duration>,
}

/// How long connecting to a rank and ServiceDiscovery may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC client of one rank: the channel over its socket (tracing context injected into every call),
/// without tonic's message size limits.
async fn connect_rank(socket: &Path) -> Result<Client> {
    let channel = uds::connect(socket)
        .await
        .map_err(|e| RouterError::Connect(e.to_string()))?;
    Ok(
        TextGenerationServiceClient::with_interceptor(channel, TraceInjector)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    )
}

impl ShardedClient {
    /// Connect to rank 0, ask it for every rank's socket, connect to each.
    pub async fn connect(master: &Path) -> Result<Self> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_unbounded(master))
            .await
            .map_err(|_| {
                RouterError::Connect(format!(
                    "{} did not answer within {} s",
                    master.display(),
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
    }

    async fn connect_unbounded(master: &Path) -> Result<Self> {
        let mut master_client = connect_rank(master).await?;
        let urls = master_client
            .service_discovery(ServiceDiscoveryRequest {})
            .await
            .map_err(|status| RouterError::Shard(ShardStatus::new("ServiceDiscovery", 0, &status)))?
            .into_inner()
            .urls;
        if urls.is_empty() {
            return Err(RouterError::Connect(
                "ServiceDiscovery returned no shard".into(),
            ));
        }
        let sockets: Vec<_> = urls.iter().map(|u| uds::url_socket(u)).collect();
        let clients = try_join_all(sockets.iter().map(|s| connect_rank(s))).await?;
        Ok(ShardedClient {
            clients,
            lockstep: Arc::new(Mutex::new(())),
            rpc_timeout: None,
        })
    }

    /// The deadline of every later RPC but Warmup.
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Self {
        self.rpc_timeout = Some(timeout);
        self
    }

    pub fn rpc_timeout(&self) -> Option<Duration> {
        self.rpc_timeout
    }

    /// Connect, retrying until `timeout` (the shards may still be starting).
    pub async fn connect_with_retry(master: &Path, timeout: Duration) -> Result<Self> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match Self::connect(master).await {
                Ok(client) => return Ok(client),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => tracing::info!("waiting for the shards: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub fn world_size(&self) -> usize {
        self.clients.len()
    }

    /// `fan_out` for an RPC that runs a forward: no other such RPC is in flight meanwhile.
    async fn fan_out_forward<T, F, Fut>(&self, rpc: &'static str, call: F) -> Result<Vec<T>>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let _turn = self.lockstep.lock().await;
        self.fan_out(rpc, call).await
    }

    /// `fan_out_forward` without the deadline (Warmup).
    async fn fan_out_unbounded<T, F, Fut>(&self, rpc: &'static str, call: F) -> Result<Vec<T>>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let _turn = self.lockstep.lock().await;
        self.fan_out_within(rpc, None, call).await
    }

    /// Run `call` on every rank concurrently within the RPC deadline; a failure keeps its gRPC code, the
    /// RPC and the rank.
    async fn fan_out<T, F, Fut>(&self, rpc: &'static str, call: F) -> Result<Vec<T>>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.fan_out_within(rpc, self.rpc_timeout, call).await
    }

    async fn fan_out_within<T, F, Fut>(
        &self,
        rpc: &'static str,
        deadline: Option<Duration>,
        call: F,
    ) -> Result<Vec<T>>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let calls = self.clients.iter().enumerate().map(|(rank, client)| {
            let fut = call(client.clone());
            async move {
                let failed = |status: tonic::Status| {
                    RouterError::Shard(ShardStatus::new(rpc, rank, &status))
                };
                let answer = match deadline {
                    Some(limit) => tokio::time::timeout(limit, fut)
                        .await
                        .map_err(|_| failed(timed_out(limit)))?,
                    None => fut.await,
                };
                answer.map(tonic::Response::into_inner).map_err(failed)
            }
        });
        try_join_all(calls).await
    }

    pub async fn clear_cache(&self, id: Option<u64>) -> Result<()> {
        self.fan_out("ClearCache", |mut c| async move {
            c.clear_cache(ClearCacheRequest { id }).await
        })
        .await?;
        Ok(())
    }

    /// Model info (rank 0's; ranks serve the same model).
    pub async fn info(&self) -> Result<InfoResponse> {
        let mut answers = self
            .fan_out("Info", |mut c| async move { c.info(InfoRequest {}).await })
            .await?;
        Ok(answers.swap_remove(0))
    }

    /// Healthy only when every rank answers (TGI looks at the last rank only).
    pub async fn health(&self) -> Result<()> {
        self.fan_out_forward(
            "Health",
            |mut c| async move { c.health(HealthRequest {}).await },
        )
        .await?;
        Ok(())
    }

    /// Warmup on every rank; the tightest answer wins.
    pub async fn warmup(&self, request: WarmupRequest) -> Result<WarmupResponse> {
        let answers = self
            .fan_out_unbounded("Warmup", |mut c| {
                let request = request.clone();
                async move { c.warmup(request).await }
            })
            .await?;
        let min_supported = answers
            .iter()
            .filter_map(|a| a.max_supported_total_tokens)
            .min();
        Ok(WarmupResponse {
            max_supported_total_tokens: min_supported,
            max_input_tokens: answers
                .iter()
                .map(|a| a.max_input_tokens)
                .min()
                .unwrap_or(0),
            max_total_tokens: answers
                .iter()
                .map(|a| a.max_total_tokens)
                .min()
                .unwrap_or(0),
        })
    }

    pub async fn prefill(
        &self,
        batch: Batch,
        cached_batch: Option<CachedBatch>,
    ) -> Result<ForwardResult> {
        let request = PrefillRequest {
            batch: Some(batch),
            cached_batch,
        };
        let answers = self
            .fan_out_forward("Prefill", |mut c| {
                let request = request.clone();
                async move { c.prefill(request).await }
            })
            .await?;
        Ok(merge(answers.into_iter().map(|r| {
            (
                r.generations,
                r.batch,
                timings(r.forward_ns, r.decode_ns, r.total_ns, r.concat_ns),
            )
        })))
    }

    pub async fn decode(&self, batches: Vec<CachedBatch>) -> Result<ForwardResult> {
        let request = DecodeRequest { batches };
        let answers = self
            .fan_out_forward("Decode", |mut c| {
                let request = request.clone();
                async move { c.decode(request).await }
            })
            .await?;
        Ok(merge(answers.into_iter().map(|r| {
            (
                r.generations,
                r.batch,
                timings(r.forward_ns, r.decode_ns, r.total_ns, r.concat_ns),
            )
        })))
    }

    pub async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<CachedBatch>> {
        let request = FilterBatchRequest {
            batch_id,
            request_ids,
        };
        let mut answers = self
            .fan_out("FilterBatch", |mut c| {
                let request = request.clone();
                async move { c.filter_batch(request).await }
            })
            .await?;
        Ok(answers.pop().and_then(|a| a.batch))
    }
}

/// The status of a rank that did not answer in time (the process is stopped, hung or far too slow).
fn timed_out(limit: Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!(
        "no answer within {} s (--shard-rpc-timeout): the shard is stopped, hung or overloaded",
        limit.as_secs_f64()
    ))
}

fn timings(
    forward_ns: u64,
    decode_ns: u64,
    total_ns: u64,
    concat_ns: Option<u64>,
) -> ForwardTimings {
    ForwardTimings {
        forward_ns,
        decode_ns,
        total_ns,
        concat_ns,
    }
}

/// Generations of all ranks (each rank may emit only its share; duplicates are dropped), the last
/// rank's batch, the slowest rank's timings.
fn merge(
    answers: impl Iterator<Item = (Vec<Generation>, Option<CachedBatch>, ForwardTimings)>,
) -> ForwardResult {
    let mut result = ForwardResult::default();
    let mut seen = std::collections::HashSet::new();
    for (generations, batch, t) in answers {
        result.generations.extend(
            generations
                .into_iter()
                .filter(|g| seen.insert(g.request_id)),
        );
        result.batch = batch;
        let r = &mut result.timings;
        r.forward_ns = r.forward_ns.max(t.forward_ns);
        r.decode_ns = r.decode_ns.max(t.decode_ns);
        r.total_ns = r.total_ns.max(t.total_ns);
        r.concat_ns = r.concat_ns.max(t.concat_ns);
    }
    result
}
