//! Every metric hyserve exports, and the only place their names are written.
//!
//! Prometheus conventions: a `hyserve_` prefix, the unit as a suffix (`_seconds`,
//! `_tokens`, `_bytes`, `_ratio`), counters ending in `_total`. Label sets are fixed and
//! bounded: per-expert metrics are summed over layers (16 experts, not 64 x 16 series),
//! and each layer gets one imbalance gauge instead.
//!
//! The gateway registers the request and engine metrics, every worker (in-process or a
//! `hyserve worker` process) the worker metrics; the dashboards (`crate::dashboards`) and
//! the alert rules name only what is here, which a test checks.

use serde::Serialize;

/// A metric's Prometheus type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Who exports a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The coordinator's `/metrics` (`hyserve serve` or `hyserve coordinator`).
    Coordinator,
    /// Every worker: in-process workers on the coordinator's `/metrics`, worker
    /// processes on their own (`hyserve worker --metrics-addr`).
    Worker,
}

/// One metric: name, type, help, labels and, for a histogram, its bucket bounds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MetricDef {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub scope: Scope,
    #[serde(skip_serializing_if = "<[f64]>::is_empty")]
    pub buckets: &'static [f64],
}

/// A gauge (`.counter()` makes it a counter).
const fn def(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    scope: Scope,
) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Gauge,
        help,
        labels,
        scope,
        buckets: &[],
    }
}

const fn histogram(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    scope: Scope,
    buckets: &'static [f64],
) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Histogram,
        help,
        labels,
        scope,
        buckets,
    }
}

use Scope::{Coordinator, Worker};

/// Latency buckets from 1 ms to about 2 minutes.
const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Inter-token and step buckets, 100 us to 5 s.
const STEP: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Length buckets (tokens), 1 to 256K.
const LENGTH: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0, 131072.0, 262144.0,
];
/// Tokens per step, 1 to 16K.
const STEP_TOKENS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 16384.0,
];
/// Accepted proposals per verification (the deepest speculation is 15 tokens).
pub const SPEC_LENGTH_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0];
/// Rebalance durations, 10 ms to 10 minutes.
const REBALANCE: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

// Requests (the gateway).
pub const REQUESTS_TOTAL: MetricDef = def(
    "hyserve_requests_total",
    "Generation requests by endpoint and outcome (ok, cancelled, invalid_request, unauthorized, overloaded, unavailable, internal_error).",
    &["endpoint", "outcome"],
    Coordinator,
)
.counter();
pub const AUTH_FAILURES_TOTAL: MetricDef = def(
    "hyserve_auth_failures_total",
    "Requests refused for a missing or wrong API key (HTTP and gRPC).",
    &[],
    Coordinator,
)
.counter();
pub const REQUEST_DURATION_SECONDS: MetricDef = histogram(
    "hyserve_request_duration_seconds",
    "End-to-end latency: from receiving a generation request to its last byte.",
    &["endpoint"],
    Coordinator,
    LATENCY,
);
pub const TIME_TO_FIRST_TOKEN_SECONDS: MetricDef = histogram(
    "hyserve_time_to_first_token_seconds",
    "Time from receiving a generation request to its first generated token.",
    &["endpoint"],
    Coordinator,
    LATENCY,
);
pub const INTER_TOKEN_LATENCY_SECONDS: MetricDef = histogram(
    "hyserve_inter_token_latency_seconds",
    "Time between consecutive generated tokens of a request, as the gateway receives them.",
    &["endpoint"],
    Coordinator,
    STEP,
);
pub const QUEUE_TIME_SECONDS: MetricDef = histogram(
    "hyserve_queue_time_seconds",
    "Time a sequence waited in the scheduler's queue before its first step.",
    &[],
    Coordinator,
    LATENCY,
);
pub const PROMPT_LENGTH_TOKENS: MetricDef = histogram(
    "hyserve_prompt_length_tokens",
    "Prompt length of accepted requests.",
    &[],
    Coordinator,
    LENGTH,
);
pub const GENERATION_LENGTH_TOKENS: MetricDef = histogram(
    "hyserve_generation_length_tokens",
    "Tokens generated per finished request (all its choices).",
    &[],
    Coordinator,
    LENGTH,
);
pub const PROMPT_TOKENS_TOTAL: MetricDef = def(
    "hyserve_prompt_tokens_total",
    "Prompt tokens of accepted requests.",
    &[],
    Coordinator,
)
.counter();
pub const GENERATED_TOKENS_TOTAL: MetricDef = def(
    "hyserve_generated_tokens_total",
    "Tokens generated for clients.",
    &[],
    Coordinator,
)
.counter();

