//! Wire types of hyserve: the only crate that defines what crosses a process boundary.
//!
//! The gRPC services (inference API, coordinator-worker control, activation exchange)
//! are defined here as `.proto` files compiled with tonic/prost when the server lands;
//! until then this crate only fixes the protocol version every process reports.

#![forbid(unsafe_code)]

/// Version of the hyserve wire protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
