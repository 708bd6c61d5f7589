//! Paged attention on CPU: the batch's new K/V are first written into their cache slots, then
//! each query attends over its sequence's positions read through the block table — causal within
//! a prefill chunk, limited to the sliding window when the model has one.
//!
//! Work is tiled as (sequence, KV head, block of up to 16 tokens): all query heads of the GQA group
//! and all tokens of the block share each K/V row, so a row is read once per tile rather than once
//! per query (the FlashAttention idea of reusing K/V across a query tile, without the online softmax
//! since a CPU tile's scores fit in cache). A decode token over more than `DECODE_PART` positions
//! is split further into parts of its span, joined by their softmax maxima and sums.
//!
//! The cache is read in its own dtype: each K/V row a tile uses is widened to f32 as it is gathered
//! or, for a decode token, once into a row buffer shared by the whole GQA group.

use half::{bf16, f16};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::{avx2, avx512};
use crate::backend::cpu::{axpy, dot, matmul_serial, Isa, PackedMatrix, NR};
use crate::backend::AttentionSpec;
use crate::forward::BatchPlan;
use crate::kv_cache::{KvElem, LayerCache};

/// Tokens per query tile.
const QUERY_BLOCK: usize = 16;
/// Positions one decode tile attends at most. A longer span is cut into parts of this size,
/// attended in parallel and joined by their softmax maxima and sums (split-KV decoding): a long
/// sequence alone would otherwise run one tile per KV head and leave cores idle. The cut
/// depends on the token's span only, never on its batch, so results stay batch-invariant.
const DECODE_PART: usize = 256;
/// How many positions ahead a decode tile asks for K and V rows: a row is a few cache lines at a
/// stride of the whole KV width, which the hardware prefetchers do not follow far enough.
const ROWS_AHEAD: usize = 4;

/// Stores each token's K and V rows (`[n, kv_dim]`) into its slot, rounded to the cache's dtype.
pub fn write_kv(cache: &mut LayerCache, k: &[f32], v: &[f32], slots: &[usize], kv_dim: usize) {
    match cache {
        LayerCache::F32(rows) => {
            let (ck, cv) = rows.as_slices_mut::<f32>();
            write_rows(ck, cv, k, v, slots, kv_dim);
        }
        LayerCache::Bf16(rows) => {
            let (ck, cv) = rows.as_slices_mut::<bf16>();
            write_rows(ck, cv, k, v, slots, kv_dim);
        }
        LayerCache::F16(rows) => {
            let (ck, cv) = rows.as_slices_mut::<f16>();
            write_rows(ck, cv, k, v, slots, kv_dim);
        }
    }
}

fn write_rows<T: KvElem>(
    ck: &mut [T],
    cv: &mut [T],
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    kv_dim: usize,
) {
    for (t, &slot) in slots.iter().enumerate() {
        let (src, dst) = (
            t * kv_dim..(t + 1) * kv_dim,
            slot * kv_dim..(slot + 1) * kv_dim,
        );
        T::store(&mut ck[dst.clone()], &k[src.clone()]);
        T::store(&mut cv[dst], &v[src]);
    }
}

/// One layer's cached K and V as `T`, `[slot][kv_dim]` each.
struct Kv<'a, T> {
    k: &'a [T],
    v: &'a [T],
}

impl<T> Clone for Kv<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Kv<'_, T> {}

/// One tile: tokens `tokens` (flat indices, one sequence) and KV head `kv_head`.
#[derive(Debug, Clone)]
struct Tile {
    seq: usize,
    kv_head: usize,
    tokens: std::ops::Range<usize>,
    /// A generated token, attended as its decode step did (one query, K/V read in place).
    decoded: bool,
    /// Which of the decode token's `parts` (`DECODE_PART` positions each) this tile attends;
    /// query tiles are one part.
    part: usize,
    parts: usize,
}

