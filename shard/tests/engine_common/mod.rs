//! Helpers shared by the engine tests: locating models and reference data (`tests/support/paths.rs`), comparing
//! logits.
#![allow(dead_code)]

#[path = "../../../tests/support/paths.rs"]
mod paths;
pub use paths::*;

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
