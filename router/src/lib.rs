//! Tessera router: TGI and OpenAI HTTP APIs, validation, continuous batching over the shards.

pub mod args;
pub mod scheduler;
