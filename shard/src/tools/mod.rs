//! The shard's tooling subcommands: local generation and benchmarks, random and converted model
//! folders. None of it runs while serving.

pub mod bench;
pub mod benchmark;
pub mod convert;
pub mod generate;
pub mod random_model;
