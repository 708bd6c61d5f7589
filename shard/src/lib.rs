//! Tessera shard library: weights, CPU engine, paged KV cache, and (later) the gRPC service.

pub mod error;
pub use error::{Error, Result};

pub mod backend;
pub mod config;
pub mod weights;

pub mod detokenize;
pub mod sampling;
pub mod stopping;
