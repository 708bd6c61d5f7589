//! `tessera-shard serve`: loads the model on the engine thread and serves `TextGenerationService`
//! on the unix socket `{uds_path}-{rank}` until SIGINT/SIGTERM.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::TextGenerationServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::comm::{Comm, CpuComm, Local, Rendezvous, SECRET_ENV};
use crate::engine::{EngineHandle, EngineOptions};
use crate::kv_cache::{KvCacheDtype, KvCacheDtypeParser};
use crate::loader::{Device, LoadOptions, WeightDtype};
use crate::service::ShardService;
use crate::weights::quant::Scheme;
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
    /// Rendezvous address of the tensor-parallel group: rank 0 listens there, the others connect.
    #[arg(long, env, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port of the tensor-parallel group.
    #[arg(long, env, default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds to wait for the other ranks at startup, and for a peer inside one collective
    /// before the group is declared broken.
    #[arg(long, env, default_value_t = 60)]
    pub comm_timeout_secs: u64,
    /// Where the model runs.
    #[arg(long, env, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Storage dtype of the weights (math is f32).
    #[arg(long, env, value_enum, default_value_t = WeightDtype::Auto)]
    pub dtype: WeightDtype,
    /// Quantize dense weight matrices at load (8-bit `q8_0` or 4-bit `q4_k`, groups of 32) so
    /// safetensors checkpoints run on the integer kernels; quantized GGUF tensors stay as stored.
    #[arg(long, env, value_enum)]
    pub quantize: Option<Scheme>,
    /// What the KV cache stores: bf16 (half the memory of f32), f16, or f32; attention math is
    /// f32 either way. TGI's fp8 values are refused.
    #[arg(long, env, value_parser = KvCacheDtypeParser, default_value_t = KvCacheDtype::default())]
    pub kv_cache_dtype: KvCacheDtype,
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
    /// Export spans over OTLP/gRPC to this collector (e.g. `http://localhost:4317`); each RPC's span
    /// continues the trace context the router sends in its metadata.
    #[arg(long, env)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    #[arg(long, env, default_value = "text-generation-inference.server")]
    pub otlp_service_name: String,
}

impl ServeArgs {
    /// This rank's socket.
    pub fn socket(&self) -> PathBuf {
        tessera_proto::uds::shard_socket(&self.uds_path, self.rank)
    }

    /// Checks the arguments and joins the tensor-parallel group (blocking until every rank has
    /// joined, or the timeout).
    pub fn engine_options(&self) -> Result<EngineOptions, Error> {
        self.check()?;
        Ok(EngineOptions {
            model: self.model_id.clone(),
            load: LoadOptions {
                dtype: self.dtype,
                quantize: self.quantize,
                device: self.device,
                kv_cache_dtype: self.kv_cache_dtype,
                comm: self.join_group()?,
            },
            max_prefill_tokens: self.max_batch_prefill_tokens.max(1),
            kv_cache_memory: self.kv_cache_memory,
            kv_memory_fraction: self.kv_cache_fraction,
            initial_kv_blocks: self.initial_kv_blocks.max(1),
            rank: self.rank,
            world_size: self.world_size,
        })
    }

    fn join_group(&self) -> Result<Arc<dyn Comm>, Error> {
        if self.world_size == 1 {
            return Ok(Arc::new(Local));
        }
        let timeout = Duration::from_secs(self.comm_timeout_secs.max(1));
        // The launcher hands the per-launch secret through the environment, never argv.
        let secret = std::env::var(SECRET_ENV).unwrap_or_default();
        if secret.is_empty() {
            tracing::warn!(
                "{SECRET_ENV} is not set: any local process that reaches {}:{} can join this \
                 tensor-parallel group (the launcher sets it)",
                self.master_addr,
                self.master_port
            );
        }
        let rendezvous = Rendezvous {
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            join_timeout: timeout,
            op_timeout: timeout,
            secret: secret.into_bytes(),
        };
        Ok(Arc::new(CpuComm::join(
            self.rank,
            self.world_size,
            &rendezvous,
        )?))
    }

    fn check(&self) -> Result<(), Error> {
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
        Ok(())
    }
}

/// Binds `path`, replacing a stale socket file a previous run left behind. The socket is made
/// owner-only (0600): gRPC on it runs the model for whoever connects. A directory others may
/// write to (as `/tmp`) lets them replace the socket, so it is named in a warning; the launcher
/// puts sockets in a fresh 0700 directory of its own.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if meta.mode() & 0o022 != 0 {
        tracing::warn!(
            "socket directory {} is writable by other users: prefer a private (0700) directory",
            dir.display()
        );
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!("replaced stale socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(path, e))?;
    Ok(listener)
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
        .trace_fn(tessera_telemetry::grpc_server_span)
        .add_service(server)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Device(format!("gRPC server failed: {e}")))
}

/// Starts the engine (loading the model) off the async runtime.
pub async fn start_engine(args: ServeArgs) -> Result<EngineHandle, Error> {
    tokio::task::spawn_blocking(move || EngineHandle::start(args.engine_options()?))
        .await
        .map_err(|e| Error::EnginePanic(e.to_string()))?
}

/// The whole `serve` command: load, bind, serve until SIGINT/SIGTERM, remove the socket.
pub async fn run(args: ServeArgs) -> Result<(), Error> {
    share_cores(args.world_size);
    let engine = start_engine(args.clone()).await?;
    let socket = args.socket();
    let listener = bind(&socket)?;
    tracing::info!("rank {} serving on unix://{}", args.rank, socket.display());
    let service = ShardService::new(engine, args.uds_path.clone(), args.world_size);
    let result = serve_listener(listener, service, shutdown_signal()).await;
    let _ = std::fs::remove_file(&socket);
    result
}

/// CPU ranks of one group share this host's cores: each takes its part (unless
/// `RAYON_NUM_THREADS` says otherwise), so no rank's workers wait on another's.
fn share_cores(world_size: usize) {
    if world_size < 2 || std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / world_size).max(1);
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        tracing::warn!("cannot size the thread pool: {e}");
    }
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
    tessera_proto::uds::client(path)
        .await
        .map_err(|e| Error::Device(e.to_string()))
}
