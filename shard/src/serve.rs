//! `tessera-shard serve`: loads the model on the engine thread and serves `TextGenerationService`
//! on the unix socket `{uds_path}-{rank}` until SIGINT/SIGTERM.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_proto::TextGenerationServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::comm::Local;
use crate::engine::{EngineHandle, EngineOptions};
use crate::loader::{Device, LoadOptions, WeightDtype};
use crate::service::ShardService;
use crate::Error;

/// Arguments of `serve` (the launcher builds a shard's argv from this struct).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ServeArgs {
    /// Model directory (Hugging Face layout) or `.gguf` file.
    #[arg(long, env)]
    pub model_id: PathBuf,
    /// Socket path prefix; this rank listens on `{uds_path}-{rank}`.
    #[arg(long, env, default_value = "/tmp/tessera-server")]
    pub uds_path: String,
    /// This process's tensor-parallel rank.
    #[arg(long, env, default_value_t = 0)]
    pub rank: usize,
    /// Number of tensor-parallel ranks.
    #[arg(long, env, default_value_t = 1)]
    pub world_size: usize,
    /// Where the model runs.
    #[arg(long, env, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Storage dtype of the weights (math is f32).
    #[arg(long, env, value_enum, default_value_t = WeightDtype::Auto)]
    pub dtype: WeightDtype,
    /// KV cache size in bytes after warmup; default: `--kv-cache-fraction` of available memory.
    #[arg(long, env)]
    pub kv_cache_memory: Option<u64>,
    /// Share of MemAvailable (split between the ranks of a host) for the KV cache.
    #[arg(long, env, default_value_t = 0.5)]
    pub kv_cache_fraction: f64,
    /// KV cache blocks used until warmup sizes the cache.
    #[arg(long, env, default_value_t = 256)]
    pub initial_kv_blocks: usize,
    /// Prefill tokens per forward for continuing chunked prefills (warmup overrides it).
    #[arg(long, env, default_value_t = 4096)]
    pub max_batch_prefill_tokens: usize,
}

impl ServeArgs {
    /// This rank's socket.
    pub fn socket(&self) -> PathBuf {
        socket_path(&self.uds_path, self.rank)
    }

    pub fn engine_options(&self) -> Result<EngineOptions, Error> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::InvalidArgument {
                field: "--rank".into(),
                reason: format!(
                    "rank {} is not below world size {}",
                    self.rank, self.world_size
                ),
            });
        }
        if !(self.kv_cache_fraction > 0.0 && self.kv_cache_fraction <= 1.0) {
            return Err(Error::InvalidArgument {
                field: "--kv-cache-fraction".into(),
                reason: format!("must be in (0, 1], got {}", self.kv_cache_fraction),
            });
        }
        if self.world_size > 1 {
            // Ranks need a communicator joined inside the forward; only the local one exists.
            return Err(Error::InvalidArgument {
                field: "--world-size".into(),
                reason: "tensor parallelism across processes is not available in this build".into(),
            });
        }
        Ok(EngineOptions {
            model: self.model_id.clone(),
            load: LoadOptions {
                dtype: self.dtype,
                device: self.device,
                comm: Arc::new(Local),
            },
            max_prefill_tokens: self.max_batch_prefill_tokens.max(1),
            kv_cache_memory: self.kv_cache_memory,
            kv_memory_fraction: self.kv_cache_fraction,
            initial_kv_blocks: self.initial_kv_blocks.max(1),
            rank: self.rank,
            world_size: self.world_size,
        })
    }
}

/// `{uds_path}-{rank}`, the socket TGI's router and launcher expect.
pub fn socket_path(uds_path: &str, rank: usize) -> PathBuf {
    PathBuf::from(format!("{uds_path}-{rank}"))
}

/// Binds `path`, replacing a stale socket file a previous run left behind.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!("replaced stale socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    UnixListener::bind(path).map_err(|e| Error::io(path, e))
}

/// Serves the engine on `listener` until `shutdown` resolves.
pub async fn serve_listener(
    listener: UnixListener,
    service: ShardService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let server = TextGenerationServiceServer::new(service)
        .max_decoding_message_size(i32::MAX as usize)
        .max_encoding_message_size(i32::MAX as usize);
    tonic::transport::Server::builder()
        .add_service(server)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Device(format!("gRPC server failed: {e}")))
}

/// Starts the engine (loading the model) off the async runtime.
pub async fn start_engine(opts: EngineOptions) -> Result<EngineHandle, Error> {
    tokio::task::spawn_blocking(move || EngineHandle::start(opts))
        .await
        .map_err(|e| Error::EnginePanic(e.to_string()))?
}

/// The whole `serve` command: load, bind, serve until SIGINT/SIGTERM, remove the socket.
pub async fn run(args: ServeArgs) -> Result<(), Error> {
    let engine = start_engine(args.engine_options()?).await?;
    let socket = args.socket();
    let listener = bind(&socket)?;
    tracing::info!("rank {} serving on unix://{}", args.rank, socket.display());
    let service = ShardService::new(engine, args.uds_path.clone(), args.world_size);
    let result = serve_listener(listener, service, shutdown_signal()).await;
    let _ = std::fs::remove_file(&socket);
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// A gRPC client on a unix socket (for tests, the benchmark, and anything that drives a shard).
pub async fn connect(
    path: impl AsRef<Path>,
) -> Result<tessera_proto::TextGenerationServiceClient<tonic::transport::Channel>, Error> {
    let path = path.as_ref().to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| Error::Device(format!("cannot connect to the shard socket: {e}")))?;
    Ok(tessera_proto::TextGenerationServiceClient::new(channel)
        .max_decoding_message_size(i32::MAX as usize)
        .max_encoding_message_size(i32::MAX as usize))
}
