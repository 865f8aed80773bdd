//! The OpenAI-compatible HTTP API against a fake engine, through the router in-process.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use common::{CACHED_TOKENS, MAX_CONTEXT, MODEL, config, gateway};
use http_body_util::BodyExt;
use hyserve_gateway::{ApiKeys, GatewayConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    fn events(&self) -> Vec<String> {
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "text/event-stream",
            "{:?}",
            self.headers
        );
        let text = std::str::from_utf8(&self.body).unwrap();
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }

    /// The JSON chunks of an event stream, checking it ends with `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        let mut events = self.events();
        assert_eq!(events.pop().as_deref(), Some("[DONE]"));
        events
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }
}

async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(router: &Router, uri: &str, body: Value) -> Reply {
    post_with(router, uri, body, None).await
}

async fn post_with(router: &Router, uri: &str, body: Value, key: Option<&str>) -> Reply {
    let mut req = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    send(router, req.body(Body::from(body.to_string())).unwrap()).await
}

async fn get(router: &Router, uri: &str) -> Reply {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

fn router() -> (Router, Arc<common::FakeEngine>) {
    let (gw, engine) = gateway(config());
    (gw.http_router(), engine)
}

fn assert_error(reply: &Reply, status: StatusCode, kind: &str, param: Option<&str>) {
    assert_eq!(reply.status, status, "{:?}", reply.json());
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    let err = &reply.json()["error"];
    assert_eq!(err["type"], kind, "{err}");
    assert_eq!(err["param"].as_str(), param, "{err}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{err}"
    );
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let (r, _) = router();
    let reply = get(&r, "/v1/models").await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "hyserve");
    assert_eq!(v["data"][0]["created"], 1_700_000_000);
}

#[tokio::test]
async fn completion_returns_text_finish_reason_and_usage() {
    let (r, engine) = router();
    let v = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await
    .json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["text"], "Hello world");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    // 11 bytes of text and the stop token.
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], 2);
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["total_tokens"], 14);
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        CACHED_TOKENS
    );

    let req = &engine.submitted.lock().unwrap()[0];
    assert_eq!(req.prompt, vec![u32::from(b'H'), u32::from(b'i')]);
    assert_eq!(req.max_tokens, 16, "OpenAI's default");
    assert_eq!(req.sampling.temperature, 1.0);
    assert_eq!(req.sampling.top_p, 1.0);
    assert_eq!(req.logprobs, None);
    // The model's own stop ids (the request named none).
    assert_eq!(req.stop_token_ids, common::tokenizer().stop_ids());
}

#[tokio::test]
async fn completion_prompt_forms_and_sampling_fields_reach_the_engine() {
    let (r, engine) = router();
    for prompt in [json!([72, 105]), json!(["Hi"]), json!([[72, 105]])] {
        let reply = post(
            &r,
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0,
                   "top_p": 0.5, "top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2,
                   "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 11,
                   "stop_token_ids": [7], "ignore_eos": true}),
        )
        .await;
        let v = reply.json();
        assert_eq!(v["choices"][0]["text"], "Hello", "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let reqs = engine.submitted.lock().unwrap();
    for req in reqs.iter() {
        assert_eq!(req.prompt, vec![72, 105]);
        let s = &req.sampling;
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.min_p),
            (0.0, 0.5, 4, 0.1)
        );
        assert_eq!(
            (
                s.repetition_penalty,
                s.presence_penalty,
                s.frequency_penalty
            ),
            (1.2, 0.5, -0.5)
        );
        assert_eq!(s.seed, Some(11));
        // ignore_eos: only the request's own stop ids.
        assert_eq!(req.stop_token_ids, vec![7]);
    }
}

