//! The [`Gateway`]: the state both fronts share, and serving them side by side with one
//! graceful shutdown.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use hyserve_coordinator::api::{Engine, ModelInfo};
use hyserve_model::tokenizer::Tokenizer;
use tokio::net::TcpListener;

use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::{grpc, http};

/// How long in-flight requests may run on after shutdown is requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What every handler needs.
pub(crate) struct State {
    pub cfg: GatewayConfig,
    pub engine: Arc<dyn Engine>,
    pub tokenizer: Arc<Tokenizer>,
    /// Read once: the model does not change under a running gateway.
    pub model: ModelInfo,
    pub metrics: Arc<Metrics>,
    /// Set by `/drain`: new requests are refused and readiness is lost while the ones
    /// in flight finish.
    pub draining: std::sync::atomic::AtomicBool,
}

impl State {
    /// Ready for traffic: the engine makes progress and the gateway is not draining.
    pub(crate) fn ready(&self) -> bool {
        self.engine.health().ready && !self.draining.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Why [`Gateway::serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// The OpenAI-compatible HTTP API and the gRPC API in front of one [`Engine`].
pub struct Gateway {
    state: Arc<State>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cfg", &self.state.cfg)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, engine: Arc<dyn Engine>, tokenizer: Arc<Tokenizer>) -> Self {
        let registry = cfg.metrics_registry.clone().unwrap_or_default();
        let metrics = Metrics::new(Arc::clone(&engine), registry)
            // The metric definitions are constants; a failure is a bug caught by any test.
            .expect("metric definitions are valid and unique");
        let model = engine.model_info();
        Self {
            state: Arc::new(State {
                cfg,
                engine,
                tokenizer,
                model,
                metrics: Arc::new(metrics),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The HTTP API as a router (tests drive it with `tower::ServiceExt::oneshot`).
    pub fn http_router(&self) -> axum::Router {
        http::router(Arc::clone(&self.state))
    }

    /// Binds both listeners, reports their addresses through `on_bound` (so port 0 works),
    /// then serves until `shutdown` resolves; in-flight requests are allowed to finish, for
    /// at most [`DRAIN_TIMEOUT`].
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_bound: impl FnOnce(SocketAddr, SocketAddr) + Send,
    ) -> Result<(), GatewayError> {
        let bind = |what: &'static str, addr: SocketAddr| async move {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind { what, addr, source })?;
            let bound = listener.local_addr().map_err(|source| GatewayError::Bind {
                what,
                addr,
                source,
            })?;
            Ok::<_, GatewayError>((listener, bound))
        };
        let (http_listener, http_addr) = bind("HTTP", self.state.cfg.http_addr).await?;
        let (grpc_listener, grpc_addr) = bind("gRPC", self.state.cfg.grpc_addr).await?;
        on_bound(http_addr, grpc_addr);
        tracing::info!(%http_addr, %grpc_addr, "gateway listening");

        let shutdown = shutdown.shared();
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let http_server = axum::serve(
            http_listener,
            self.http_router()
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone())
        .into_future()
        .map(|r| r.map_err(GatewayError::Http));
        let grpc_server = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(grpc::service(Arc::clone(&self.state)))
            .serve_with_incoming_shutdown(
                // Streamed tokens are small writes: no Nagle delays.
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                shutdown.clone(),
            )
            .map(|r| r.map_err(GatewayError::Grpc));
        let health = grpc::report_health(Arc::clone(&self.state), reporter, shutdown.clone())
            .map(Ok::<_, GatewayError>);
        let servers = async { tokio::try_join!(http_server, grpc_server, health) };
        // Long-lived streams (a health watch, a stalled client) would hold a graceful
        // shutdown forever; after the drain period they are cut.
        let drain_deadline = shutdown.then(|()| tokio::time::sleep(DRAIN_TIMEOUT));
        tokio::select! {
            result = servers => { result?; }
            () = drain_deadline => {
                tracing::warn!(?DRAIN_TIMEOUT, "connections still open after the drain period; closing them");
            }
        }
        tracing::info!("gateway stopped");
        Ok(())
    }
}