/// `q` is `[n, heads · head_dim]`; returns the attention output of the same shape.
pub fn paged_attention(
    q: &[f32],
    cache: &LayerCache,
    plan: &BatchPlan,
    h: AttentionSpec,
) -> Vec<f32> {
    match cache {
        LayerCache::F32(rows) => {
            let (k, v) = rows.as_slices::<f32>();
            attention(q, Kv { k, v }, plan, h)
        }
        LayerCache::Bf16(rows) => {
            let (k, v) = rows.as_slices::<bf16>();
            attention(q, Kv { k, v }, plan, h)
        }
        LayerCache::F16(rows) => {
            let (k, v) = rows.as_slices::<f16>();
            attention(q, Kv { k, v }, plan, h)
        }
    }
}

fn attention<T: KvElem>(
    q: &[f32],
    cache: Kv<'_, T>,
    plan: &BatchPlan,
    h: AttentionSpec,
) -> Vec<f32> {
    let mut tiles = Vec::new();
    for (seq, range) in plan.seq_tokens.iter().enumerate() {
        let from = plan.seq_decoded_from[seq];
        let prompt_end = from.unwrap_or(range.end);
        for kv_head in 0..h.num_kv_heads {
            let blocks = (range.start..prompt_end).step_by(QUERY_BLOCK);
            let blocks = blocks.map(|t0| t0..(t0 + QUERY_BLOCK).min(prompt_end));
            let alone = (prompt_end..range.end).map(|t| t..t + 1);
            for tokens in blocks.chain(alone) {
                let decoded = from.map_or(tokens.len() == 1, |f| tokens.start >= f);
                let parts = if decoded {
                    let (lo, pos) = decode_span(plan, h, tokens.start);
                    (pos + 1 - lo).div_ceil(DECODE_PART)
                } else {
                    1
                };
                tiles.extend((0..parts).map(|part| Tile {
                    seq,
                    kv_head,
                    tokens: tokens.clone(),
                    decoded,
                    part,
                    parts,
                }));
            }
        }
    }
    let isa = Isa::chosen();
    let results: Vec<Vec<f32>> = tiles
        .par_iter()
        .map(|tile| match isa {
            // SAFETY: `Isa::chosen` picks an instruction set only where the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { attend_avx512(q, cache, plan, h, tile) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { attend_avx2(q, cache, plan, h, tile) },
            _ => attend::<T, PortableDot>(q, cache, plan, h, tile),
        })
        .collect();
    let (hd, group) = (h.head_dim, h.num_heads / h.num_kv_heads);
    let mut out = vec![0.0; q.len()];
    let mut at = 0;
    while at < tiles.len() {
        let (tile, parts) = (&tiles[at], tiles[at].parts);
        let joined;
        let res = if parts == 1 {
            &results[at]
        } else {
            joined = join_parts(&results[at..at + parts], group, hd);
            &joined
        };
        for (i, t) in tile.tokens.clone().enumerate() {
            let dst = (t * h.num_heads + tile.kv_head * group) * hd;
            out[dst..dst + group * hd].copy_from_slice(&res[i * group * hd..(i + 1) * group * hd]);
        }
        at += parts;
    }
    out
}

/// The positions `lo..=pos` decode token `t` attends (its sliding window, if any).
fn decode_span(plan: &BatchPlan, h: AttentionSpec, t: usize) -> (usize, usize) {
    let pos = plan.positions[t];
    (h.window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos)
}

/// One decode token's output from its parts, each `[group][head_dim]` weighted by unnormalized
/// probabilities, then the `group` maxima and the `group` sums they were taken with.
fn join_parts(parts: &[Vec<f32>], group: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; group * hd];
    for (g, o) in out.chunks_exact_mut(hd).enumerate() {
        let (max_at, sum_at) = (group * hd + g, group * hd + group + g);
        let max = parts
            .iter()
            .map(|p| p[max_at])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for p in parts {
            let weight = (p[max_at] - max).exp();
            total += weight * p[sum_at];
            axpy(o, weight, &p[g * hd..(g + 1) * hd]);
        }
        o.iter_mut().for_each(|v| *v /= total);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: KvElem>(
    q: &[f32],
    cache: Kv<'_, T>,
    plan: &BatchPlan,
    h: AttentionSpec,
    tile: &Tile,
) -> Vec<f32> {
    attend::<T, Avx512Dot>(q, cache, plan, h, tile)
}

/// The tile compiled for AVX2: its gathers and sums vectorize 8 wide, its dot products are AVX2's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: KvElem>(
    q: &[f32],
    cache: Kv<'_, T>,
    plan: &BatchPlan,
    h: AttentionSpec,
    tile: &Tile,
) -> Vec<f32> {
    attend::<T, Avx2Dot>(q, cache, plan, h, tile)
}

