//! Model files shared by router and shard: GGUF containers, tokenizers (HF folder or GGUF), chat templates.

pub mod error;
pub mod gguf;
pub mod tokenizer;

pub use error::{Error, Result};
