//! One worker's KV block pool with prefix caching: the scheduler's view of which KV
//! blocks are free, which are held by sequences (ref-counted, so sequences with a common
//! prompt prefix share them), and which hold a finished sequence's KV that a later
//! request with the same prefix can reuse instead of recomputing.
//!
//! A full block is named by a hash chained over (parent block's hash, the block's token
//! ids), so equal hashes mean equal prefixes up to and including that block. A block
//! whose last holder lets go keeps its hash and stays reusable until its memory is
//! needed: allocation takes never-cached blocks first, then evicts the least recently
//! released cached block.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Names a full block by its content and everything before it.
pub type BlockHash = u64;

/// The hash of a full block of `tokens` following the block named `parent`.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // `DefaultHasher::new()` is keyed identically within a process, which is the
    // lifetime of the cache.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Cached blocks found for a prefix, not yet taken (see [`BlockPool::acquire`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    pub blocks: Vec<u32>,
    pub hashes: Vec<BlockHash>,
    /// How many of `blocks` are held by nobody now: taking them shrinks what
    /// [`BlockPool::n_available`] reports.
    pub n_evictable: usize,
}

impl PrefixMatch {
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }
}

/// What the cache remembers about a registered block. The tokens and parent are kept
/// so a lookup compares content, not only a 64-bit hash: a hash collision must not
/// hand out another prompt's KV.
#[derive(Clone, Debug)]
struct CachedBlock {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    n_refs: u32,
    cached: Option<CachedBlock>,
    /// Key in `evictable` while `n_refs == 0` and `cached` is set.
    lru_tick: u64,
}

/// One worker's KV blocks. Invariants: a block is in exactly one of `free` (no holder,
/// no hash), `evictable` (no holder, hashed) or held (`n_refs > 0`); `by_hash` names
/// exactly the blocks whose `cached` is set.
#[derive(Clone, Debug)]
pub struct BlockPool {
    block_size: usize,
    enable_prefix_cache: bool,
    meta: Vec<BlockMeta>,
    /// Popped from the end: lowest ids first on a fresh pool.
    free: Vec<u32>,
    /// Least recently released first.
    evictable: BTreeMap<u64, u32>,
    by_hash: HashMap<BlockHash, u32>,
    next_tick: u64,
    n_held: usize,
}

