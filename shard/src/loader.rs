//! Loading a model for serving: resolves a Hugging Face folder or a `.gguf` file, reads its config,
//! weights (kept in the requested dtype), tokenizer and chat template.

use std::path::Path;
use std::sync::Arc;

use tessera_formats::chat_template::ChatTemplate;
use tessera_formats::gguf::Gguf;
use tokenizers::Tokenizer;

use crate::comm::{Comm, Local};
use crate::config::ModelConfig;
use crate::kv_cache::KvCacheDtype;
use crate::models::Model;
use crate::weights::gguf::GgufSource;
use crate::weights::quant::Scheme;
use crate::weights::safetensors::SafetensorsDir;
use crate::weights::{DType, WeightSource};
use crate::{Error, Result};

/// Storage dtype of the weights; math is f32 whatever is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightDtype {
    /// The checkpoint's own dtype (GGUF: quantized tensors stay quantized, float ones f32).
    #[default]
    Auto,
    #[value(name = "float32", alias = "f32")]
    F32,
    #[value(name = "bfloat16", alias = "bf16")]
    Bf16,
    #[value(name = "float16", alias = "f16")]
    F16,
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Device {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    pub dtype: WeightDtype,
    /// Quantize dense matrices at load (`--quantize q8_0|q4_k`); quantized GGUF tensors stay.
    pub quantize: Option<Scheme>,
    pub device: Device,
    /// What the model's KV caches store (`Model::cache_shape`).
    pub kv_cache_dtype: KvCacheDtype,
    /// The tensor-parallel group this process belongs to.
    pub comm: Arc<dyn Comm>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: WeightDtype::Auto,
            quantize: None,
            device: Device::Auto,
            kv_cache_dtype: KvCacheDtype::default(),
            comm: Arc::new(Local),
        }
    }
}

/// A model ready to serve.
pub struct Loaded {
    pub model: Model,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Name of the weight dtype, as `Info` reports it ("float32", "bfloat16", "float16",
    /// "quantized", "q8_0", "q4_k").
    pub dtype_name: String,
}

/// Loads model, config and tokenizer from a folder or `.gguf` file.
pub fn load(model: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let (model_, config, dtype) = load_model(model, opts)?;
    let tokenizer = tessera_formats::tokenizer::load_tokenizer(model)?;
    let chat_template = ChatTemplate::load(model)?;
    tessera_formats::heap::release_freed();
    Ok(Loaded {
        model: model_,
        config,
        tokenizer,
        chat_template,
        dtype_name: dtype_name(dtype).to_string(),
    })
}

/// Loads only the model (weights and config), for callers that bring their own tokenizer.
pub fn load_model(model: &Path, opts: &LoadOptions) -> Result<(Model, ModelConfig, DType)> {
    check_device(opts.device)?;
    if model.is_dir() {
        let config = ModelConfig::from_hf_dir(model)?;
        let src = SafetensorsDir::open(model)?;
        let dtype = resolve_dtype(opts, &src);
        let m = Model::load(&src, &config, dtype, opts.comm.clone())?;
        Ok((m.with_kv_cache_dtype(opts.kv_cache_dtype), config, dtype))
    } else if model.extension().is_some_and(|e| e == "gguf") {
        let gguf = Gguf::open(model)?;
        let config = ModelConfig::from_gguf(&gguf)?;
        let src = GgufSource::new(&gguf, config.num_heads, config.num_kv_heads);
        let dtype = resolve_dtype(opts, &src);
        let src = src.keep_quantized(matches!(dtype, DType::Quantized { .. }));
        let m = Model::load(&src, &config, dtype, opts.comm.clone())?;
        Ok((m.with_kv_cache_dtype(opts.kv_cache_dtype), config, dtype))
    } else if !model.exists() {
        Err(Error::io(
            model,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ))
    } else {
        Err(Error::model_file(
            model,
            "not a model: expected a directory with config.json or a .gguf file",
        ))
    }
}

/// The one place the device is decided. `auto` would pick CUDA when the driver reports a GPU; until
/// the CUDA model path runs models it says so and stays on CPU, and `cuda` is an error that names
/// what was found. Every outcome without a driver or GPU is a one-line error, never a panic.
fn check_device(device: Device) -> Result<()> {
    use crate::backend::cuda::{probe, Probe};
    const NOT_YET: &str = "the CUDA model path is not yet available in this build \
                           (kernels, NVRTC and device discovery are; see docs/cuda.md)";
    match device {
        Device::Cpu => Ok(()),
        Device::Auto => {
            if let Probe::Gpus(gpus) = probe() {
                tracing::warn!("--device auto: found {}, but {NOT_YET}; using CPU", gpus[0]);
            }
            Ok(())
        }
        Device::Cuda => {
            let found = match probe() {
                Probe::NoDriver => "no CUDA driver found (libcuda.so could not be loaded)".into(),
                Probe::NoGpu(why) => format!("the CUDA driver offers no usable GPU ({why})"),
                Probe::Gpus(gpus) => format!("found {}, but {NOT_YET}", gpus[0]),
            };
            Err(Error::Device(format!(
                "--device cuda: {found}; use --device cpu"
            )))
        }
    }
}

/// `--quantize` wins over `--dtype`: the matrices it leaves dense (rows not whole groups) are f32.
fn resolve_dtype(opts: &LoadOptions, src: &dyn WeightSource) -> DType {
    if let Some(s) = opts.quantize {
        return DType::Quantized { at_load: Some(s) };
    }
    match opts.dtype {
        WeightDtype::Auto => src.native_dtype(),
        WeightDtype::F32 => DType::F32,
        WeightDtype::Bf16 => DType::Bf16,
        WeightDtype::F16 => DType::F16,
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::Bf16 => "bfloat16",
        DType::F16 => "float16",
        DType::Quantized { at_load: None } => "quantized",
        DType::Quantized {
            at_load: Some(Scheme::Q8_0),
        } => "q8_0",
        DType::Quantized {
            at_load: Some(Scheme::Q4K),
        } => "q4_k",
    }
}
