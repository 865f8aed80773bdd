//! The gateway of hyserve: the OpenAI-compatible HTTP API and the `hyserve.v1` gRPC API in
//! front of an [`Engine`](hyserve_coordinator::api::Engine).
//!
//! - `server`: [`Gateway`], the state both fronts share, serving them with one shutdown.
//! - `config`: [`GatewayConfig`], what an operator decides.
//! - `auth`: [`ApiKeys`], hashed keys checked in constant time by both fronts.
//! - `http`: the OpenAI routes, probes and `/metrics`; `http::json` reads bodies into
//!   field-naming errors, `http::openai` is the wire format, `http::generate` the two
//!   generation endpoints.
//! - `grpc`: the `Inference` service and the standard health service.
//! - `plan`: request options (from either front) checked and turned into engine requests.
//! - `choice`: one engine sequence as client-visible text, tokens and a finish.
//! - `detok`: incremental detokenization and stop strings.
//! - `request`: per-request metrics and the request log line.
//! - `error`: the one mapping of errors to HTTP, OpenAI and gRPC answers.
//! - `metrics`: every metric name, and the registry behind `/metrics`.

#![forbid(unsafe_code)]

mod auth;
mod choice;
mod config;
mod detok;
mod error;
mod grpc;
mod http;
mod metrics;
mod plan;
mod request;
mod server;

pub use auth::{ApiKeys, ApiKeysError};
pub use config::GatewayConfig;
pub use server::{DRAIN_TIMEOUT, Gateway, GatewayError};