#[tokio::test]
async fn invalid_requests_name_their_field() {
    let (r, _) = router();
    let long_prompt = "x".repeat(MAX_CONTEXT + 1);
    let completions: Vec<(Value, Option<&str>)> = vec![
        (json!({"prompt": "Hi"}), Some("model")),
        (json!({"model": "gpt-4", "prompt": "Hi"}), Some("model")),
        (json!({"model": MODEL}), Some("prompt")),
        (
            json!({"model": MODEL, "prompt": {"text": "Hi"}}),
            Some("prompt"),
        ),
        (json!({"model": MODEL, "prompt": ""}), Some("prompt")),
        (
            json!({"model": MODEL, "prompt": ["a", "b"]}),
            Some("prompt"),
        ),
        (
            json!({"model": MODEL, "prompt": [99999999]}),
            Some("prompt"),
        ),
        (
            json!({"model": MODEL, "prompt": long_prompt}),
            Some("prompt"),
        ),
        (
            json!({"model": MODEL, "prompt": "x".repeat(201)}),
            Some("prompt"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "max_tokens": 0}),
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "max_tokens": 255}),
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "max_tokens": -1}),
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "max_tokens": "many"}),
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "temperature": 2.5}),
            Some("temperature"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "temperature": "hot"}),
            Some("temperature"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "top_p": 0}),
            Some("top_p"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "top_p": 1.5}),
            Some("top_p"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "top_k": -2}),
            Some("top_k"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "min_p": 2}),
            Some("min_p"),
        ),
        (json!({"model": MODEL, "prompt": "Hi", "n": 0}), Some("n")),
        (json!({"model": MODEL, "prompt": "Hi", "n": 17}), Some("n")),
        (
            json!({"model": MODEL, "prompt": "Hi", "logprobs": 21}),
            Some("logprobs"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "echo": true}),
            Some("echo"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}),
            Some("stop"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "stop": [""]}),
            Some("stop"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "stop": 5}),
            Some("stop"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "seed": "x"}),
            Some("seed"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "presence_penalty": 2.5}),
            Some("presence_penalty"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "frequency_penalty": -3}),
            Some("frequency_penalty"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "repetition_penalty": 0}),
            Some("repetition_penalty"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "stop_token_ids": [99999999]}),
            Some("stop_token_ids"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "stream": "yes"}),
            Some("stream"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "logit_bias": {"1": 5}}),
            Some("logit_bias"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "suffix": "end"}),
            Some("suffix"),
        ),
        (
            json!({"model": MODEL, "prompt": "Hi", "best_of": 3}),
            Some("best_of"),
        ),
        (json!([1, 2]), None),
    ];
    for (body, param) in completions {
        let reply = post(&r, "/v1/completions", body.clone()).await;
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            param,
        );
    }
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let chats: Vec<(Value, Option<&str>)> = vec![
        (json!({"model": MODEL}), Some("messages")),
        (json!({"model": MODEL, "messages": []}), Some("messages")),
        (json!({"model": MODEL, "messages": "Hi"}), Some("messages")),
        (
            json!({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}),
            Some("messages[0].role"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user"}]}),
            Some("messages[0].content"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
            Some("messages[0].content"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            Some("messages[0].content[0].type"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            Some("messages"),
        ),
        (
            json!({"model": MODEL, "messages": msgs, "top_logprobs": 3}),
            Some("top_logprobs"),
        ),
        (
            json!({"model": MODEL, "messages": msgs, "logprobs": true, "top_logprobs": 21}),
            Some("top_logprobs"),
        ),
        (
            json!({"model": MODEL, "messages": msgs, "logprobs": 1}),
            Some("logprobs"),
        ),
        (
            json!({"model": MODEL, "messages": msgs, "max_completion_tokens": 0}),
            Some("max_completion_tokens"),
        ),
        (
            json!({"model": MODEL, "messages": msgs, "max_tokens": 1000}),
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL, "messages": msgs, "tools": [{"type": "function"}]}),
            Some("tools"),
        ),
        (
            json!({"model": MODEL, "messages": msgs, "response_format": {"type": "json_object"}}),
            Some("response_format"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(300)}]}),
            Some("messages"),
        ),
    ];
    for (body, param) in chats {
        let reply = post(&r, "/v1/chat/completions", body.clone()).await;
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            param,
        );
    }

    // Malformed JSON, and a body with no content type at all.
    for (body, ctype) in [
        ("{\"model\": ", Some("application/json")),
        ("not json", None),
    ] {
        let mut req = Request::post("/v1/completions");
        if let Some(c) = ctype {
            req = req.header(header::CONTENT_TYPE, c);
        }
        let reply = send(&r, req.body(Body::from(body)).unwrap()).await;
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
        );
    }
}

#[tokio::test]
async fn errors_never_quote_prompt_text() {
    let (r, _) = router();
    let reply = post(
        &r,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": "my secret prompt"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(!String::from_utf8_lossy(&reply.body).contains("secret"));
}

#[tokio::test]
async fn completion_stream_is_openai_sse_with_usage_and_done() {
    let (r, _) = router();
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let chunks = reply.chunks();
    let (usage, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert_eq!(usage["usage"]["prompt_tokens"], 2);
    let (last, text_chunks) = chunks.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    let text: String = text_chunks
        .iter()
        .map(|c| {
            assert_eq!(c["object"], "text_completion");
            assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
            c["choices"][0]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Hello world");
    // One event per token's text (each byte is a token here).
    assert_eq!(text_chunks.len(), "Hello world".len());

    // Without include_usage there is no usage chunk.
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "stream": true}),
    )
    .await;
    let chunks = reply.chunks();
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn chat_returns_assistant_message() {
    let (r, engine) = router();
    let v = post(
        &r,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
        ]}),
    )
    .await
    .json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let req = &engine.submitted.lock().unwrap()[0];
    // <|startoftext|>Be brief.<|extra_4|>Hi<|extra_0|>: specials are single tokens.
    assert_eq!(req.prompt.len(), 1 + 9 + 1 + 2 + 1);
    assert_eq!(v["usage"]["prompt_tokens"], req.prompt.len());
    // Without max_tokens, a chat may use the rest of the context.
    assert_eq!(req.max_tokens, MAX_CONTEXT - req.prompt.len());
}

