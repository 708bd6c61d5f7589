//! Tessera shard library: weights, engine (CPU and CUDA backends), paged KV cache, the gRPC
//! service, and the tooling subcommands.

pub mod error;
pub use error::{Error, Result};

pub mod backend;
pub mod cli;
pub mod comm;
pub mod config;
pub mod forward;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod models;
pub mod weights;

pub mod detokenize;
pub mod engine;
pub mod sampling;
pub mod serve;
pub mod service;
pub mod stopping;
pub mod tools;
