//! `POST /v1/completions` and `POST /v1/chat/completions`: the OpenAI request turned into a
//! [`Plan`], its choices run, and the result written back whole or as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State as Extract;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use futures::{Stream, StreamExt};
use hyserve_coordinator::api::{FinishReason, ServeError};
use hyserve_model::tokenizer::ChatMessage;
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;

use super::json::{JsonObject, decode};
use super::openai::*;
use crate::choice::{Choice, ChoiceEvent, TokenOut};
use crate::error::{ApiError, outcome};
use crate::metrics::{OUTCOME_OK, endpoint};
use crate::plan::{DefaultMaxTokens, FieldNames, Options, Plan};
use crate::request::{REQUEST_ID_HEADER, Tracker};
use crate::server::State;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;
/// OpenAI's stand-in for a log-probability of minus infinity (JSON has no infinities).
const LOGPROB_FLOOR: f32 = -9999.0;

pub(crate) async fn completions(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Response {
    let tracker = Tracker::new(
        &state.metrics,
        endpoint::COMPLETIONS,
        "cmpl",
        client_request_id(&headers),
    );
    let span = tracing::info_span!("request", request_id = %tracker.request_id, endpoint = endpoint::COMPLETIONS);
    respond(
        &tracker,
        completions_inner(&state, &body, &tracker)
            .instrument(span)
            .await,
    )
}

pub(crate) async fn chat_completions(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Response {
    let tracker = Tracker::new(
        &state.metrics,
        endpoint::CHAT_COMPLETIONS,
        "chatcmpl",
        client_request_id(&headers),
    );
    let span = tracing::info_span!("request", request_id = %tracker.request_id, endpoint = endpoint::CHAT_COMPLETIONS);
    respond(
        &tracker,
        chat_inner(&state, &body, &tracker).instrument(span).await,
    )
}

fn client_request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok())
}

/// The response, with the request's id in `x-request-id` (the client's own, or the
/// one its log lines carry).
fn respond(tracker: &Tracker, result: Result<Response, ServeError>) -> Response {
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            tracker.done(outcome(&e));
            ApiError::Serve(e).into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&tracker.request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// What the two endpoints have in common once their own fields are read.
struct Prepared {
    plan: Plan,
    choices: Vec<Choice>,
    stream: bool,
    include_usage: bool,
    meta: Meta,
}

/// The fields every response object and chunk repeats.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
}

fn check_model(state: &State, model: &str) -> Result<(), ServeError> {
    if model == state.cfg.model_name {
        Ok(())
    } else {
        Err(ServeError::invalid(
            "model",
            format!(
                "the model `{model}` does not exist; this server serves `{}`",
                state.cfg.model_name
            ),
        ))
    }
}

fn unsupported(field: &str, what: &str) -> ServeError {
    ServeError::invalid(field, format!("{what} is not supported"))
}

/// Reads the shared fields into generation options, rejecting the OpenAI features this
/// server does not implement rather than silently ignoring them.
fn common_options(common: &CommonFields) -> Result<Options, ServeError> {
    if common.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("logit_bias", "logit_bias"));
    }
    Ok(Options {
        max_tokens: None,
        temperature: common.temperature,
        top_p: common.top_p,
        top_k: common.top_k,
        min_p: common.min_p,
        presence_penalty: common.presence_penalty,
        frequency_penalty: common.frequency_penalty,
        repetition_penalty: common.repetition_penalty,
        n: common.n,
        seed: common.seed.as_ref().map(Seed::as_u64),
        stop: match &common.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        },
        stop_token_ids: common.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: common.ignore_eos.unwrap_or(false),
        logprobs: None,
        speculation: common.speculation.clone(),
    })
}

