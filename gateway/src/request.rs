//! Per-request bookkeeping shared by a request's choices and its response stream: the
//! request metrics (outcome, duration, time to first token, token counts) and the one log
//! line per request.
//!
//! Recorded when the last holder drops the [`Tracker`], so a streaming response is timed to
//! its end and a client that goes away mid-stream is counted as `cancelled`, whatever path
//! the response took.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::metrics::{Metrics, OUTCOME_CANCELLED};

pub(crate) struct Tracker {
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    pub request_id: String,
    start: Instant,
    first_token_seen: AtomicBool,
    outcome: OnceLock<&'static str>,
    prompt_tokens: AtomicUsize,
    completion_tokens: AtomicUsize,
}

impl Tracker {
    pub(crate) fn new(
        metrics: &Arc<Metrics>,
        endpoint: &'static str,
        id_prefix: &str,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics: Arc::clone(metrics),
            endpoint,
            request_id: format!("{id_prefix}-{:032x}", rand::random::<u128>()),
            start: Instant::now(),
            first_token_seen: AtomicBool::new(false),
            outcome: OnceLock::new(),
            prompt_tokens: AtomicUsize::new(0),
            completion_tokens: AtomicUsize::new(0),
        })
    }

    /// The engine took the request: its prompt counts.
    pub(crate) fn prompt_accepted(&self, tokens: usize) {
        self.prompt_tokens.store(tokens, Ordering::Relaxed);
        self.metrics.prompt_tokens.inc_by(tokens as u64);
    }

    pub(crate) fn prompt_tokens(&self) -> usize {
        self.prompt_tokens.load(Ordering::Relaxed)
    }

    /// A generated token arrived from the engine (for any choice).
    pub(crate) fn token_arrived(&self) {
        self.completion_tokens.fetch_add(1, Ordering::Relaxed);
        self.metrics.generated_tokens.inc();
        if !self.first_token_seen.swap(true, Ordering::Relaxed) {
            self.metrics
                .time_to_first_token(self.endpoint)
                .observe(self.start.elapsed().as_secs_f64());
        }
    }

    /// How the request ended; the first call wins.
    pub(crate) fn done(&self, outcome: &'static str) {
        let _ = self.outcome.set(outcome);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let outcome = self.outcome.get().copied().unwrap_or(OUTCOME_CANCELLED);
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics.request_done(self.endpoint, outcome, seconds);
        tracing::info!(
            request_id = %self.request_id,
            endpoint = self.endpoint,
            outcome,
            prompt_tokens = self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens = self.completion_tokens.load(Ordering::Relaxed),
            duration_ms = (seconds * 1e3) as u64,
            "request finished"
        );
    }
}
