//! Bounds-checked parsing of the GGUF header: metadata key/values and tensor infos.
//!
//! Every read is checked against the mapped file length before it happens, and every count read
//! from the file is checked against the bytes left (and, for metadata values, a total cap) before
//! anything is allocated from it, so a corrupt file gives an error, never a panic or a huge
//! allocation.

use std::path::Path;

use super::value::GgufValue;
use crate::error::{Error, Result};

/// Deepest nesting of arrays inside arrays accepted (real files use 1).
const MAX_ARRAY_DEPTH: usize = 4;

/// Most metadata values (array elements included) one file may hold. A one-byte value in the
/// file becomes a 32-byte [`GgufValue`] in memory, so the file size alone would allow a 32x
/// blow-up; real files hold under a million (vocabulary, token types, merges), and this cap
/// bounds metadata at about 256 MiB of values plus the strings' own bytes.
pub(crate) const MAX_METADATA_VALUES: usize = 1 << 23;

/// A cursor over the mapped file that only hands out in-bounds slices.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata values still allowed before [`MAX_METADATA_VALUES`] is reached.
    values_left: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], path: &'a Path) -> Self {
        Reader {
            buf,
            pos: 0,
            path,
            values_left: MAX_METADATA_VALUES,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn err(&self, msg: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.to_path_buf(),
            msg: msg.into(),
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {} bytes",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each occupy at least `min_item_bytes`: rejected when the file cannot
    /// possibly hold that many, which bounds any allocation sized from it.
    pub(crate) fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = (n as u128) * (min_item_bytes as u128) <= self.remaining() as u128;
        if !fits {
            return Err(self.err(format!(
                "{what} is {n} at offset {}, more than the {} bytes left in the file can hold (truncated or corrupt)",
                self.pos - 8,
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    /// A GGUF string: u64 length then UTF-8 bytes.
    pub(crate) fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{what}: string length {len} at offset {at} runs past the end of the file ({} bytes)",
                self.buf.len()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.err(format!("{what}: string at offset {at} is not valid UTF-8")))
    }

    /// Takes `n` values from the metadata budget, failing once the file holds too many.
    fn spend_values(&mut self, n: usize, key: &str) -> Result<()> {
        if n > self.values_left {
            return Err(self.err(format!(
                "metadata '{key}': more than {MAX_METADATA_VALUES} metadata values in the file"
            )));
        }
        self.values_left -= n;
        Ok(())
    }

    /// A metadata value of GGUF type id `ty`.
    pub(crate) fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        self.spend_values(1, key)?;
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => GgufValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => self.array_value(key, depth)?,
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            _ => return Err(self.err(format!("metadata '{key}': unknown value type {ty}"))),
        })
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<GgufValue> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!("metadata '{key}': arrays nested too deeply")));
        }
        let elem_ty = self.u32(key)?;
        let n = self.count(
            min_value_bytes(elem_ty),
            &format!("metadata '{key}' array length"),
        )?;
        // Checked before the allocation; each element spends its own value again when read.
        if n > self.values_left {
            return Err(self.err(format!(
                "metadata '{key}' array length {n} is more than the {} metadata values left of {MAX_METADATA_VALUES}",
                self.values_left
            )));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(elem_ty, key, depth + 1)?);
        }
        Ok(GgufValue::Array(items))
    }
}

/// The fewest bytes a value of type `ty` can take in the file (unknown types fail when read).
fn min_value_bytes(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}