fn start(
    state: &State,
    tracker: &Arc<Tracker>,
    common: &CommonFields,
    prompt: Vec<u32>,
    opts: Options,
    names: FieldNames,
    default_max_tokens: DefaultMaxTokens,
) -> Result<Prepared, ServeError> {
    let plan = Plan::new(state, prompt, opts, names, default_max_tokens)?;
    let streams = plan.submit(state, &tracker.request_id)?;
    tracker.prompt_accepted(plan.prompt.len());
    let choices = Choice::for_streams(
        streams,
        &plan,
        &state.tokenizer,
        tracker,
        state.cfg.log_prompts,
    );
    let stream = common.stream.unwrap_or(false);
    Ok(Prepared {
        choices,
        stream,
        include_usage: stream
            && common
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        meta: Meta {
            id: tracker.request_id.clone(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: state.cfg.model_name.clone(),
        },
        plan,
    })
}

// ---- /v1/completions ---------------------------------------------------------------------

async fn completions_inner(
    state: &State,
    body: &Value,
    tracker: &Arc<Tracker>,
) -> Result<Response, ServeError> {
    let req: CompletionRequest = decode(body)?;
    let common: CommonFields = decode(body)?;
    check_model(state, &req.model)?;
    if req.echo == Some(true) {
        return Err(ServeError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "suffix"));
    }
    if req.best_of.is_some_and(|b| b != common.n.unwrap_or(1)) {
        return Err(ServeError::invalid(
            "best_of",
            "best_of other than n is not supported",
        ));
    }
    let prompt = match req.prompt {
        PromptInput::Text(text) => encode(state, &text, "prompt")?,
        PromptInput::Tokens(ids) => ids,
        PromptInput::Texts(mut v) if v.len() == 1 => encode(state, &v.remove(0), "prompt")?,
        PromptInput::TokenLists(mut v) if v.len() == 1 => v.remove(0),
        PromptInput::Texts(_) | PromptInput::TokenLists(_) => {
            return Err(ServeError::invalid(
                "prompt",
                "exactly one prompt per request is supported",
            ));
        }
    };
    let opts = Options {
        max_tokens: req.max_tokens,
        logprobs: req.logprobs,
        ..common_options(&common)?
    };
    let names = FieldNames {
        prompt: "prompt",
        max_tokens: "max_tokens",
        logprobs: "logprobs",
    };
    let p = start(
        state,
        tracker,
        &common,
        prompt,
        opts,
        names,
        DefaultMaxTokens::Fixed(DEFAULT_COMPLETION_MAX_TOKENS),
    )?;
    let want_logprobs = p.plan.logprobs.is_some();
    let prompt_tokens = p.plan.prompt.len();
    if p.stream {
        let tracker = Arc::clone(tracker);
        let meta = p.meta.clone();
        let chunk = move |index, text, logprobs, finish_reason| Completion {
            id: meta.id.clone(),
            object: "text_completion",
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason,
            }],
            usage: None,
        };
        let meta = p.meta;
        let n = p.plan.n;
        let include_usage = p.include_usage;
        let events = async_stream::stream! {
            let mut merged = merge(p.choices);
            let mut offsets = vec![0usize; n];
            let mut usage = UsageSum::default();
            while let Some((index, ev)) = merged.next().await {
                match ev {
                    ChoiceEvent::Delta { text, tokens } => {
                        if text.is_empty() && !want_logprobs {
                            continue;
                        }
                        let logprobs = want_logprobs.then(|| {
                            completion_logprobs(&tokens, &text, &mut offsets[index])
                        });
                        yield to_json(&chunk(index, text, logprobs, None));
                    }
                    ChoiceEvent::Finished { reason, completion_tokens, cached_tokens } => {
                        usage.add(completion_tokens, cached_tokens);
                        yield to_json(&chunk(index, String::new(), None, Some(reason.as_openai())));
                    }
                    ChoiceEvent::Failed(e) => {
                        tracker.done(outcome(&e));
                        yield to_json(&ApiError::Serve(e).envelope());
                        yield DONE.to_string();
                        return;
                    }
                }
            }
            if include_usage {
                yield to_json(&Completion {
                    id: meta.id,
                    object: "text_completion",
                    created: meta.created,
                    model: meta.model,
                    choices: Vec::new(),
                    usage: Some(usage.usage(prompt_tokens)),
                });
            }
            tracker.done(OUTCOME_OK);
            yield DONE.to_string();
        };
        return Ok(sse(events));
    }

    let results = collect_all(p.choices).await?;
    let mut usage = UsageSum::default();
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            usage.add(r.completion_tokens, r.cached_tokens);
            let logprobs = want_logprobs.then(|| completion_logprobs(&r.tokens, &r.text, &mut 0));
            CompletionChoice {
                index,
                text: r.text,
                logprobs,
                finish_reason: Some(r.reason.as_openai()),
            }
        })
        .collect();
    tracker.done(OUTCOME_OK);
    Ok(Json(Completion {
        id: p.meta.id,
        object: "text_completion",
        created: p.meta.created,
        model: p.meta.model,
        choices,
        usage: Some(usage.usage(prompt_tokens)),
    })
    .into_response())
}

fn encode(state: &State, text: &str, field: &str) -> Result<Vec<u32>, ServeError> {
    // Special-token markup in the text is honoured, as OpenAI-compatible servers do for raw
    // prompts (and as the chat template's own markup needs).
    state
        .tokenizer
        .encode(text, true)
        .map_err(|_| ServeError::invalid(field, "the prompt could not be tokenized"))
}

