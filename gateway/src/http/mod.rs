//! The HTTP front: OpenAI-compatible `/v1/*` (behind the API key check), `/health`,
//! `/ready` and `/metrics` (open, for probes and scrapers), and the layers every request
//! passes: tracing, panic catching, the body size limit, JSON 404/405 answers.

mod generate;
mod json;
mod openai;

use std::any::Any;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State as Extract};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use hyserve_coordinator::api::ServeError;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::server::State;

pub(crate) fn router(state: Arc<State>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/drain", post(drain))
        .merge(api)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn require_api_key(
    Extract(state): Extract<Arc<State>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(keys) = &state.cfg.api_keys {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !keys.check_authorization(header) {
            state.metrics.auth_failures.inc();
            return ApiError::Serve(ServeError::Unauthorized).into_response();
        }
    }
    next.run(req).await
}

/// A handler panicked: answer 500 like any other internal error. The payload is not logged
/// (a panic message may quote request data).
fn panic_response(_payload: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("an HTTP handler panicked");
    ApiError::Serve(ServeError::Internal {
        message: "the request failed unexpectedly".into(),
    })
    .into_response()
}

async fn models(Extract(state): Extract<Arc<State>>) -> Json<openai::ModelList> {
    Json(openai::ModelList {
        object: "list",
        data: vec![openai::ModelCard {
            id: state.cfg.model_name.clone(),
            object: "model",
            created: state.model.created_unix,
            owned_by: "hyserve",
            max_model_len: state.model.max_context,
        }],
    })
}

/// Liveness: every worker is alive.
async fn health(Extract(state): Extract<Arc<State>>) -> Response {
    probe(state.engine.health().live, "ok", "unhealthy")
}

/// Readiness: the engine accepts requests and makes progress, and the gateway is not
/// draining.
async fn ready(Extract(state): Extract<Arc<State>>) -> Response {
    probe(state.ready(), "ready", "not ready")
}

#[derive(serde::Deserialize)]
struct DrainQuery {
    timeout_secs: Option<u64>,
}

/// Longest wait `/drain` accepts.
const MAX_DRAIN_SECS: u64 = 3600;

/// Starts draining (readiness lost, new generation requests refused with 503) and
/// waits until the requests in flight have finished, or `timeout_secs` (default 30)
/// passed: 200 when drained, 504 when some are still running. Only from this host
/// (`hyserve drain`, a Kubernetes preStop hook): anyone else gets 403, so a client that
/// can reach the API cannot take the server out of rotation.
async fn drain(
    Extract(state): Extract<Arc<State>>,
    axum::extract::Query(q): axum::extract::Query<DrainQuery>,
    req: Request,
) -> Response {
    let local = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback());
    if !local {
        return (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({"status": "refused", "reason": "/drain is only served to this host"})),
        )
            .into_response();
    }
    let timeout = std::time::Duration::from_secs(q.timeout_secs.unwrap_or(30).min(MAX_DRAIN_SECS));
    if !state
        .draining
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        tracing::info!(
            ?timeout,
            "draining: refusing new requests, waiting for those in flight"
        );
    }
    let start = std::time::Instant::now();
    let in_flight = || {
        state
            .metrics
            .in_flight
            .load(std::sync::atomic::Ordering::Acquire)
    };
    while in_flight() > 0 && start.elapsed() < timeout {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let left = in_flight();
    let body = serde_json::json!({
        "status": if left == 0 { "drained" } else { "timeout" },
        "in_flight": left,
        "waited_ms": start.elapsed().as_millis() as u64,
    });
    if left == 0 {
        tracing::info!("drained");
        Json(body).into_response()
    } else {
        tracing::warn!(in_flight = left, "drain timed out with requests in flight");
        (StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response()
    }
}

fn probe(ok: bool, yes: &str, no: &str) -> Response {
    if ok {
        Json(serde_json::json!({ "status": yes })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": no })),
        )
            .into_response()
    }
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        state.metrics.render(),
    )
        .into_response()
}
