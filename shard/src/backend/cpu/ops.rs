//! The CPU backend: [`Backend`] on host memory. Matrices are `PackedMatrix` panels for the
//! matmul kernels; element-wise operations run over rayon's pool in tasks of
//! [`ROWS_PER_TASK`] rows, so a decode step stays on one thread while a prefill spreads.

use rayon::prelude::*;

use super::attention;
use super::{dot, exp_in_place, matmul, PackedMatrix};
use crate::backend::{Activation, AttentionSpec, Backend};
use crate::comm::Comm;
use crate::forward::BatchPlan;
use crate::kv_cache::LayerCache;
use crate::weights::TensorData;
use crate::Result;

/// Token rows per parallel task in the element-wise operations: enough work to pay for a task.
pub const ROWS_PER_TASK: usize = 16;

/// The CPU device.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

/// `rows × width` f32 values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    pub data: Vec<f32>,
    pub width: usize,
}

impl Activations {
    pub fn new(data: Vec<f32>, width: usize) -> Self {
        debug_assert!(width == 0 || data.len().is_multiple_of(width));
        Activations { data, width }
    }

    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.width).unwrap_or(0)
    }

    fn par_rows_mut(&mut self) -> rayon::slice::ChunksExactMut<'_, f32> {
        self.data.par_chunks_exact_mut(self.width.max(1))
    }
}

/// A new tensor of `rows × width`, each row filled by `f(row index, output row)` in parallel.
fn map_rows(rows: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Send + Sync) -> Activations {
    let mut out = Activations::new(vec![0.0; rows * width], width);
    out.par_rows_mut()
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(r, o)| f(r, o));
    out
}

/// `x / √(mean(x²) + eps) · (w + offset)` of one chunk.
#[inline]
fn rms_norm_into(o: &mut [f32], x: &[f32], w: &[f32], eps: f32, offset: f32) {
    let inv = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
        *o = (w + offset) * (x * inv);
    }
}

/// GELU with the tanh approximation, as PyTorch's `gelu(approximate="tanh")`.
#[inline]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

impl Backend for Cpu {
    type Tensor = Activations;
    type Matrix = PackedMatrix;

    fn run<R: Send>(&self, forward: impl FnOnce() -> R + Send) -> R {
        // On a pool worker, the per-op parallel loops start from a worker's own deque instead
        // of each injecting a job and parking the calling thread.
        rayon::join(forward, || ()).0
    }

    fn upload(&self, data: Vec<f32>, width: usize) -> Activations {
        Activations::new(data, width)
    }

    fn download(&self, x: &Activations) -> Vec<f32> {
        x.data.clone()
    }

    fn rows(&self, x: &Activations) -> usize {
        x.rows()
    }

    fn width(&self, x: &Activations) -> usize {
        x.width
    }

    fn pack(
        &self,
        rows: usize,
        cols: usize,
        data: &TensorData,
    ) -> std::result::Result<PackedMatrix, String> {
        PackedMatrix::pack(rows, cols, data)
    }

    fn shape(&self, w: &PackedMatrix) -> (usize, usize) {
        (w.rows(), w.cols())
    }

    fn nbytes(&self, w: &PackedMatrix) -> usize {
        w.nbytes()
    }

    fn matmul(&self, x: &Activations, w: &PackedMatrix) -> Activations {
        let n = x.rows();
        let mut out = vec![0.0; n * w.rows()];
        matmul(&x.data, n, w, &mut out);
        Activations::new(out, w.rows())
    }

    fn lookup(&self, table: &PackedMatrix, ids: &[u32], first: usize) -> Activations {
        let (rows, h) = (table.rows(), table.cols());
        map_rows(ids.len(), h, |t, o| {
            let local = (ids[t] as usize).checked_sub(first).filter(|&r| r < rows);
            if let Some(r) = local {
                table.row_into(r, o);
            }
        })
    }

