//! Checkpoint readers. A `WeightSource` hands out tensors by their Hugging Face name, as host
//! tensors in the checkpoint's dtype; layers convert and pack them for the backend.

pub mod gguf;
pub mod safetensors;

use std::path::PathBuf;

use half::{bf16, f16};

use crate::Result;

/// Element types a checkpoint tensor may have once read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// A tensor's elements in one of the supported dtypes, row-major.
#[derive(Debug, Clone)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::Bf16(v) => v.len(),
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
        }
    }

    /// Elements `range` converted to f32 (exact for the 16-bit types).
    pub fn f32_range(&self, start: usize, end: usize) -> Vec<f32> {
        match self {
            TensorData::F32(v) => v[start..end].to_vec(),
            TensorData::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            TensorData::Bf16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.f32_range(0, self.len())
    }

    /// Converts to `dtype` (round to nearest even when narrowing).
    pub fn convert(self, dtype: DType) -> TensorData {
        if self.dtype() == dtype {
            return self;
        }
        let v = self.to_f32();
        match dtype {
            DType::F32 => TensorData::F32(v),
            DType::F16 => TensorData::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => TensorData::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    /// Keeps rows `rows` of a row-major matrix with `cols` columns.
    pub fn slice_rows(&self, rows: std::ops::Range<usize>, cols: usize) -> TensorData {
        let (a, b) = (rows.start * cols, rows.end * cols);
        match self {
            TensorData::F32(v) => TensorData::F32(v[a..b].to_vec()),
            TensorData::F16(v) => TensorData::F16(v[a..b].to_vec()),
            TensorData::Bf16(v) => TensorData::Bf16(v[a..b].to_vec()),
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
        }
    }
}

/// Stacks row-major matrices by rows after converting each to `dtype` (fused q/k/v, gate/up).
pub fn stack_rows(parts: Vec<TensorData>, dtype: DType) -> TensorData {
    let mut parts = parts.into_iter().map(|p| p.convert(dtype));
    let mut out = parts
        .next()
        .unwrap_or(TensorData::F32(Vec::new()))
        .convert(dtype);
    for p in parts {
        match (&mut out, p) {
            (TensorData::F32(a), TensorData::F32(b)) => a.extend(b),
            (TensorData::F16(a), TensorData::F16(b)) => a.extend(b),
            (TensorData::Bf16(a), TensorData::Bf16(b)) => a.extend(b),
            // `convert(dtype)` made every part the same variant as `out`.
            _ => {}
        }
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