// The engine (scheduler and KV cache).
pub const REQUESTS_RUNNING: MetricDef = def(
    "hyserve_requests_running",
    "Sequences being generated.",
    &[],
    Coordinator,
);
pub const REQUESTS_WAITING: MetricDef = def(
    "hyserve_requests_waiting",
    "Sequences queued for admission (new or preempted).",
    &[],
    Coordinator,
);
pub const REQUESTS_PREEMPTED: MetricDef = def(
    "hyserve_requests_preempted",
    "Preempted sequences waiting to resume (part of hyserve_requests_waiting).",
    &[],
    Coordinator,
);
pub const PREEMPTIONS_TOTAL: MetricDef = def(
    "hyserve_preemptions_total",
    "Sequences preempted to free KV blocks.",
    &[],
    Coordinator,
)
.counter();
pub const KV_BLOCKS_USED: MetricDef = def(
    "hyserve_kv_blocks_used",
    "KV cache blocks held by sequences or the prefix cache.",
    &[],
    Coordinator,
);
pub const KV_BLOCKS_FREE: MetricDef = def(
    "hyserve_kv_blocks_free",
    "KV cache blocks free for new sequences.",
    &[],
    Coordinator,
);
pub const KV_BLOCKS_CAPACITY: MetricDef = def(
    "hyserve_kv_blocks_capacity",
    "KV cache blocks in the pool.",
    &[],
    Coordinator,
);
pub const KV_BLOCKS_CACHED: MetricDef = def(
    "hyserve_kv_blocks_cached",
    "KV cache blocks held only by the prefix cache (evictable).",
    &[],
    Coordinator,
);
pub const KV_CACHE_BYTES_PER_TOKEN: MetricDef = def(
    "hyserve_kv_cache_bytes_per_token",
    "KV cache bytes one token takes over all layers (cross-layer attention shares a pair's K/V).",
    &[],
    Coordinator,
);
pub const PREFIX_CACHE_QUERIES_TOKENS_TOTAL: MetricDef = def(
    "hyserve_prefix_cache_queries_tokens_total",
    "Prompt tokens looked up in the prefix cache.",
    &[],
    Coordinator,
)
.counter();
pub const PREFIX_CACHE_HITS_TOKENS_TOTAL: MetricDef = def(
    "hyserve_prefix_cache_hits_tokens_total",
    "Prompt tokens found in the prefix cache.",
    &[],
    Coordinator,
)
.counter();
pub const STEPS_TOTAL: MetricDef = def(
    "hyserve_steps_total",
    "Engine steps (batched forward passes) run.",
    &[],
    Coordinator,
)
.counter();
pub const STEPS_FAILED_TOTAL: MetricDef = def(
    "hyserve_steps_failed_total",
    "Engine steps that failed (a worker died, erred or timed out); their sequences were requeued.",
    &[],
    Coordinator,
)
.counter();
pub const REQUESTS_GIVEN_UP_TOTAL: MetricDef = def(
    "hyserve_requests_given_up_total",
    "Requests failed with an internal error: a query of death, in 8 failed steps with no token of its own between.",
    &[],
    Coordinator,
)
.counter();
pub const STEPS_WARMING_TOTAL: MetricDef = def(
    "hyserve_steps_warming_total",
    "Engine steps that ran a batch shape still being recorded as a CUDA graph.",
    &[],
    Coordinator,
)
.counter();
pub const PROMPT_STEPS_TOTAL: MetricDef = def(
    "hyserve_prompt_steps_total",
    "Engine steps that computed a prompt chunk, alone or beside decodes (such steps never speculate).",
    &[],
    Coordinator,
)
.counter();
pub const PROMPT_STEP_SECONDS_TOTAL: MetricDef = def(
    "hyserve_prompt_step_seconds_total",
    "Wall time of the engine steps that computed a prompt chunk.",
    &[],
    Coordinator,
)
.counter();
pub const SCHEDULER_SECONDS_TOTAL: MetricDef = def(
    "hyserve_scheduler_seconds_total",
    "Wall time spent in the scheduler.",
    &[],
    Coordinator,
)
.counter();
pub const MODEL_SECONDS_TOTAL: MetricDef = def(
    "hyserve_model_seconds_total",
    "Wall time from sending a step to the workers to their last reply.",
    &[],
    Coordinator,
)
.counter();
pub const WORKER_SECONDS_TOTAL: MetricDef = def(
    "hyserve_worker_seconds_total",
    "Of the model time: the slowest worker's own time running each step.",
    &[],
    Coordinator,
)
.counter();
pub const FORWARD_SECONDS_TOTAL: MetricDef = def(
    "hyserve_forward_seconds_total",
    "Of the worker time: the target model's forward pass (device work and logits download on a GPU).",
    &[],
    Coordinator,
)
.counter();
pub const STEP_SECONDS_TOTAL: MetricDef = def(
    "hyserve_step_seconds_total",
    "Wall time of engine steps, from planning each to applying its results.",
    &[],
    Coordinator,
)
.counter();

