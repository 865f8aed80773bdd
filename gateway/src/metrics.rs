//! The gateway's `/metrics`: request metrics updated as requests run, and engine metrics
//! read from [`Engine::stats`] at scrape time by a custom collector, so counters keep
//! their counter type instead of being gauges that happen to end in `_total`. Names,
//! help and buckets come from the catalogue (`hyserve_telemetry::catalogue`), the one
//! place they are written.

use std::collections::HashMap;
use std::sync::Arc;

use hyserve_coordinator::api::{Engine, EngineStats, HistogramCounts};
use hyserve_telemetry::catalogue::{self as c, MetricDef};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramVec, IntCounter, IntCounterVec, Registry, TextEncoder,
};

/// Engine metrics: (name, help, type, value).
type EngineMetric = (MetricDef, fn(&EngineStats) -> f64);

const ENGINE_METRICS: &[EngineMetric] = &[
    (c::KV_BLOCKS_USED, |s| s.kv_blocks_used as f64),
    (c::KV_BLOCKS_FREE, |s| {
        s.kv_blocks_total.saturating_sub(s.kv_blocks_used) as f64
    }),
    (c::KV_BLOCKS_CAPACITY, |s| s.kv_blocks_total as f64),
    (c::KV_BLOCKS_CACHED, |s| s.kv_blocks_cached as f64),
    (c::REQUESTS_RUNNING, |s| s.running as f64),
    (c::REQUESTS_WAITING, |s| s.waiting as f64),
    (c::REQUESTS_PREEMPTED, |s| s.preempted_waiting as f64),
    (c::PREFIX_CACHE_QUERIES_TOKENS_TOTAL, |s| {
        s.prefix_cache_queries_tokens as f64
    }),
    (c::PREFIX_CACHE_HITS_TOKENS_TOTAL, |s| {
        s.prefix_cache_hit_tokens as f64
    }),
    (c::PREEMPTIONS_TOTAL, |s| s.preempted_total as f64),
    (c::STEPS_TOTAL, |s| s.steps_total as f64),
    (c::STEPS_FAILED_TOTAL, |s| s.steps_failed_total as f64),
    (c::REQUESTS_GIVEN_UP_TOTAL, |s| {
        s.requests_given_up_total as f64
    }),
    (c::STEPS_WARMING_TOTAL, |s| s.steps_warming_total as f64),
    (c::PROMPT_STEPS_TOTAL, |s| s.prompt_steps_total as f64),
    (c::PROMPT_STEP_SECONDS_TOTAL, |s| {
        s.prompt_step_seconds_total
    }),
    (c::SPEC_STEPS_TOTAL, |s| s.spec.steps as f64),
    (c::SCHEDULER_SECONDS_TOTAL, |s| s.scheduler_seconds_total),
    (c::MODEL_SECONDS_TOTAL, |s| s.model_seconds_total),
    (c::WORKER_SECONDS_TOTAL, |s| s.worker_seconds_total),
    (c::FORWARD_SECONDS_TOTAL, |s| s.forward_seconds_total),
    (c::STEP_SECONDS_TOTAL, |s| s.step_seconds_total),
    (c::SPEC_PROPOSED_TOKENS_TOTAL, |s| {
        s.spec.proposed_tokens as f64
    }),
    (c::SPEC_ACCEPTED_TOKENS_TOTAL, |s| {
        s.spec.accepted_tokens as f64
    }),
    (c::SPEC_TIME_SAVED_SECONDS, |s| s.spec.time_saved_seconds),
    (c::SPEC_GUARD_PROBE_STEPS_TOTAL, |s| {
        s.spec.probe_steps as f64
    }),
    (c::SPEC_GUARD_VERDICT_CHANGES_TOTAL, |s| {
        s.spec.verdict_changes as f64
    }),
    (c::SPEC_GUARD_VETOES_TOTAL, |s| s.spec.vetoes as f64),
    (c::SPEC_SEARCHES_SKIPPED_TOTAL, |s| {
        s.spec.searches_skipped as f64
    }),
    (c::WORKERS_ALIVE, |s| s.workers_alive as f64),
    (c::WORKERS_EXPECTED, |s| s.workers_expected as f64),
    (c::PLACEMENT_EPOCH, |s| s.epoch as f64),
    (c::REBALANCES_TOTAL, |s| s.rebalances_total as f64),
];

