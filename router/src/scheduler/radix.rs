//! Radix prefix cache over KV blocks (after SGLang's RadixAttention, as in TGI v3's `radix.rs`): a trie
//! whose edges are full blocks of prompt token ids and whose nodes own the KV block for that edge.
//! Invariants: a node with `refs > 0` (leased by a running request) is never evicted, and neither are
//! its ancestors, because only childless nodes are evicted; eviction takes the least recently used.
//! Every node change goes through `PrefixCache::update`, which keeps the count of unleased nodes and
//! the LRU-ordered set of evictable leaves in step, so admission and eviction cost O(log nodes).

use super::blocks::KvBlock;
use std::collections::{BTreeSet, HashMap};

const ROOT: usize = 0;

#[derive(Debug)]
struct Node {
    /// The block of KV this edge stands for (`None` only for the root).
    block: Option<KvBlock>,
    key: Vec<u32>,
    parent: usize,
    children: HashMap<Vec<u32>, usize>,
    refs: u32,
    last_used: u64,
}

/// Cached prompt prefixes; a logical clock orders uses (no wall clock in the scheduler).
#[derive(Debug)]
pub struct PrefixCache {
    block_size: usize,
    nodes: Vec<Option<Node>>,
    vacant: Vec<usize>,
    clock: u64,
    cached: usize,
    /// Non-root nodes with `refs == 0`: what eviction could free, leaves first.
    unleased: usize,
    /// `(last_used, index)` of every non-root node with `refs == 0` and no children.
    leaves: BTreeSet<(u64, usize)>,
}

/// A running request's hold on a cached prefix (nodes root-to-leaf). Not `Clone`; it must go back
/// through `PrefixCache::release`, which drops the hold.
#[derive(Debug)]
pub struct PrefixLease {
    nodes: Vec<usize>,
}

impl PrefixLease {
    pub fn empty() -> Self {
        PrefixLease { nodes: Vec::new() }
    }

