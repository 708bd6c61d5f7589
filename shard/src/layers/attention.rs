//! Paged attention on CPU: the batch's new K/V are first written into their cache slots, then
//! every (token, query head) attends over its sequence's positions read through the block table
//! — causal within a prefill chunk, limited to the sliding window when the model has one.
//! Grouped-query attention maps query head h to KV head h / (heads / kv_heads).

use rayon::prelude::*;

use crate::backend::cpu::{axpy, dot};
use crate::forward::BatchPlan;
use crate::kv_cache::LayerCache;

/// Head geometry of this rank.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

/// Copies each token's K and V rows (`[n, kv_dim]`) into its slot.
pub fn write_kv(cache: &mut LayerCache, k: &[f32], v: &[f32], slots: &[usize], kv_dim: usize) {
    for (t, &slot) in slots.iter().enumerate() {
        let (src, dst) = (t * kv_dim..(t + 1) * kv_dim, slot * kv_dim..(slot + 1) * kv_dim);
        cache.k[dst.clone()].copy_from_slice(&k[src.clone()]);
        cache.v[dst].copy_from_slice(&v[src]);
    }
}

/// `q` is `[n, heads · head_dim]`; returns the attention output of the same shape.
pub(crate) fn paged_attention(q: &[f32], cache: &LayerCache, plan: &BatchPlan, h: Heads) -> Vec<f32> {
    let hd = h.head_dim;
    let kv_dim = h.num_kv_heads * hd;
    let group = h.num_heads / h.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0; q.len()];
    out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
        let (t, head) = (i / h.num_heads, i % h.num_heads);
        let pos = plan.positions[t];
        let slots = &plan.seq_slots[plan.seq_of[t]];
        let first = h.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let qv = &q[i * hd..(i + 1) * hd];
        let kv_off = (head / group) * hd;
        let mut scores: Vec<f32> = slots[first..=pos]
            .iter()
            .map(|&s| dot(qv, &cache.k[s * kv_dim + kv_off..s * kv_dim + kv_off + hd]) * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in &mut scores {
            *s = (*s - max).exp();
            sum += *s;
        }
        for (&s, &slot) in scores.iter().zip(&slots[first..=pos]) {
            axpy(o, s / sum, &cache.v[slot * kv_dim + kv_off..slot * kv_dim + kv_off + hd]);
        }
    });
    out
}
