//! Every metric the gateway exposes on `/metrics`, and the only place their names are
//! written: `hyserve_` prefix, units as suffixes (`_seconds`, `_tokens`, `_total`).
//!
//! Request metrics are updated as requests run; engine metrics are read from
//! [`Engine::stats`] at scrape time by a custom collector, so counters keep their counter
//! type instead of being gauges that happen to end in `_total`.

use std::collections::HashMap;
use std::sync::Arc;

use hyserve_coordinator::api::{Engine, EngineStats};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

pub(crate) const REQUESTS_TOTAL: &str = "hyserve_requests_total";
pub(crate) const AUTH_FAILURES_TOTAL: &str = "hyserve_auth_failures_total";
pub(crate) const REQUEST_DURATION_SECONDS: &str = "hyserve_request_duration_seconds";
pub(crate) const TIME_TO_FIRST_TOKEN_SECONDS: &str = "hyserve_time_to_first_token_seconds";
pub(crate) const GENERATED_TOKENS_TOTAL: &str = "hyserve_generated_tokens_total";
pub(crate) const PROMPT_TOKENS_TOTAL: &str = "hyserve_prompt_tokens_total";

/// Engine metrics: (name, help, type, value).
type EngineMetric = (
    &'static str,
    &'static str,
    MetricType,
    fn(&EngineStats) -> f64,
);

const ENGINE_METRICS: &[EngineMetric] = &[
    (
        "hyserve_kv_blocks_used",
        "KV cache blocks held by sequences or the prefix cache.",
        MetricType::GAUGE,
        |s| s.kv_blocks_used as f64,
    ),
    (
        "hyserve_kv_blocks_total",
        "KV cache blocks in the pool.",
        MetricType::GAUGE,
        |s| s.kv_blocks_total as f64,
    ),
    (
        "hyserve_kv_blocks_cached",
        "KV cache blocks held only by the prefix cache (evictable).",
        MetricType::GAUGE,
        |s| s.kv_blocks_cached as f64,
    ),
    (
        "hyserve_requests_running",
        "Sequences being generated.",
        MetricType::GAUGE,
        |s| s.running as f64,
    ),
    (
        "hyserve_requests_waiting",
        "Sequences queued for admission.",
        MetricType::GAUGE,
        |s| s.waiting as f64,
    ),
    (
        "hyserve_prefix_cache_queries_tokens_total",
        "Prompt tokens looked up in the prefix cache.",
        MetricType::COUNTER,
        |s| s.prefix_cache_queries_tokens as f64,
    ),
    (
        "hyserve_prefix_cache_hits_tokens_total",
        "Prompt tokens found in the prefix cache.",
        MetricType::COUNTER,
        |s| s.prefix_cache_hit_tokens as f64,
    ),
    (
        "hyserve_preemptions_total",
        "Sequences preempted to free KV blocks.",
        MetricType::COUNTER,
        |s| s.preempted_total as f64,
    ),
    (
        "hyserve_steps_total",
        "Engine steps (batched forward passes) run.",
        MetricType::COUNTER,
        |s| s.steps_total as f64,
    ),
    (
        "hyserve_steps_warming_total",
        "Engine steps that ran a batch shape still being recorded as a CUDA graph.",
        MetricType::COUNTER,
        |s| s.steps_warming_total as f64,
    ),
    (
        "hyserve_spec_steps_total",
        "Engine steps that verified speculative proposals.",
        MetricType::COUNTER,
        |s| s.spec.steps as f64,
    ),
    (
        "hyserve_scheduler_seconds_total",
        "Wall time spent in the scheduler.",
        MetricType::COUNTER,
        |s| s.scheduler_seconds_total,
    ),
    (
        "hyserve_model_seconds_total",
        "Wall time spent in model forward passes.",
        MetricType::COUNTER,
        |s| s.model_seconds_total,
    ),
    (
        "hyserve_spec_proposed_tokens_total",
        "Tokens proposed for speculative verification (prompt lookup or draft model).",
        MetricType::COUNTER,
        |s| s.spec.proposed_tokens as f64,
    ),
    (
        "hyserve_spec_accepted_tokens_total",
        "Proposed tokens the target model accepted.",
        MetricType::COUNTER,
        |s| s.spec.accepted_tokens as f64,
    ),
    (
        "hyserve_spec_time_saved_seconds",
        "Estimated decode time speculation saved so far (negative: it cost time).",
        MetricType::GAUGE,
        |s| s.spec.time_saved_seconds,
    ),
];

/// Accepted proposals per verified sequence-step, as a histogram.
const SPEC_ACCEPTED_LENGTH: &str = "hyserve_spec_accepted_length_tokens";
/// Its buckets' upper bounds (the deepest speculation is 15 tokens).
const SPEC_LENGTH_BUCKETS: &[u64] = &[0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15];

/// `outcome` label of a request that completed.
pub(crate) const OUTCOME_OK: &str = "ok";
/// `outcome` label of a request whose client went away first.
pub(crate) const OUTCOME_CANCELLED: &str = "cancelled";

/// `endpoint` label values.
pub(crate) mod endpoint {
    pub(crate) const COMPLETIONS: &str = "completions";
    pub(crate) const CHAT_COMPLETIONS: &str = "chat_completions";
    pub(crate) const GRPC_GENERATE: &str = "grpc_generate";
    pub(crate) const GRPC_GENERATE_STREAM: &str = "grpc_generate_stream";
}