    /// Leased blocks.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        let root = Node {
            block: None,
            key: Vec::new(),
            parent: ROOT,
            children: HashMap::new(),
            refs: 0,
            last_used: 0,
        };
        PrefixCache {
            block_size,
            nodes: vec![Some(root)],
            vacant: Vec::new(),
            clock: 0,
            cached: 0,
            unleased: 0,
            leaves: BTreeSet::new(),
        }
    }

    /// Cached blocks.
    pub fn len(&self) -> usize {
        self.cached
    }

    pub fn is_empty(&self) -> bool {
        self.cached == 0
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("live node index")
    }

    /// Changes node `i` through `f`, keeping `unleased` and `leaves` in step with its `refs`,
    /// children and `last_used`.
    fn update(&mut self, i: usize, f: impl FnOnce(&mut Node)) {
        let node = self.nodes[i].as_mut().expect("live node index");
        if i == ROOT {
            return f(node);
        }
        if node.refs == 0 {
            self.unleased -= 1;
            self.leaves.remove(&(node.last_used, i));
        }
        f(node);
        if node.refs == 0 {
            self.unleased += 1;
            if node.children.is_empty() {
                self.leaves.insert((node.last_used, i));
            }
        }
    }

    /// Lease the longest cached prefix of `tokens`, at most `max_blocks` blocks long.
    pub fn lease(&mut self, tokens: &[u32], max_blocks: usize) -> PrefixLease {
        self.clock += 1;
        let mut nodes = Vec::new();
        let mut at = ROOT;
        for key in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let Some(&child) = self.node(at).children.get(key) else {
                break;
            };
            let clock = self.clock;
            self.update(child, |node| {
                node.refs += 1;
                node.last_used = clock;
            });
            nodes.push(child);
            at = child;
        }
        PrefixLease { nodes }
    }

    pub fn block_ids(&self, lease: &PrefixLease) -> Vec<u32> {
        lease
            .nodes
            .iter()
            .map(|&n| {
                self.node(n)
                    .block
                    .as_ref()
                    .expect("non-root node owns a block")
                    .id()
                    .0
            })
            .collect()
    }

    /// Drop a lease. `own` are the request's blocks after the leased prefix, in order; those fully
    /// covered by `prompt` become cache entries (a duplicate of an existing entry is simply freed).
    pub fn release(&mut self, lease: PrefixLease, prompt: &[u32], own: Vec<KvBlock>) {
        self.clock += 1;
        let clock = self.clock;
        for &n in &lease.nodes {
            self.update(n, |node| {
                node.refs -= 1;
                node.last_used = clock;
            });
        }
        let bs = self.block_size;
        let mut at = lease.nodes.last().copied().unwrap_or(ROOT);
        for (j, block) in own.into_iter().enumerate() {
            let index = lease.nodes.len() + j;
            let Some(key) = prompt.get(index * bs..(index + 1) * bs) else {
                break;
            };
            at = match self.node(at).children.get(key) {
                Some(&existing) => existing,
                None => self.insert(at, key.to_vec(), block),
            };
            self.update(at, |node| node.last_used = clock);
        }
    }

    fn insert(&mut self, parent: usize, key: Vec<u32>, block: KvBlock) -> usize {
        let node = Node {
            block: Some(block),
            key: key.clone(),
            parent,
            children: HashMap::new(),
            refs: 0,
            last_used: self.clock,
        };
        self.unleased += 1;
        let index = match self.vacant.pop() {
            Some(i) => {
                self.nodes[i] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        };
        self.leaves.insert((self.clock, index));
        self.update(parent, |p| {
            p.children.insert(key, index);
        });
        self.cached += 1;
        index
    }

    /// Blocks eviction could free now: every unleased node (a leased node's ancestors are leased).
    pub fn evictable(&self) -> usize {
        self.unleased
    }

    /// Free up to `n` blocks, least recently used unleased leaves first. Returns how many were freed.
    pub fn evict(&mut self, n: usize) -> usize {
        let mut freed = 0;
        while freed < n {
            let Some((_, victim)) = self.leaves.pop_first() else {
                break;
            };
            let node = self.nodes[victim].take().expect("victim is live");
            self.unleased -= 1;
            self.update(node.parent, |p| {
                p.children.remove(&node.key);
            });
            self.vacant.push(victim);
            self.cached -= 1;
            freed += 1;
            // Dropping `node` drops its KvBlock, which returns the block to the pool.
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::super::blocks::BlockPool;
    use super::*;

    #[test]
    fn released_prompt_blocks_are_leased_again_and_evicted_lru() {
        let pool = BlockPool::new(9);
        let mut cache = PrefixCache::new(2);
        let prompt_a = [1, 2, 3, 4, 5];
        let own = pool.take(3).unwrap();
        let ids: Vec<u32> = own.iter().map(|b| b.id().0).collect();
        cache.release(PrefixLease::empty(), &prompt_a, own);
        // Two full prompt blocks are cached; the partial third one was freed.
        assert_eq!(cache.len(), 2);
        assert_eq!(pool.free_count(), 8 - 2);

        let lease = cache.lease(&[1, 2, 3, 4, 9, 9], 3);
        assert_eq!(cache.block_ids(&lease), ids[..2].to_vec());
        // Leased blocks cannot be evicted.
        assert_eq!(cache.evict(5), 0);
        cache.release(lease, &[], Vec::new());

        let prompt_b = [7, 7, 8, 8];
        cache.release(PrefixLease::empty(), &prompt_b, pool.take(2).unwrap());
        assert_eq!(cache.len(), 4);
        // The LRU leaf is A's second block, then A's first (now a leaf), then B's.
        assert_eq!(cache.evict(1), 1);
        let lease = cache.lease(&[1, 2, 3, 4], 2);
        assert_eq!(lease.len(), 1);
        cache.release(lease, &[], Vec::new());
        assert_eq!(cache.evict(10), 3);
        assert!(cache.is_empty());
        assert_eq!(pool.free_count(), 8);
    }

    /// `unleased` and `leaves` as a full scan of the nodes finds them.
    fn scan(cache: &PrefixCache) -> (usize, BTreeSet<(u64, usize)>) {
        let live = || {
            cache
                .nodes
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(i, n)| Some((i, n.as_ref()?)))
        };
        let unleased = live().filter(|(_, n)| n.refs == 0).count();
        let leaves = live()
            .filter(|(_, n)| n.refs == 0 && n.children.is_empty())
            .map(|(i, n)| (n.last_used, i))
            .collect();
        (unleased, leaves)
    }

    /// Random leases, releases and evictions over prompts that share prefixes: after every step the
    /// kept counts equal a full scan, and eviction takes the least recently used unleased leaf.
    #[test]
    fn bookkeeping_matches_a_full_scan() {
        let pool = BlockPool::new(20_000);
        let mut cache = PrefixCache::new(2);
        let mut held = Vec::new();
        let mut seed = 7u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize % n
        };
        for _ in 0..3000 {
            match next(4) {
                0 => {
                    let blocks = 1 + next(6);
                    let prompt: Vec<u32> = (0..2 * blocks).map(|_| next(3) as u32).collect();
                    let lease = cache.lease(&prompt, blocks);
                    let own = pool.take(blocks - lease.len()).expect("pool has room");
                    held.push((lease, prompt, own));
                }
                1 | 2 if !held.is_empty() => {
                    let (lease, prompt, own) = held.swap_remove(next(held.len()));
                    cache.release(lease, &prompt, own);
                }
                _ => {
                    let oldest = scan(&cache).1.first().copied();
                    assert_eq!(cache.evict(1), oldest.is_some() as usize);
                    if let Some((_, victim)) = oldest {
                        assert!(cache.nodes[victim].is_none(), "evicted {victim}");
                    }
                }
            }
            let (unleased, leaves) = scan(&cache);
            assert_eq!(cache.evictable(), unleased);
            assert_eq!(cache.leaves, leaves);
        }
        assert!(
            cache.len() > 10,
            "the walk built a trie ({} nodes)",
            cache.len()
        );
    }

    #[test]
    fn duplicate_inserts_free_the_duplicate() {
        let pool = BlockPool::new(9);
        let mut cache = PrefixCache::new(2);
        cache.release(PrefixLease::empty(), &[1, 2], pool.take(1).unwrap());
        cache.release(PrefixLease::empty(), &[1, 2, 3, 4], pool.take(2).unwrap());
        assert_eq!(cache.len(), 2);
        assert_eq!(pool.free_count(), 6);
    }
}