#[tokio::test]
async fn chat_stream_starts_with_role_and_ends_with_usage_and_done() {
    let (r, _) = router();
    let reply = post(
        &r,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
               "stream": true, "stream_options": {"include_usage": true},
               "max_completion_tokens": 5}),
    )
    .await;
    let chunks = reply.chunks();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1..].iter().all(|c| {
        c["choices"]
            .get(0)
            .is_none_or(|ch| ch["delta"].get("role").is_none())
    }));
    let (usage, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let (last, _) = chunks.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
}

#[tokio::test]
async fn stop_string_split_across_tokens_truncates_and_cancels() {
    let (r, engine) = router();
    engine.set_reply("Hello STOP world, and more");
    let v = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "stop": "STOP", "max_tokens": 100}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["text"], "Hello ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Generation ended at the stop string: "Hello STOP" is 10 tokens, not the whole reply.
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(engine.dropped.load(Ordering::SeqCst), 1);

    // A near miss ("STO" then "P" never comes) is released once decided.
    engine.set_reply("a STOx STOP b");
    let reply = post(
        &r,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
               "stop": ["STOP", "never"], "stream": true}),
    )
    .await;
    let chunks = reply.chunks();
    let deltas: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(deltas.concat(), "a STOx ");
    // "STOx" was held while it could still become "STOP", then released in one piece.
    assert!(deltas.contains(&"STOx"), "{deltas:?}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn multibyte_character_split_over_tokens_is_streamed_whole() {
    let (r, engine) = router();
    engine.set_reply("h\u{e9}llo \u{20ac}!");
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "stream": true}),
    )
    .await;
    let texts: Vec<String> = reply
        .chunks()
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(texts, ["h", "\u{e9}", "l", "l", "o", " ", "\u{20ac}", "!"]);
}

#[tokio::test]
async fn n_choices_use_consecutive_seeds_and_interleave_in_streams() {
    let (r, engine) = router();
    engine.set_reply("seed={seed}");
    let v = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "n": 3, "seed": 7}),
    )
    .await
    .json();
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(texts, ["seed=7", "seed=8", "seed=9"]);
    assert_eq!(engine.seeds(), [7, 8, 9]);
    // Completion tokens are summed over choices; the prompt is counted once.
    assert_eq!(v["usage"]["completion_tokens"], 3 * 7);
    assert_eq!(v["usage"]["prompt_tokens"], 2);

    // Without a seed the gateway picks one, still consecutive per choice.
    engine.submitted.lock().unwrap().clear();
    let reply = post(
        &r,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
               "n": 2, "stream": true}),
    )
    .await;
    let seeds = engine.seeds();
    assert_eq!(seeds[1], seeds[0].wrapping_add(1));
    let chunks = reply.chunks();
    for (index, seed) in seeds.iter().enumerate() {
        let mine: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0])
            .filter(|ch| ch["index"] == index)
            .collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant");
        assert_eq!(mine.last().unwrap()["finish_reason"], "stop");
        let text: String = mine
            .iter()
            .filter_map(|ch| ch["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, format!("seed={seed}"));
    }
}

