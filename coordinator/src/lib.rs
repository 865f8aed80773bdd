//! The coordinator: the serving API types, the scheduler (continuous batching, KV
//! block accounting, prefix caching) as plain tested code, and the ractor actors that
//! run it against worker executors.
//!
//! - [`api`]: requests, token events and the closed error class the fronts map.
//! - [`scheduler`]: the plain, synchronous scheduler: batching, KV blocks, prefix cache,
//!   preemption and sampling.
//! - [`placement`]: the expert placement planner (plain code): which worker holds which
//!   expert, dense-part layout, replicas for hot experts, KV room.
//! - [`membership`]: worker registration and discovery through etcd leases and watches.
//! - [`cluster`]: the coordinator of worker processes: discovery, placement, assignment,
//!   the gRPC links the engine steps through, rebalancing by placement epochs.

#![forbid(unsafe_code)]

pub mod api;
pub mod cluster;
pub mod engine;
pub mod membership;
pub mod placement;
pub mod scheduler;

pub use hyserve_worker::{SeqStep, Step, StepOutput};
