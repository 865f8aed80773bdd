//! The gRPC front: `hyserve.v1.Inference` (unary and streaming generation, model list)
//! behind the same API keys as HTTP, and the standard `grpc.health.v1` service whose status
//! follows the engine's readiness.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyserve_coordinator::api::{FinishReason, ServeError};
use hyserve_model::tokenizer::ChatMessage;
use hyserve_proto::v1;
use hyserve_proto::v1::inference_server::{Inference, InferenceServer, SERVICE_NAME};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::choice::{Choice, ChoiceEvent, TokenOut};
use crate::error::{grpc_status, outcome};
use crate::metrics::{OUTCOME_OK, endpoint};
use crate::plan::{DefaultMaxTokens, FieldNames, Options, Plan};
use crate::request::Tracker;
use crate::server::State;

/// How often the health service's status is refreshed from the engine.
const HEALTH_POLL: Duration = Duration::from_secs(1);
/// `max_tokens` when the request leaves it unset (as OpenAI's completions).
const DEFAULT_MAX_TOKENS: usize = 16;

const NAMES: FieldNames = FieldNames {
    prompt: "input",
    max_tokens: "max_tokens",
    logprobs: "top_logprobs",
};

/// The API key check in front of `Inference` (the health service stays open, as `/health`).
#[derive(Clone)]
pub(crate) struct AuthCheck {
    state: Arc<State>,
}

impl Interceptor for AuthCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(keys) = &self.state.cfg.api_keys else {
            return Ok(req);
        };
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if keys.check_authorization(header) {
            Ok(req)
        } else {
            self.state.metrics.auth_failures.inc();
            Err(grpc_status(&ServeError::Unauthorized))
        }
    }
}

/// The `Inference` service with its API key check.
pub(crate) fn service(
    state: Arc<State>,
) -> InterceptedService<InferenceServer<GrpcInference>, AuthCheck> {
    let check = AuthCheck {
        state: Arc::clone(&state),
    };
    InferenceServer::with_interceptor(GrpcInference { state }, check)
}

/// Keeps the health service's status in step with `Engine::health().ready` until shutdown.
/// A client's request id from the `x-request-id` metadata.
fn client_request_id<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(crate::request::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
}

pub(crate) async fn report_health(
    state: Arc<State>,
    reporter: HealthReporter,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last = None;
    loop {
        let ready = state.ready();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            // "" is the whole server, as health-checking clients ask by default.
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE_NAME, status).await;
            last = Some(ready);
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
}

