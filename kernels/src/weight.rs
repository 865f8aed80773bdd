//! Host weight matrices that borrow checkpoint bytes without copying them.
//!
//! A memory-mapped safetensors shard is shared by every tensor cut from it; a
//! [`SharedBytes`] is an `Arc` to the owner plus the byte range of one tensor.

use std::ops::Range;
use std::sync::Arc;

use crate::numeric::{self, DType};

/// A cheaply clonable window into bytes owned elsewhere (an mmap, a `Vec`).
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.range.len())
    }
}

impl SharedBytes {
    /// Wraps a whole owner. The range is validated against the owner's length.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        let len = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(Self { owner, range })
    }

    /// Takes ownership of a vector.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            owner: Arc::new(v),
            range: 0..len,
        }
    }

    /// A sub-window, relative to this window; `None` if out of range.
    pub fn sub(&self, range: Range<usize>) -> Option<Self> {
        if range.start > range.end || range.end > self.range.len() {
            return None;
        }
        Some(Self {
            owner: self.owner.clone(),
            range: self.range.start + range.start..self.range.start + range.end,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// A 2-D weight `[rows, cols]` (row-major, `[out, in]` for linear layers) on the host.
#[derive(Clone, Debug)]
pub struct HostMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: SharedBytes,
}

impl HostMatrix {
    /// Builds a matrix, checking that the byte length matches the shape.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: SharedBytes) -> Option<Self> {
        let need = rows.checked_mul(cols)?.checked_mul(dtype.size_bytes())?;
        (bytes.len() == need).then_some(Self {
            dtype,
            rows,
            cols,
            bytes,
        })
    }

    /// A matrix from f32 values, stored as `dtype`.
    pub fn from_f32(dtype: DType, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols, "shape mismatch");
        Self {
            dtype,
            rows,
            cols,
            bytes: SharedBytes::from_vec(numeric::encode(dtype, values)),
        }
    }

    /// Returns row `r` decoded to f32.
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let es = self.dtype.size_bytes();
        let start = r * self.cols * es;
        let mut out = Vec::with_capacity(self.cols);
        numeric::decode_into(
            self.dtype,
            &self.bytes.as_slice()[start..start + self.cols * es],
            &mut out,
        );
        out
    }

    /// All values decoded to f32 (for small tensors: norms, tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        numeric::decode_into(self.dtype, self.bytes.as_slice(), &mut out);
        out
    }

    /// Converts the storage to `dtype` (rounding to nearest even), copying.
    pub fn cast(&self, dtype: DType) -> Self {
        if dtype == self.dtype {
            return self.clone();
        }
        Self::from_f32(dtype, self.rows, self.cols, &self.to_f32())
    }

    /// Rows `rows` as a matrix of their own, sharing the bytes (a tensor-parallel
    /// shard); `None` when the range is outside the matrix.
    pub fn row_range(&self, rows: Range<usize>) -> Option<Self> {
        if rows.start > rows.end || rows.end > self.rows {
            return None;
        }
        let row_bytes = self.cols * self.dtype.size_bytes();
        Some(Self {
            dtype: self.dtype,
            rows: rows.len(),
            cols: self.cols,
            bytes: self
                .bytes
                .sub(rows.start * row_bytes..rows.end * row_bytes)?,
        })
    }

    /// Size of the stored weights in bytes.
    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }
}