// Speculative decoding.
pub const SPEC_PROPOSED_TOKENS_TOTAL: MetricDef = def(
    "hyserve_spec_proposed_tokens_total",
    "Tokens proposed for speculative verification (prompt lookup or draft model).",
    &[],
    Coordinator,
)
.counter();
pub const SPEC_ACCEPTED_TOKENS_TOTAL: MetricDef = def(
    "hyserve_spec_accepted_tokens_total",
    "Proposed tokens the target model accepted.",
    &[],
    Coordinator,
)
.counter();
pub const SPEC_STEPS_TOTAL: MetricDef = def(
    "hyserve_spec_steps_total",
    "Engine steps that verified speculative proposals.",
    &[],
    Coordinator,
)
.counter();
pub const SPEC_ACCEPTED_LENGTH_TOKENS: MetricDef = histogram(
    "hyserve_spec_accepted_length_tokens",
    "Proposed tokens accepted per speculative verification of one sequence.",
    &[],
    Coordinator,
    SPEC_LENGTH_BUCKETS,
);
pub const SPEC_TIME_SAVED_SECONDS: MetricDef = def(
    "hyserve_spec_time_saved_seconds",
    "Estimated decode time speculation saved so far (negative: it cost time).",
    &[],
    Coordinator,
);
pub const SPEC_GUARD_PROBE_STEPS_TOTAL: MetricDef = def(
    "hyserve_spec_guard_probe_steps_total",
    "Decode steps the speculation guard ran against its verdict at their batch size, to measure the other arm (probes).",
    &[],
    Coordinator,
)
.counter();
pub const SPEC_GUARD_VERDICT_CHANGES_TOTAL: MetricDef = def(
    "hyserve_spec_guard_verdict_changes_total",
    "Times the speculation guard's measured verdict at a batch size turned over (one that keeps turning is measuring noise).",
    &[],
    Coordinator,
)
.counter();
pub const SPEC_SEARCHES_SKIPPED_TOTAL: MetricDef = def(
    "hyserve_spec_searches_skipped_total",
    "Decode steps allowed to speculate whose prompt-lookup search was skipped: the planner would have verified nothing whatever it found.",
    &[],
    Coordinator,
)
.counter();
pub const SPEC_GUARD_VETOES_TOTAL: MetricDef = def(
    "hyserve_spec_guard_vetoes_total",
    "Of those turns, the ones to plain decoding because speculation's steps, all counted, took longer than plain decoding would have.",
    &[],
    Coordinator,
)
.counter();

// The cluster.
pub const WORKERS_ALIVE: MetricDef = def(
    "hyserve_workers_alive",
    "Workers alive (in-process workers, or worker processes answering).",
    &[],
    Coordinator,
);
pub const WORKERS_EXPECTED: MetricDef = def(
    "hyserve_workers_expected",
    "Workers the engine runs with.",
    &[],
    Coordinator,
);
pub const PLACEMENT_EPOCH: MetricDef = def(
    "hyserve_placement_epoch",
    "The expert placement epoch in force (rises with each rebalance; 0 without expert parallelism).",
    &[],
    Coordinator,
);
pub const REBALANCES_TOTAL: MetricDef = def(
    "hyserve_rebalances_total",
    "Expert placements replaced from observed load.",
    &[],
    Coordinator,
)
.counter();
pub const REBALANCE_DURATION_SECONDS: MetricDef = histogram(
    "hyserve_rebalance_duration_seconds",
    "Time to move experts to a new placement (staging, switch).",
    &[],
    Coordinator,
    REBALANCE,
);
pub const BUILD_INFO: MetricDef = def(
    "hyserve_build_info",
    "Always 1: the running build's version, git revision and device.",
    &["version", "revision", "device"],
    Coordinator,
);