#[tokio::test]
async fn logprobs_are_reported_in_both_formats() {
    let (r, _) = router();
    let v = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "logprobs": 2, "max_tokens": 3}),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["H", "e", "l"]));
    assert_eq!(lp["token_logprobs"], json!([-0.5, -0.5, -0.5]));
    assert_eq!(lp["top_logprobs"][0], json!({"a": -1.0, "b": -2.0}));
    assert_eq!(lp["text_offset"], json!([0, 1, 2]));

    let v = post(
        &r,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
               "logprobs": true, "top_logprobs": 1, "max_tokens": 2}),
    )
    .await
    .json();
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(
        content[0],
        json!({"token": "H", "logprob": -0.5, "bytes": [72],
               "top_logprobs": [{"token": "a", "logprob": -1.0, "bytes": [97]}]})
    );
    assert_eq!(content.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn api_keys_guard_v1_but_not_probes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(
        &path,
        format!("# keys\nplain-key\n{}\n", ApiKeys::hashed_line("other-key")),
    )
    .unwrap();
    let keys = ApiKeys::from_file(&path).unwrap();
    let cfg = GatewayConfig {
        api_keys: Some(keys),
        ..config()
    };
    assert!(!format!("{cfg:?}").contains("plain-key"));
    let (gw, _) = gateway(cfg);
    let r = gw.http_router();
    let body = json!({"model": MODEL, "prompt": "Hi"});
    for key in [None, Some("wrong"), Some("")] {
        let reply = post_with(&r, "/v1/completions", body.clone(), key).await;
        assert_error(
            &reply,
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            None,
        );
    }
    let reply = get(&r, "/v1/models").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    for key in ["plain-key", "other-key"] {
        let reply = post_with(&r, "/v1/completions", body.clone(), Some(key)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(&r, open).await.status, StatusCode::OK, "{open}");
    }
    let metrics = String::from_utf8(get(&r, "/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("hyserve_auth_failures_total 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn overload_is_429_with_retry_after() {
    let (r, engine) = router();
    engine.overloaded.store(true, Ordering::SeqCst);
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;
    assert_error(
        &reply,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        None,
    );
    assert_eq!(reply.headers[header::RETRY_AFTER], "2");
}

#[tokio::test]
async fn engine_failures_become_500_or_an_error_event() {
    let (r, engine) = router();
    *engine.fail_after.lock().unwrap() = Some(2);
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;
    assert_error(
        &reply,
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
    );
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "stream": true}),
    )
    .await;
    let chunks = reply.chunks();
    assert_eq!(chunks.last().unwrap()["error"]["type"], "server_error");
}

