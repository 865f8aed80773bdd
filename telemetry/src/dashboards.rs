//! The Grafana dashboards, built from the catalogue's names so that a renamed metric
//! cannot leave a dashboard behind: `hyserve dashboards --out deploy/grafana` writes
//! them, and a test checks the committed files are what this module builds.

use serde_json::{Value, json};

use crate::catalogue::{self as c, MetricDef};

/// A dashboard: its file stem and JSON.
pub struct Dashboard {
    pub file: &'static str,
    pub json: Value,
}

/// One query of a panel: PromQL and its legend.
struct Query {
    expr: String,
    legend: &'static str,
}

fn q(expr: String, legend: &'static str) -> Query {
    Query { expr, legend }
}

/// `rate(metric[$__rate_interval])`, summed without the given labels' split.
fn rate(m: &MetricDef) -> String {
    format!("rate({}[$__rate_interval])", m.name)
}

/// The rate of `parts[0]` less the others' as a share of `whole`'s rate (0 while
/// `whole` does not move).
fn share(parts: &[&MetricDef], whole: &MetricDef) -> String {
    let sums: Vec<String> = parts.iter().map(|m| format!("sum({})", rate(m))).collect();
    let part = match sums.as_slice() {
        [one] => one.clone(),
        _ => format!("({})", sums.join(" - ")),
    };
    format!("{part} / clamp_min(sum({}), 1e-9)", rate(whole))
}

/// The `p` quantile of a histogram over all its series (or split `by`).
fn quantile(m: &MetricDef, p: f64, by: &str) -> String {
    let by = if by.is_empty() {
        "le".to_string()
    } else {
        format!("le, {by}")
    };
    format!(
        "histogram_quantile({p}, sum by ({by}) (rate({}_bucket[$__rate_interval])))",
        m.name
    )
}

/// A histogram's mean over the interval.
fn mean(m: &MetricDef, by: &str) -> String {
    let by = if by.is_empty() {
        String::new()
    } else {
        format!(" by ({by})")
    };
    format!(
        "sum{by} (rate({n}_sum[$__rate_interval])) / sum{by} (rate({n}_count[$__rate_interval]))",
        n = m.name
    )
}

struct Layout {
    next_id: u64,
    x: u64,
    y: u64,
}

impl Layout {
    fn new() -> Self {
        Self {
            next_id: 1,
            x: 0,
            y: 0,
        }
    }

    /// A panel of `w` x `h` grid cells, placed left to right, wrapping at 24.
    fn panel(
        &mut self,
        kind: &str,
        title: &str,
        unit: &str,
        w: u64,
        h: u64,
        qs: Vec<Query>,
    ) -> Value {
        if self.x + w > 24 {
            self.x = 0;
            self.y += h;
        }
        let targets: Vec<Value> = qs
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let mut t = json!({
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "expr": q.expr,
                    "legendFormat": q.legend,
                    "refId": ((b'A' + i as u8) as char).to_string(),
                });
                if kind == "heatmap" {
                    t["format"] = json!("heatmap");
                }
                t
            })
            .collect();
        let mut p = json!({
            "id": self.next_id,
            "type": kind,
            "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": targets,
        });
        if kind == "heatmap" {
            p["options"] = json!({
                "calculate": false,
                "yAxis": {"axisLabel": "expert"},
                "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange"},
                "cellGap": 1,
            });
        }
        self.next_id += 1;
        self.x += w;
        p
    }
}

fn dashboard(uid: &str, title: &str, tags: &[&str], panels: Vec<Value>, worker_var: bool) -> Value {
    let mut templating = vec![json!({
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    })];
    if worker_var {
        templating.push(json!({
            "name": "worker",
            "label": "Worker",
            "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {
                "query": format!("label_values({}_count, worker)", c::WORKER_STEP_DURATION_SECONDS.name),
                "refId": "worker",
            },
            "definition": format!("label_values({}_count, worker)", c::WORKER_STEP_DURATION_SECONDS.name),
            "includeAll": true,
            "allValue": ".*",
            "multi": true,
            "current": {"text": "All", "value": "$__all"},
            "refresh": 2,
            "hide": 0,
        }));
    }
    json!({
        "uid": uid,
        "title": title,
        "tags": tags,
        "editable": true,
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "",
        "templating": {"list": templating},
        "annotations": {"list": []},
        "panels": panels,
    })
}

