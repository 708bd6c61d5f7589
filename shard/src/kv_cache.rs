//! Paged KV cache (vLLM's PagedAttention layout): memory is split into blocks of `block_size`
//! token slots; slot = block_id · block_size + offset. Each layer holds K and V as
//! `[slot][kv_head][head_dim]` in the cache's dtype (`--kv-cache-dtype`: bf16 by default, f16 or
//! f32). The router owns which blocks belong to which sequence; the engine only writes the slots
//! and reads the block tables it is given.

use std::fmt;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::ValueEnum;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Block size the router and shard use unless told otherwise (TGI's flash default is 16 too).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// What the KV cache stores per value. Attention math is f32 whatever is stored: values are
/// rounded to nearest (ties to even) when written and widened exactly when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum KvCacheDtype {
    /// bfloat16: f32's range with an 8-bit significand; half the memory of f32.
    #[default]
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
    /// float16: an 11-bit significand, but values beyond ±65504 become infinite.
    #[value(name = "f16", alias = "float16")]
    F16,
    /// float32: the exact values, twice the memory.
    #[value(name = "f32", alias = "float32")]
    F32,
}

impl KvCacheDtype {
    /// Bytes of one stored value.
    pub fn size(self) -> usize {
        match self {
            KvCacheDtype::Bf16 | KvCacheDtype::F16 => 2,
            KvCacheDtype::F32 => 4,
        }
    }
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.to_possible_value().expect("every dtype has a name");
        f.write_str(value.get_name())
    }
}

/// clap parser of `--kv-cache-dtype`: [`KvCacheDtype`]'s values, and TGI's fp8 values refused by
/// name with the reason instead of clap's bare "invalid value".
#[derive(Debug, Clone, Copy, Default)]
pub struct KvCacheDtypeParser;

impl TypedValueParser for KvCacheDtypeParser {
    type Value = KvCacheDtype;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KvCacheDtype, clap::Error> {
        let text = value.to_string_lossy();
        if text.to_ascii_lowercase().starts_with("fp8") {
            let flag = arg.and_then(|a| a.get_long()).unwrap_or("kv-cache-dtype");
            return Err(clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "--{flag} {text} is not supported: an fp8 KV cache (TGI's fp8_e4m3fn, fp8_e5m2) \
                     changes the outputs and its accuracy is not established here; \
                     use bf16 (the default), f16 or f32\n"
                ),
            )
            .with_cmd(cmd));
        }
        clap::builder::EnumValueParser::<KvCacheDtype>::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            KvCacheDtype::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        ))
    }
}

/// What one rank caches per token: `layers` layers of K and V rows `kv_dim` wide (its own KV
/// heads only, under tensor parallelism), stored as `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_dim: usize,
    pub dtype: KvCacheDtype,
}

impl CacheShape {
    /// Bytes one token takes across all layers (K and V, at the stored element size).
    pub fn bytes_per_token(&self) -> usize {
        self.layers * 2 * self.kv_dim * self.dtype.size()
    }
}

/// An element type the cache stores: how rows are rounded on write and widened on read.
pub trait KvElem: bytemuck::Pod + Send + Sync {
    /// Rounds `src` into `dst` (same length).
    fn store(dst: &mut [Self], src: &[f32]);
    /// Widens `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);
    /// The row as f32: `src` itself where it already is, else widened into `buf`.
    #[inline(always)]
    fn row<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        Self::load(src, buf);
        buf
    }
}

