//! Process-level telemetry: the build-info metric, a worker process's HTTP endpoint
//! (`/metrics`, `/health`, `/ready`), and the `metrics-catalogue` and `dashboards`
//! commands that publish the metric catalogue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use hyserve_telemetry::catalogue::BUILD_INFO;
use hyserve_worker::remote::WorkerNode;
use prometheus::{Encoder, IntGaugeVec, Registry, TextEncoder};

/// Registers `hyserve_build_info{version, revision, device} 1` on `registry`.
pub fn register_build_info(registry: &Registry, device: &str) -> anyhow::Result<()> {
    let g = IntGaugeVec::new(BUILD_INFO.opts(), BUILD_INFO.labels)?;
    let (version, revision) = hyserve_telemetry::build_version();
    g.with_label_values(&[version, revision, device]).set(1);
    registry.register(Box::new(g))?;
    Ok(())
}

/// Registers a constant gauge (a fact of the configuration) on `registry`.
pub fn register_constant(
    registry: &Registry,
    def: &hyserve_telemetry::MetricDef,
    value: f64,
) -> anyhow::Result<()> {
    let g = prometheus::Gauge::with_opts(def.opts())?;
    g.set(value);
    registry.register(Box::new(g))?;
    Ok(())
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding only fails on malformed families, which registration refuses.
    if TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .is_err()
    {
        out.clear();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Serves a worker process's `/metrics`, `/health` (the process answers) and `/ready`
/// (it holds an assigned, loaded shard) on `addr`; returns the bound address.
pub async fn serve_worker_http(
    addr: SocketAddr,
    registry: Registry,
    node: Arc<WorkerNode>,
) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render(&registry);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ready",
            get(move || {
                let node = Arc::clone(&node);
                async move {
                    if node.is_assigned().await {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "waiting for an assignment")
                            .into_response()
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[derive(clap::Args, Debug)]
pub struct CatalogueArgs {
    /// A Markdown table instead of JSON.
    #[arg(long)]
    markdown: bool,
}

/// `hyserve metrics-catalogue`: every metric hyserve exports, as JSON (or Markdown).
pub fn catalogue(a: CatalogueArgs) -> anyhow::Result<()> {
    if a.markdown {
        print!("{}", hyserve_telemetry::catalogue::markdown_table());
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(hyserve_telemetry::catalogue::ALL)?
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    /// Directory to write the dashboards' JSON files to.
    #[arg(long, default_value = "deploy/grafana")]
    out: PathBuf,
}

/// `hyserve dashboards`: writes the Grafana dashboards built from the catalogue.
pub fn dashboards(a: DashboardArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for d in hyserve_telemetry::dashboards::all() {
        let path = a.out.join(format!("{}.json", d.file));
        std::fs::write(&path, hyserve_telemetry::dashboards::render(&d))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
