//! Tensor kernels for hyserve: the only crate allowed `unsafe`.
//!
//! The model code is written once against the [`Backend`] trait; this crate provides
//! the CPU implementation ([`cpu::CpuBackend`]), which is also the numerical oracle
//! that later device backends are tested against.
//!
//! Layout:
//! - [`numeric`]: bf16/f16 conversions and the rounding points that emulate a bf16 model.
//! - [`weight`]: host weight matrices that borrow memory-mapped checkpoint bytes.
//! - [`backend`]: the [`Backend`] trait (what a device must implement) and its value types.
//! - [`cpu`]: the CPU backend: batch-invariant GEMM over bf16/f16/f32 weights, norms,
//!   RoPE, paged attention, routing, SwiGLU.
//! - `cuda` (feature `cuda`, on by default): the CUDA backend. Kernels are `.cu` files in
//!   `kernels/cuda/`, compiled at start-up by NVRTC; the libraries are loaded at run
//!   time, so the crate builds on machines without CUDA.
//! - [`sampling`]: host-side token sampling (greedy, temperature, top-k/p, min-p, penalties).
//!
//! Batch invariance is a design rule here: every output element of every kernel is
//! computed with a reduction order that depends only on that element's own inputs,
//! never on how many other rows share the call or on the thread count.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mmap;
pub mod numeric;
pub mod sampling;
pub mod weight;

pub use backend::{
    AttnSeq, Backend, KvSpec, LayerLoad, MlpRef, Precision, RecordKey, Routing, ScoreScale,
};
pub use numeric::DType;
pub use weight::{HostMatrix, SharedBytes};
