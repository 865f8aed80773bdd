//! The worker-side metrics: step time and size, expert load, all-to-all traffic.
//!
//! One [`WorkerMetrics`] per process, shared by its workers (each labels its series with
//! its own name); registered on the coordinator's registry for in-process workers, or
//! on a worker process's own `/metrics`.

use std::sync::Mutex;

use prometheus::{CounterVec, GaugeVec, HistogramVec, IntCounterVec, Registry};

use crate::catalogue as c;

/// Each step's routed rows enter a layer's imbalance window with this weight, the
/// window's older rows decaying by `1 - IMBALANCE_DECAY` per step (about 64 steps).
const IMBALANCE_DECAY: f64 = 1.0 / 64.0;

/// What one worker step did, for [`WorkerMetrics::observe_step`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StepReport<'a> {
    pub seconds: f64,
    /// Rows of the worker's own sequences computed (proposals included).
    pub tokens: usize,
    /// Rows routed per layer and expert, `[layer][expert]` (empty: not counted).
    pub expert_load: &'a [Vec<u64>],
    /// Bytes sent to peers and seconds spent exchanging with them.
    pub all_to_all_bytes: u64,
    pub all_to_all_seconds: f64,
}

/// The worker metrics of a process.
#[derive(Debug)]
pub struct WorkerMetrics {
    step_duration: HistogramVec,
    step_tokens: HistogramVec,
    routed: IntCounterVec,
    imbalance: GaugeVec,
    a2a_bytes: IntCounterVec,
    a2a_seconds: CounterVec,
    /// Per layer: the decayed routed rows per expert.
    window: Mutex<Vec<Vec<f64>>>,
}

impl WorkerMetrics {
    /// The metrics, registered on `registry`; every series of `workers` (their names) and
    /// of `experts` experts and `layers` MoE layers starts at zero, so dashboards and
    /// alerts see them before the first request.
    pub fn new(
        registry: &Registry,
        workers: &[String],
        layers: usize,
        experts: usize,
    ) -> Result<Self, prometheus::Error> {
        let worker = &[c::WORKER_STEP_DURATION_SECONDS.labels[0]];
        let m = Self {
            step_duration: HistogramVec::new(
                c::WORKER_STEP_DURATION_SECONDS.histogram_opts(),
                worker,
            )?,
            step_tokens: HistogramVec::new(c::WORKER_STEP_TOKENS.histogram_opts(), worker)?,
            routed: IntCounterVec::new(
                c::EXPERT_ROUTED_TOKENS_TOTAL.opts(),
                c::EXPERT_ROUTED_TOKENS_TOTAL.labels,
            )?,
            imbalance: GaugeVec::new(
                c::EXPERT_LOAD_IMBALANCE_RATIO.opts(),
                c::EXPERT_LOAD_IMBALANCE_RATIO.labels,
            )?,
            a2a_bytes: IntCounterVec::new(
                c::ALL_TO_ALL_BYTES_TOTAL.opts(),
                c::ALL_TO_ALL_BYTES_TOTAL.labels,
            )?,
            a2a_seconds: CounterVec::new(
                c::ALL_TO_ALL_SECONDS_TOTAL.opts(),
                c::ALL_TO_ALL_SECONDS_TOTAL.labels,
            )?,
            window: Mutex::new(Vec::new()),
        };
        registry.register(Box::new(m.step_duration.clone()))?;
        registry.register(Box::new(m.step_tokens.clone()))?;
        registry.register(Box::new(m.routed.clone()))?;
        registry.register(Box::new(m.imbalance.clone()))?;
        registry.register(Box::new(m.a2a_bytes.clone()))?;
        registry.register(Box::new(m.a2a_seconds.clone()))?;
        for w in workers {
            m.step_duration.with_label_values(&[w]);
            m.step_tokens.with_label_values(&[w]);
            m.a2a_bytes.with_label_values(&[w]);
            m.a2a_seconds.with_label_values(&[w]);
        }
        for e in 0..experts {
            m.routed.with_label_values(&[&e.to_string()]);
        }
        for l in 0..layers {
            m.imbalance.with_label_values(&[&l.to_string()]).set(1.0);
        }
        Ok(m)
    }

