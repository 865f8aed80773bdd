//! What an operator decides about the gateway: addresses, the served model's name, API keys
//! and the request limits. Separate from the engine's own configuration.

use std::net::SocketAddr;

use crate::auth::ApiKeys;

/// Settings of a [`crate::Gateway`].
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// OpenAI-compatible HTTP API, `/health`, `/ready`, `/metrics`.
    pub http_addr: SocketAddr,
    /// gRPC `hyserve.v1.Inference` and the standard health service.
    pub grpc_addr: SocketAddr,
    /// The model id served by `/v1/models` and the only one accepted in `"model"`.
    pub model_name: String,
    /// `None`: no authentication.
    pub api_keys: Option<ApiKeys>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Longer prompts get 400 (before the model's own context limit is considered).
    pub max_prompt_tokens: usize,
    /// Largest accepted `n` (choices per request).
    pub max_n: usize,
    /// Prompts and generated text are logged only when this is set.
    pub log_prompts: bool,
    /// The registry `/metrics` renders, when other parts of the process (in-process
    /// workers, the build info) already registered on it; a fresh one otherwise.
    pub metrics_registry: Option<prometheus::Registry>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            model_name: "hyserve".to_string(),
            api_keys: None,
            max_body_bytes: 4 << 20,
            max_prompt_tokens: 1 << 20,
            max_n: 16,
            log_prompts: false,
            metrics_registry: None,
        }
    }
}