/// The dot product of decode tiles, by instruction set.
trait Dot {
    /// # Safety
    /// The caller runs with the target features the implementation names enabled.
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32;
}

/// AVX-512F (`attend_avx512`).
#[cfg(target_arch = "x86_64")]
struct Avx512Dot;
/// AVX2 and FMA (`attend_avx2`).
#[cfg(target_arch = "x86_64")]
struct Avx2Dot;
/// Plain Rust, safe anywhere.
struct PortableDot;

#[cfg(target_arch = "x86_64")]
impl Dot for Avx512Dot {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        avx512::dot(a, b)
    }
}

#[cfg(target_arch = "x86_64")]
impl Dot for Avx2Dot {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        avx2::dot(a, b)
    }
}

impl Dot for PortableDot {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

/// Attention of one tile; returns `[tokens][group heads][head_dim]`. Scores and the weighted sum
/// are two small GEMMs on the CPU matmul kernel: K gathered into panels (Q·Kᵀ) and V into panels
/// of Vᵀ (P·V), so neither needs horizontal sums.
/// `D`: the decode dot product, of the instruction set the caller enabled.
#[inline(always)]
fn attend<T: KvElem, D: Dot>(
    q: &[f32],
    cache: Kv<'_, T>,
    plan: &BatchPlan,
    h: AttentionSpec,
    tile: &Tile,
) -> Vec<f32> {
    if tile.decoded {
        return attend_one::<T, D>(q, cache, plan, h, tile);
    }
    let (hd, group) = (h.head_dim, h.num_heads / h.num_kv_heads);
    let kv_dim = h.num_kv_heads * hd;
    let kv_off = tile.kv_head * hd;
    let slots = &plan.seq_slots[tile.seq];
    // Query i is (token, head of the group) and sees positions lo..=hi.
    let bounds: Vec<(usize, usize)> = tile
        .tokens
        .clone()
        .flat_map(|t| {
            let pos = plan.positions[t];
            let lo = h.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            std::iter::repeat_n((lo, pos), group)
        })
        .collect();
    let first = bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let last = bounds.iter().map(|b| b.1).max().unwrap_or(0);
    let (span, nq) = (last + 1 - first, bounds.len());
    let mut qs = Vec::with_capacity(nq * hd);
    for t in tile.tokens.clone() {
        let row = (t * h.num_heads + tile.kv_head * group) * hd;
        qs.extend(q[row..row + group * hd].iter().map(|v| v * h.scale));
    }
    let (keys, values_t) = gather_kv(cache, &slots[first..=last], kv_dim, kv_off, hd);
    let mut probs = vec![0f32; nq * span];
    matmul_serial(&qs, nq, &keys, &mut probs);
    for (i, &(lo, hi)) in bounds.iter().enumerate() {
        let row = &mut probs[i * span..(i + 1) * span];
        row[..lo - first].fill(0.0);
        row[hi + 1 - first..].fill(0.0);
        let seen = &mut row[lo - first..=hi - first];
        if let Some(cap) = h.softcap {
            softcap(seen, cap);
        }
        softmax(seen);
    }
    let mut out = vec![0f32; nq * hd];
    matmul_serial(&probs, nq, &values_t, &mut out);
    out
}

/// A one-token tile (a decode step): K and V rows are read in place through the block table —
/// packing them for a GEMM of `group` rows would copy more than it computes. Each row is widened
/// once (into a row buffer; an f32 cache is read as it is) and used by every head of the group.
/// A tile of one part returns the output; one of several parts returns its share for
/// `join_parts`: outputs weighted by unnormalized probabilities, their maxima and sums.
#[inline(always)]
fn attend_one<T: KvElem, D: Dot>(
    q: &[f32],
    cache: Kv<'_, T>,
    plan: &BatchPlan,
    h: AttentionSpec,
    tile: &Tile,
) -> Vec<f32> {
    let (hd, group) = (h.head_dim, h.num_heads / h.num_kv_heads);
    let kv_dim = h.num_kv_heads * hd;
    let kv_off = tile.kv_head * hd;
    let t = tile.tokens.start;
    let (lo, pos) = decode_span(plan, h, t);
    let from = lo + tile.part * DECODE_PART;
    let slots = &plan.seq_slots[tile.seq][from..(from + DECODE_PART).min(pos + 1)];
    let span = slots.len();
    let row = |slot: usize| slot * kv_dim + kv_off..slot * kv_dim + kv_off + hd;
    let q0 = (t * h.num_heads + tile.kv_head * group) * hd;
    let mut buf = vec![0f32; hd];
    // Scores of head g of the group over the span: `scores[g * span..(g + 1) * span]`.
    let mut scores = vec![0f32; group * span];
    for (s, &slot) in slots.iter().enumerate() {
        if let Some(&next) = slots.get(s + ROWS_AHEAD) {
            prefetch(&cache.k[row(next)]);
        }
        let k = T::row(&cache.k[row(slot)], &mut buf);
        for g in 0..group {
            let qg = &q[q0 + g * hd..q0 + (g + 1) * hd];
            // SAFETY: `attend` runs under the target features `D` names (see `Dot`).
            scores[g * span + s] = h.scale * unsafe { D::dot(qg, k) };
        }
    }
    if let Some(cap) = h.softcap {
        softcap(&mut scores, cap);
    }
    // One part: probabilities. Several: unnormalized, with the (maxima, sums) to join them by.
    let shares: Option<(Vec<f32>, Vec<f32>)> = if tile.parts == 1 {
        scores.chunks_exact_mut(span).for_each(softmax);
        None
    } else {
        Some(scores.chunks_exact_mut(span).map(exp_shifted).unzip())
    };
    let mut out = vec![0f32; group * hd];
    for (s, &slot) in slots.iter().enumerate() {
        if let Some(&next) = slots.get(s + ROWS_AHEAD) {
            prefetch(&cache.v[row(next)]);
        }
        let v = T::row(&cache.v[row(slot)], &mut buf);
        for (g, o) in out.chunks_exact_mut(hd).enumerate() {
            axpy(o, scores[g * span + s], v);
        }
    }
    if let Some((maxima, sums)) = shares {
        out.extend(maxima);
        out.extend(sums);
    }
    out
}

/// Asks the CPU to bring `row`'s cache lines into L1 (a hint: no effect on results).
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let (start, bytes) = (row.as_ptr() as *const i8, size_of_val(row));
        for at in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and `at` stays inside the row.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.add(at))
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Packs the K rows of `slots` as a `[span, hd]` matrix and the V rows as `[hd, span]` (Vᵀ).
fn gather_kv<T: KvElem>(
    cache: Kv<'_, T>,
    slots: &[usize],
    kv_dim: usize,
    kv_off: usize,
    hd: usize,
) -> (PackedMatrix, PackedMatrix) {
    let span = slots.len();
    let mut k = vec![0f32; span.div_ceil(NR) * hd * NR];
    let mut vt = vec![0f32; hd.div_ceil(NR) * span * NR];
    let mut row = vec![0f32; hd];
    for (j, &slot) in slots.iter().enumerate() {
        let base = slot * kv_dim + kv_off;
        let (kp, lane) = ((j / NR) * hd * NR, j % NR);
        let krow = T::row(&cache.k[base..base + hd], &mut row);
        for (d, &kv) in krow.iter().enumerate() {
            k[kp + d * NR + lane] = kv;
        }
        for (p, chunk) in cache.v[base..base + hd].chunks(NR).enumerate() {
            let at = p * span * NR + j * NR;
            T::load(chunk, &mut vt[at..at + chunk.len()]);
        }
    }
    (
        PackedMatrix::from_f32_panels(span, hd, k),
        PackedMatrix::from_f32_panels(hd, span, vt),
    )
}

