//! Router-owned paged KV-cache blocks (TGI v3's block allocator): blocks are owned handles that free
//! themselves on drop, and the allocator puts a radix prefix cache in front of the free list.

use super::radix::{PrefixCache, PrefixLease};
use std::sync::{Arc, Mutex};

/// A KV-cache block index as the shards see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

type FreeList = Arc<Mutex<Vec<u32>>>;

/// One KV block held by a request or by the prefix cache. Not `Clone`: exactly one owner, and dropping
/// it returns the block to the pool.
#[derive(Debug)]
pub struct KvBlock {
    id: BlockId,
    pool: FreeList,
}

impl KvBlock {
    pub fn id(&self) -> BlockId {
        self.id
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        // A poisoned lock only means another holder panicked mid-push; the list itself is still valid.
        let mut free = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        free.push(self.id.0);
    }
}

/// The free list. Block 0 is never handed out: the health probe writes into it.
#[derive(Debug)]
pub struct BlockPool {
    free: FreeList,
    usable: usize,
}

impl BlockPool {
    /// A pool over blocks `1..num_blocks` (block 0 reserved for health).
    pub fn new(num_blocks: u32) -> Self {
        // Reversed so that `pop` hands out low ids first (easier to read in logs and tests).
        let ids: Vec<u32> = (1..num_blocks).rev().collect();
        let usable = ids.len();
        BlockPool {
            free: Arc::new(Mutex::new(ids)),
            usable,
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Blocks this pool can ever hand out.
    pub fn usable(&self) -> usize {
        self.usable
    }

    /// `n` blocks, or none at all when fewer are free.
    pub fn take(&self, n: usize) -> Option<Vec<KvBlock>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < n {
            return None;
        }
        let start = free.len() - n;
        let ids: Vec<u32> = free.drain(start..).rev().collect();
        drop(free);
        Some(
            ids.into_iter()
                .map(|id| KvBlock {
                    id: BlockId(id),
                    pool: self.free.clone(),
                })
                .collect(),
        )
    }
}

/// The KV memory of one admitted request: a leased cached prefix followed by its own blocks.
#[derive(Debug)]
pub struct Allocation {
    lease: PrefixLease,
    own: Vec<KvBlock>,
    /// Prompt tokens whose KV is already in the leased prefix blocks (`cache_len` for the shard).
    pub prefix_len: u32,
    /// Block ids in sequence order (prefix first).
    pub blocks: Vec<u32>,
    /// One slot per token of the sequence: `block * block_size + offset`.
    pub slots: Vec<u32>,
}

/// Blocks plus prefix cache: the one place KV memory is handed out and returned.
#[derive(Debug)]
pub struct BlockAllocator {
    pool: BlockPool,
    cache: PrefixCache,
    block_size: u32,
    prefix_caching: bool,
}

impl BlockAllocator {
    pub fn new(num_blocks: u32, block_size: u32, prefix_caching: bool) -> Self {
        let block_size = block_size.max(1);
        // Slots are u32 on the wire: only blocks whose every slot `block * block_size + offset`
        // fits are handed out, so the slot arithmetic in `allocate` cannot overflow.
        let num_blocks = num_blocks.min(u32::MAX / block_size);
        BlockAllocator {
            pool: BlockPool::new(num_blocks),
            cache: PrefixCache::new(block_size as usize),
            block_size,
            prefix_caching,
        }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks held by requests or by the prefix cache.
    pub fn used_blocks(&self) -> usize {
        self.pool.usable() - self.pool.free_count()
    }

    /// Blocks on the free list (cached prefixes are evictable but not counted here).
    pub fn free_blocks(&self) -> usize {
        self.pool.free_count()
    }

    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Reserve room for `total_tokens` tokens, leaving at least `reserve` blocks obtainable for
    /// others. `prompt` enables a prefix-cache lookup. `None` means the KV cache cannot hold the
    /// request right now.
    pub fn allocate(
        &mut self,
        prompt: Option<&[u32]>,
        total_tokens: u32,
        reserve: usize,
    ) -> Option<Allocation> {
        let bs = self.block_size as usize;
        let needed = (total_tokens as usize).div_ceil(bs).max(1);
        let lease = match prompt.filter(|_| self.prefix_caching) {
            // At least one prompt token must be computed to produce logits, so never lease all of it.
            Some(p) if !p.is_empty() => self.cache.lease(p, (p.len() - 1) / bs),
            _ => PrefixLease::empty(),
        };
        let own_needed = needed.saturating_sub(lease.len());
        let Some(own) = self.take(own_needed, reserve) else {
            self.cache.release(lease, &[], Vec::new());
            return None;
        };
        let mut blocks = self.cache.block_ids(&lease);
        blocks.extend(own.iter().map(|b| b.id().0));
        let slots = (0..total_tokens as usize)
            .map(|t| blocks[t / bs] * self.block_size + (t % bs) as u32)
            .collect();
        // Within the prompt, whose length validation bounds far below u32::MAX.
        let prefix_len = u32::try_from(lease.len() * bs).unwrap_or(u32::MAX);
        Some(Allocation {
            lease,
            own,
            prefix_len,
            blocks,
            slots,
        })
    }

    /// `n` blocks while `reserve` more stay obtainable (free or evictable), evicting cached
    /// prefixes only as far as `n` needs.
    fn take(&mut self, n: usize, reserve: usize) -> Option<Vec<KvBlock>> {
        let free = self.pool.free_count();
        if free < n.saturating_add(reserve) {
            if free + self.cache.evictable() < n.saturating_add(reserve) {
                return None;
            }
            self.cache.evict(n.saturating_sub(free));
        }
        self.pool.take(n)
    }

    /// Grow an allocation to hold `total_tokens` tokens (KV on demand); false when the blocks are
    /// not there, with the allocation unchanged.
    pub fn grow(&mut self, allocation: &mut Allocation, total_tokens: u32) -> bool {
        let bs = self.block_size as usize;
        let needed = (total_tokens as usize)
            .div_ceil(bs)
            .saturating_sub(allocation.blocks.len());
        if needed > 0 {
            let Some(more) = self.take(needed, 0) else {
                return false;
            };
            allocation.blocks.extend(more.iter().map(|b| b.id().0));
            allocation.own.extend(more);
        }
        let blocks = &allocation.blocks;
        let from = allocation.slots.len();
        allocation.slots.extend(
            (from..(total_tokens as usize).max(from))
                .map(|t| blocks[t / bs] * self.block_size + (t % bs) as u32),
        );
        true
    }

    /// Drops every cached prefix that no request holds (the shards that computed them are gone).
    pub fn forget_cached(&mut self) {
        self.cache.evict(usize::MAX);
    }

    /// Return an allocation. `prefilled_prompt` is the prompt whose KV the blocks now hold (the request
    /// finished its prefill); its full blocks go into the prefix cache, everything else is freed.
    pub fn release(&mut self, allocation: Allocation, prefilled_prompt: Option<&[u32]>) {
        let Allocation { lease, own, .. } = allocation;
        let prompt = prefilled_prompt
            .filter(|_| self.prefix_caching)
            .unwrap_or(&[]);
        self.cache.release(lease, prompt, own);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_block_returns_it_and_block_zero_is_reserved() {
        let pool = BlockPool::new(4);
        assert_eq!(pool.usable(), 3);
        let blocks = pool.take(3).unwrap();
        assert!(blocks.iter().all(|b| b.id().0 != 0));
        assert!(pool.take(1).is_none());
        drop(blocks);
        assert_eq!(pool.free_count(), 3);
    }

    #[test]
    fn slots_follow_blocks() {
        let mut alloc = BlockAllocator::new(10, 4, false);
        let a = alloc.allocate(None, 6, 0).unwrap();
        assert_eq!(a.blocks.len(), 2);
        assert_eq!(a.slots.len(), 6);
        assert_eq!(a.slots[0], a.blocks[0] * 4);
        assert_eq!(a.slots[5], a.blocks[1] * 4 + 1);
        assert_eq!(alloc.used_blocks(), 2);
        alloc.release(a, None);
        assert_eq!(alloc.used_blocks(), 0);
    }

    #[test]
    fn an_allocation_grows_block_by_block_and_a_reserve_is_kept() {
        let mut alloc = BlockAllocator::new(6, 4, false);
        let mut a = alloc.allocate(None, 3, 0).unwrap();
        assert_eq!((a.blocks.len(), a.slots.len()), (1, 3));
        assert!(alloc.grow(&mut a, 4));
        assert_eq!((a.blocks.len(), a.slots.len()), (1, 4));
        assert!(alloc.grow(&mut a, 9));
        assert_eq!((a.blocks.len(), a.slots.len()), (3, 9));
        assert_eq!(a.slots[8], a.blocks[2] * 4);
        // Two blocks are free: a 5-token request fits only when nothing need stay free.
        assert!(alloc.allocate(None, 5, 1).is_none());
        let b = alloc.allocate(None, 5, 0).unwrap();
        assert!(!alloc.grow(&mut a, 13), "no block left");
        assert_eq!(a.blocks.len(), 3);
        alloc.release(b, None);
        assert!(alloc.grow(&mut a, 13));
    }
}
