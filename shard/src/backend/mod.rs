//! Compute backends behind one interface. Layers and models are written against [`Backend`] only:
//! they hold its tensors and matrices and call its operations, so a device adds an implementation
//! of this trait and every model family runs on it unchanged. The CPU backend ([`cpu::Cpu`]) is the
//! default and the test target; the CUDA kernels (`cuda`) are on their way to implementing it
//! (see docs/cuda.md).
//!
//! Conventions: a tensor is `rows × width` f32 activations, row-major, one row per token (or per
//! token and head where an operation says so). A matrix is a weight `[out, in]` (PyTorch's layout)
//! in whatever storage the device packs it to (f32, bf16, f16 or quantized blocks).

pub mod cpu;
pub mod cuda;

use crate::comm::Comm;
use crate::forward::BatchPlan;
use crate::kv_cache::LayerCache;
use crate::weights::TensorData;
use crate::Result;

/// The gate activation of a gated MLP: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen, Phi-3.
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

/// One attention layer as this rank runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// This rank's query heads (a multiple of `num_kv_heads`).
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// A query at position p sees positions `p + 1 - window ..= p` (all of `0..=p` when `None`).
    pub window: Option<usize>,
    /// Multiplies q·k (`1/√head_dim` unless the model says otherwise).
    pub scale: f32,
    /// Scores become `cap · tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

/// The operations a model needs from a device.
pub trait Backend: Send + Sync + 'static {
    /// `rows × width` f32 activations in the device's memory.
    type Tensor: Send + Sync;
    /// A weight matrix `[out, in]` packed for this device's matmul.
    type Matrix: Send + Sync;

    /// Runs a whole forward in the device's context (a CPU worker thread, a CUDA stream).
    fn run<R: Send>(&self, forward: impl FnOnce() -> R + Send) -> R;

    // Moving data.
    /// `data` as rows of `width` values.
    fn upload(&self, data: Vec<f32>, width: usize) -> Self::Tensor;
    fn download(&self, x: &Self::Tensor) -> Vec<f32>;
    fn rows(&self, x: &Self::Tensor) -> usize;
    fn width(&self, x: &Self::Tensor) -> usize;

    // Weights.
    /// Packs `[rows, cols]` weights (any `TensorData` format); the error says why it cannot.
    fn pack(&self, rows: usize, cols: usize, data: &TensorData) -> Result<Self::Matrix, String>;
    /// `(rows, cols)` of a packed matrix.
    fn shape(&self, w: &Self::Matrix) -> (usize, usize);
    /// Bytes of weight storage (what a decode step streams).
    fn nbytes(&self, w: &Self::Matrix) -> usize;

    // Linear algebra.
    /// `x · Wᵀ`: `[n, in]` to `[n, out]`.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Matrix) -> Self::Tensor;
    /// Rows `ids` of `table` (an embedding lookup): id `i` is row `i - first`, and ids outside
    /// `first..first + rows` give zero rows.
    fn lookup(&self, table: &Self::Matrix, ids: &[u32], first: usize) -> Self::Tensor;

    // Element-wise.
    /// `x += y` (same shape), or `x += y` broadcast over rows when `y` is one row (a bias).
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor);
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Tensor, s: f32);
    /// `x = cap · tanh(x / cap)`.
    fn softcap(&self, x: &mut Self::Tensor, cap: f32);
    /// RMSNorm of every `w.width`-wide chunk of every row (a row, or each head of a row):
    /// `x / √(mean(x²) + eps) · (w + offset)`; `offset` is 1 for Gemma's `(1 + w)` weights.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32, offset: f32) -> Self::Tensor;
    /// `act(gate) · up` for rows `[gate | up]` of two equal halves.
    fn gated(&self, gate_up: &Self::Tensor, act: Activation) -> Self::Tensor;
    /// Splits rows into consecutive column blocks of the given widths (fused q/k/v).
    fn split_columns(&self, x: &Self::Tensor, widths: &[usize]) -> Vec<Self::Tensor>;
    /// Rotates the first `2 · cos.width` dimensions of every `head_dim`-wide head of each row
    /// by that row's angles (`cos`, `sin`: `[rows, rotary_dim / 2]`), rotate-half style.
    fn rope(&self, x: &mut Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor, head_dim: usize);

    // Rows.
    /// The rows `rows` of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;
    /// `out[rows[i]] += weights[i] · x[i]` (combining experts' outputs).
    fn scatter_add_rows(
        &self,
        out: &mut Self::Tensor,
        x: &Self::Tensor,
        rows: &[usize],
        weights: &[f32],
    );
    /// A tensor of `rows × width` zeros.
    fn zeros(&self, rows: usize, width: usize) -> Self::Tensor;
    /// Per row: the `k` largest of `softmax(row)` as (column, probability), largest first, the
    /// probabilities rescaled to sum to 1 when `renormalize` (a mixture-of-experts router).
    fn top_k_softmax(
        &self,
        logits: &Self::Tensor,
        k: usize,
        renormalize: bool,
    ) -> Vec<Vec<(usize, f32)>>;

    // Attention over the paged KV cache.
    /// Stores each token's K and V rows (`[n, kv_dim]`) into its `plan.slots` slot.
    fn write_kv(
        &self,
        cache: &mut LayerCache,
        k: &Self::Tensor,
        v: &Self::Tensor,
        plan: &BatchPlan,
    );
    /// Causal attention of `q` (`[n, heads · head_dim]`) over each token's sequence in `cache`.
    fn attention(
        &self,
        q: &Self::Tensor,
        cache: &LayerCache,
        plan: &BatchPlan,
        spec: AttentionSpec,
    ) -> Self::Tensor;

    // Collectives of the tensor-parallel group.
    fn all_reduce(&self, comm: &dyn Comm, x: &mut Self::Tensor) -> Result<()>;
    /// Joins every rank's column block of `x` (rank order) into full rows.
    fn all_gather_columns(&self, comm: &dyn Comm, x: &Self::Tensor) -> Result<Self::Tensor>;
}
