//! Telemetry shared by every hyserve process: the metric catalogue (the one registry of
//! names), the worker-side metrics, and the Grafana dashboards built from the catalogue.

pub mod catalogue;
pub mod dashboards;
pub mod worker;

pub use catalogue::{Kind, MetricDef, Scope};
pub use worker::{StepReport, WorkerMetrics};

/// The version and git revision this binary was built from.
pub fn build_version() -> (&'static str, &'static str) {
    (
        env!("CARGO_PKG_VERSION"),
        option_env!("HYSERVE_GIT_REVISION").unwrap_or("unknown"),
    )
}