fn overview() -> Value {
    let mut l = Layout::new();
    let panels = vec![
        l.panel(
            "timeseries",
            "Requests per second by outcome",
            "reqps",
            12,
            8,
            vec![q(
                format!("sum by (outcome) ({})", rate(&c::REQUESTS_TOTAL)),
                "{{outcome}}",
            )],
        ),
        l.panel(
            "timeseries",
            "Generated tokens per second",
            "short",
            12,
            8,
            vec![
                q(
                    format!("sum({})", rate(&c::GENERATED_TOKENS_TOTAL)),
                    "generated",
                ),
                q(format!("sum({})", rate(&c::PROMPT_TOKENS_TOTAL)), "prompt"),
            ],
        ),
        l.panel(
            "timeseries",
            "Time to first token",
            "s",
            12,
            8,
            vec![
                q(quantile(&c::TIME_TO_FIRST_TOKEN_SECONDS, 0.5, ""), "p50"),
                q(quantile(&c::TIME_TO_FIRST_TOKEN_SECONDS, 0.95, ""), "p95"),
            ],
        ),
        l.panel(
            "timeseries",
            "Inter-token latency",
            "s",
            12,
            8,
            vec![
                q(quantile(&c::INTER_TOKEN_LATENCY_SECONDS, 0.5, ""), "p50"),
                q(quantile(&c::INTER_TOKEN_LATENCY_SECONDS, 0.95, ""), "p95"),
            ],
        ),
        l.panel(
            "timeseries",
            "Sequences",
            "short",
            12,
            8,
            vec![
                q(format!("sum({})", c::REQUESTS_RUNNING.name), "running"),
                q(format!("sum({})", c::REQUESTS_WAITING.name), "waiting"),
                q(format!("sum({})", c::REQUESTS_PREEMPTED.name), "preempted"),
            ],
        ),
        l.panel(
            "timeseries",
            "KV cache use",
            "percentunit",
            12,
            8,
            vec![
                q(
                    format!(
                        "sum({}) / sum({})",
                        c::KV_BLOCKS_USED.name,
                        c::KV_BLOCKS_CAPACITY.name
                    ),
                    "used",
                ),
                q(
                    format!(
                        "sum({}) / sum({})",
                        c::KV_BLOCKS_CACHED.name,
                        c::KV_BLOCKS_CAPACITY.name
                    ),
                    "prefix cache only",
                ),
            ],
        ),
        l.panel(
            "timeseries",
            "Prefix cache hit rate",
            "percentunit",
            8,
            8,
            vec![q(
                format!(
                    "sum({}) / clamp_min(sum({}), 1)",
                    rate(&c::PREFIX_CACHE_HITS_TOKENS_TOTAL),
                    rate(&c::PREFIX_CACHE_QUERIES_TOKENS_TOTAL)
                ),
                "hits",
            )],
        ),
        l.panel(
            "timeseries",
            "Speculation: acceptance",
            "percentunit",
            8,
            8,
            vec![q(
                format!(
                    "sum({}) / clamp_min(sum({}), 1)",
                    rate(&c::SPEC_ACCEPTED_TOKENS_TOTAL),
                    rate(&c::SPEC_PROPOSED_TOKENS_TOTAL)
                ),
                "accepted / proposed",
            )],
        ),
        l.panel(
            "stat",
            "Workers alive / expected",
            "short",
            8,
            8,
            vec![
                q(format!("sum({})", c::WORKERS_ALIVE.name), "alive"),
                q(format!("sum({})", c::WORKERS_EXPECTED.name), "expected"),
            ],
        ),
        l.panel(
            "timeseries",
            "Failed steps (their sequences recomputed) and requests given up",
            "ops",
            8,
            8,
            vec![
                q(format!("sum({})", rate(&c::STEPS_FAILED_TOTAL)), "failed"),
                q(
                    format!("sum({})", rate(&c::REQUESTS_GIVEN_UP_TOTAL)),
                    "given up",
                ),
            ],
        ),
    ];
    dashboard(
        "hyserve-overview",
        "hyserve / Overview",
        &["hyserve"],
        panels,
        false,
    )
}