    fn add(&self, x: &mut Activations, y: &Activations) {
        let width = x.width;
        let broadcast = y.data.len() == width;
        x.par_rows_mut()
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(r, a)| {
                let b = if broadcast {
                    &y.data[..]
                } else {
                    &y.data[r * width..(r + 1) * width]
                };
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            });
    }

    fn scale(&self, x: &mut Activations, s: f32) {
        x.par_rows_mut()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|r| r.iter_mut().for_each(|v| *v *= s));
    }

    fn softcap(&self, x: &mut Activations, cap: f32) {
        x.par_rows_mut()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|r| r.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap));
    }

    fn rms_norm(&self, x: &Activations, w: &Activations, eps: f32, offset: f32) -> Activations {
        let dim = w.data.len();
        map_rows(x.rows(), x.width, |r, o| {
            let row = &x.data[r * x.width..(r + 1) * x.width];
            for (o, x) in o.chunks_exact_mut(dim).zip(row.chunks_exact(dim)) {
                rms_norm_into(o, x, &w.data, eps, offset);
            }
        })
    }

    fn gated(&self, gate_up: &Activations, act: Activation) -> Activations {
        let ff = gate_up.width / 2;
        map_rows(gate_up.rows(), ff, |r, o| {
            let row = &gate_up.data[r * 2 * ff..(r + 1) * 2 * ff];
            let (g, u) = row.split_at(ff);
            match act {
                Activation::Silu => {
                    o.iter_mut().zip(g).for_each(|(o, &g)| *o = -g);
                    exp_in_place(o);
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g / (1.0 + *o) * u;
                    }
                }
                Activation::GeluTanh => {
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = gelu_tanh(g) * u;
                    }
                }
            }
        })
    }

    fn split_columns(&self, x: &Activations, widths: &[usize]) -> Vec<Activations> {
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let cols = start..start + w;
                start += w;
                map_rows(x.rows(), w, |r, o| {
                    let row = &x.data[r * x.width..(r + 1) * x.width];
                    o.copy_from_slice(&row[cols.clone()]);
                })
            })
            .collect()
    }

    fn rope(&self, x: &mut Activations, cos: &Activations, sin: &Activations, head_dim: usize) {
        let half = cos.width;
        x.par_rows_mut()
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(t, row)| {
                let (c, s) = (
                    &cos.data[t * half..(t + 1) * half],
                    &sin.data[t * half..(t + 1) * half],
                );
                for head in row.chunks_exact_mut(head_dim) {
                    let (x1, rest) = head.split_at_mut(half);
                    let x2 = &mut rest[..half];
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        x1[i] = a * c[i] - b * s[i];
                        x2[i] = b * c[i] + a * s[i];
                    }
                }
            });
    }

    fn gather_rows(&self, x: &Activations, rows: &[usize]) -> Activations {
        map_rows(rows.len(), x.width, |i, o| {
            let r = rows[i];
            o.copy_from_slice(&x.data[r * x.width..(r + 1) * x.width]);
        })
    }

    fn scatter_add_rows(
        &self,
        out: &mut Activations,
        x: &Activations,
        rows: &[usize],
        weights: &[f32],
    ) {
        let w = out.width;
        for ((&r, &s), src) in rows.iter().zip(weights).zip(x.data.chunks_exact(w)) {
            super::axpy(&mut out.data[r * w..(r + 1) * w], s, src);
        }
    }

    fn zeros(&self, rows: usize, width: usize) -> Activations {
        Activations::new(vec![0.0; rows * width], width)
    }

    fn top_k_softmax(
        &self,
        logits: &Activations,
        k: usize,
        renormalize: bool,
    ) -> Vec<Vec<(usize, f32)>> {
        logits
            .data
            .chunks_exact(logits.width.max(1))
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut p: Vec<f32> = row.iter().map(|v| v - max).collect();
                exp_in_place(&mut p);
                let inv = 1.0 / p.iter().sum::<f32>();
                let mut order: Vec<usize> = (0..row.len()).collect();
                // Largest first; equal probabilities keep the lower index first, as torch.topk.
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                let top: Vec<(usize, f32)> =
                    order.into_iter().take(k).map(|e| (e, p[e] * inv)).collect();
                let sum: f32 = top.iter().map(|t| t.1).sum();
                let norm = if renormalize { sum } else { 1.0 };
                top.into_iter().map(|(e, p)| (e, p / norm)).collect()
            })
            .collect()
    }

    fn write_kv(&self, cache: &mut LayerCache, k: &Activations, v: &Activations, plan: &BatchPlan) {
        attention::write_kv(cache, &k.data, &v.data, &plan.slots, k.width);
    }

    fn attention(
        &self,
        q: &Activations,
        cache: &LayerCache,
        plan: &BatchPlan,
        spec: AttentionSpec,
    ) -> Activations {
        Activations::new(
            attention::paged_attention(&q.data, cache, plan, spec),
            q.width,
        )
    }

    fn all_reduce(&self, comm: &dyn Comm, x: &mut Activations) -> Result<()> {
        comm.all_reduce_sum(&mut x.data)
    }

    fn all_gather_columns(&self, comm: &dyn Comm, x: &Activations) -> Result<Activations> {
        let rows = x.rows();
        let all = comm.all_gather_columns(&x.data, rows)?;
        let width = all.len().checked_div(rows).unwrap_or(0);
        Ok(Activations::new(all, width))
    }
}
