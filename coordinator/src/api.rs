//! What the fronts (HTTP, gRPC) and the engine say to each other: a request in, a
//! stream of token events out, and a closed set of errors that map once to HTTP
//! status codes, OpenAI error types and gRPC codes.

use std::time::Duration;

use hyserve_kernels::sampling::SamplingParams;
use tokio::sync::mpsc;

/// One sequence to generate (an OpenAI request with `n > 1` is `n` of these).
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Caller-chosen id for logs and metrics (never the prompt).
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Seed used when `sampling.seed` is `None` (the engine picks one if this is too).
    pub max_tokens: usize,
    /// Generation ends after emitting one of these (included in the output).
    pub stop_token_ids: Vec<u32>,
    /// Number of top alternatives to report per token (`None`: no logprobs at all,
    /// `Some(0)`: only the chosen token's logprob).
    pub logprobs: Option<usize>,
    /// Whether the engine may speculate for this request (it decides how much). The
    /// output is the same either way; a client may still opt out, e.g. to keep each
    /// step's latency even.
    pub speculate: bool,
}

/// A candidate token with its log-probability under the model (before sampling filters).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (or, decided by the front, a stop string).
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Cancelled by the client (dropped its stream).
    Cancelled,
}

impl FinishReason {
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts for `usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// What the engine streams back for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenEvent {
    Token {
        id: u32,
        /// The chosen token's logprob, when requested.
        logprob: Option<f32>,
        /// The top alternatives, when requested.
        top: Vec<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(ServeError),
}

/// The closed error class of the serving path.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// The request is invalid; the message names the field.
    #[error("{message}")]
    InvalidRequest { field: String, message: String },
    /// Too many requests queued: retry after the given time.
    #[error("the server is at capacity: {message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    /// The server is starting or shutting down.
    #[error("the server is not ready: {message}")]
    Unavailable { message: String },
    #[error("missing or invalid API key")]
    Unauthorized,
    /// A fault inside the engine (a worker died, ...); the request may be retried.
    #[error("internal error: {message}")]
    Internal { message: String },
}

impl ServeError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ServeError::InvalidRequest {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// HTTP status code.
    pub fn http_status(&self) -> u16 {
        match self {
            ServeError::InvalidRequest { .. } => 400,
            ServeError::Unauthorized => 401,
            ServeError::Overloaded { .. } => 429,
            ServeError::Unavailable { .. } => 503,
            ServeError::Internal { .. } => 500,
        }
    }

    /// OpenAI error `type`.
    pub fn openai_type(&self) -> &'static str {
        match self {
            ServeError::InvalidRequest { .. } => "invalid_request_error",
            ServeError::Unauthorized => "authentication_error",
            ServeError::Overloaded { .. } => "rate_limit_error",
            ServeError::Unavailable { .. } => "service_unavailable",
            ServeError::Internal { .. } => "server_error",
        }
    }

    /// The offending parameter, if any (OpenAI error `param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            ServeError::InvalidRequest { field, .. } => Some(field),
            _ => None,
        }
    }

    /// Seconds for a `Retry-After` header.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ServeError::Overloaded { retry_after, .. } => Some(*retry_after),
            ServeError::Unavailable { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// A submitted request: its events, and cancellation on drop.
///
/// Dropping the stream (a client that disconnects) cancels the sequence and frees its
/// KV blocks at the next step boundary.
pub struct TokenStream {
    pub events: mpsc::Receiver<TokenEvent>,
    /// Prompt tokens of the request, for `usage` on early exits.
    pub prompt_tokens: usize,
    pub(crate) _cancel: CancelOnDrop,
}

/// Runs a cancellation callback when dropped.
pub(crate) struct CancelOnDrop(pub(crate) Option<Box<dyn FnOnce() + Send + Sync>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream")
            .field("prompt_tokens", &self.prompt_tokens)
            .finish()
    }
}

/// Model facts the fronts need for validation and `/v1/models`.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub id: String,
    pub max_context: usize,
    pub vocab_size: usize,
    pub created_unix: u64,
}

/// Engine health for `/health` and `/ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    /// Every worker is alive.
    pub live: bool,
    /// The engine accepts requests and its last step completed recently (forward progress).
    pub ready: bool,
}