#[tokio::test]
async fn handler_panic_is_a_json_500() {
    let (r, engine) = router();
    engine.set_reply("PANIC");
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;
    assert_error(
        &reply,
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
    );
    // The router keeps serving.
    engine.set_reply("ok");
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_body_is_413_json() {
    let (gw, _) = gateway(GatewayConfig {
        max_body_bytes: 1024,
        ..config()
    });
    let r = gw.http_router();
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x".repeat(2000)}),
    )
    .await;
    assert_error(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        None,
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let (r, _) = router();
    let reply = get(&r, "/v1/nothing").await;
    assert_error(&reply, StatusCode::NOT_FOUND, "invalid_request_error", None);
    let reply = send(
        &r,
        Request::builder()
            .method(Method::GET)
            .uri("/v1/completions")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(
        &reply,
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        None,
    );
}

#[tokio::test]
async fn probes_follow_engine_health() {
    let (r, engine) = router();
    let reply = get(&r, "/health").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"status": "ok"}));
    assert_eq!(get(&r, "/ready").await.status, StatusCode::OK);
    engine.ready.store(false, Ordering::SeqCst);
    assert_eq!(
        get(&r, "/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&r, "/health").await.status, StatusCode::OK);
    engine.live.store(false, Ordering::SeqCst);
    assert_eq!(
        get(&r, "/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn metrics_parse_with_unique_prefixed_names() {
    let (r, engine) = router();
    post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;
    post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "n": 0}),
    )
    .await;
    engine.overloaded.store(true, Ordering::SeqCst);
    post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;

    let reply = get(&r, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let mut families = HashSet::new();
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(families.insert(name.to_string()), "duplicate family {name}");
            assert!(name.starts_with("hyserve_"), "{name}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            // Counters and only counters end in `_total`.
            assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            // Every family is in the catalogue, with its type.
            let def = hyserve_telemetry::catalogue::find(name)
                .unwrap_or_else(|| panic!("{name} is not in the catalogue"));
            assert_eq!(
                serde_json::to_value(def.kind).unwrap(),
                serde_json::json!(kind),
                "{line}"
            );
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            assert!(series.starts_with("hyserve_"), "{line}");
            assert!(
                samples.insert(series.to_string(), v).is_none(),
                "duplicate {series}"
            );
        }
    }
    for name in [
        "hyserve_requests_total",
        "hyserve_auth_failures_total",
        "hyserve_request_duration_seconds",
        "hyserve_time_to_first_token_seconds",
        "hyserve_generated_tokens_total",
        "hyserve_prompt_tokens_total",
        "hyserve_kv_blocks_used",
        "hyserve_kv_blocks_free",
        "hyserve_kv_blocks_capacity",
        "hyserve_kv_blocks_cached",
        "hyserve_requests_running",
        "hyserve_requests_waiting",
        "hyserve_prefix_cache_queries_tokens_total",
        "hyserve_prefix_cache_hits_tokens_total",
        "hyserve_preemptions_total",
        "hyserve_steps_total",
        "hyserve_steps_failed_total",
        "hyserve_requests_given_up_total",
        "hyserve_steps_warming_total",
        "hyserve_prompt_steps_total",
        "hyserve_prompt_step_seconds_total",
        "hyserve_spec_steps_total",
        "hyserve_spec_guard_probe_steps_total",
        "hyserve_spec_guard_verdict_changes_total",
        "hyserve_spec_guard_vetoes_total",
        "hyserve_spec_searches_skipped_total",
        "hyserve_scheduler_seconds_total",
        "hyserve_model_seconds_total",
        "hyserve_inter_token_latency_seconds",
        "hyserve_queue_time_seconds",
        "hyserve_prompt_length_tokens",
        "hyserve_generation_length_tokens",
        "hyserve_requests_preempted",
        "hyserve_workers_alive",
        "hyserve_placement_epoch",
        "hyserve_rebalance_duration_seconds",
    ] {
        assert!(families.contains(name), "missing {name}");
    }
    let s = |k: &str| samples.get(k).copied();
    assert_eq!(
        s(r#"hyserve_requests_total{endpoint="completions",outcome="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"hyserve_requests_total{endpoint="completions",outcome="invalid_request"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"hyserve_requests_total{endpoint="completions",outcome="overloaded"}"#),
        Some(1.0)
    );
    assert_eq!(s("hyserve_generated_tokens_total"), Some(12.0));
    assert_eq!(s("hyserve_prompt_tokens_total"), Some(2.0));
    assert_eq!(s("hyserve_kv_blocks_capacity"), Some(100.0));
    assert_eq!(s("hyserve_kv_blocks_free"), Some(90.0));
    // Outcomes not seen yet are there at zero (alerts select them).
    assert_eq!(
        s(r#"hyserve_requests_total{endpoint="grpc_generate",outcome="internal_error"}"#),
        Some(0.0)
    );
    assert_eq!(s("hyserve_prompt_length_tokens_count"), Some(1.0));
    assert_eq!(s("hyserve_generation_length_tokens_sum"), Some(12.0));
    assert_eq!(s("hyserve_requests_running"), Some(2.0));
    assert_eq!(s("hyserve_model_seconds_total"), Some(1.5));
    assert_eq!(
        s(r#"hyserve_time_to_first_token_seconds_count{endpoint="completions"}"#),
        Some(1.0)
    );
}

/// Captured log output.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn logs_of_one_request(log_prompts: bool) -> String {
    let buffer = LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (gw, engine) = gateway(GatewayConfig {
        log_prompts,
        ..config()
    });
    engine.set_reply("classified output");
    let r = gw.http_router();
    for stream in [false, true] {
        let reply = post(
            &r,
            "/v1/chat/completions",
            json!({"model": MODEL, "stream": stream,
                   "messages": [{"role": "user", "content": "secret question"}]}),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("request finished"), "{logs}");
    logs
}

#[tokio::test]
async fn prompts_and_outputs_are_logged_only_when_allowed() {
    let logs = logs_of_one_request(false).await;
    assert!(!logs.contains("secret"), "{logs}");
    assert!(!logs.contains("classified"), "{logs}");
    let logs = logs_of_one_request(true).await;
    assert!(logs.contains("secret question"), "{logs}");
    assert!(logs.contains("classified output"), "{logs}");
}

/// `/drain` answers only this host: from a caller it cannot place (or a remote one) it
/// refuses, and the server keeps serving.
#[tokio::test]
async fn drain_is_refused_to_callers_not_on_this_host() {
    let (r, _) = router();
    let reply = send(&r, Request::post("/drain").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let mut req = Request::post("/drain").body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [10, 0, 0, 7],
            40000,
        ))));
    assert_eq!(send(&r, req).await.status, StatusCode::FORBIDDEN);
    assert_eq!(get(&r, "/ready").await.status, StatusCode::OK);
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The response carries the request's id.
    assert!(
        reply.headers["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("cmpl-")
    );
}

/// From this host, `/drain` stops admissions and readiness at once (nothing is in
/// flight, so it returns drained immediately).
#[tokio::test]
async fn drain_from_this_host_stops_admissions() {
    let (r, _) = router();
    let mut req = Request::post("/drain?timeout_secs=1")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            40000,
        ))));
    let reply = send(&r, req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "drained");
    assert_eq!(
        get(&r, "/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let reply = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi"}),
    )
    .await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        None,
    );
}