/// The gateway's metrics and the registry that renders them.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    pub(crate) auth_failures: IntCounter,
    request_duration: HistogramVec,
    time_to_first_token: HistogramVec,
    pub(crate) generated_tokens: IntCounter,
    pub(crate) prompt_tokens: IntCounter,
}

impl Metrics {
    pub(crate) fn new(engine: Arc<dyn Engine>) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS_TOTAL,
                "Generation requests by endpoint and outcome.",
            ),
            &["endpoint", "outcome"],
        )?;
        let auth_failures = IntCounter::new(
            AUTH_FAILURES_TOTAL,
            "Requests refused for a missing or wrong API key (HTTP and gRPC).",
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                REQUEST_DURATION_SECONDS,
                "Time from receiving a generation request to its last byte.",
            )
            .buckets(prometheus::exponential_buckets(0.01, 2.0, 15)?),
            &["endpoint"],
        )?;
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                TIME_TO_FIRST_TOKEN_SECONDS,
                "Time from receiving a generation request to its first generated token.",
            )
            .buckets(prometheus::exponential_buckets(0.005, 2.0, 15)?),
            &["endpoint"],
        )?;
        let generated_tokens =
            IntCounter::new(GENERATED_TOKENS_TOTAL, "Tokens generated for clients.")?;
        let prompt_tokens = IntCounter::new(PROMPT_TOKENS_TOTAL, "Prompt tokens of requests.")?;

        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(EngineStatsCollector::new(engine)?))?;
        Ok(Self {
            registry,
            requests,
            auth_failures,
            request_duration,
            time_to_first_token,
            generated_tokens,
            prompt_tokens,
        })
    }

    /// Counts a finished request and its duration.
    pub(crate) fn request_done(&self, endpoint: &str, outcome: &str, seconds: f64) {
        self.requests.with_label_values(&[endpoint, outcome]).inc();
        self.request_duration
            .with_label_values(&[endpoint])
            .observe(seconds);
    }

    pub(crate) fn time_to_first_token(&self, endpoint: &str) -> Histogram {
        self.time_to_first_token.with_label_values(&[endpoint])
    }

    /// The text exposition format (what `/metrics` returns).
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on malformed families, which the registry refuses
        // at registration; an empty page is the safe answer if it ever happens.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Reads [`EngineStats`] at scrape time.
struct EngineStatsCollector {
    engine: Arc<dyn Engine>,
    descs: Vec<Desc>,
}

impl EngineStatsCollector {
    fn new(engine: Arc<dyn Engine>) -> Result<Self, prometheus::Error> {
        let mut descs: Vec<Desc> = ENGINE_METRICS
            .iter()
            .map(|(name, help, _, _)| {
                Desc::new(name.to_string(), help.to_string(), vec![], HashMap::new())
            })
            .collect::<Result<_, _>>()?;
        descs.push(Desc::new(
            SPEC_ACCEPTED_LENGTH.to_string(),
            SPEC_LENGTH_HELP.to_string(),
            vec![],
            HashMap::new(),
        )?);
        Ok(Self { engine, descs })
    }
}

impl Collector for EngineStatsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.engine.stats();
        let mut families: Vec<MetricFamily> = ENGINE_METRICS
            .iter()
            .map(|&(name, help, kind, value)| {
                let mut metric = proto::Metric::default();
                if kind == MetricType::COUNTER {
                    let mut c = proto::Counter::default();
                    c.set_value(value(&stats));
                    metric.set_counter(c);
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(value(&stats));
                    metric.set_gauge(g);
                }
                let mut family = MetricFamily::default();
                family.set_name(name.to_string());
                family.set_help(help.to_string());
                family.set_field_type(kind);
                family.set_metric(vec![metric]);
                family
            })
            .collect();
        families.push(accepted_length_histogram(
            &stats.spec.accepted_length_counts,
        ));
        families
    }
}

const SPEC_LENGTH_HELP: &str =
    "Proposed tokens accepted per speculative verification of one sequence.";

/// The histogram of accepted lengths from per-length counts (index = length).
fn accepted_length_histogram(counts: &[u64]) -> MetricFamily {
    let mut h = proto::Histogram::default();
    let total: u64 = counts.iter().sum();
    let sum: u64 = counts.iter().enumerate().map(|(n, c)| n as u64 * c).sum();
    h.set_sample_count(total);
    h.set_sample_sum(sum as f64);
    let buckets = SPEC_LENGTH_BUCKETS
        .iter()
        .map(|&le| {
            let mut b = proto::Bucket::default();
            let below: u64 = counts.iter().take(le as usize + 1).sum();
            b.set_upper_bound(le as f64);
            b.set_cumulative_count(below);
            b
        })
        .collect();
    h.set_bucket(buckets);
    let mut metric = proto::Metric::default();
    metric.set_histogram(h);
    let mut family = MetricFamily::default();
    family.set_name(SPEC_ACCEPTED_LENGTH.to_string());
    family.set_help(SPEC_LENGTH_HELP.to_string());
    family.set_field_type(MetricType::HISTOGRAM);
    family.set_metric(vec![metric]);
    family
}