/// Engine histograms kept as counts: (metric, its counts).
type EngineHistogram = (MetricDef, fn(&EngineStats) -> HistogramCounts);

const ENGINE_HISTOGRAMS: &[EngineHistogram] = &[
    (c::QUEUE_TIME_SECONDS, |s| s.queue_seconds.clone()),
    (c::REBALANCE_DURATION_SECONDS, |s| {
        s.rebalance_seconds.clone()
    }),
];

/// `outcome` label of a request that completed.
pub(crate) const OUTCOME_OK: &str = "ok";
/// `outcome` label of a request whose client went away first.
pub(crate) const OUTCOME_CANCELLED: &str = "cancelled";
/// Every `outcome` label value (the others are `crate::error::outcome`'s).
const OUTCOMES: &[&str] = &[
    OUTCOME_OK,
    OUTCOME_CANCELLED,
    "invalid_request",
    "unauthorized",
    "overloaded",
    "unavailable",
    "internal_error",
];

/// `endpoint` label values.
pub(crate) mod endpoint {
    pub(crate) const COMPLETIONS: &str = "completions";
    pub(crate) const CHAT_COMPLETIONS: &str = "chat_completions";
    pub(crate) const GRPC_GENERATE: &str = "grpc_generate";
    pub(crate) const GRPC_GENERATE_STREAM: &str = "grpc_generate_stream";
    pub(crate) const ALL: &[&str] = &[
        COMPLETIONS,
        CHAT_COMPLETIONS,
        GRPC_GENERATE,
        GRPC_GENERATE_STREAM,
    ];
}

/// The gateway's metrics and the registry that renders them.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    pub(crate) auth_failures: IntCounter,
    request_duration: HistogramVec,
    time_to_first_token: HistogramVec,
    inter_token: HistogramVec,
    pub(crate) prompt_length: Histogram,
    pub(crate) generation_length: Histogram,
    pub(crate) generated_tokens: IntCounter,
    pub(crate) prompt_tokens: IntCounter,
    /// Generation requests being answered (what `/drain` waits for).
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
}