    /// Records one step of worker `worker`.
    pub fn observe_step(&self, worker: &str, r: StepReport<'_>) {
        self.step_duration
            .with_label_values(&[worker])
            .observe(r.seconds);
        self.step_tokens
            .with_label_values(&[worker])
            .observe(r.tokens as f64);
        if r.all_to_all_bytes > 0 || r.all_to_all_seconds > 0.0 {
            self.a2a_bytes
                .with_label_values(&[worker])
                .inc_by(r.all_to_all_bytes);
            self.a2a_seconds
                .with_label_values(&[worker])
                .inc_by(r.all_to_all_seconds.max(0.0));
        }
        if r.expert_load.iter().all(|l| l.iter().all(|&n| n == 0)) {
            return;
        }
        let mut per_expert: Vec<u64> = Vec::new();
        for l in r.expert_load {
            if per_expert.len() < l.len() {
                per_expert.resize(l.len(), 0);
            }
            for (a, &n) in per_expert.iter_mut().zip(l) {
                *a += n;
            }
        }
        for (e, &n) in per_expert.iter().enumerate() {
            if n > 0 {
                self.routed.with_label_values(&[&e.to_string()]).inc_by(n);
            }
        }
        let Ok(mut window) = self.window.lock() else {
            return;
        };
        if window.len() < r.expert_load.len() {
            window.resize(r.expert_load.len(), Vec::new());
        }
        for (l, (w, load)) in window.iter_mut().zip(r.expert_load).enumerate() {
            if load.is_empty() {
                continue;
            }
            if w.len() < load.len() {
                w.resize(load.len(), 0.0);
            }
            for (x, &n) in w.iter_mut().zip(load) {
                *x = *x * (1.0 - IMBALANCE_DECAY) + n as f64;
            }
            if let Some(ratio) = imbalance(w) {
                self.imbalance
                    .with_label_values(&[&l.to_string()])
                    .set(ratio);
            }
        }
    }
}

/// The busiest expert's load over the mean's (`None` with no load).
pub fn imbalance(load: &[f64]) -> Option<f64> {
    let total: f64 = load.iter().sum();
    if load.is_empty() || total <= 0.0 {
        return None;
    }
    let max = load.iter().copied().fold(0.0, f64::max);
    Some(max / (total / load.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(r: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[1.0, 1.0, 1.0, 1.0]), Some(1.0));
        assert_eq!(imbalance(&[4.0, 0.0, 0.0, 0.0]), Some(4.0));
        assert_eq!(imbalance(&[0.0, 0.0]), None);
    }

    #[test]
    fn steps_sum_experts_over_layers_and_track_imbalance() {
        let r = Registry::new();
        let m = WorkerMetrics::new(&r, &["w0".into()], 2, 4).unwrap();
        let text = scrape(&r);
        // Every series exists before the first step.
        assert!(text.contains("hyserve_expert_routed_tokens_total{expert=\"3\"} 0"));
        assert!(text.contains("hyserve_expert_load_imbalance_ratio{layer=\"1\"} 1"));
        assert!(text.contains("hyserve_worker_step_duration_seconds_count{worker=\"w0\"} 0"));
        let load = vec![vec![3, 1, 0, 0], vec![0, 0, 0, 4]];
        m.observe_step(
            "w0",
            StepReport {
                seconds: 0.01,
                tokens: 4,
                expert_load: &load,
                all_to_all_bytes: 1024,
                all_to_all_seconds: 0.002,
            },
        );
        let text = scrape(&r);
        assert!(text.contains("hyserve_expert_routed_tokens_total{expert=\"0\"} 3"));
        assert!(text.contains("hyserve_expert_routed_tokens_total{expert=\"3\"} 4"));
        assert!(text.contains("hyserve_expert_load_imbalance_ratio{layer=\"0\"} 3"));
        assert!(text.contains("hyserve_expert_load_imbalance_ratio{layer=\"1\"} 4"));
        assert!(text.contains("hyserve_all_to_all_bytes_total{worker=\"w0\"} 1024"));
        assert!(text.contains("hyserve_worker_step_tokens_sum{worker=\"w0\"} 4"));
    }
}