impl KvElem for f32 {
    #[inline(always)]
    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn row<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn store(dst: &mut [bf16], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn load(src: &[bf16], dst: &mut [f32]) {
        // bf16 is f32's upper half: a shift, which the compiler vectorizes.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn store(dst: &mut [f16], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn load(src: &[f16], dst: &mut [f32]) {
        // `half` converts with F16C where the CPU has it.
        src.convert_to_f32_slice(dst);
    }
}

/// K and V of one layer, `[slot][kv_dim]` each, as `S` (f32 values or 16-bit patterns).
#[derive(Debug, Clone)]
pub struct KvRows<S: bytemuck::Pod> {
    k: ZeroedPages<S>,
    v: ZeroedPages<S>,
}

impl<S: bytemuck::Pod> KvRows<S> {
    fn zeroed(len: usize) -> Self {
        KvRows {
            k: ZeroedPages::new(len),
            v: ZeroedPages::new(len),
        }
    }
}

/// `len` zeroed values in pages of their own (an anonymous mapping): the OS commits a page when
/// it is first written and takes every page back on drop. A cache sized for the worst case then
/// costs only the slots used, whatever the allocator's thresholds (glibc serves a few-MiB
/// `calloc` from its arenas once big frees have raised its mmap threshold, and zeroes it there:
/// 46 MiB resident for the warmup's 258 blocks of SmolLM2).
struct ZeroedPages<S> {
    map: memmap2::MmapMut,
    len: usize,
    elem: std::marker::PhantomData<S>,
}

impl<S: bytemuck::Pod> ZeroedPages<S> {
    fn new(len: usize) -> Self {
        let bytes = len * size_of::<S>();
        // An anonymous mapping fails only when the address space is exhausted, where `vec!`
        // would abort the process too.
        let map = memmap2::MmapMut::map_anon(bytes.max(1))
            .unwrap_or_else(|e| panic!("cannot map {bytes} bytes of KV cache: {e}"));
        ZeroedPages {
            map,
            len,
            elem: std::marker::PhantomData,
        }
    }

    fn as_slice(&self) -> &[S] {
        // Page alignment satisfies any `S`; the mapping holds at least `len` values.
        bytemuck::cast_slice(&self.map[..self.len * size_of::<S>()])
    }

    fn as_mut_slice(&mut self) -> &mut [S] {
        let bytes = self.len * size_of::<S>();
        bytemuck::cast_slice_mut(&mut self.map[..bytes])
    }
}

impl<S: bytemuck::Pod> Clone for ZeroedPages<S> {
    fn clone(&self) -> Self {
        let mut copy = ZeroedPages::new(self.len);
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        copy
    }
}

impl<S> fmt::Debug for ZeroedPages<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ZeroedPages({} values)", self.len)
    }
}

/// K and V storage of one layer. The 16-bit kinds hold bit patterns in `u16`, viewed as bf16 or
/// f16 by [`KvRows::as_slices`].
#[derive(Debug, Clone)]
pub enum LayerCache {
    F32(KvRows<f32>),
    Bf16(KvRows<u16>),
    F16(KvRows<u16>),
}

impl<S: bytemuck::Pod> KvRows<S> {
    /// K and V viewed as `T` (same size as `S`: f32 as f32, u16 as bf16 or f16).
    pub fn as_slices<T: KvElem>(&self) -> (&[T], &[T]) {
        (
            bytemuck::cast_slice(self.k.as_slice()),
            bytemuck::cast_slice(self.v.as_slice()),
        )
    }

    pub fn as_slices_mut<T: KvElem>(&mut self) -> (&mut [T], &mut [T]) {
        (
            bytemuck::cast_slice_mut(self.k.as_mut_slice()),
            bytemuck::cast_slice_mut(self.v.as_mut_slice()),
        )
    }
}

impl LayerCache {
    /// A zeroed layer of `slots` slots of `kv_dim` values each.
    pub fn new(dtype: KvCacheDtype, slots: usize, kv_dim: usize) -> LayerCache {
        let len = slots * kv_dim;
        match dtype {
            KvCacheDtype::F32 => LayerCache::F32(KvRows::zeroed(len)),
            KvCacheDtype::Bf16 => LayerCache::Bf16(KvRows::zeroed(len)),
            KvCacheDtype::F16 => LayerCache::F16(KvRows::zeroed(len)),
        }
    }

    pub fn dtype(&self) -> KvCacheDtype {
        match self {
            LayerCache::F32(_) => KvCacheDtype::F32,
            LayerCache::Bf16(_) => KvCacheDtype::Bf16,
            LayerCache::F16(_) => KvCacheDtype::F16,
        }
    }
}

