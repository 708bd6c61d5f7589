//! The engine: one thread that owns the model, the KV cache and every batch (by batch id), driven
//! by typed commands over a channel, each answered on its own oneshot. A panic while handling a
//! command is caught and fails that command only; the thread keeps serving.

mod request;
mod step;
pub mod types;
mod warmup;

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use crate::config::ModelConfig;
use crate::kv_cache::{KvCache, DEFAULT_BLOCK_SIZE};
use crate::loader::{load, LoadOptions};
use crate::models::Model;
use crate::Error;
use request::{Ctx, Seq};
pub use types::*;

/// How to load the model and size the KV cache.
#[derive(Clone)]
pub struct EngineOptions {
    pub model: PathBuf,
    pub load: LoadOptions,
    /// Prefill-token budget of one forward for continuing chunked prefills (warmup may change it).
    pub max_prefill_tokens: usize,
    /// KV cache bytes after warmup; `None`: `kv_memory_fraction` of available memory.
    pub kv_cache_memory: Option<u64>,
    /// Share of `MemAvailable` (split between the ranks of this host) for the KV cache.
    pub kv_memory_fraction: f64,
    /// Blocks of the cache used before warmup sizes it.
    pub initial_kv_blocks: usize,
    pub rank: usize,
    pub world_size: usize,
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Command {
    Info(Reply<ModelInfo>),
    Health(Reply<()>),
    ClearCache(Option<u64>, Reply<()>),
    Filter(u64, Vec<u64>, Reply<BatchInfo>),
    Warmup(Box<WarmupIn>, Reply<WarmupOut>),
    Prefill(NewBatch, Option<u64>, Vec<KvGrant>, Reply<StepOut>),
    Decode(Vec<u64>, Vec<KvGrant>, Reply<StepOut>),
}

/// The async side's handle: cheap to clone, one per gRPC service.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl EngineHandle {
    /// Starts the engine thread and waits until it has loaded the model.
    pub fn start(opts: EngineOptions) -> Result<EngineHandle, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("engine-{}", opts.rank))
            .spawn(
                move || match catch_unwind(AssertUnwindSafe(|| Engine::new(opts))) {
                    Ok(Ok(engine)) => {
                        let _ = ready_tx.send(Ok(()));
                        engine.run(rx);
                    }
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                    }
                    Err(panic) => {
                        let message = panic_message(&*panic);
                        let _ = ready_tx.send(Err(Error::EnginePanic(message)));
                    }
                },
            )
            .map_err(|e| Error::io("engine thread", e))?;
        ready_rx.recv().map_err(|_| Error::EngineStopped)??;
        Ok(EngineHandle { tx })
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .map_err(|_| Error::EngineStopped)?;
        rx.await.map_err(|_| Error::EngineStopped)?
    }

    pub async fn info(&self) -> Result<ModelInfo, Error> {
        self.call(Command::Info).await
    }

    pub async fn health(&self) -> Result<(), Error> {
        self.call(Command::Health).await
    }

    pub async fn clear_cache(&self, id: Option<u64>) -> Result<(), Error> {
        self.call(|r| Command::ClearCache(id, r)).await
    }

    pub async fn filter(&self, batch_id: u64, request_ids: Vec<u64>) -> Result<BatchInfo, Error> {
        self.call(|r| Command::Filter(batch_id, request_ids, r))
            .await
    }

    pub async fn warmup(&self, warmup: WarmupIn) -> Result<WarmupOut, Error> {
        self.call(|r| Command::Warmup(Box::new(warmup), r)).await
    }

    /// Prefill `batch`, merged with the `cached` batch when given; `grants` extend the KV of
    /// requests of the cached batch first.
    pub async fn prefill(
        &self,
        batch: NewBatch,
        cached: Option<u64>,
        grants: Vec<KvGrant>,
    ) -> Result<StepOut, Error> {
        self.call(|r| Command::Prefill(batch, cached, grants, r))
            .await
    }

    /// One decode step over the held batches; `grants` extend their requests' KV first.
    pub async fn decode(
        &self,
        batch_ids: Vec<u64>,
        grants: Vec<KvGrant>,
    ) -> Result<StepOut, Error> {
        self.call(|r| Command::Decode(batch_ids, grants, r)).await
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic into an error, and answers.
fn answer<T>(reply: Reply<T>, f: impl FnOnce() -> Result<T, Error>) {
    let result = catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(Error::EnginePanic(panic_message(&*panic))));
    if let Err(e) = &result {
        tracing::warn!("engine command failed: {e}");
    }
    // The caller may have gone (RPC cancelled): nothing to do then.
    let _ = reply.send(result);
}

