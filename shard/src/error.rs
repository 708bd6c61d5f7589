//! The shard crate's one error type. Every variant says which file, tensor or request field is at
//! fault, so a message alone is enough to act on.

use std::path::PathBuf;

/// Errors of the shard: loading a model, validating a batch, running a forward, serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file (safetensors, config.json, GGUF...) is malformed or inconsistent.
    #[error("{path}: {msg}", path = path.display())]
    ModelFile { path: PathBuf, msg: String },
    /// A tensor the model needs has the wrong shape or dtype, or is missing.
    #[error("{path}: tensor '{tensor}': {msg}", path = path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("unsupported architecture '{0}' (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error(transparent)]
    Formats(#[from] tessera_formats::Error),
    /// A forward batch that cannot be run as given (out-of-range slot, token id, ...).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("{0}")]
    Device(String),
    #[error("{0}")]
    Tokenizer(String),
    /// A request field the router sent is malformed (named as in generate.proto).
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("batch {0} not found")]
    BatchNotFound(u64),
    #[error("sampling failed: {0}")]
    Sampling(String),
    /// A panic on the engine thread, caught so that only the RPC that caused it fails.
    #[error("engine panicked: {0}")]
    EnginePanic(String),
    #[error("the engine thread has stopped")]
    EngineStopped,
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn model_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::ModelFile {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}
