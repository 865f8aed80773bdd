//! KV cache blocks: a free list of fixed-size blocks and per-sequence block tables.

/// Hands out KV blocks; every block is owned by at most one table at a time.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    n_blocks: usize,
    block_size: usize,
}

impl BlockAllocator {
    pub fn new(n_blocks: usize, block_size: usize) -> Self {
        Self {
            // Popped from the end: lowest ids first.
            free: (0..n_blocks as u32).rev().collect(),
            n_blocks,
            block_size,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_free(&self) -> usize {
        self.free.len()
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Grows `table` to hold `n_tokens` tokens; returns false (changing nothing) if
    /// there are not enough free blocks.
    pub fn ensure(&mut self, table: &mut BlockTable, n_tokens: usize) -> bool {
        let need = n_tokens
            .div_ceil(self.block_size)
            .saturating_sub(table.blocks.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            table.blocks.push(self.free.pop().expect("checked above"));
        }
        true
    }

    /// Returns every block of `table` to the free list.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
    }
}

/// The blocks holding one sequence's KV, in position order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
}

impl BlockTable {
    /// Cache slot of every position `0..n_tokens`.
    pub fn slots(&self, n_tokens: usize, block_size: usize) -> Vec<usize> {
        (0..n_tokens)
            .map(|p| self.blocks[p / block_size] as usize * block_size + p % block_size)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_and_release_balance() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t = BlockTable::default();
        assert!(a.ensure(&mut t, 17));
        assert_eq!(t.blocks, vec![0, 1]);
        assert!(!a.ensure(&mut t, 16 * 5), "over capacity must fail");
        assert_eq!(t.blocks.len(), 2, "a failed ensure changes nothing");
        assert_eq!(t.slots(18, 16)[16..], [16, 17]);
        a.release(&mut t);
        assert_eq!(a.n_free(), 4);
    }
}
