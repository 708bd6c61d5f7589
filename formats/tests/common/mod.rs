//! Test helpers of the formats crate: the shared data locations (`tests/support/paths.rs`).
#![allow(dead_code)]

#[path = "../../../tests/support/paths.rs"]
mod paths;
pub use paths::*;
