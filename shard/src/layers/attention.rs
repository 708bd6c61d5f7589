//! Paged attention on CPU: the batch's new K/V are first written into their cache slots, then
//! each query attends over its sequence's positions read through the block table — causal within
//! a prefill chunk, limited to the sliding window when the model has one.
//!
//! Work is tiled as (sequence, KV head, block of up to 16 tokens): all query heads of the GQA group
//! and all tokens of the block share each K/V row, so a row is read once per tile rather than once
//! per query (the FlashAttention idea of reusing K/V across a query tile, without the online softmax
//! since a CPU tile's scores fit in cache).

use rayon::prelude::*;

use crate::backend::cpu::{avx512, axpy, dot, matmul_serial, PackedMatrix, NR};
use crate::forward::BatchPlan;
use crate::kv_cache::LayerCache;

/// Tokens per query tile.
const QUERY_BLOCK: usize = 16;

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
        let (src, dst) = (
            t * kv_dim..(t + 1) * kv_dim,
            slot * kv_dim..(slot + 1) * kv_dim,
        );
        cache.k[dst.clone()].copy_from_slice(&k[src.clone()]);
        cache.v[dst].copy_from_slice(&v[src]);
    }
}

/// One tile: tokens `tokens` (flat indices, one sequence) and KV head `kv_head`.
#[derive(Debug, Clone)]
struct Tile {
    seq: usize,
    kv_head: usize,
    tokens: std::ops::Range<usize>,
}