// Workers.
pub const WORKER_STEP_DURATION_SECONDS: MetricDef = histogram(
    "hyserve_worker_step_duration_seconds",
    "Wall time of one worker's step (draft rounds, forward pass, exchanges).",
    &["worker"],
    Worker,
    STEP,
);
pub const WORKER_STEP_TOKENS: MetricDef = histogram(
    "hyserve_worker_step_tokens",
    "Tokens one worker's step computed (its own sequences' rows, proposals included).",
    &["worker"],
    Worker,
    STEP_TOKENS,
);
pub const EXPERT_ROUTED_TOKENS_TOTAL: MetricDef = def(
    "hyserve_expert_routed_tokens_total",
    "Token rows routed to each expert, summed over layers (on the worker that routed them).",
    &["expert"],
    Worker,
)
.counter();
pub const EXPERT_LOAD_IMBALANCE_RATIO: MetricDef = def(
    "hyserve_expert_load_imbalance_ratio",
    "Per layer: the busiest expert's routed rows over the mean expert's, over the last ~64 steps (1 is even).",
    &["layer"],
    Worker,
);
pub const ALL_TO_ALL_BYTES_TOTAL: MetricDef = def(
    "hyserve_all_to_all_bytes_total",
    "Bytes of activation rows a worker sent to its peers (expert dispatch and combine).",
    &["worker"],
    Worker,
)
.counter();
pub const ALL_TO_ALL_SECONDS_TOTAL: MetricDef = def(
    "hyserve_all_to_all_seconds_total",
    "Wall time a worker spent sending rows to and waiting for its peers.",
    &["worker"],
    Worker,
)
.counter();

impl MetricDef {
    const fn counter(self) -> Self {
        Self {
            kind: Kind::Counter,
            ..self
        }
    }

    /// The prometheus options of this metric.
    pub fn opts(&self) -> prometheus::Opts {
        prometheus::Opts::new(self.name, self.help)
    }

    /// The histogram options of this metric, with its buckets.
    pub fn histogram_opts(&self) -> prometheus::HistogramOpts {
        prometheus::HistogramOpts::new(self.name, self.help).buckets(self.buckets.to_vec())
    }
}

/// Every metric, in the order `/metrics` lists them.
pub const ALL: &[MetricDef] = &[
    REQUESTS_TOTAL,
    AUTH_FAILURES_TOTAL,
    REQUEST_DURATION_SECONDS,
    TIME_TO_FIRST_TOKEN_SECONDS,
    INTER_TOKEN_LATENCY_SECONDS,
    QUEUE_TIME_SECONDS,
    PROMPT_LENGTH_TOKENS,
    GENERATION_LENGTH_TOKENS,
    PROMPT_TOKENS_TOTAL,
    GENERATED_TOKENS_TOTAL,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    REQUESTS_PREEMPTED,
    PREEMPTIONS_TOTAL,
    KV_BLOCKS_USED,
    KV_BLOCKS_FREE,
    KV_BLOCKS_CAPACITY,
    KV_BLOCKS_CACHED,
    KV_CACHE_BYTES_PER_TOKEN,
    PREFIX_CACHE_QUERIES_TOKENS_TOTAL,
    PREFIX_CACHE_HITS_TOKENS_TOTAL,
    STEPS_TOTAL,
    STEPS_FAILED_TOTAL,
    REQUESTS_GIVEN_UP_TOTAL,
    STEPS_WARMING_TOTAL,
    PROMPT_STEPS_TOTAL,
    PROMPT_STEP_SECONDS_TOTAL,
    SCHEDULER_SECONDS_TOTAL,
    MODEL_SECONDS_TOTAL,
    WORKER_SECONDS_TOTAL,
    FORWARD_SECONDS_TOTAL,
    STEP_SECONDS_TOTAL,
    SPEC_PROPOSED_TOKENS_TOTAL,
    SPEC_ACCEPTED_TOKENS_TOTAL,
    SPEC_STEPS_TOTAL,
    SPEC_ACCEPTED_LENGTH_TOKENS,
    SPEC_TIME_SAVED_SECONDS,
    SPEC_GUARD_PROBE_STEPS_TOTAL,
    SPEC_GUARD_VERDICT_CHANGES_TOTAL,
    SPEC_GUARD_VETOES_TOTAL,
    SPEC_SEARCHES_SKIPPED_TOTAL,
    WORKERS_ALIVE,
    WORKERS_EXPECTED,
    PLACEMENT_EPOCH,
    REBALANCES_TOTAL,
    REBALANCE_DURATION_SECONDS,
    BUILD_INFO,
    WORKER_STEP_DURATION_SECONDS,
    WORKER_STEP_TOKENS,
    EXPERT_ROUTED_TOKENS_TOTAL,
    EXPERT_LOAD_IMBALANCE_RATIO,
    ALL_TO_ALL_BYTES_TOTAL,
    ALL_TO_ALL_SECONDS_TOTAL,
];

