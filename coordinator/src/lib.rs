//! The coordinator: scheduling (continuous batching, KV block accounting) and expert
//! placement, as plain tested code under thin ractor actors.
//!
//! The engine core (kernels, model, worker executor) comes first; the scheduler and
//! the placement planner build on [`hyserve_worker::Executor`]'s step interface.

#![forbid(unsafe_code)]

pub use hyserve_worker::{SeqStep, Step, StepOutput};