/// The KV cache of all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    num_blocks: usize,
    block_size: usize,
    shape: CacheShape,
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Allocates `num_blocks` blocks (zeroed lazily by the OS) for this rank's KV heads.
    pub fn new(shape: CacheShape, num_blocks: usize, block_size: usize) -> KvCache {
        let slots = num_blocks * block_size;
        let layers = (0..shape.layers)
            .map(|_| LayerCache::new(shape.dtype, slots, shape.kv_dim))
            .collect();
        KvCache {
            num_blocks,
            block_size,
            shape,
            layers,
        }
    }

    /// Bytes one block takes across all layers (K and V, at the stored element size).
    pub fn bytes_per_block(shape: CacheShape, block_size: usize) -> usize {
        block_size * shape.bytes_per_token()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Values per slot per layer for K (and for V).
    pub fn kv_dim(&self) -> usize {
        self.shape.kv_dim
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn dtype(&self) -> KvCacheDtype {
        self.shape.dtype
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, value_parser = KvCacheDtypeParser, default_value_t = KvCacheDtype::default())]
        kv_cache_dtype: KvCacheDtype,
    }

    #[test]
    fn flag_parses_our_values_and_refuses_fp8_by_name() {
        let parse = |v: &str| Cli::try_parse_from(["x", "--kv-cache-dtype", v]);
        assert_eq!(parse("bf16").unwrap().kv_cache_dtype, KvCacheDtype::Bf16);
        assert_eq!(parse("float16").unwrap().kv_cache_dtype, KvCacheDtype::F16);
        assert_eq!(parse("f32").unwrap().kv_cache_dtype, KvCacheDtype::F32);
        let default = Cli::try_parse_from(["x"]).unwrap().kv_cache_dtype;
        assert_eq!(default, KvCacheDtype::Bf16);
        for fp8 in ["fp8_e4m3fn", "fp8_e5m2", "FP8"] {
            let err = parse(fp8).unwrap_err().to_string();
            assert!(
                err.contains("fp8 KV cache") && err.contains("bf16"),
                "{err}"
            );
        }
        let err = parse("int4").unwrap_err().to_string();
        assert!(err.contains("possible values: bf16, f16, f32"), "{err}");
    }

    #[test]
    fn sizes_count_the_stored_element() {
        let shape = |dtype| CacheShape {
            layers: 30,
            kv_dim: 192,
            dtype,
        };
        let f32_block = KvCache::bytes_per_block(shape(KvCacheDtype::F32), 16);
        assert_eq!(f32_block, 30 * 2 * 192 * 4 * 16);
        assert_eq!(
            KvCache::bytes_per_block(shape(KvCacheDtype::Bf16), 16) * 2,
            f32_block
        );
        assert_eq!(shape(KvCacheDtype::F16).bytes_per_token(), 30 * 2 * 192 * 2);
        let cache = KvCache::new(shape(KvCacheDtype::F16), 3, 16);
        assert_eq!(cache.dtype(), KvCacheDtype::F16);
        assert!(
            matches!(&cache.layers[0], LayerCache::F16(r) if r.k.as_slice().len() == 3 * 16 * 192)
        );
    }

    #[test]
    fn writes_round_to_nearest_even_and_reads_widen_exactly() {
        let ulp = 2f32.powi(-7); // bf16's spacing at 1.0
        let src = [
            1.0 + ulp / 2.0,  // tie: down to the even 1.0
            1.0 + 1.5 * ulp,  // tie: up to the even 1 + 2 ulp
            1.0 + 0.75 * ulp, // nearest: 1 + ulp
            -3.0e38,          // within bf16's range (f32's)
            0.1,
        ];
        let mut stored = [bf16::ZERO; 5];
        bf16::store(&mut stored, &src);
        let mut back = [0f32; 5];
        bf16::load(&stored, &mut back);
        assert_eq!(back[..3], [1.0, 1.0 + 2.0 * ulp, 1.0 + ulp]);
        assert!((back[3] / -3.0e38 - 1.0).abs() < ulp);
        assert_eq!(back[4], bf16::from_f32(0.1).to_f32());
        let mut halves = [f16::ZERO; 5];
        f16::store(&mut halves, &src);
        f16::load(&halves, &mut back);
        assert_eq!(back[0], 1.0 + ulp / 2.0, "f16 keeps 10 fraction bits");
        assert_eq!(back[3], f32::NEG_INFINITY, "beyond f16's range");
    }
}
