//! Tessera router: TGI and OpenAI HTTP APIs, validation, continuous batching over the shards.

pub mod api;
pub mod args;
pub mod batcher;
pub mod cli;
pub mod client;
pub mod common;
pub mod error;
pub mod health;
pub mod metrics;
pub mod openai;
pub mod openai_stream;
pub mod openai_types;
pub mod openapi;
pub mod rejoin;
pub mod sagemaker;
pub mod scheduler;
pub mod server;
pub mod startup;
pub mod swagger;
pub mod tgi;
pub mod tools;
pub mod validation;
