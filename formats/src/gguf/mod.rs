//! GGUF container reader (llama.cpp's model format, versions 2 and 3) over a memory map.
//!
//! `open` validates the whole header up front — magic, version, counts, string lengths, tensor
//! types, shapes, offsets, sizes and alignment — so later accessors only index checked ranges.

pub mod affine;
mod blocks;
mod dequant;
mod reader;
mod types;
mod value;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use affine::Affine;
pub use dequant::{can_dequantize, dequantize};
pub use types::{block_layout, BlockLayout, GgmlType};
pub use value::GgufValue;

use crate::error::{Error, Result};
use crate::FileBytes as Bytes;
use reader::Reader;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Most tensor infos accepted: real checkpoints have a few thousand; each info costs ~100 bytes
/// of memory for 24 bytes of file, so the cap keeps a hostile count from costing gigabytes.
const MAX_TENSORS: usize = 1 << 20;

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the fastest-varying (contiguous) one.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the start of the tensor data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The PyTorch-order shape (dims reversed): `[rows, cols]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (validated at open not to overflow).
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Size of the tensor's data in bytes (validated at open).
    pub fn n_bytes(&self) -> usize {
        let l = self.ggml_type.layout();
        self.n_elements() / l.block_elems * l.block_bytes
    }
}

/// An open GGUF file: parsed metadata and tensor infos over a read-only memory map.
pub struct Gguf {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Maps and validates `path`.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based model loader we assume the file is
        // not truncated by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(mmap))
    }

    /// Validates a GGUF held in memory; `origin` names it in errors (fuzzing and tests use this
    /// to skip the file system).
    pub fn from_bytes(origin: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Gguf> {
        Self::parse(origin.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Gguf> {
        let mut r = Reader::new(&bytes, &path);
        let version = read_preamble(&mut r)?;
        // Each tensor info is at least name length (8) + n_dims (4) + type (4) + offset (8).
        let n_tensors = r.count(24, "tensor count")?;
        if n_tensors > MAX_TENSORS {
            return Err(r.err(format!(
                "tensor count {n_tensors} is more than the {MAX_TENSORS} this reader accepts"
            )));
        }
        // Each key/value is at least key length (8) + value type (4) + a one-byte value.
        let n_kv = r.count(13, "metadata key/value count")?;
        let metadata = read_metadata(&mut r, n_kv)?;
        let tensors = (0..n_tensors)
            .map(|i| read_tensor_info(&mut r, i))
            .collect::<Result<Vec<_>>>()?;
        let alignment = alignment(&r, &metadata)?;
        let data_start = align_up(r.pos() as u64, alignment);
        check_tensor_ranges(&r, &tensors, data_start, alignment, bytes.len() as u64)?;
        let by_name = index_names(&r, &tensors)?;
        Ok(Gguf {
            path,
            bytes,
            version,
            metadata,
            tensors,
            by_name,
            data_start: data_start as usize,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// Any integer type that is non-negative.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.get(key)?.as_array()
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The tensor's raw bytes in its stored (possibly quantized) layout.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name)?;
        let start = self.data_start + info.offset as usize;
        Ok(&self.bytes[start..start + info.n_bytes()])
    }

    /// Drops the tensor's mapped pages from resident memory once it has been decoded (see
    /// [`FileBytes::release`](crate::FileBytes::release)); reading it again still works.
    pub fn release_tensor(&self, name: &str) {
        if let Ok(info) = self.tensor_info(name) {
            self.bytes
                .release(self.data_start + info.offset as usize, info.n_bytes());
        }
    }

    /// The tensor dequantized to f32, with its PyTorch-order shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name)?;
        let data = self.tensor_data(name)?;
        let values =
            dequantize(info.ggml_type, data, info.n_elements()).map_err(|msg| Error::Tensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                msg,
            })?;
        Ok((info.shape(), values))
    }

    /// The tensor as unsigned quants with a scale and offset per group (see [`affine`]), with its
    /// PyTorch-order shape; groups run along the last (contiguous) dimension.
    pub fn tensor_affine(&self, name: &str) -> Result<(Vec<usize>, Affine)> {
        let info = self.tensor_info(name)?;
        let data = self.tensor_data(name)?;
        let values = affine::to_affine(info.ggml_type, data, info.n_elements()).map_err(|msg| {
            Error::Tensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                msg,
            }
        })?;
        Ok((info.shape(), values))
    }
}

fn read_preamble(r: &mut Reader) -> Result<u32> {
    let magic = r.u32("magic")?.to_le_bytes();
    if &magic != MAGIC {
        return Err(r.err(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(r.err(format!(
            "unsupported version {version} (2 and 3 are supported)"
        )));
    }
    Ok(version)
}

fn read_metadata(r: &mut Reader, n_kv: usize) -> Result<BTreeMap<String, GgufValue>> {
    let mut out = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("metadata '{key}' type"))?;
        let value = r.value(ty, &key, 0)?;
        if out.insert(key.clone(), value).is_some() {
            return Err(r.err(format!("metadata key '{key}' appears twice")));
        }
    }
    Ok(out)
}

fn read_tensor_info(r: &mut Reader, i: usize) -> Result<GgufTensorInfo> {
    let name = r.string(&format!("tensor #{i} name"))?;
    let n_dims = r.u32(&format!("tensor '{name}' n_dims"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(r.err(format!(
            "tensor '{name}': {n_dims} dimensions (1..={MAX_DIMS} allowed)"
        )));
    }
    let dims = (0..n_dims)
        .map(|_| r.u64(&format!("tensor '{name}' dims")))
        .collect::<Result<Vec<_>>>()?;
    let type_id = r.u32(&format!("tensor '{name}' type"))?;
    let ggml_type = GgmlType::from_id(type_id)
        .ok_or_else(|| r.err(format!("tensor '{name}': unknown ggml type {type_id}")))?;
    let offset = r.u64(&format!("tensor '{name}' offset"))?;
    Ok(GgufTensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

fn alignment(r: &Reader, metadata: &BTreeMap<String, GgufValue>) -> Result<u64> {
    let Some(v) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match v.as_u64() {
        Some(a) if a.is_power_of_two() && a <= 1 << 20 => Ok(a),
        _ => Err(r.err(format!(
            "general.alignment {v:?} is not a power of two up to 1 MiB"
        ))),
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Checks each tensor's shape, byte size and placement inside the file.
fn check_tensor_ranges(
    r: &Reader,
    tensors: &[GgufTensorInfo],
    data_start: u64,
    alignment: u64,
    file_len: u64,
) -> Result<()> {
    for t in tensors {
        let bad = |msg: String| r.err(format!("tensor '{}': {msg}", t.name));
        let n_bytes = tensor_bytes(t).map_err(bad)?;
        if t.offset % alignment != 0 {
            return Err(bad(format!(
                "offset {} is not a multiple of the alignment {alignment}",
                t.offset
            )));
        }
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(n_bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(bad(format!(
                    "data at offset {} + {n_bytes} bytes runs past the end of the file ({file_len} bytes, data section at {data_start})",
                    t.offset
                )))
            }
        }
    }
    Ok(())
}

/// Byte size from dims and type, rejecting overflow and rows that are not whole blocks.
fn tensor_bytes(t: &GgufTensorInfo) -> std::result::Result<u64, String> {
    let l = t.ggml_type.layout();
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| format!("dims {:?} overflow", t.dims))?;
    if !t.dims[0].is_multiple_of(l.block_elems as u64) {
        return Err(format!(
            "dims[0] = {} is not a multiple of the {} block size {}",
            t.dims[0], t.ggml_type, l.block_elems
        ));
    }
    (n / l.block_elems as u64)
        .checked_mul(l.block_bytes as u64)
        .ok_or_else(|| format!("dims {:?} overflow", t.dims))
}

fn index_names(r: &Reader, tensors: &[GgufTensorInfo]) -> Result<HashMap<String, usize>> {
    let mut by_name = HashMap::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if by_name.insert(t.name.clone(), i).is_some() {
            return Err(r.err(format!("tensor name '{}' appears twice", t.name)));
        }
    }
    Ok(by_name)
}
