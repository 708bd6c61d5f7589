//! Tessera shard library: weights, CPU engine, paged KV cache, and (later) the gRPC service.

pub mod error;
pub use error::{Error, Result};

pub mod backend;
pub mod bench;
pub mod cli;
pub mod comm;
pub mod config;
pub mod forward;
pub mod generate;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod models;
pub mod random_model;
pub mod weights;

pub mod benchmark;
pub mod detokenize;
pub mod engine;
pub mod sampling;
pub mod serve;
pub mod service;
pub mod stopping;
