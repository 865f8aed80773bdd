//! The worker side: the executor that runs batches of sequences through a model on a
//! dedicated thread, and the KV block allocator it serves.
//!
//! - [`blocks`]: fixed-size KV blocks, a free list, and slot arithmetic.
//! - [`executor`]: [`Executor`] runs a [`Step`] (mixed prefill chunks and decode tokens)
//!   on any [`hyserve_kernels::Backend`]; [`ExecutorHandle`] owns it on its own thread.
//! - [`remote`]: the worker as a process of its own: the cluster gRPC service, the gRPC
//!   activation exchange between worker processes, mutual TLS.
//! - [`nccl`]: the exchange between GPUs over NCCL.
//! - [`warm_up`]: the step shapes an executor records before serving.
//! - [`generate`]: a single-sequence driver (prefill in chunks, then decode with a
//!   sampler) used by `hyserve generate` and the benchmarks.

#![forbid(unsafe_code)]

pub mod blocks;
pub mod executor;
pub mod generate;
pub mod nccl;
pub mod remote;
pub mod warm_up;

pub use blocks::{BlockAllocator, BlockTable};
pub use executor::{
    DraftRequest, Executor, ExecutorError, ExecutorHandle, Holders, SeqStep, StageSlot, Staged,
    Step, StepOutput, StepTiming, kv_spec,
};
pub use generate::{GenerateOptions, GenerateOutput, generate};
pub use warm_up::{WarmUp, WarmedUp};