impl BlockPool {
    /// `block_size` is clamped to at least 1 token.
    pub fn new(n_blocks: usize, block_size: usize, enable_prefix_cache: bool) -> Self {
        let n_blocks = n_blocks.min(u32::MAX as usize);
        Self {
            block_size: block_size.max(1),
            enable_prefix_cache,
            meta: vec![BlockMeta::default(); n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            by_hash: HashMap::new(),
            next_tick: 0,
            n_held: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks an allocation can get now: free ones plus evictable cached ones.
    pub fn n_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn n_held(&self) -> usize {
        self.n_held
    }

    /// Blocks held only by the cache (reusable, evictable).
    pub fn n_cached(&self) -> usize {
        self.evictable.len()
    }

    /// The longest chain of cached full blocks that starts `tokens`, at most
    /// `max_blocks` long. Takes nothing.
    pub fn lookup(&self, tokens: &[u32], max_blocks: usize) -> PrefixMatch {
        let mut m = PrefixMatch::default();
        if !self.enable_prefix_cache {
            return m;
        }
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = block_hash(parent, chunk);
            let Some(&b) = self.by_hash.get(&hash) else {
                break;
            };
            let Some(meta) = self.meta.get(b as usize) else {
                break;
            };
            match &meta.cached {
                Some(c) if c.parent == parent && *c.tokens == *chunk => {}
                _ => break,
            }
            if meta.n_refs == 0 {
                m.n_evictable += 1;
            }
            m.blocks.push(b);
            m.hashes.push(hash);
            parent = Some(hash);
        }
        m
    }

    /// Takes a reference on every block of `m` (from [`Self::lookup`] with no pool
    /// change in between).
    pub fn acquire(&mut self, m: &PrefixMatch) {
        for &b in &m.blocks {
            let Some(meta) = self.meta.get_mut(b as usize) else {
                continue;
            };
            if meta.n_refs == 0 {
                self.evictable.remove(&meta.lru_tick);
                self.n_held += 1;
            }
            meta.n_refs = meta.n_refs.saturating_add(1);
        }
    }

    /// One block for a sequence's exclusive use: a free one, else the least recently
    /// released cached one (forgetting its hash). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(c) = self.meta.get_mut(b as usize).and_then(|m| m.cached.take()) {
                    self.by_hash.remove(&c.hash);
                }
                b
            }
        };
        if let Some(meta) = self.meta.get_mut(b as usize) {
            meta.n_refs = 1;
        }
        self.n_held += 1;
        Some(b)
    }

    /// Drops one reference on each of `blocks`. A block nobody holds becomes free, or
    /// evictable if it is cached. Blocks are let go last to first, so a sequence's tail
    /// is evicted before its head: a cached prefix stays usable as long as possible.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let Some(meta) = self.meta.get_mut(b as usize) else {
                continue;
            };
            if meta.n_refs == 0 {
                // Not held: a double release is ignored rather than corrupting counts.
                continue;
            }
            meta.n_refs -= 1;
            if meta.n_refs > 0 {
                continue;
            }
            self.n_held -= 1;
            if meta.cached.is_some() {
                meta.lru_tick = self.next_tick;
                self.next_tick += 1;
                self.evictable.insert(meta.lru_tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Records that held `block` is fully written with `tokens` (one block's worth)
    /// following the block named `parent`, and returns its hash. A block whose content
    /// is already cached elsewhere stays unregistered (the first copy serves lookups);
    /// so does everything while prefix caching is off.
    pub fn register(&mut self, block: u32, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let hash = block_hash(parent, tokens);
        if !self.enable_prefix_cache || tokens.len() != self.block_size {
            return hash;
        }
        let Some(meta) = self.meta.get_mut(block as usize) else {
            return hash;
        };
        if meta.n_refs == 0 || meta.cached.is_some() || self.by_hash.contains_key(&hash) {
            return hash;
        }
        meta.cached = Some(CachedBlock {
            hash,
            parent,
            tokens: tokens.into(),
        });
        self.by_hash.insert(hash, block);
        hash
    }

    /// Forgets every cached block (their KV can no longer be trusted, e.g. the worker
    /// restarted). Held blocks stay held; evictable ones become free.
    pub fn clear_cache(&mut self) {
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.free.push(b);
        }
        for meta in &mut self.meta {
            meta.cached = None;
        }
        self.by_hash.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(start: u32, n: usize) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    /// Allocates blocks for `tokens`, registers its full blocks as written, releases.
    fn write_and_release(pool: &mut BlockPool, tokens: &[u32]) -> Vec<u32> {
        let bs = pool.block_size();
        let blocks: Vec<u32> = (0..tokens.len().div_ceil(bs))
            .map(|_| pool.allocate().expect("a block"))
            .collect();
        let mut parent = None;
        for (b, chunk) in blocks.iter().zip(tokens.chunks_exact(bs)) {
            parent = Some(pool.register(*b, parent, chunk));
        }
        pool.release(&blocks);
        blocks
    }

    #[test]
    fn released_prefix_is_found_shared_and_counted() {
        let mut pool = BlockPool::new(8, 4, true);
        let prompt = toks(100, 10);
        let blocks = write_and_release(&mut pool, &prompt);
        assert_eq!(
            (pool.n_held(), pool.n_cached(), pool.n_available()),
            (0, 2, 8)
        );
        let m = pool.lookup(&prompt, 9 / 4);
        assert_eq!(m.blocks, blocks[..2]);
        assert_eq!(m.n_evictable, 2);
        pool.acquire(&m);
        pool.acquire(&m);
        assert_eq!(
            (pool.n_held(), pool.n_cached(), pool.n_available()),
            (2, 0, 6)
        );
        pool.release(&m.blocks);
        assert_eq!(pool.lookup(&prompt, 2).n_evictable, 0, "still held once");
        pool.release(&m.blocks);
        assert_eq!((pool.n_held(), pool.n_cached()), (0, 2));
    }

    #[test]
    fn lookup_stops_at_the_first_difference_and_respects_the_limit() {
        let mut pool = BlockPool::new(8, 4, true);
        write_and_release(&mut pool, &toks(0, 12));
        for (tokens, max_blocks, want) in [
            (toks(0, 12), 3, 3),
            (toks(0, 12), 2, 2),
            (toks(0, 11), 3, 2),
            ([toks(0, 4), toks(50, 8)].concat(), 3, 1),
            ([vec![9], toks(1, 11)].concat(), 3, 0),
        ] {
            assert_eq!(
                pool.lookup(&tokens, max_blocks).n_blocks(),
                want,
                "{tokens:?}"
            );
        }
    }

    #[test]
    fn allocation_prefers_free_blocks_then_evicts_least_recently_released_tail_first() {
        let mut pool = BlockPool::new(4, 2, true);
        let a = write_and_release(&mut pool, &toks(0, 4)); // 2 cached blocks
        let _ = pool.allocate().expect("free");
        let _ = pool.allocate().expect("free");
        assert_eq!(pool.n_cached(), 2, "free blocks are used before evicting");
        let evicted = pool.allocate().expect("evicts");
        assert_eq!(evicted, a[1], "the tail goes first");
        assert_eq!(pool.lookup(&toks(0, 4), 2).blocks, a[..1]);
        let _ = pool.allocate().expect("evicts");
        assert_eq!(pool.lookup(&toks(0, 4), 2).n_blocks(), 0);
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn duplicates_disabled_cache_and_double_release_are_harmless() {
        let mut pool = BlockPool::new(4, 2, true);
        let a = write_and_release(&mut pool, &toks(0, 2));
        let b = pool.allocate().expect("free");
        pool.register(b, None, &toks(0, 2));
        pool.release(&[b]);
        pool.release(&[b]);
        assert_eq!(
            pool.lookup(&toks(0, 2), 1).blocks,
            a,
            "the first copy serves"
        );
        assert_eq!((pool.n_held(), pool.n_available()), (0, 4));
        pool.clear_cache();
        assert_eq!((pool.n_cached(), pool.n_available()), (0, 4));
        assert_eq!(pool.lookup(&toks(0, 2), 1).n_blocks(), 0);

        let mut off = BlockPool::new(4, 2, false);
        write_and_release(&mut off, &toks(0, 4));
        assert_eq!(
            (off.n_cached(), off.lookup(&toks(0, 4), 2).n_blocks()),
            (0, 0)
        );
    }
}
