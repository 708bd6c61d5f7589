//! The crate's one error type: every variant names the file (or template origin) and the problem.

use std::path::PathBuf;

/// Errors from reading model files. `path` is the file the problem was found in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid GGUF: {msg}", path = path.display())]
    Gguf { path: PathBuf, msg: String },
    #[error("{path}: tensor '{tensor}': {msg}", path = path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{path}: no tensor named '{tensor}'", path = path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tokenizer: {msg}", path = path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: invalid JSON: {msg}", path = path.display())]
    Json { path: PathBuf, msg: String },
    #[error("{path}: chat template: {msg}", path = path.display())]
    Template { path: PathBuf, msg: String },
    /// The template itself called `raise_exception(message)`.
    #[error("{path}: chat template raised an exception: {message}", path = path.display())]
    TemplateException { path: PathBuf, message: String },
    #[error("{path}: file is {len} bytes, more than the {cap} accepted for it", path = path.display())]
    TooLarge { path: PathBuf, len: u64, cap: u64 },
    #[error("{path}: not a model: expected a directory with config.json or a .gguf file", path = path.display())]
    NotAModel { path: PathBuf },
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
