//! Per-request bookkeeping shared by a request's choices and its response stream: the
//! request metrics (outcome, duration, time to first token, token counts) and the one log
//! line per request.
//!
//! Recorded when the last holder drops the [`Tracker`], so a streaming response is timed to
//! its end and a client that goes away mid-stream is counted as `cancelled`, whatever path
//! the response took.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::metrics::{Metrics, OUTCOME_CANCELLED, OUTCOME_OK};

pub(crate) struct Tracker {
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    pub request_id: String,
    start: Instant,
    first_token_seen: AtomicBool,
    /// When the last token arrived (inter-token latency).
    last_token: Mutex<Option<Instant>>,
    outcome: OnceLock<&'static str>,
    prompt_tokens: AtomicUsize,
    completion_tokens: AtomicUsize,
}

impl Tracker {
    /// A request's tracker; its id is the client's `x-request-id` when that is a
    /// usable one (up to 128 of `[A-Za-z0-9._:-]`), else a new `{id_prefix}-{random}`.
    pub(crate) fn new(
        metrics: &Arc<Metrics>,
        endpoint: &'static str,
        id_prefix: &str,
        client_id: Option<&str>,
    ) -> Arc<Self> {
        metrics.in_flight.fetch_add(1, Ordering::AcqRel);
        Arc::new(Self {
            metrics: Arc::clone(metrics),
            endpoint,
            request_id: client_id.filter(|id| usable_request_id(id)).map_or_else(
                || format!("{id_prefix}-{:032x}", rand::random::<u128>()),
                str::to_string,
            ),
            start: Instant::now(),
            first_token_seen: AtomicBool::new(false),
            last_token: Mutex::new(None),
            outcome: OnceLock::new(),
            prompt_tokens: AtomicUsize::new(0),
            completion_tokens: AtomicUsize::new(0),
        })
    }

    /// The engine took the request: its prompt counts.
    pub(crate) fn prompt_accepted(&self, tokens: usize) {
        self.prompt_tokens.store(tokens, Ordering::Relaxed);
        self.metrics.prompt_tokens.inc_by(tokens as u64);
        self.metrics.prompt_length.observe(tokens as f64);
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
        let now = Instant::now();
        if let Ok(mut last) = self.last_token.lock()
            && let Some(prev) = last.replace(now)
        {
            self.metrics
                .inter_token(self.endpoint)
                .observe((now - prev).as_secs_f64());
        }
    }

    /// How the request ended; the first call wins.
    pub(crate) fn done(&self, outcome: &'static str) {
        let _ = self.outcome.set(outcome);
    }
}

/// The header (HTTP) and metadata key (gRPC) a request id comes in and goes back in.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// A client's request id is kept if it is short and plain (it goes into logs).
fn usable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let outcome = self.outcome.get().copied().unwrap_or(OUTCOME_CANCELLED);
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics.request_done(self.endpoint, outcome, seconds);
        self.metrics.in_flight.fetch_sub(1, Ordering::AcqRel);
        if outcome == OUTCOME_OK {
            self.metrics
                .generation_length
                .observe(self.completion_tokens.load(Ordering::Relaxed) as f64);
        }
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

#[cfg(test)]
mod tests {
    use super::usable_request_id;

    #[test]
    fn only_plain_short_request_ids_are_kept() {
        assert!(usable_request_id("trace-1234:abc_DEF.9"));
        assert!(!usable_request_id(""));
        assert!(!usable_request_id("has space"));
        assert!(!usable_request_id("line\nbreak"));
        assert!(!usable_request_id(&"x".repeat(129)));
    }
}
