//! A minimal GGUF writer for tests: builds valid files and deliberately broken ones byte by byte.
#![allow(dead_code)]

/// GGUF metadata value type ids.
pub const T_U8: u32 = 0;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_F32: u32 = 6;
pub const T_BOOL: u32 = 7;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;
pub const T_U64: u32 = 10;

/// Key/values, tensor infos and the data section of a GGUF v3 file, serialized by [`Builder::bytes`].
#[derive(Default, Clone)]
pub struct Builder {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

pub fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

impl Builder {
    pub fn kv_u32(self, key: &str, v: u32) -> Self {
        self.kv_raw(key, T_U32, &v.to_le_bytes())
    }

    pub fn kv_bool(self, key: &str, v: bool) -> Self {
        self.kv_raw(key, T_BOOL, &[v as u8])
    }

    pub fn kv_str(self, key: &str, v: &str) -> Self {
        let mut raw = Vec::new();
        put_str(&mut raw, v);
        self.kv_raw(key, T_STRING, &raw)
    }

    /// An array of strings.
    pub fn kv_strs(self, key: &str, items: &[&str]) -> Self {
        let mut raw = T_STRING.to_le_bytes().to_vec();
        raw.extend((items.len() as u64).to_le_bytes());
        for s in items {
            put_str(&mut raw, s);
        }
        self.kv_raw(key, T_ARRAY, &raw)
    }

    /// An array of fixed-size values of type `elem_ty`, each given as its little-endian bytes.
    pub fn kv_array(self, key: &str, elem_ty: u32, items: &[Vec<u8>]) -> Self {
        let mut raw = elem_ty.to_le_bytes().to_vec();
        raw.extend((items.len() as u64).to_le_bytes());
        for item in items {
            raw.extend(item);
        }
        self.kv_raw(key, T_ARRAY, &raw)
    }

    pub fn kv_raw(mut self, key: &str, ty: u32, raw: &[u8]) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(raw);
        self.n_kv += 1;
        self
    }

    /// A tensor header with raw type id and offset; data is appended separately.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        put_str(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    pub fn data(mut self, bytes: &[u8]) -> Self {
        self.data.extend(bytes);
        self
    }

    /// Offset the next tensor's data will have, padded to the default alignment (32).
    pub fn next_offset(&self) -> u64 {
        (self.data.len() as u64).div_ceil(32) * 32
    }

    /// Pads the data section to the default alignment.
    pub fn align_data(mut self) -> Self {
        self.data.resize(self.next_offset() as usize, 0);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend(&self.data);
        out
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
