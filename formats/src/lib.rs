//! Model files shared by router and shard: GGUF containers, tokenizers (HF folder or GGUF), chat templates.
//!
//! - [`gguf`]: validated, memory-mapped GGUF reader with dequantization to f32.
//! - [`tokenizer`]: `tokenizers::Tokenizer` from `tokenizer.json` or from GGUF vocabulary metadata.
//! - [`chat_template`]: Hugging Face chat templates rendered as transformers does.
//! - [`model_files`]: what a model path is (HF folder or GGUF file).

// The workspace's MSRV (1.85) predates `is_multiple_of` (1.87), so `%` checks stay.
#![allow(clippy::manual_is_multiple_of)]

pub mod chat_template;
pub mod error;
pub mod gguf;
pub mod model_files;
pub mod tokenizer;

pub use error::{Error, Result};