pub(crate) struct GrpcInference {
    state: Arc<State>,
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<v1::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for GrpcInference {
    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<v1::GenerateResponse>, Status> {
        let tracker = Tracker::new(
            &self.state.metrics,
            endpoint::GRPC_GENERATE,
            "grpc",
            client_request_id(&request),
        );
        let result = async {
            let mut choice = self.start(request.into_inner(), &tracker)?;
            let mut text = String::new();
            let mut tokens = Vec::new();
            loop {
                match choice.next().await {
                    Some(ChoiceEvent::Delta {
                        text: t,
                        tokens: ts,
                    }) => {
                        text.push_str(&t);
                        tokens.extend(ts.iter().map(token_to_wire));
                    }
                    Some(ChoiceEvent::Finished {
                        reason,
                        completion_tokens,
                        cached_tokens,
                    }) => {
                        return Ok(v1::GenerateResponse {
                            text,
                            tokens,
                            finish_reason: finish_to_wire(reason) as i32,
                            usage: Some(usage(
                                tracker.prompt_tokens(),
                                completion_tokens,
                                cached_tokens,
                            )),
                            model: self.state.cfg.model_name.clone(),
                        });
                    }
                    Some(ChoiceEvent::Failed(e)) => return Err(e),
                    None => {
                        return Err(ServeError::Internal {
                            message: "the sequence ended without finishing".into(),
                        });
                    }
                }
            }
        }
        .await;
        match result {
            Ok(resp) => {
                tracker.done(OUTCOME_OK);
                Ok(Response::new(resp))
            }
            Err(e) => {
                tracker.done(outcome(&e));
                Err(grpc_status(&e))
            }
        }
    }

    type GenerateStreamStream = GenerateStream;

    async fn generate_stream(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let tracker = Tracker::new(
            &self.state.metrics,
            endpoint::GRPC_GENERATE_STREAM,
            "grpc",
            client_request_id(&request),
        );
        let choice = match self.start(request.into_inner(), &tracker) {
            Ok(c) => c,
            Err(e) => {
                tracker.done(outcome(&e));
                return Err(grpc_status(&e));
            }
        };
        let stream = choice.into_stream().map(move |(_, ev)| match ev {
            ChoiceEvent::Delta { text, tokens } => Ok(v1::GenerateStreamResponse {
                text,
                tokens: tokens.iter().map(token_to_wire).collect(),
                finish_reason: v1::FinishReason::Unspecified as i32,
                usage: None,
            }),
            ChoiceEvent::Finished {
                reason,
                completion_tokens,
                cached_tokens,
            } => {
                tracker.done(OUTCOME_OK);
                Ok(v1::GenerateStreamResponse {
                    text: String::new(),
                    tokens: Vec::new(),
                    finish_reason: finish_to_wire(reason) as i32,
                    usage: Some(usage(
                        tracker.prompt_tokens(),
                        completion_tokens,
                        cached_tokens,
                    )),
                })
            }
            ChoiceEvent::Failed(e) => {
                tracker.done(outcome(&e));
                Err(grpc_status(&e))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        Ok(Response::new(v1::ListModelsResponse {
            models: vec![v1::Model {
                id: self.state.cfg.model_name.clone(),
                created_unix: self.state.model.created_unix,
                max_context: self.state.model.max_context as u64,
            }],
        }))
    }
}

impl GrpcInference {
    /// Checks the request and submits its one sequence.
    fn start(
        &self,
        req: v1::GenerateRequest,
        tracker: &Arc<Tracker>,
    ) -> Result<Choice, ServeError> {
        let state = &self.state;
        if !req.model.is_empty() && req.model != state.cfg.model_name {
            return Err(ServeError::invalid(
                "model",
                format!("this server serves `{}`", state.cfg.model_name),
            ));
        }
        use v1::generate_request::Input;
        let prompt = match (req.input, req.chat) {
            (Some(Input::Text(text)), chat) => {
                let text = if chat {
                    state
                        .tokenizer
                        .apply_chat_template(&[ChatMessage::new("user", text)], true)
                        .map_err(|e| {
                            let msg = e.to_string();
                            let first = msg.lines().next().unwrap_or_default().to_string();
                            ServeError::invalid(
                                "chat",
                                format!("the chat template failed: {first}"),
                            )
                        })?
                } else {
                    text
                };
                state
                    .tokenizer
                    .encode(&text, true)
                    .map_err(|_| ServeError::invalid("input", "the text could not be tokenized"))?
            }
            (Some(Input::TokenIds(_)), true) => {
                return Err(ServeError::invalid(
                    "chat",
                    "`chat` needs `text` input, not token ids",
                ));
            }
            (Some(Input::TokenIds(ids)), false) => ids.ids,
            (None, _) => {
                return Err(ServeError::invalid(
                    "input",
                    "`text` or `token_ids` is required",
                ));
            }
        };
        if !req.logprobs && req.top_logprobs > 0 {
            return Err(ServeError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs`",
            ));
        }
        let opts = Options {
            max_tokens: req.max_tokens.map(u64::from),
            temperature: req.temperature.map(f64::from),
            top_p: req.top_p.map(f64::from),
            top_k: Some(i64::from(req.top_k)),
            min_p: Some(f64::from(req.min_p)),
            presence_penalty: Some(f64::from(req.presence_penalty)),
            frequency_penalty: Some(f64::from(req.frequency_penalty)),
            repetition_penalty: req.repetition_penalty.map(f64::from),
            n: None,
            seed: req.seed,
            stop: req.stop,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs.then_some(u64::from(req.top_logprobs)),
            speculation: Some(req.speculation),
        };
        let plan = Plan::new(
            state,
            prompt,
            opts,
            NAMES,
            DefaultMaxTokens::Fixed(DEFAULT_MAX_TOKENS),
        )?;
        let streams = plan.submit(state, &tracker.request_id)?;
        tracker.prompt_accepted(plan.prompt.len());
        Choice::for_streams(
            streams,
            &plan,
            &state.tokenizer,
            tracker,
            state.cfg.log_prompts,
        )
        .pop()
        .ok_or_else(|| ServeError::Internal {
            message: "no sequence was submitted".into(),
        })
    }
}

fn token_to_wire(t: &TokenOut) -> v1::Token {
    v1::Token {
        id: t.token.id,
        text: t.token.text.clone(),
        logprob: if t.token.logprob.is_nan() {
            0.0
        } else {
            t.token.logprob
        },
        top_logprobs: t
            .top
            .iter()
            .map(|alt| v1::TopLogprob {
                id: alt.id,
                text: alt.text.clone(),
                logprob: alt.logprob,
            })
            .collect(),
    }
}

fn finish_to_wire(reason: FinishReason) -> v1::FinishReason {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => v1::FinishReason::Stop,
        FinishReason::Length => v1::FinishReason::Length,
    }
}

fn usage(prompt: usize, completion: usize, cached: usize) -> v1::Usage {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    v1::Usage {
        prompt_tokens: clamp(prompt),
        completion_tokens: clamp(completion),
        cached_tokens: clamp(cached),
    }
}
