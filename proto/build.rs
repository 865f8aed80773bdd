//! Compiles the `.proto` files into Rust (prost messages, tonic client and server) at build
//! time, with a vendored `protoc` so that no system protobuf compiler is needed.

const PROTOS: &[&str] = &[
    "hyserve/v1/inference.proto",
    "hyserve/cluster/v1/cluster.proto",
];

/// Messages that carry prompt or generated text: their `Debug` is written by hand in
/// `lib.rs` so that a stray `{:?}` in a log line cannot leak it.
const REDACTED_DEBUG: &[&str] = &[
    "hyserve.v1.GenerateRequest",
    "hyserve.v1.GenerateRequest.input",
    "hyserve.v1.GenerateResponse",
    "hyserve.v1.GenerateStreamResponse",
    "hyserve.v1.Token",
    "hyserve.v1.TopLogprob",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    // An explicit PROTOC (a packager's own compiler) wins over the vendored one. It is handed
    // to prost-build directly because `env::set_var` is `unsafe` in edition 2024 and the
    // workspace forbids `unsafe`.
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    config.skip_debug(REDACTED_DEBUG);
    tonic_prost_build::configure().compile_with_config(config, PROTOS, &["."])?;
    Ok(())
}
