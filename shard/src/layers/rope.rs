//! Rotary position embedding (Su et al. 2021) in Hugging Face's rotate-half form over the first
//! `rotary_dim` dimensions of each head (all of them unless the model rotates a part, as Phi-3),
//! with the inverse frequencies computed in f32 exactly as transformers does, and its frequency
//! rescalings: linear, dynamic NTK, YaRN, Llama 3 and LongRoPE. Dynamic NTK and LongRoPE depend on
//! the sequence's length, so the angles are computed per sequence, as transformers does per forward.

use std::borrow::Cow;

use crate::backend::Backend;
use crate::config::{LongRope, RopeConfig, RopeScaling, Yarn};
use crate::forward::BatchPlan;

#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    /// The frequencies of a sequence within the trained context (LongRoPE's short factors).
    inv_freq: Vec<f32>,
    /// cos and sin are multiplied by this (YaRN's and LongRoPE's attention factor; else 1).
    attention_factor: f32,
}

/// cos/sin of every token's angles, `[n, rotary_dim / 2]` each, shared by the layers of a forward
/// that use this rotary embedding.
pub struct RopeTables<B: Backend> {
    cos: B::Tensor,
    sin: B::Tensor,
}

/// `1 / base^(2i / dim)` for `i < dim / 2`, in f32 as `torch.arange(0, dim, 2).float() / dim`.
fn default_inv_freq(base: f32, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect()
}

impl Yarn {
    /// Interpolated (`/ factor`) below the ramp, extrapolated (as trained) above it, blended
    /// linearly between the correction dimensions of `beta_fast` and `beta_slow` rotations.
    fn inv_freq(&self, base: f32, dim: usize) -> Vec<f32> {
        let (b, d) = (base as f64, dim as f64);
        let original = self.original_max_position_embeddings as f64;
        let correction = |rotations: f32| {
            d * (original / (rotations as f64 * 2.0 * std::f64::consts::PI)).ln() / (2.0 * b.ln())
        };
        let (mut low, mut high) = (correction(self.beta_fast), correction(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0) as f32, high.min(d - 1.0) as f32);
        if low == high {
            high += 0.001;
        }
        (0..dim / 2)
            .map(|i| {
                let pos_freq = base.powf((2 * i) as f32 / dim as f32);
                let (extrapolated, interpolated) = (1.0 / pos_freq, 1.0 / (self.factor * pos_freq));
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
            })
            .collect()
    }
}

impl LongRope {
    /// `1 / (factor_i · base^(2i / dim))`.
    fn inv_freq(&self, base: f32, dim: usize, factors: &[f32]) -> Vec<f32> {
        (0..dim / 2)
            .map(|i| 1.0 / (factors[i] * base.powf((2 * i) as f32 / dim as f32)))
            .collect()
    }
}

impl Rope {
    pub fn new(config: &RopeConfig) -> Self {
        let dim = config.rotary_dim;
        let mut inv_freq = default_inv_freq(config.theta, dim);
        let mut attention_factor = 1.0;
        match &config.scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wl {
                        *f /= factor;
                    } else if wavelen >= high_wl {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::Yarn(y) => {
                inv_freq = y.inv_freq(config.theta, dim);
                attention_factor = y.attention_factor;
            }
            RopeScaling::LongRope(l) => {
                inv_freq = l.inv_freq(config.theta, dim, &l.short_factor);
                attention_factor = l.attention_factor;
            }
        }
        Rope {
            config: config.clone(),
            inv_freq,
            attention_factor,
        }
    }

    /// The frequencies for a sequence of `len` positions.
    fn inv_freq(&self, len: usize) -> Cow<'_, [f32]> {
        let (theta, dim) = (self.config.theta, self.config.rotary_dim);
        match &self.config.scaling {
            &RopeScaling::Dynamic {
                factor,
                max_position_embeddings: max,
            } if len > max => {
                let grown = factor as f64 * len as f64 / max as f64 - (factor as f64 - 1.0);
                let base = theta as f64 * grown.powf(dim as f64 / (dim as f64 - 2.0));
                Cow::Owned(default_inv_freq(base as f32, dim))
            }
            RopeScaling::LongRope(l) if len > l.original_max_position_embeddings => {
                Cow::Owned(l.inv_freq(theta, dim, &l.long_factor))
            }
            _ => Cow::Borrowed(&self.inv_freq),
        }
    }

    /// The angles of every token of `plan`, each at its position in its sequence.
    pub fn tables<B: Backend>(&self, b: &B, plan: &BatchPlan) -> RopeTables<B> {
        let half = self.config.rotary_dim / 2;
        let n = plan.positions.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for tokens in &plan.seq_tokens {
            let positions = &plan.positions[tokens.clone()];
            let len = positions.iter().max().map_or(0, |p| p + 1);
            let inv_freq = self.inv_freq(len);
            for &p in positions {
                for &f in inv_freq.iter() {
                    let angle = p as f32 * f;
                    cos.push(angle.cos() * self.attention_factor);
                    sin.push(angle.sin() * self.attention_factor);
                }
            }
        }
        RopeTables {
            cos: b.upload(cos, half),
            sin: b.upload(sin, half),
        }
    }
}

impl<B: Backend> RopeTables<B> {
    /// Rotates every `head_dim`-wide head of every token in `x` (`[n, heads · head_dim]`).
    pub fn apply(&self, b: &B, x: &mut B::Tensor, head_dim: usize) {
        b.rope(x, &self.cos, &self.sin, head_dim);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::forward::{ForwardBatch, LogitsWanted, SeqInput};

    fn rope(head_dim: usize, theta: f32, scaling: RopeScaling) -> Rope {
        Rope::new(&RopeConfig {
            theta,
            scaling,
            rotary_dim: head_dim,
        })
    }

    /// Sequences of `(first position, tokens)`, each with its own blocks of one slot.
    fn plan(seqs: &[(usize, usize)]) -> BatchPlan {
        let mut next = 0u32;
        let seqs = seqs
            .iter()
            .map(|&(start, len)| {
                let blocks: Vec<u32> = (next..next + (start + len) as u32).collect();
                next += (start + len) as u32;
                SeqInput {
                    tokens: vec![0; len],
                    start_pos: start,
                    slots: blocks[start..].to_vec(),
                    block_table: blocks,
                    logits: LogitsWanted::None,
                    decoded_from: None,
                }
            })
            .collect();
        BatchPlan::new(&ForwardBatch { seqs }, 1, next as usize, 1).unwrap()
    }

    #[test]
    fn position_zero_is_identity_and_rotation_preserves_norm() {
        let r = rope(4, 10000.0, RopeScaling::None);
        let mut x = Cpu.upload(vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0], 4);
        r.tables(&Cpu, &plan(&[(0, 1), (5, 1)]))
            .apply(&Cpu, &mut x, 4);
        let x = x.data;
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        let norm: f32 = x[4..].iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies_only() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let (plain, scaled) = (
            rope(128, 500000.0, RopeScaling::None),
            rope(128, 500000.0, scaling),
        );
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        assert!((plain.inv_freq[63] / scaled.inv_freq[63] - 8.0).abs() < 1e-4);
    }
}