fn latency() -> Value {
    let mut l = Layout::new();
    let per_endpoint = |m: &MetricDef, title: &str, l: &mut Layout| {
        l.panel(
            "timeseries",
            title,
            "s",
            12,
            8,
            vec![
                q(quantile(m, 0.5, "endpoint"), "{{endpoint}} p50"),
                q(quantile(m, 0.95, "endpoint"), "{{endpoint}} p95"),
                q(quantile(m, 0.99, "endpoint"), "{{endpoint}} p99"),
            ],
        )
    };
    let panels = vec![
        per_endpoint(
            &c::TIME_TO_FIRST_TOKEN_SECONDS,
            "Time to first token",
            &mut l,
        ),
        per_endpoint(
            &c::INTER_TOKEN_LATENCY_SECONDS,
            "Inter-token latency",
            &mut l,
        ),
        per_endpoint(&c::REQUEST_DURATION_SECONDS, "End-to-end latency", &mut l),
        l.panel(
            "timeseries",
            "Queue time",
            "s",
            12,
            8,
            vec![
                q(quantile(&c::QUEUE_TIME_SECONDS, 0.5, ""), "p50"),
                q(quantile(&c::QUEUE_TIME_SECONDS, 0.95, ""), "p95"),
            ],
        ),
        l.panel(
            "timeseries",
            "Prompt and generation length",
            "short",
            12,
            8,
            vec![
                q(quantile(&c::PROMPT_LENGTH_TOKENS, 0.5, ""), "prompt p50"),
                q(quantile(&c::PROMPT_LENGTH_TOKENS, 0.95, ""), "prompt p95"),
                q(
                    quantile(&c::GENERATION_LENGTH_TOKENS, 0.5, ""),
                    "generation p50",
                ),
                q(
                    quantile(&c::GENERATION_LENGTH_TOKENS, 0.95, ""),
                    "generation p95",
                ),
            ],
        ),
        l.panel(
            "timeseries",
            "Where a step's time goes",
            "percentunit",
            12,
            8,
            vec![
                q(
                    share(&[&c::SCHEDULER_SECONDS_TOTAL], &c::STEP_SECONDS_TOTAL),
                    "scheduler",
                ),
                q(
                    share(&[&c::FORWARD_SECONDS_TOTAL], &c::STEP_SECONDS_TOTAL),
                    "forward pass",
                ),
                q(
                    share(
                        &[&c::WORKER_SECONDS_TOTAL, &c::FORWARD_SECONDS_TOTAL],
                        &c::STEP_SECONDS_TOTAL,
                    ),
                    "worker, besides the forward pass",
                ),
                q(
                    share(
                        &[
                            &c::STEP_SECONDS_TOTAL,
                            &c::SCHEDULER_SECONDS_TOTAL,
                            &c::WORKER_SECONDS_TOTAL,
                        ],
                        &c::STEP_SECONDS_TOTAL,
                    ),
                    "messaging",
                ),
                q(
                    share(&[&c::SPEC_STEPS_TOTAL], &c::STEPS_TOTAL),
                    "steps speculating",
                ),
                q(
                    share(&[&c::STEPS_WARMING_TOTAL], &c::STEPS_TOTAL),
                    "steps warming up",
                ),
                q(
                    share(&[&c::PROMPT_STEP_SECONDS_TOTAL], &c::STEP_SECONDS_TOTAL),
                    "time in steps with a prompt chunk",
                ),
            ],
        ),
        l.panel(
            "timeseries",
            "Speculation: accepted length",
            "short",
            12,
            8,
            vec![
                q(
                    mean(&c::SPEC_ACCEPTED_LENGTH_TOKENS, ""),
                    "mean accepted per verification",
                ),
                q(
                    format!("sum({})", c::SPEC_TIME_SAVED_SECONDS.name),
                    "time saved (s)",
                ),
                q(
                    format!(
                        "sum(rate({}[$__rate_interval]))",
                        c::SPEC_GUARD_PROBE_STEPS_TOTAL.name
                    ),
                    "guard probe steps per second",
                ),
                q(
                    format!(
                        "sum(increase({}[$__rate_interval]))",
                        c::SPEC_GUARD_VERDICT_CHANGES_TOTAL.name
                    ),
                    "guard verdict changes",
                ),
                q(
                    format!(
                        "sum(increase({}[$__rate_interval]))",
                        c::SPEC_GUARD_VETOES_TOTAL.name
                    ),
                    "guard vetoes",
                ),
            ],
        ),
        l.panel(
            "timeseries",
            "Errors and refusals per second",
            "reqps",
            12,
            8,
            vec![q(
                format!(
                    "sum by (outcome) (rate({}{{outcome!=\"ok\"}}[$__rate_interval]))",
                    c::REQUESTS_TOTAL.name
                ),
                "{{outcome}}",
            )],
        ),
    ];
    dashboard(
        "hyserve-latency",
        "hyserve / Latency",
        &["hyserve"],
        panels,
        false,
    )
}

