//! Model files shared by router and shard: GGUF containers, tokenizers (HF folder or GGUF), chat templates.

pub mod error;
pub mod gguf;
pub mod tokenizer;
pub mod chat_template;

pub use error::{Error, Result};