/// State owned by the engine thread.
struct Engine {
    model: Model,
    cache: KvCache,
    config: ModelConfig,
    ctx: Ctx,
    info: ModelInfo,
    batches: HashMap<u64, Vec<Seq>>,
    opts: EngineOptions,
}

impl Engine {
    fn new(opts: EngineOptions) -> Result<Engine, Error> {
        let loaded = load(&opts.model, &opts.load)?;
        let config = loaded.config;
        let block_size = DEFAULT_BLOCK_SIZE;
        let num_blocks = opts.initial_kv_blocks.max(1);
        let cache = KvCache::new(loaded.model.cache_shape(), num_blocks, block_size);
        let special = crate::detokenize::special_ids(&loaded.tokenizer);
        let info = ModelInfo {
            dtype: loaded.dtype_name.to_string(),
            device_type: "cpu".into(),
            block_size: block_size as u32,
            // TGI's router may size KV reservations by the window: only when every layer has it.
            window_size: config
                .sliding_window
                .filter(|_| config.sliding_layers.iter().all(|&s| s))
                .map(|w| w as u32),
        };
        let ctx = Ctx {
            tokenizer: loaded.tokenizer,
            special,
            eos_token_ids: config.eos_token_ids.clone(),
            num_blocks,
            block_size,
            max_positions: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            grammars: Default::default(),
        };
        ctx.prepare_grammars();
        tracing::info!(rank = opts.rank, num_blocks, "engine ready");
        Ok(Engine {
            model: loaded.model,
            cache,
            config,
            ctx,
            info,
            batches: HashMap::new(),
            opts,
        })
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(command) = rx.blocking_recv() {
            match command {
                Command::Info(r) => answer(r, || Ok(self.info.clone())),
                Command::Health(r) => answer(r, || self.health()),
                Command::ClearCache(id, r) => answer(r, || {
                    self.clear(id);
                    Ok(())
                }),
                Command::Filter(id, keep, r) => answer(r, || self.filter(id, &keep)),
                Command::Warmup(w, r) => answer(r, || self.warmup(*w)),
                Command::Prefill(b, cached, g, r) => answer(r, || self.prefill(b, cached, g)),
                Command::Decode(ids, g, r) => answer(r, || self.decode(&ids, g)),
            }
        }
    }

    fn clear(&mut self, id: Option<u64>) {
        match id {
            Some(id) => drop(self.batches.remove(&id)),
            None => self.batches.clear(),
        }
    }

    /// Keeps the listed requests; ids no longer in the batch (already finished) are ignored.
    fn filter(&mut self, id: u64, keep: &[u64]) -> Result<BatchInfo, Error> {
        if keep.is_empty() {
            return Err(Error::InvalidArgument {
                field: "request_ids".into(),
                reason: "empty: use ClearCache to drop a whole batch".into(),
            });
        }
        let seqs = self.batches.get_mut(&id).ok_or(Error::BatchNotFound(id))?;
        let keep: HashSet<u64> = keep.iter().copied().collect();
        if !seqs.iter().any(|s| keep.contains(&s.id)) {
            return Err(Error::InvalidArgument {
                field: "request_ids".into(),
                reason: format!("none of them is in batch {id}"),
            });
        }
        seqs.retain(|s| keep.contains(&s.id));
        let info = self.batch_info(id, &self.batches[&id]);
        Ok(info)
    }

    /// The router's handle on a batch; `current_tokens` plans the next forward exactly as the
    /// step will.
    fn batch_info(&self, id: u64, seqs: &[Seq]) -> BatchInfo {
        let mut budget = self.opts.max_prefill_tokens;
        BatchInfo {
            id,
            request_ids: seqs.iter().map(|s| s.id).collect(),
            max_tokens: seqs
                .iter()
                .map(|s| s.capacity(self.ctx.block_size))
                .sum::<usize>() as u32,
            current_tokens: seqs.iter().map(|s| s.next_len(&mut budget)).sum::<usize>() as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_fails_only_its_command() {
        let (reply, mut rx) = oneshot::channel::<Result<(), Error>>();
        answer(reply, || panic!("boom at step {}", 3));
        match rx.try_recv() {
            Ok(Err(Error::EnginePanic(m))) => assert_eq!(m, "boom at step 3"),
            other => panic!("{other:?}"),
        }
        let (reply, mut rx) = oneshot::channel::<Result<u8, Error>>();
        answer(reply, || Ok(7));
        assert_eq!(rx.try_recv().unwrap().unwrap(), 7);
    }
}
