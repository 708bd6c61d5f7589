//! A streaming safetensors writer: the header is computed from shapes alone, then each tensor is
//! produced, converted and written in turn, so only one tensor is in memory at a time.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::weights::{DType, TensorData};
use crate::{Error, Result};

/// One tensor of the file: its name and PyTorch-order shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsEntry {
    pub name: String,
    pub shape: Vec<usize>,
}

fn dtype_tag(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::Bf16 => "BF16",
        DType::Quantized { .. } => unreachable!("convert writes dense dtypes only"),
    }
}

/// The header JSON padded with spaces to a multiple of 8 bytes, so tensor data starts aligned.
fn header(entries: &[SafetensorsEntry], dtype: DType) -> Vec<u8> {
    let mut map = Map::new();
    let mut offset = 0usize;
    for e in entries {
        let bytes = e.shape.iter().product::<usize>() * dtype.size();
        map.insert(
            e.name.clone(),
            json!({"dtype": dtype_tag(dtype), "shape": e.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut text = Value::Object(map).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    text
}

/// Little-endian bytes of `data` after converting it to `dtype` (round to nearest even).
fn le_bytes(data: TensorData, dtype: DType) -> Vec<u8> {
    match data.convert(dtype) {
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::Quant(_) => unreachable!("convert writes dense dtypes only"),
    }
}

/// Writes `entries` in order to `path` as `dtype`, asking `tensor(name)` for each one's elements;
/// returns the number of parameters. A tensor whose element count differs from its entry's shape
/// is an error (the header is already written by then, so the file must be discarded).
pub fn write_safetensors(
    path: &Path,
    entries: &[SafetensorsEntry],
    dtype: DType,
    mut tensor: impl FnMut(&str) -> Result<TensorData>,
) -> Result<usize> {
    let io = |e| Error::io(path, e);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let head = header(entries, dtype);
    f.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&head).map_err(io)?;
    let mut parameters = 0;
    for e in entries {
        let data = tensor(&e.name)?;
        let expected: usize = e.shape.iter().product();
        if data.len() != expected {
            return Err(Error::tensor(
                path,
                &e.name,
                format!(
                    "{} elements produced for shape {:?} ({expected} elements)",
                    data.len(),
                    e.shape
                ),
            ));
        }
        f.write_all(&le_bytes(data, dtype)).map_err(io)?;
        parameters += expected;
    }
    f.flush().map_err(io)?;
    Ok(parameters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::safetensors::SafetensorsFile;

    fn entries() -> Vec<SafetensorsEntry> {
        vec![
            SafetensorsEntry {
                name: "a".into(),
                shape: vec![3],
            },
            SafetensorsEntry {
                name: "b.weight".into(),
                shape: vec![2, 2],
            },
        ]
    }

    fn data(name: &str) -> Result<TensorData> {
        Ok(TensorData::F32(match name {
            "a" => vec![1.0, -2.5, 3.0e-3],
            // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0), while
            // 1 + 3 * 2^-8 rounds up to 1 + 2^-6 (its even neighbour).
            _ => vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::MAX, -0.0],
        }))
    }

    #[test]
    fn f32_round_trips_exactly_and_the_header_is_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        assert_eq!(
            write_safetensors(&path, &entries(), DType::F32, data).unwrap(),
            7
        );
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(bytes.len(), 8 + n + 7 * 4);
        let file = SafetensorsFile::open(&path).unwrap();
        for e in entries() {
            let t = file.tensor(&e.name).unwrap();
            assert_eq!(t.shape, e.shape);
            let want = data(&e.name).unwrap().to_f32();
            let got = t.data.to_f32();
            assert!(want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_safetensors(&path, &entries(), DType::Bf16, data).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.dtype_name("b.weight"), Some("BF16"));
        let got = file.tensor("b.weight").unwrap().data.to_f32();
        assert_eq!(got[..2], [1.0, 1.0 + 4.0 / 256.0]);
        assert!(
            got[2].is_infinite(),
            "f32::MAX rounds up past bf16's largest finite value"
        );
        assert!(got[3] == 0.0 && got[3].is_sign_negative());
    }

    #[test]
    fn a_tensor_of_the_wrong_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let err = write_safetensors(&path, &entries(), DType::F32, |_| {
            Ok(TensorData::F32(vec![0.0; 2]))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("'a'") && err.contains("2 elements"), "{err}");
    }
}