/// The metric of this name.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    ALL.iter().find(|m| m.name == name)
}

/// The catalogue metric a series name belongs to: itself, or a histogram's
/// `_bucket`/`_sum`/`_count` series.
pub fn metric_of_series(series: &str) -> Option<&'static MetricDef> {
    find(series).or_else(|| {
        ["_bucket", "_sum", "_count"].iter().find_map(|s| {
            series
                .strip_suffix(s)
                .and_then(find)
                .filter(|m| m.kind == Kind::Histogram)
        })
    })
}

/// The catalogue as a Markdown table (what `docs/deploy.md` shows, checked by a test).
pub fn markdown_table() -> String {
    let mut out =
        String::from("| metric | type | labels | exported by | meaning |\n|---|---|---|---|---|\n");
    for m in ALL {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let scope = match m.scope {
            Scope::Coordinator => "coordinator",
            Scope::Worker => "worker",
        };
        let labels = if m.labels.is_empty() {
            "-".to_string()
        } else {
            m.labels.join(", ")
        };
        out += &format!(
            "| `{}` | {kind} | {labels} | {scope} | {} |\n",
            m.name,
            m.help.replace('|', "/")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deploy guide lists the catalogue as it is: run
    /// `cargo run -- metrics-catalogue --markdown` and paste it after changing a metric.
    #[test]
    fn the_deploy_guide_shows_the_catalogue() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        assert!(
            doc.contains(&markdown_table()),
            "{}: the metric table is stale (cargo run -- metrics-catalogue --markdown)",
            path.display()
        );
    }

    #[test]
    fn names_follow_the_conventions_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("hyserve_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                _ => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            let unit = [
                "_seconds",
                "_tokens",
                "_bytes",
                "_ratio",
                "_total",
                "_blocks",
                "_info",
                "_token",
                "_epoch",
                "_running",
                "_waiting",
                "_preempted",
                "_used",
                "_free",
                "_cached",
                "_alive",
                "_expected",
                "_capacity",
            ];
            assert!(
                unit.iter().any(|u| m.name.ends_with(u)),
                "{} has no unit or kind suffix",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Histogram,
                !m.buckets.is_empty(),
                "{}: buckets only for histograms",
                m.name
            );
            assert!(
                m.buckets.windows(2).all(|w| w[0] < w[1]),
                "{}: buckets rise",
                m.name
            );
            assert!(!m.help.is_empty());
        }
    }

    #[test]
    fn histogram_series_map_to_their_metric() {
        assert_eq!(
            metric_of_series("hyserve_queue_time_seconds_bucket").map(|m| m.name),
            Some("hyserve_queue_time_seconds")
        );
        assert_eq!(
            metric_of_series("hyserve_steps_total").map(|m| m.name),
            Some("hyserve_steps_total")
        );
        // A counter has no _count series.
        assert!(metric_of_series("hyserve_steps_total_count").is_none());
        assert!(metric_of_series("hyserve_nonexistent").is_none());
    }
}