fn experts() -> Value {
    let mut l = Layout::new();
    let panels = vec![
        l.panel(
            "heatmap",
            "Routed tokens per second by expert (all layers)",
            "short",
            24,
            10,
            vec![q(
                format!("sum by (expert) ({})", rate(&c::EXPERT_ROUTED_TOKENS_TOTAL)),
                "{{expert}}",
            )],
        ),
        l.panel(
            "timeseries",
            "Share of routed tokens by expert",
            "percentunit",
            12,
            8,
            vec![q(
                format!(
                    "sum by (expert) ({r}) / scalar(sum({r}))",
                    r = rate(&c::EXPERT_ROUTED_TOKENS_TOTAL)
                ),
                "expert {{expert}}",
            )],
        ),
        l.panel(
            "timeseries",
            "Load imbalance (busiest expert / mean)",
            "short",
            12,
            8,
            vec![
                q(
                    format!("max({})", c::EXPERT_LOAD_IMBALANCE_RATIO.name),
                    "worst layer",
                ),
                q(
                    format!("avg({})", c::EXPERT_LOAD_IMBALANCE_RATIO.name),
                    "mean over layers",
                ),
            ],
        ),
        l.panel(
            "heatmap",
            "Load imbalance by layer",
            "short",
            24,
            10,
            vec![q(
                format!("max by (layer) ({})", c::EXPERT_LOAD_IMBALANCE_RATIO.name),
                "{{layer}}",
            )],
        ),
        l.panel(
            "timeseries",
            "Placement epoch and rebalances",
            "short",
            12,
            8,
            vec![
                q(format!("max({})", c::PLACEMENT_EPOCH.name), "epoch"),
                q(
                    format!("sum(increase({}[1h]))", c::REBALANCES_TOTAL.name),
                    "rebalances in the last hour",
                ),
            ],
        ),
        l.panel(
            "timeseries",
            "Rebalance duration",
            "s",
            12,
            8,
            vec![q(mean(&c::REBALANCE_DURATION_SECONDS, ""), "mean")],
        ),
    ];
    dashboard(
        "hyserve-experts",
        "hyserve / Experts",
        &["hyserve", "moe"],
        panels,
        false,
    )
}

