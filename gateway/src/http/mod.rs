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

/// Readiness: the engine accepts requests and makes progress.
async fn ready(Extract(state): Extract<Arc<State>>) -> Response {
    probe(state.engine.health().ready, "ready", "not ready")
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
