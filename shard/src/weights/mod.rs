//! Checkpoint readers. A `WeightSource` hands out tensors by their Hugging Face name, as host
//! tensors in the checkpoint's dtype (quantized GGUF tensors stay quantized); layers convert and
//! pack them for the backend.

pub mod gguf;
pub mod quant;
pub mod safetensors;

use std::path::PathBuf;

use half::{bf16, f16};
use tessera_formats::gguf::affine::Affine;

use crate::Result;

/// Element types a checkpoint tensor may have once read, or what the model's matrices become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Bf16,
    /// Integer-quantized (see `quant`): quantized tensors stay as the checkpoint stores them,
    /// dense matrices stay dense, or are quantized at load with `at_load`.
    Quantized {
        at_load: Option<quant::Scheme>,
    },
}

impl DType {
    /// Bytes per element (quantized: at most one).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::Quantized { .. } => 1,
        }
    }
}

/// A tensor's elements in one of the supported dtypes, row-major.
#[derive(Debug, Clone)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    /// Unsigned integers with a scale and offset per group of a row's elements, in blocks of
    /// whole rows, top to bottom: one block, unless the parts of a fused matrix are stored in
    /// different formats (`quant::stack`), which then keep their own.
    Quant(Vec<Affine>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::Bf16(v) => v.len(),
            TensorData::Quant(blocks) => blocks.iter().map(|a| a.q.len()).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::Bf16(_) => DType::Bf16,
            TensorData::Quant(_) => DType::Quantized { at_load: None },
        }
    }

    /// Elements `range` converted to f32 (exact for the 16-bit types).
    pub fn f32_range(&self, start: usize, end: usize) -> Vec<f32> {
        match self {
            TensorData::F32(v) => v[start..end].to_vec(),
            TensorData::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            TensorData::Bf16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            TensorData::Quant(blocks) => quant::dequantize_range(blocks, start..end),
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            // One block (almost always): its parallel dequantization is the result, no copy.
            TensorData::Quant(blocks) => match blocks.as_slice() {
                [one] => quant::dequantize(one),
                _ => blocks.iter().flat_map(quant::dequantize).collect(),
            },
            _ => self.f32_range(0, self.len()),
        }
    }

    /// Converts to `dtype` (round to nearest even when narrowing; dequantized exactly to f32
    /// first). A quantized target keeps every tensor as it is: see `quantized_at_load`.
    pub fn convert(self, dtype: DType) -> TensorData {
        if self.dtype() == dtype || matches!(dtype, DType::Quantized { .. }) {
            return self;
        }
        let v = self.to_f32();
        match dtype {
            DType::F16 => TensorData::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => TensorData::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            _ => TensorData::F32(v),
        }
    }

    /// This dense `[_, cols]` matrix quantized, when `dtype` asks for it at load and its rows are
    /// whole groups; `None` when the matrix stays as it is.
    pub fn quantized_at_load(&self, cols: usize, dtype: DType) -> Option<TensorData> {
        match (dtype, self) {
            (DType::Quantized { at_load: Some(s) }, TensorData::F32(_) | TensorData::F16(_))
            | (DType::Quantized { at_load: Some(s) }, TensorData::Bf16(_)) => {
                quant::quantize(&self.to_f32(), cols, s).map(|a| TensorData::Quant(vec![a]))
            }
            _ => None,
        }
    }

    /// Keeps rows `rows` of a row-major matrix with `cols` columns: the tensor itself, not a
    /// copy, when that is all of it.
    pub fn slice_rows(self, rows: std::ops::Range<usize>, cols: usize) -> TensorData {
        let (a, b) = (rows.start * cols, rows.end * cols);
        if a == 0 && b == self.len() {
            return self;
        }
        match &self {
            TensorData::F32(v) => TensorData::F32(v[a..b].to_vec()),
            TensorData::F16(v) => TensorData::F16(v[a..b].to_vec()),
            TensorData::Bf16(v) => TensorData::Bf16(v[a..b].to_vec()),
            TensorData::Quant(blocks) => TensorData::Quant(quant::slice_rows(blocks, rows, cols)),
        }
    }

    /// Rows in the order `order` names them (row `i` of the result is row `order[i]`).
    pub fn gather_rows(&self, order: &[usize], cols: usize) -> TensorData {
        match self {
            TensorData::F32(v) => TensorData::F32(gather(v, order, cols)),
            TensorData::F16(v) => TensorData::F16(gather(v, order, cols)),
            TensorData::Bf16(v) => TensorData::Bf16(gather(v, order, cols)),
            TensorData::Quant(blocks) => TensorData::Quant(quant::gather_rows(blocks, order, cols)),
        }
    }
}