impl Metrics {
    /// The gateway's metrics on `registry` (which may already hold other parts' of the
    /// process, such as in-process workers'), every label combination it knows
    /// present from the start.
    pub(crate) fn new(
        engine: Arc<dyn Engine>,
        registry: Registry,
    ) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(c::REQUESTS_TOTAL.opts(), c::REQUESTS_TOTAL.labels)?;
        let auth_failures = IntCounter::with_opts(c::AUTH_FAILURES_TOTAL.opts())?;
        let per_endpoint = |m: &MetricDef| HistogramVec::new(m.histogram_opts(), m.labels);
        let request_duration = per_endpoint(&c::REQUEST_DURATION_SECONDS)?;
        let time_to_first_token = per_endpoint(&c::TIME_TO_FIRST_TOKEN_SECONDS)?;
        let inter_token = per_endpoint(&c::INTER_TOKEN_LATENCY_SECONDS)?;
        let prompt_length = Histogram::with_opts(c::PROMPT_LENGTH_TOKENS.histogram_opts())?;
        let generation_length = Histogram::with_opts(c::GENERATION_LENGTH_TOKENS.histogram_opts())?;
        let generated_tokens = IntCounter::with_opts(c::GENERATED_TOKENS_TOTAL.opts())?;
        let prompt_tokens = IntCounter::with_opts(c::PROMPT_TOKENS_TOTAL.opts())?;
        for e in endpoint::ALL {
            for o in OUTCOMES {
                requests.with_label_values(&[e, o]);
            }
            request_duration.with_label_values(&[e]);
            time_to_first_token.with_label_values(&[e]);
            inter_token.with_label_values(&[e]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        registry.register(Box::new(inter_token.clone()))?;
        registry.register(Box::new(prompt_length.clone()))?;
        registry.register(Box::new(generation_length.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(EngineStatsCollector::new(engine)?))?;
        Ok(Self {
            registry,
            requests,
            auth_failures,
            request_duration,
            time_to_first_token,
            inter_token,
            prompt_length,
            generation_length,
            generated_tokens,
            prompt_tokens,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
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

    pub(crate) fn inter_token(&self, endpoint: &str) -> Histogram {
        self.inter_token.with_label_values(&[endpoint])
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
        let defs = ENGINE_METRICS
            .iter()
            .map(|(m, _)| m)
            .chain(ENGINE_HISTOGRAMS.iter().map(|(m, _)| m))
            .chain([&c::SPEC_ACCEPTED_LENGTH_TOKENS]);
        let descs = defs
            .map(|m| {
                Desc::new(
                    m.name.to_string(),
                    m.help.to_string(),
                    vec![],
                    HashMap::new(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { engine, descs })
    }
}

fn family(m: &MetricDef, kind: MetricType, metric: proto::Metric) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(m.name.to_string());
    family.set_help(m.help.to_string());
    family.set_field_type(kind);
    family.set_metric(vec![metric]);
    family
}

impl Collector for EngineStatsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.engine.stats();
        let mut families: Vec<MetricFamily> = ENGINE_METRICS
            .iter()
            .map(|(m, value)| {
                let mut metric = proto::Metric::default();
                let kind = if m.kind == c::Kind::Counter {
                    let mut x = proto::Counter::default();
                    x.set_value(value(&stats));
                    metric.set_counter(x);
                    MetricType::COUNTER
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(value(&stats));
                    metric.set_gauge(g);
                    MetricType::GAUGE
                };
                family(m, kind, metric)
            })
            .collect();
        for (m, counts) in ENGINE_HISTOGRAMS {
            families.push(histogram_family(m, &counts(&stats)));
        }
        families.push(accepted_length_histogram(
            &stats.spec.accepted_length_counts,
        ));
        families
    }
}

/// A histogram family from bucket counts.
fn histogram_family(m: &MetricDef, h: &HistogramCounts) -> MetricFamily {
    let mut p = proto::Histogram::default();
    p.set_sample_count(h.count());
    p.set_sample_sum(h.sum);
    // The counts were kept against the catalogue's bounds (`HistogramCounts::new`).
    let mut cumulative = 0;
    let buckets = m
        .buckets
        .iter()
        .enumerate()
        .map(|(i, &le)| {
            cumulative += h.counts.get(i).copied().unwrap_or(0);
            let mut b = proto::Bucket::default();
            b.set_upper_bound(le);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    p.set_bucket(buckets);
    let mut metric = proto::Metric::default();
    metric.set_histogram(p);
    family(m, MetricType::HISTOGRAM, metric)
}

/// The histogram of accepted lengths from per-length counts (index = length).
fn accepted_length_histogram(counts: &[u64]) -> MetricFamily {
    let m = &c::SPEC_ACCEPTED_LENGTH_TOKENS;
    let mut h = proto::Histogram::default();
    let total: u64 = counts.iter().sum();
    let sum: u64 = counts.iter().enumerate().map(|(n, c)| n as u64 * c).sum();
    h.set_sample_count(total);
    h.set_sample_sum(sum as f64);
    let buckets = m
        .buckets
        .iter()
        .map(|&le| {
            let mut b = proto::Bucket::default();
            let below: u64 = counts.iter().take(le as usize + 1).sum();
            b.set_upper_bound(le);
            b.set_cumulative_count(below);
            b
        })
        .collect();
    h.set_bucket(buckets);
    let mut metric = proto::Metric::default();
    metric.set_histogram(h);
    family(m, MetricType::HISTOGRAM, metric)
}
