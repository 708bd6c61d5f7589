//! Rotary position embedding (Su et al. 2021) in Hugging Face's rotate-half form, with the
//! inverse frequencies computed in f32 exactly as transformers does, plus linear and Llama-3
//! frequency rescaling.

use rayon::prelude::*;

use crate::layers::ROWS_PER_TASK;

use crate::config::RopeScaling;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

/// cos/sin of every token's position, `[n, head_dim / 2]` each, shared by all layers of a forward.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, scaling: RopeScaling) -> Self {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
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
        }
        Rope { inv_freq }
    }

    pub fn tables(&self, positions: &[usize]) -> RopeTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTables { cos, sin, half }
    }
}

impl RopeTables {
    /// Rotates every head of every token in `x` (`[n, heads · head_dim]`) in place.
    pub fn apply(&self, x: &mut [f32], n: usize) {
        let half = self.half;
        let width = x.len() / n.max(1);
        let rows = x.par_chunks_exact_mut(width.max(1)).enumerate();
        rows.with_min_len(ROWS_PER_TASK).for_each(|(t, row)| {
            let (c, s) = (
                &self.cos[t * half..(t + 1) * half],
                &self.sin[t * half..(t + 1) * half],
            );
            for head in row.chunks_exact_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_rotation_preserves_norm() {
        let rope = Rope::new(4, 10000.0, RopeScaling::None);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        rope.tables(&[0, 5]).apply(&mut x, 2);
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
            Rope::new(128, 500000.0, RopeScaling::None),
            Rope::new(128, 500000.0, scaling),
        );
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        assert!((plain.inv_freq[63] / scaled.inv_freq[63] - 8.0).abs() < 1e-4);
    }
}
