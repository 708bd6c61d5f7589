//! Paged KV cache (vLLM's PagedAttention layout): memory is split into blocks of `block_size`
//! token slots; slot = block_id · block_size + offset. Each layer holds K and V as
//! `[slot][kv_head][head_dim]` f32. The router owns which blocks belong to which sequence; the
//! engine only writes the slots and reads the block tables it is given.

/// Block size the router and shard use unless told otherwise (TGI's flash default is 16 too).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// What one rank caches per token: `layers` layers of K and V rows `kv_dim` wide (its own KV
/// heads only, under tensor parallelism).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_dim: usize,
}

/// K and V storage of one layer.
#[derive(Debug, Clone)]
pub struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The KV cache of all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    num_blocks: usize,
    block_size: usize,
    kv_dim: usize,
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Allocates `num_blocks` blocks (zeroed lazily by the OS) for this rank's KV heads.
    pub fn new(shape: CacheShape, num_blocks: usize, block_size: usize) -> KvCache {
        let kv_dim = shape.kv_dim;
        let slots = num_blocks * block_size;
        let layers = (0..shape.layers)
            .map(|_| LayerCache {
                k: vec![0.0; slots * kv_dim],
                v: vec![0.0; slots * kv_dim],
            })
            .collect();
        KvCache {
            num_blocks,
            block_size,
            kv_dim,
            layers,
        }
    }

    /// Bytes one block takes across all layers (K and V, f32).
    pub fn bytes_per_block(shape: CacheShape, block_size: usize) -> usize {
        shape.layers * 2 * block_size * shape.kv_dim * size_of::<f32>()
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
        self.kv_dim
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }
}