/// `q` is `[n, heads · head_dim]`; returns the attention output of the same shape.
pub(crate) fn paged_attention(
    q: &[f32],
    cache: &LayerCache,
    plan: &BatchPlan,
    h: Heads,
) -> Vec<f32> {
    let mut tiles = Vec::new();
    for (seq, range) in plan.seq_tokens.iter().enumerate() {
        for kv_head in 0..h.num_kv_heads {
            for t0 in range.clone().step_by(QUERY_BLOCK) {
                tiles.push(Tile {
                    seq,
                    kv_head,
                    tokens: t0..(t0 + QUERY_BLOCK).min(range.end),
                });
            }
        }
    }
    let use_avx512 = avx512::available();
    let results: Vec<Vec<f32>> = tiles
        .par_iter()
        .map(|tile| {
            if use_avx512 {
                // SAFETY: AVX-512F is present (checked at run time above).
                unsafe { attend_avx512(q, cache, plan, h, tile) }
            } else {
                attend::<false>(q, cache, plan, h, tile)
            }
        })
        .collect();
    let (hd, group) = (h.head_dim, h.num_heads / h.num_kv_heads);
    let mut out = vec![0.0; q.len()];
    for (tile, res) in tiles.iter().zip(&results) {
        for (i, t) in tile.tokens.clone().enumerate() {
            let dst = (t * h.num_heads + tile.kv_head * group) * hd;
            out[dst..dst + group * hd].copy_from_slice(&res[i * group * hd..(i + 1) * group * hd]);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(
    q: &[f32],
    cache: &LayerCache,
    plan: &BatchPlan,
    h: Heads,
    tile: &Tile,
) -> Vec<f32> {
    attend::<true>(q, cache, plan, h, tile)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn attend_avx512(
    q: &[f32],
    cache: &LayerCache,
    plan: &BatchPlan,
    h: Heads,
    tile: &Tile,
) -> Vec<f32> {
    attend::<false>(q, cache, plan, h, tile)
}

/// Attention of one tile; returns `[tokens][group heads][head_dim]`. Scores and the weighted sum
/// are two small GEMMs on the CPU matmul kernel: K gathered into panels (Q·Kᵀ) and V into panels
/// of Vᵀ (P·V), so neither needs horizontal sums.
/// `AVX512`: the caller runs with AVX-512F enabled (decode dot products use it).
#[inline(always)]
fn attend<const AVX512: bool>(
    q: &[f32],
    cache: &LayerCache,
    plan: &BatchPlan,
    h: Heads,
    tile: &Tile,
) -> Vec<f32> {
    if tile.tokens.len() == 1 {
        return attend_one::<AVX512>(q, cache, plan, h, tile);
    }
    let (hd, group) = (h.head_dim, h.num_heads / h.num_kv_heads);
    let kv_dim = h.num_kv_heads * hd;
    let kv_off = tile.kv_head * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let slots = &plan.seq_slots[tile.seq];
    // Query i is (token, head of the group) and sees positions lo..=hi.
    let bounds: Vec<(usize, usize)> = tile
        .tokens
        .clone()
        .flat_map(|t| {
            let pos = plan.positions[t];
            let lo = h.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            std::iter::repeat_n((lo, pos), group)
        })
        .collect();
    let first = bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let last = bounds.iter().map(|b| b.1).max().unwrap_or(0);
    let (span, nq) = (last + 1 - first, bounds.len());
    let mut qs = Vec::with_capacity(nq * hd);
    for t in tile.tokens.clone() {
        let row = (t * h.num_heads + tile.kv_head * group) * hd;
        qs.extend(q[row..row + group * hd].iter().map(|v| v * scale));
    }
    let (keys, values_t) = gather_kv(cache, &slots[first..=last], kv_dim, kv_off, hd);
    let mut probs = vec![0f32; nq * span];
    matmul_serial(&qs, nq, &keys, &mut probs);
    for (i, &(lo, hi)) in bounds.iter().enumerate() {
        let row = &mut probs[i * span..(i + 1) * span];
        row[..lo - first].fill(0.0);
        row[hi + 1 - first..].fill(0.0);
        softmax(&mut row[lo - first..=hi - first]);
    }
    let mut out = vec![0f32; nq * hd];
    matmul_serial(&probs, nq, &values_t, &mut out);
    out
}

/// A one-token tile (a decode step): K and V rows are read in place through the block table —
/// packing them for a GEMM of `group` rows would copy more than it computes.
#[inline(always)]
fn attend_one<const AVX512: bool>(
    q: &[f32],
    cache: &LayerCache,
    plan: &BatchPlan,
    h: Heads,
    tile: &Tile,
) -> Vec<f32> {
    let (hd, group) = (h.head_dim, h.num_heads / h.num_kv_heads);
    let kv_dim = h.num_kv_heads * hd;
    let kv_off = tile.kv_head * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let t = tile.tokens.start;
    let pos = plan.positions[t];
    let lo = h.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let slots = &plan.seq_slots[tile.seq][lo..=pos];
    let row = |slot: usize| slot * kv_dim + kv_off..slot * kv_dim + kv_off + hd;
    let q0 = (t * h.num_heads + tile.kv_head * group) * hd;
    let mut out = vec![0f32; group * hd];
    let mut scores = vec![0f32; slots.len()];
    for (g, o) in out.chunks_exact_mut(hd).enumerate() {
        let qg = &q[q0 + g * hd..q0 + (g + 1) * hd];
        for (s, &slot) in scores.iter_mut().zip(slots) {
            let k = &cache.k[row(slot)];
            *s = scale
                * if AVX512 {
                    // SAFETY: `AVX512` is only set under `attend_avx512`, after the CPU check.
                    unsafe { avx512::dot(qg, k) }
                } else {
                    dot(qg, k)
                };
        }
        softmax(&mut scores);
        for (&p, &slot) in scores.iter().zip(slots) {
            axpy(o, p, &cache.v[row(slot)]);
        }
    }
    out
}

/// Packs the K rows of `slots` as a `[span, hd]` matrix and the V rows as `[hd, span]` (Vᵀ).
fn gather_kv(
    cache: &LayerCache,
    slots: &[usize],
    kv_dim: usize,
    kv_off: usize,
    hd: usize,
) -> (PackedMatrix, PackedMatrix) {
    let span = slots.len();
    let mut k = vec![0f32; span.div_ceil(NR) * hd * NR];
    let mut vt = vec![0f32; hd.div_ceil(NR) * span * NR];
    for (j, &slot) in slots.iter().enumerate() {
        let base = slot * kv_dim + kv_off;
        let (kp, lane) = ((j / NR) * hd * NR, j % NR);
        for (d, &kv) in cache.k[base..base + hd].iter().enumerate() {
            k[kp + d * NR + lane] = kv;
        }
        for (p, chunk) in cache.v[base..base + hd].chunks(NR).enumerate() {
            let at = p * span * NR + j * NR;
            vt[at..at + chunk.len()].copy_from_slice(chunk);
        }
    }
    (
        PackedMatrix::from_f32_panels(span, hd, k),
        PackedMatrix::from_f32_panels(hd, span, vt),
    )
}

#[inline(always)]
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    x.iter_mut().for_each(|v| *v -= max);
    crate::backend::cpu::exp_in_place(x);
    let inv = 1.0 / x.iter().sum::<f32>();
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::{ForwardBatch, LogitsWanted, SeqInput};

    /// Naive attention of query `qv` at position `pos` over positions `lo..=pos`.
    fn naive(qv: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], lo: usize, pos: usize) -> Vec<f32> {
        let scale = 1.0 / (qv.len() as f32).sqrt();
        let s: Vec<f32> = (lo..=pos)
            .map(|j| qv.iter().zip(&k[j]).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut out = vec![0.0; qv.len()];
        for (j, w) in (lo..=pos).zip(&e) {
            for (o, vv) in out.iter_mut().zip(&v[j]) {
                *o += w / sum * vv;
            }
        }
        out
    }

    #[test]
    fn matches_naive_attention_with_and_without_sliding_window() {
        let (n, hd, nh) = (21, 4, 2);
        let val = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 7.0;
        let k: Vec<Vec<f32>> = (0..n)
            .map(|j| (0..hd).map(|d| val(j * hd + d)).collect())
            .collect();
        let v: Vec<Vec<f32>> = (0..n)
            .map(|j| (0..hd).map(|d| val(j * hd + d + 5)).collect())
            .collect();
        let q: Vec<f32> = (0..n * nh * hd).map(|i| val(i + 11)).collect();
        // Blocks of 4 handed out in reverse order, to go through the block table.
        let blocks: Vec<u32> = (0..6).rev().collect();
        let slots: Vec<u32> = (0..n).map(|p| blocks[p / 4] * 4 + (p % 4) as u32).collect();
        let batch = ForwardBatch {
            seqs: vec![SeqInput {
                tokens: vec![0; n],
                start_pos: 0,
                slots,
                block_table: blocks,
                logits: LogitsWanted::None,
            }],
        };
        let plan = BatchPlan::new(&batch, 1, 6, 4).unwrap();
        let mut cache = LayerCache {
            k: vec![0.0; 24 * hd],
            v: vec![0.0; 24 * hd],
        };
        write_kv(&mut cache, &k.concat(), &v.concat(), &plan.slots, hd);
        for window in [None, Some(1), Some(5)] {
            let h = Heads {
                num_heads: nh,
                num_kv_heads: 1,
                head_dim: hd,
                sliding_window: window,
            };
            let out = paged_attention(&q, &cache, &plan, h);
            for t in 0..n {
                let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
                for head in 0..nh {
                    let at = (t * nh + head) * hd;
                    let want = naive(&q[at..at + hd], &k, &v, lo, t);
                    for (a, b) in out[at..at + hd].iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "window {window:?} token {t} head {head}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
