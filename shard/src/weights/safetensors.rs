//! Safetensors reader (single file or sharded `model.safetensors.index.json`) over memmap2, with
//! every header field validated so a corrupt file is an error naming the file, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value;

use super::{DType, HostTensor, TensorData, WeightSource};
use crate::{Error, Result};
use tessera_formats::FileBytes as Bytes;

/// Header entry of one tensor: dtype name as written, shape, byte range within the data section.
#[derive(Debug, Clone)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Largest JSON header accepted, as in the reference `safetensors` implementation: real headers
/// are tens of KiB, and parsing costs several times the header's size in memory.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Largest `model.safetensors.index.json` read (real ones are well under 1 MiB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// One memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    data_start: usize,
    entries: BTreeMap<String, Entry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; the model files are not modified while served.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(mmap))
    }

    /// Validates a safetensors file held in memory; `origin` names it in errors (fuzzing and
    /// tests use this to skip the file system).
    pub fn from_bytes(origin: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(origin.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let bad = |msg: String| Error::model_file(&path, format!("invalid safetensors: {msg}"));
        let (data_start, entries) = parse_header(&bytes).map_err(bad)?;
        Ok(SafetensorsFile {
            path,
            bytes,
            data_start,
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The dtype name (as written in the header) of `name`.
    pub fn dtype_name(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(|e| e.dtype.as_str())
    }

    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "missing from the checkpoint"))?;
        let bytes = &self.bytes[self.data_start + e.start..self.data_start + e.end];
        let data = match e.dtype.as_str() {
            "F32" => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                    .collect(),
            ),
            "F16" => TensorData::F16(u16s(bytes).map(f16::from_bits).collect()),
            "BF16" => TensorData::Bf16(u16s(bytes).map(bf16::from_bits).collect()),
            other => {
                return Err(Error::tensor(
                    &self.path,
                    name,
                    format!("unsupported dtype '{other}' (supported: F32, F16, BF16)"),
                ))
            }
        };
        self.bytes
            .release(self.data_start + e.start, e.end - e.start);
        Ok(HostTensor {
            shape: e.shape.clone(),
            data,
        })
    }
}

/// The data section's start and the tensor entries, every field checked against the file size.
fn parse_header(bytes: &[u8]) -> std::result::Result<(usize, BTreeMap<String, Entry>), String> {
    if bytes.len() < 8 {
        return Err(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            bytes.len()
        ));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} is more than the {MAX_HEADER_BYTES} bytes accepted"
        ));
    }
    let data_start = 8u64
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len() as u64)
        .ok_or_else(|| {
            format!(
                "header length {header_len} runs past the end of the file ({} bytes)",
                bytes.len()
            )
        })? as usize;
    let header: Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| format!("header is not valid JSON: {e}"))?;
    let obj = header.as_object().ok_or("header is not a JSON object")?;
    let data_len = bytes.len() - data_start;
    let mut entries = BTreeMap::new();
    for (name, v) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let entry = parse_entry(v, data_len).map_err(|msg| format!("tensor '{name}': {msg}"))?;
        entries.insert(name.clone(), entry);
    }
    Ok((data_start, entries))
}

fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
}

fn dtype_size(name: &str) -> Option<usize> {
    Some(match name {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

fn parse_entry(v: &Value, data_len: usize) -> std::result::Result<Entry, String> {
    let dtype = v
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("no 'dtype'")?
        .to_string();
    let elem = dtype_size(&dtype).ok_or_else(|| format!("unknown dtype '{dtype}'"))?;
    let shape = v
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("no 'shape'")?
        .iter()
        .map(|d| {
            d.as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| format!("bad dimension {d}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let offs = v
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("no 'data_offsets'")?;
    let off = |i: usize| {
        offs.get(i)
            .and_then(Value::as_u64)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or("'data_offsets' must be two integers")
    };
    let (start, end) = (off(0)?, off(1)?);
    if offs.len() != 2 || start > end {
        return Err(format!("bad data_offsets [{start}, {end}]"));
    }
    if end > data_len {
        return Err(format!(
            "data_offsets [{start}, {end}] run past the end of the data ({data_len} bytes)"
        ));
    }
    let n = shape
        .iter()
        .try_fold(elem, |acc, &d| acc.checked_mul(d))
        .ok_or("shape overflows")?;
    if n != end - start {
        return Err(format!(
            "shape {shape:?} of {dtype} needs {n} bytes but data_offsets span {}",
            end - start
        ));
    }
    Ok(Entry {
        dtype,
        shape,
        start,
        end,
    })
}

/// A model folder's weights: one file or several listed by `model.safetensors.index.json`.
pub struct SafetensorsDir {
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    first: PathBuf,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<PathBuf> = if index_path.exists() {
            shard_files(&index_path)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::model_file(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        let files = names
            .iter()
            .map(|p| SafetensorsFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for n in f.names() {
                index.insert(n.to_string(), i);
            }
        }
        Ok(SafetensorsDir {
            first: names[0].clone(),
            files,
            index,
        })
    }
}

/// The distinct shard file names of an index, in first-seen order.
fn shard_files(index_path: &Path) -> Result<Vec<String>> {
    let bad = |m: String| Error::model_file(index_path, m);
    let len = std::fs::metadata(index_path)
        .map_err(|e| Error::io(index_path, e))?
        .len();
    if len > MAX_INDEX_BYTES {
        return Err(bad(format!(
            "file is {len} bytes, more than the {MAX_INDEX_BYTES} accepted for an index"
        )));
    }
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no 'weight_map' object".into()))?;
    let mut out: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map['{tensor}'] is not a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!(
                "weight_map['{tensor}'] = '{file}' is not a plain file name"
            )));
        }
        if !out.iter().any(|f| f == file) {
            out.push(file.to_string());
        }
    }
    if out.is_empty() {
        return Err(bad("'weight_map' is empty".into()));
    }
    Ok(out)
}

impl WeightSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        match self.index.get(name) {
            Some(&i) => self.files[i].tensor(name),
            None => Err(Error::tensor(
                &self.first,
                name,
                "missing from the checkpoint",
            )),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.index.get(name).map_or_else(
            || self.first.clone(),
            |&i| self.files[i].path().to_path_buf(),
        )
    }

    fn native_dtype(&self) -> DType {
        let probe = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ];
        let name = probe.iter().find(|n| self.contains(n));
        match name.and_then(|n| self.files[self.index[*n]].dtype_name(n)) {
            Some("BF16") => DType::Bf16,
            Some("F16") => DType::F16,
            _ => DType::F32,
        }
    }
}