fn workers() -> Value {
    let mut l = Layout::new();
    let sel = "{worker=~\"$worker\"}";
    let panels = vec![
        l.panel(
            "timeseries",
            "Step time by worker (p50 / p95)",
            "s",
            12,
            8,
            vec![
                q(
                    format!(
                        "histogram_quantile(0.5, sum by (le, worker) (rate({}_bucket{sel}[$__rate_interval])))",
                        c::WORKER_STEP_DURATION_SECONDS.name
                    ),
                    "{{worker}} p50",
                ),
                q(
                    format!(
                        "histogram_quantile(0.95, sum by (le, worker) (rate({}_bucket{sel}[$__rate_interval])))",
                        c::WORKER_STEP_DURATION_SECONDS.name
                    ),
                    "{{worker}} p95",
                ),
            ],
        ),
        l.panel(
            "timeseries",
            "Tokens per step by worker",
            "short",
            12,
            8,
            vec![q(
                format!(
                    "sum by (worker) (rate({n}_sum{sel}[$__rate_interval])) / sum by (worker) (rate({n}_count{sel}[$__rate_interval]))",
                    n = c::WORKER_STEP_TOKENS.name
                ),
                "{{worker}}",
            )],
        ),
        l.panel(
            "timeseries",
            "Steps per second by worker",
            "short",
            12,
            8,
            vec![q(
                format!(
                    "sum by (worker) (rate({}_count{sel}[$__rate_interval]))",
                    c::WORKER_STEP_DURATION_SECONDS.name
                ),
                "{{worker}}",
            )],
        ),
        l.panel(
            "timeseries",
            "All-to-all traffic",
            "Bps",
            12,
            8,
            vec![q(
                format!(
                    "sum by (worker) (rate({}{sel}[$__rate_interval]))",
                    c::ALL_TO_ALL_BYTES_TOTAL.name
                ),
                "{{worker}}",
            )],
        ),
        l.panel(
            "timeseries",
            "Share of step time in all-to-all",
            "percentunit",
            12,
            8,
            vec![q(
                format!(
                    "sum by (worker) (rate({}{sel}[$__rate_interval])) / sum by (worker) (rate({}_sum{sel}[$__rate_interval]))",
                    c::ALL_TO_ALL_SECONDS_TOTAL.name,
                    c::WORKER_STEP_DURATION_SECONDS.name
                ),
                "{{worker}}",
            )],
        ),
        l.panel(
            "stat",
            "Build",
            "none",
            12,
            8,
            vec![q(
                format!("max by (version, revision, device) ({})", c::BUILD_INFO.name),
                "{{version}} {{revision}} {{device}}",
            )],
        ),
    ];
    dashboard(
        "hyserve-workers",
        "hyserve / Workers",
        &["hyserve"],
        panels,
        true,
    )
}

/// Every dashboard.
pub fn all() -> Vec<Dashboard> {
    vec![
        Dashboard {
            file: "overview",
            json: overview(),
        },
        Dashboard {
            file: "latency",
            json: latency(),
        },
        Dashboard {
            file: "experts",
            json: experts(),
        },
        Dashboard {
            file: "workers",
            json: workers(),
        },
    ]
}

/// A dashboard's file contents (pretty JSON and a final newline).
pub fn render(d: &Dashboard) -> String {
    serde_json::to_string_pretty(&d.json).expect("a JSON value renders") + "\n"
}

/// Every PromQL expression of a dashboard's panels.
pub fn exprs(d: &Value) -> Vec<String> {
    d["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect()
}

/// The metric names an expression mentions (words starting `hyserve_`).
pub fn metric_names(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("hyserve_") {
        let boundary = rest[..i]
            .chars()
            .last()
            .is_none_or(|ch| !(ch.is_ascii_alphanumeric() || ch == '_'));
        let tail = &rest[i..];
        let end = tail
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(tail.len());
        if boundary {
            out.push(&tail[..end]);
        }
        rest = &tail[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_names_only_catalogued_metrics() {
        let mut named = 0;
        for d in all() {
            let exprs = exprs(&d.json);
            assert!(!exprs.is_empty(), "{} has no queries", d.file);
            for e in exprs {
                let names = metric_names(&e);
                assert!(!names.is_empty(), "{}: {e} names no metric", d.file);
                for n in names {
                    assert!(
                        c::metric_of_series(n).is_some(),
                        "{}: {n} is not in the catalogue ({e})",
                        d.file
                    );
                    named += 1;
                }
            }
        }
        assert!(named > 40, "{named}");
    }

    #[test]
    fn names_are_read_out_of_expressions() {
        assert_eq!(
            metric_names(
                "sum(rate(hyserve_a_total[1m])) / x_hyserve_b + hyserve_c_bucket{l=\"hyserve_d\"}"
            ),
            vec!["hyserve_a_total", "hyserve_c_bucket", "hyserve_d"]
        );
    }

    /// The committed files are this module's output: run
    /// `cargo run -- dashboards --out deploy/grafana` after changing it.
    #[test]
    fn committed_dashboards_are_generated() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
        for d in all() {
            let path = dir.join(format!("{}.json", d.file));
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == render(&d),
                "{} is stale: run `cargo run -- dashboards --out deploy/grafana`",
                path.display()
            );
        }
    }
}