impl TensorData {
    /// Keeps columns `range` of a row-major matrix with `cols` columns.
    pub fn slice_cols(&self, range: std::ops::Range<usize>, cols: usize) -> TensorData {
        fn pick<T: Copy>(v: &[T], r: &std::ops::Range<usize>, cols: usize) -> Vec<T> {
            v.chunks_exact(cols)
                .flat_map(|row| row[r.clone()].iter().copied())
                .collect()
        }
        match self {
            TensorData::F32(v) => TensorData::F32(pick(v, &range, cols)),
            TensorData::F16(v) => TensorData::F16(pick(v, &range, cols)),
            TensorData::Bf16(v) => TensorData::Bf16(pick(v, &range, cols)),
            // A range that splits a group is served dense (exact).
            TensorData::Quant(blocks) => match quant::slice_cols(blocks, range.clone(), cols) {
                Some(sliced) => TensorData::Quant(sliced),
                None => TensorData::F32(pick(&self.to_f32(), &range, cols)),
            },
        }
    }
}

/// Stacks row-major matrices by rows after converting each to `dtype` (fused q/k/v, gate/up).
/// Quantized parts stay quantized, each in its own format; a mix of quantized and dense parts, or of dense
/// dtypes, meets in f32.
pub fn stack_rows(parts: Vec<TensorData>, dtype: DType) -> TensorData {
    let parts: Vec<TensorData> = parts.into_iter().map(|p| p.convert(dtype)).collect();
    if !parts.is_empty() && parts.iter().all(|p| matches!(p, TensorData::Quant(_))) {
        let all = parts.into_iter().flat_map(|p| match p {
            TensorData::Quant(blocks) => blocks,
            _ => Vec::new(),
        });
        return TensorData::Quant(quant::stack(all.collect()));
    }
    let first = parts.first().map_or(DType::F32, TensorData::dtype);
    let common = if parts.iter().all(|p| p.dtype() == first) {
        first
    } else {
        DType::F32
    };
    let mut parts = parts.into_iter().map(|p| p.convert(common));
    let mut out = parts
        .next()
        .unwrap_or(TensorData::F32(Vec::new()))
        .convert(common);
    for p in parts {
        match (&mut out, p) {
            (TensorData::F32(a), TensorData::F32(b)) => a.extend(b),
            (TensorData::F16(a), TensorData::F16(b)) => a.extend(b),
            (TensorData::Bf16(a), TensorData::Bf16(b)) => a.extend(b),
            // `convert(common)` made every part the same variant as `out`.
            _ => {}
        }
    }
    out
}

/// Rows of `width` elements of `v` in the order `order` names them, a whole row per copy.
pub(crate) fn gather<T: Copy>(v: &[T], order: &[usize], width: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(order.len() * width);
    for &r in order {
        out.extend_from_slice(&v[r * width..(r + 1) * width]);
    }
    out
}

/// A tensor read from a checkpoint, with its shape in PyTorch order (`[out, in]` for linears).
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Where weights come from: a safetensors folder or a GGUF file.
pub trait WeightSource {
    /// The tensor named `name` (Hugging Face spelling); an error names the file and tensor.
    fn tensor(&self, name: &str) -> Result<HostTensor>;
    /// Whether the checkpoint holds `name`.
    fn contains(&self, name: &str) -> bool;
    /// The file `name` lives in (or would), for error messages.
    fn file_of(&self, name: &str) -> PathBuf;
    /// The dtype most weights are stored in; `WeightDtype::Auto` keeps it.
    fn native_dtype(&self) -> DType;
}

/// Reads the tensor and checks its shape against `expected`.
pub fn expect_shape(src: &dyn WeightSource, name: &str, expected: &[usize]) -> Result<HostTensor> {
    let t = src.tensor(name)?;
    if t.shape != expected {
        return Err(crate::Error::tensor(
            src.file_of(name),
            name,
            format!("expected shape {expected:?}, found {:?}", t.shape),
        ));
    }
    Ok(t)
}
