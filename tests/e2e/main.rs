//! End-to-end tests of the `hyserve` binary: they run the real executable the way a
//! user or the fidelity scripts do, and check what it prints and writes.

mod cli;
mod cluster;
mod fidelity;
mod grpc;
mod python;
mod support;