/// The legacy logprobs object for `tokens`, whose text is `text`. `offset` is the number of
/// characters of the choice's text before `text`, and is advanced past it.
fn completion_logprobs(tokens: &[TokenOut], text: &str, offset: &mut usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let end = *offset + text.chars().count();
    let mut at = *offset;
    for t in tokens {
        lp.tokens.push(t.token.text.clone());
        lp.token_logprobs.push(wire_logprob(t.token.logprob));
        lp.top_logprobs.push(
            t.top
                .iter()
                .map(|alt| (alt.text.clone(), Value::from(wire_logprob(alt.logprob))))
                .collect(),
        );
        // A token that is part of a character has no offset of its own: it shares the
        // character's (the per-token texts need not add up to the released text).
        lp.text_offset.push(at.min(end));
        at += t.token.text.chars().count();
    }
    *offset = end;
    lp
}

// ---- /v1/chat/completions ----------------------------------------------------------------

async fn chat_inner(
    state: &State,
    body: &Value,
    tracker: &Arc<Tracker>,
) -> Result<Response, ServeError> {
    let req: ChatRequest = decode(body)?;
    let common: CommonFields = decode(body)?;
    check_model(state, &req.model)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("tools", "tool calling"));
    }
    if req
        .response_format
        .as_ref()
        .is_some_and(|f| f.kind != "text")
    {
        return Err(unsupported(
            "response_format",
            "a response_format other than text",
        ));
    }
    let messages = chat_messages(req.messages)?;
    let text = state
        .tokenizer
        .apply_chat_template(&messages, true)
        .map_err(|e| {
            // The first line is the template's complaint; later lines of a template error
            // can quote the messages themselves.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default();
            ServeError::invalid(
                "messages",
                format!("the conversation cannot be rendered: {first}"),
            )
        })?;
    let prompt = encode(state, &text, "messages")?;

    let (max_tokens, max_tokens_field) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, Some(k)) if k > 0 => {
            return Err(ServeError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs` to be true",
            ));
        }
        (false, _) => None,
    };
    let opts = Options {
        max_tokens,
        logprobs,
        ..common_options(&common)?
    };
    let names = FieldNames {
        prompt: "messages",
        max_tokens: max_tokens_field,
        logprobs: "top_logprobs",
    };
    let p = start(
        state,
        tracker,
        &common,
        prompt,
        opts,
        names,
        DefaultMaxTokens::RestOfContext,
    )?;
    let want_logprobs = p.plan.logprobs.is_some();
    let prompt_tokens = p.plan.prompt.len();
    if p.stream {
        let tracker = Arc::clone(tracker);
        let meta = p.meta.clone();
        let chunk = move |index, delta, logprobs, finish_reason| ChatChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk",
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![ChatChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: None,
        };
        let meta = p.meta;
        let n = p.plan.n;
        let include_usage = p.include_usage;
        let events = async_stream::stream! {
            for index in 0..n {
                let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
                yield to_json(&chunk(index, delta, None, None));
            }
            let mut merged = merge(p.choices);
            let mut usage = UsageSum::default();
            while let Some((index, ev)) = merged.next().await {
                match ev {
                    ChoiceEvent::Delta { text, tokens } => {
                        if text.is_empty() && !want_logprobs {
                            continue;
                        }
                        let logprobs = want_logprobs.then(|| chat_logprobs(&tokens));
                        let delta = ChatDelta { role: None, content: Some(text) };
                        yield to_json(&chunk(index, delta, logprobs, None));
                    }
                    ChoiceEvent::Finished { reason, completion_tokens, cached_tokens } => {
                        usage.add(completion_tokens, cached_tokens);
                        let delta = ChatDelta::default();
                        yield to_json(&chunk(index, delta, None, Some(reason.as_openai())));
                    }
                    ChoiceEvent::Failed(e) => {
                        tracker.done(outcome(&e));
                        yield to_json(&ApiError::Serve(e).envelope());
                        yield DONE.to_string();
                        return;
                    }
                }
            }
            if include_usage {
                yield to_json(&ChatChunk {
                    id: meta.id,
                    object: "chat.completion.chunk",
                    created: meta.created,
                    model: meta.model,
                    choices: Vec::new(),
                    usage: Some(usage.usage(prompt_tokens)),
                });
            }
            tracker.done(OUTCOME_OK);
            yield DONE.to_string();
        };
        return Ok(sse(events));
    }

    let results = collect_all(p.choices).await?;
    let mut usage = UsageSum::default();
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            usage.add(r.completion_tokens, r.cached_tokens);
            ChatChoice {
                index,
                logprobs: want_logprobs.then(|| chat_logprobs(&r.tokens)),
                message: ChatMessageOut {
                    role: "assistant",
                    content: r.text,
                },
                finish_reason: r.reason.as_openai(),
            }
        })
        .collect();
    tracker.done(OUTCOME_OK);
    Ok(Json(ChatCompletion {
        id: p.meta.id,
        object: "chat.completion",
        created: p.meta.created,
        model: p.meta.model,
        choices,
        usage: usage.usage(prompt_tokens),
    })
    .into_response())
}

/// OpenAI messages to the tokenizer's: roles checked, content parts joined.
fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ServeError> {
    if messages.is_empty() {
        return Err(ServeError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" => m.role,
                // OpenAI's newer name for the system role.
                "developer" => "system".to_string(),
                _ => {
                    return Err(ServeError::invalid(
                        &format!("messages[{i}].role"),
                        "the role must be system, user or assistant",
                    ));
                }
            };
            let content = match m.content {
                Some(ChatContent::Text(t)) => t,
                Some(ChatContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => texts.push(t),
                            ("text", None) => {
                                return Err(ServeError::invalid(
                                    &format!("messages[{i}].content[{j}].text"),
                                    "a text part needs `text`",
                                ));
                            }
                            _ => {
                                return Err(ServeError::invalid(
                                    &format!("messages[{i}].content[{j}].type"),
                                    "only text content parts are supported",
                                ));
                            }
                        }
                    }
                    texts.join("\n")
                }
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ServeError::invalid(
                        &format!("messages[{i}].content"),
                        "`content` is required",
                    ));
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn chat_logprobs(tokens: &[TokenOut]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.text.clone(),
                logprob: wire_logprob(t.token.logprob),
                bytes: t.token.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|alt| ChatTopLogprob {
                        token: alt.text.clone(),
                        logprob: wire_logprob(alt.logprob),
                        bytes: alt.bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

// ---- shared plumbing ---------------------------------------------------------------------

const DONE: &str = "[DONE]";

fn wire_logprob(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { LOGPROB_FLOOR }
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Only plain structs with string keys are serialized here; this cannot fail, and an
    // empty object is the harmless answer if it ever did.
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string())
}

fn sse(events: impl Stream<Item = String> + Send + 'static) -> Response {
    Sse::new(events.map(|data| Ok::<_, Infallible>(Event::default().data(data))))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// All choices' events, interleaved as they come (each tagged with its choice index).
fn merge(choices: Vec<Choice>) -> impl Stream<Item = (usize, ChoiceEvent)> + Send + Unpin {
    futures::stream::select_all(choices.into_iter().map(|c| c.into_stream().boxed()))
}

/// Token counts summed over choices; the prompt is counted once.
#[derive(Default)]
struct UsageSum {
    completion: usize,
    /// Cached prompt tokens (the least over choices: each choice's prompt is the same).
    cached: Option<usize>,
}

impl UsageSum {
    fn add(&mut self, completion: usize, cached: usize) {
        self.completion += completion;
        self.cached = Some(self.cached.map_or(cached, |c| c.min(cached)));
    }

    fn usage(&self, prompt: usize) -> Usage {
        Usage::new(prompt, self.completion, self.cached.unwrap_or(0))
    }
}

/// One choice, run to its end.
struct Collected {
    text: String,
    tokens: Vec<TokenOut>,
    reason: FinishReason,
    completion_tokens: usize,
    cached_tokens: usize,
}

/// Runs every choice to its end; the first failure cancels the others (they are dropped).
async fn collect_all(choices: Vec<Choice>) -> Result<Vec<Collected>, ServeError> {
    futures::future::try_join_all(choices.into_iter().map(collect)).await
}

async fn collect(mut choice: Choice) -> Result<Collected, ServeError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    loop {
        match choice.next().await {
            Some(ChoiceEvent::Delta {
                text: t,
                tokens: ts,
            }) => {
                text.push_str(&t);
                tokens.extend(ts);
            }
            Some(ChoiceEvent::Finished {
                reason,
                completion_tokens,
                cached_tokens,
            }) => {
                return Ok(Collected {
                    text,
                    tokens,
                    reason,
                    completion_tokens,
                    cached_tokens,
                });
            }
            Some(ChoiceEvent::Failed(e)) => return Err(e),
            None => {
                return Err(ServeError::Internal {
                    message: "a choice ended without finishing".into(),
                });
            }
        }
    }
}