/// Engine counters the fronts expose (on `/metrics`) and tests observe.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub preempted_total: u64,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Blocks held only by the prefix cache (reusable, evictable).
    pub kv_blocks_cached: usize,
    pub prefix_cache_queries_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub steps_total: u64,
    /// Steps that failed (a worker died, erred or timed out); their sequences were
    /// requeued and recomputed.
    pub steps_failed_total: u64,
    /// Requests failed because every step they were in failed, too many in a row (a
    /// request that breaks the steps it is in is not retried forever).
    pub requests_given_up_total: u64,
    /// Steps that ran a shape the backend was still recording (CUDA graphs): a steady
    /// rise means recordings are being replaced faster than they are reused.
    pub steps_warming_total: u64,
    pub step_tokens_total: u64,
    /// Steps that computed a prompt chunk (alongside any decodes), and their wall time:
    /// such steps are not decode steps' shape (on a GPU, not recorded as graphs).
    pub prompt_steps_total: u64,
    pub prompt_step_seconds_total: f64,
    /// Wall time spent inside worker forward passes.
    pub model_seconds_total: f64,
    /// Wall time spent in the scheduler itself (planning and post-processing steps).
    pub scheduler_seconds_total: f64,
    /// Of the model time, per step the slowest worker's own time running it (the rest
    /// is messaging: the actors' mailboxes, the executor's queue, gRPC)...
    pub worker_seconds_total: f64,
    /// ...and of that worker's time, the target model's forward pass.
    pub forward_seconds_total: f64,
    /// Of the model time, that worker's step waiting in its executor's queue.
    pub worker_queued_seconds_total: f64,
    /// Steps' wall time, from planning each to applying its results: the time
    /// decoding takes per step, host overheads included.
    pub step_seconds_total: f64,
    /// Speculative decoding: proposals, acceptances, time saved.
    pub spec: crate::scheduler::spec::SpecStats,
    /// Waiting sequences that ran before and were preempted.
    pub preempted_waiting: usize,
    /// Time from submission to a sequence's first admission.
    pub queue_seconds: HistogramCounts,
    pub workers_alive: usize,
    pub workers_expected: usize,
    /// The placement epoch in force (expert parallelism; 0 without).
    pub epoch: u64,
    pub rebalances_total: u64,
    pub rebalance_seconds: HistogramCounts,
}

/// A histogram kept as counts (the engine does not depend on a metrics library; the
/// fronts turn it into their exposition).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramCounts {
    /// Upper bounds of the buckets, rising.
    pub bounds: &'static [f64],
    /// Observations per bucket (not cumulative), one more than `bounds`: the last
    /// counts those above every bound.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl HistogramCounts {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, x: f64) {
        if self.counts.len() != self.bounds.len() + 1 {
            self.counts.resize(self.bounds.len() + 1, 0);
        }
        let i = self.bounds.partition_point(|&b| b < x);
        self.counts[i] += 1;
        self.sum += x;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What a front needs from the engine. Implemented by the actor system
/// (`crate::engine`) and, in the fronts' unit tests, by small fakes.
pub trait Engine: Send + Sync + 'static {
    /// Queues a request; never blocks. A full queue is `ServeError::Overloaded`.
    fn submit(&self, request: GenerateRequest) -> Result<TokenStream, ServeError>;
    fn model_info(&self) -> ModelInfo;
    fn health(&self) -> Health;
    fn stats(&self) -> EngineStats;
}

impl TokenStream {
    /// The next event; `None` once the engine has nothing more to say.
    ///
    /// Use this rather than `events.recv()` inside `async move` blocks: a block that
    /// names only the `events` field captures only that field, and the rest of the
    /// stream (its cancellation guard) is dropped at once, cancelling the request.
    pub async fn recv(&mut self) -> Option<TokenEvent> {
        self.events.recv().await
    }

    /// A stream whose `cancel` runs when it is dropped.
    pub fn new(
        events: mpsc::Receiver<TokenEvent>,
        prompt_tokens: usize,
        cancel: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        Self {
            events,
            prompt_tokens,
            _cancel: CancelOnDrop(Some(Box::new(cancel))),
        }
    }
}