/// `x = cap · tanh(x / cap)` (Gemma 2's attention logit soft-capping).
fn softcap(x: &mut [f32], cap: f32) {
    x.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
}

#[inline(always)]
fn softmax(x: &mut [f32]) {
    let (_, sum) = exp_shifted(x);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x = exp(x − max x)`; returns `(max x, Σ x)`: a softmax before its normalization.
#[inline(always)]
fn exp_shifted(x: &mut [f32]) -> (f32, f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    x.iter_mut().for_each(|v| *v -= max);
    crate::backend::cpu::exp_in_place(x);
    (max, x.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::{ForwardBatch, LogitsWanted, SeqInput};
    use crate::kv_cache::KvCacheDtype;

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

    /// `x` as the cache of `dtype` stores it.
    fn rounded(dtype: KvCacheDtype, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        match dtype {
            KvCacheDtype::F32 => out.copy_from_slice(x),
            KvCacheDtype::Bf16 => {
                let mut s = vec![bf16::ZERO; x.len()];
                bf16::store(&mut s, x);
                bf16::load(&s, &mut out);
            }
            KvCacheDtype::F16 => {
                let mut s = vec![f16::ZERO; x.len()];
                f16::store(&mut s, x);
                f16::load(&s, &mut out);
            }
        }
        out
    }

    const HD: usize = 8;
    const KV_HEADS: usize = 2;
    const HEADS: usize = 6;
    const KV_DIM: usize = KV_HEADS * HD;

    /// One sequence of `n` tokens written at once (a prefill; with `n` = 17 its last query tile is
    /// one token, which takes the decode path), its K/V `[n, KV_DIM]` and queries `[n, HEADS·HD]`.
    struct Case {
        plan: BatchPlan,
        k: Vec<f32>,
        v: Vec<f32>,
        q: Vec<f32>,
    }

    fn case(n: usize) -> Case {
        // Deterministic values in about [-2, 2] with no pattern the rounding could align with.
        let val = |i: usize| ((i as f32 * 0.618_034).fract() - 0.5) * 4.0;
        let k: Vec<f32> = (0..n * KV_DIM).map(val).collect();
        let v: Vec<f32> = (0..n * KV_DIM).map(|i| val(i + 7919)).collect();
        let q: Vec<f32> = (0..n * HEADS * HD).map(|i| val(i + 104_729)).collect();
        // Blocks of 4 handed out in reverse order, to go through the block table.
        let num_blocks = n.div_ceil(4);
        let blocks: Vec<u32> = (0..num_blocks as u32).rev().collect();
        let slots: Vec<u32> = (0..n).map(|p| blocks[p / 4] * 4 + (p % 4) as u32).collect();
        let batch = ForwardBatch {
            seqs: vec![SeqInput {
                tokens: vec![0; n],
                start_pos: 0,
                slots,
                block_table: blocks,
                logits: LogitsWanted::None,
                decoded_from: None,
            }],
        };
        let plan = BatchPlan::new(&batch, 1, num_blocks, 4).unwrap();
        Case { plan, k, v, q }
    }

    fn heads(window: Option<usize>) -> AttentionSpec {
        AttentionSpec {
            num_heads: HEADS,
            num_kv_heads: KV_HEADS,
            head_dim: HD,
            window,
            scale: 1.0 / (HD as f32).sqrt(),
            softcap: None,
        }
    }

    fn run(c: &Case, dtype: KvCacheDtype, window: Option<usize>) -> Vec<f32> {
        let slots = c.plan.seq_slots[0].len().div_ceil(4) * 4;
        let mut cache = LayerCache::new(dtype, slots, KV_DIM);
        write_kv(&mut cache, &c.k, &c.v, &c.plan.slots, KV_DIM);
        paged_attention(&c.q, &cache, &c.plan, heads(window))
    }

    /// A query's output does not depend on how its sequence was cut into forwards: prompt tokens
    /// always go through query tiles and generated ones through the decode path, so a resumed
    /// request recomputes bit-identical KV (see `SeqInput::decoded_from`).
    #[test]
    fn chunking_does_not_change_a_single_bit() {
        let (n, generated_from) = (40, 30);
        let whole = case(n);
        let blocks = whole.plan.seq_slots[0]
            .chunks(4)
            .map(|c| (c[0] / 4) as u32)
            .collect::<Vec<_>>();
        let mut cache = LayerCache::new(KvCacheDtype::Bf16, n.div_ceil(4) * 4, KV_DIM);
        write_kv(&mut cache, &whole.k, &whole.v, &whole.plan.slots, KV_DIM);
        let forward = |range: std::ops::Range<usize>| {
            let batch = ForwardBatch {
                seqs: vec![SeqInput {
                    tokens: vec![0; range.len()],
                    start_pos: range.start,
                    slots: whole.plan.slots[range.clone()]
                        .iter()
                        .map(|&s| s as u32)
                        .collect(),
                    block_table: blocks.clone(),
                    logits: LogitsWanted::None,
                    decoded_from: Some(generated_from),
                }],
            };
            let plan = BatchPlan::new(&batch, 1, blocks.len(), 4).unwrap();
            let row = HEADS * HD;
            let q = &whole.q[range.start * row..range.end * row];
            paged_attention(q, &cache, &plan, heads(None))
        };
        let all = forward(0..n);
        let cut = [0..17, 17..18, 18..30, 30..31, 31..33, 33..40]
            .map(forward)
            .concat();
        assert!(all
            .iter()
            .zip(&cut)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// Every cache dtype computes exact attention over the values it stored; 641 tokens end in a
    /// decode token of three parts (two with a window of 300).
    #[test]
    fn matches_naive_attention_over_the_stored_values() {
        let dtypes = [KvCacheDtype::F32, KvCacheDtype::Bf16, KvCacheDtype::F16];
        for (n, dtype) in [17, 21, 641]
            .into_iter()
            .flat_map(|n| dtypes.map(|d| (n, d)))
        {
            let c = case(n);
            let (k, v) = (rounded(dtype, &c.k), rounded(dtype, &c.v));
            let group = HEADS / KV_HEADS;
            for window in [None, Some(1), Some(5), Some(300)] {
                let out = run(&c, dtype, window);
                for t in 0..n {
                    let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
                    for head in 0..HEADS {
                        let kv = (head / group) * HD;
                        let rows = |x: &[f32]| -> Vec<Vec<f32>> {
                            (0..n)
                                .map(|j| x[j * KV_DIM + kv..j * KV_DIM + kv + HD].to_vec())
                                .collect()
                        };
                        let at = (t * HEADS + head) * HD;
                        let want = naive(&c.q[at..at + HD], &rows(&k), &rows(&v), lo, t);
                        for (a, b) in out[at..at + HD].iter().zip(&want) {
                            assert!(
                                (a - b).abs() < 1e-5,
                                "{dtype} n {n} window {window:?} token {t} head {head}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// 16-bit caches stay close to the f32 cache: values in [-2, 2], scores over 8 dimensions.
    /// Observed maximum differences: bf16 4.7e-3, f16 7.5e-4 (bf16 keeps 8 significant bits,
    /// f16 11).
    #[test]
    fn half_caches_follow_the_f32_cache() {
        for n in [17, 21] {
            let c = case(n);
            let exact = run(&c, KvCacheDtype::F32, None);
            for (dtype, tol) in [(KvCacheDtype::Bf16, 1e-2), (KvCacheDtype::F16, 2e-3)] {
                let out = run(&c, dtype, None);
                let worst = out
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < tol, "{dtype} n {n}: max difference {worst}");
                assert!(worst > 0.0, "{dtype} n {n}: the cache must round");
            }
        }
    }
}
