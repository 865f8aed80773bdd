//! The gRPC API through a real tonic client, against a gateway serving on 127.0.0.1:0.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{CACHED_TOKENS, FakeEngine, MODEL, config, gateway};
use hyserve_gateway::{ApiKeys, GatewayConfig};
use hyserve_proto::v1;
use hyserve_proto::v1::inference_client::InferenceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const KEY: &str = "grpc-test-key";

struct Running {
    http: SocketAddr,
    grpc: SocketAddr,
    engine: Arc<FakeEngine>,
    stop: oneshot::Sender<()>,
    served: JoinHandle<Result<(), hyserve_gateway::GatewayError>>,
}

async fn start(cfg: GatewayConfig) -> Running {
    let (gw, engine) = gateway(cfg);
    let (stop, stopped) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = oneshot::channel();
    let served = tokio::spawn(gw.serve(
        async move {
            let _ = stopped.await;
        },
        move |http, grpc| {
            let _ = bound_tx.send((http, grpc));
        },
    ));
    let (http, grpc) = bound_rx.await.unwrap();
    Running {
        http,
        grpc,
        engine,
        stop,
        served,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn authed<T>(msg: T, key: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(key) = key {
        let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
        req.metadata_mut().insert("authorization", value);
    }
    req
}

fn text(t: &str) -> Option<v1::generate_request::Input> {
    Some(v1::generate_request::Input::Text(t.into()))
}

#[tokio::test]
async fn unary_and_streaming_generation_with_auth() {
    let cfg = GatewayConfig {
        api_keys: Some(ApiKeys::from_keys([KEY])),
        ..config()
    };
    let running = start(cfg).await;
    let mut client = InferenceClient::new(channel(running.grpc).await);

    // Text in.
    let resp = client
        .generate(authed(
            v1::GenerateRequest {
                input: text("Hi"),
                ..Default::default()
            },
            Some(KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.text, "Hello world");
    assert_eq!(resp.finish_reason(), v1::FinishReason::Stop);
    assert_eq!(resp.model, MODEL);
    assert_eq!(resp.tokens.len(), "Hello world".len());
    let usage = resp.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens
        ),
        (2, 12, CACHED_TOKENS as u32)
    );

    // Token ids in, logprobs out.
    let resp = client
        .generate(authed(
            v1::GenerateRequest {
                input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                    ids: vec![72, 105],
                })),
                max_tokens: Some(3),
                temperature: Some(0.0),
                seed: Some(5),
                logprobs: true,
                top_logprobs: 2,
                ..Default::default()
            },
            Some(KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.text, "Hel");
    assert_eq!(resp.finish_reason(), v1::FinishReason::Length);
    let first = &resp.tokens[0];
    assert_eq!(
        (first.id, first.text.as_str(), first.logprob),
        (72, "H", -0.5)
    );
    let alts: Vec<(u32, &str, f32)> = first
        .top_logprobs
        .iter()
        .map(|t| (t.id, t.text.as_str(), t.logprob))
        .collect();
    assert_eq!(alts, [(97, "a", -1.0), (98, "b", -2.0)]);
    {
        let submitted = running.engine.submitted.lock().unwrap();
        let req = submitted.last().unwrap();
        assert_eq!(req.prompt, vec![72, 105]);
        assert_eq!(req.sampling.seed, Some(5));
        assert_eq!(req.logprobs, Some(2));
    }

    // Streaming, through the chat template, with a stop string.
    running.engine.set_reply("one two. three");
    let mut stream = client
        .generate_stream(authed(
            v1::GenerateRequest {
                input: text("Count"),
                chat: true,
                stop: vec![".".into()],
                max_tokens: Some(50),
                ..Default::default()
            },
            Some(KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        messages.push(m);
    }
    let last = messages.pop().unwrap();
    assert_eq!(last.finish_reason(), v1::FinishReason::Stop);
    assert!(last.usage.is_some());
    assert!(
        messages
            .iter()
            .all(|m| m.finish_reason() == v1::FinishReason::Unspecified && m.usage.is_none())
    );
    let streamed: String = messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(streamed, "one two");
    // <|startoftext|>Count<|extra_0|>
    assert_eq!(
        running
            .engine
            .submitted
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .prompt
            .len(),
        7
    );

    let models = client
        .list_models(authed(v1::ListModelsRequest {}, Some(KEY)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models[0].id, MODEL);

    // Refused without the key, and with a wrong one; counted with HTTP's failures.
    for key in [None, Some("wrong")] {
        let err = client
            .generate(authed(
                v1::GenerateRequest {
                    input: text("Hi"),
                    ..Default::default()
                },
                key,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = client
            .generate_stream(authed(v1::GenerateRequest::default(), key))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let metrics = reqwest_metrics(running.http).await;
    assert!(
        metrics.contains("hyserve_auth_failures_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"endpoint="grpc_generate_stream",outcome="ok"} 1"#),
        "{metrics}"
    );

    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}

/// `/metrics` over a plain HTTP/1 request (no client crate needed for one GET).
async fn reqwest_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[tokio::test]
async fn errors_map_to_grpc_codes_and_health_follows_readiness() {
    let running = start(config()).await;
    let ch = channel(running.grpc).await;
    let mut client = InferenceClient::new(ch.clone());

    let bad = [
        (
            v1::GenerateRequest {
                input: text("Hi"),
                temperature: Some(5.0),
                ..Default::default()
            },
            "temperature",
        ),
        (v1::GenerateRequest::default(), "input"),
        (
            v1::GenerateRequest {
                input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                    ids: vec![1],
                })),
                chat: true,
                ..Default::default()
            },
            "chat",
        ),
        (
            v1::GenerateRequest {
                input: text("Hi"),
                top_logprobs: 3,
                ..Default::default()
            },
            "top_logprobs",
        ),
        (
            v1::GenerateRequest {
                input: text("Hi"),
                model: "other".into(),
                ..Default::default()
            },
            "model",
        ),
    ];
    for (req, field) in bad {
        let err = client.generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }

    running.engine.overloaded.store(true, Ordering::SeqCst);
    let err = client
        .generate(v1::GenerateRequest {
            input: text("Hi"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    running.engine.overloaded.store(false, Ordering::SeqCst);

    *running.engine.fail_after.lock().unwrap() = Some(1);
    let mut stream = client
        .generate_stream(v1::GenerateRequest {
            input: text("Hi"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without the failure"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Internal);

    let mut health = HealthClient::new(ch);
    let status = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in ["", "hyserve.v1.Inference"] {
        let resp = health.check(status(service)).await.unwrap().into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
    running.engine.ready.store(false, Ordering::SeqCst);
    let mut watch = health.watch(status("")).await.unwrap().into_inner();
    let not_serving = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Some(resp) = watch.message().await.unwrap() {
            if resp.status() == ServingStatus::NotServing {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(not_serving);
    // An open watch would hold the graceful shutdown until its drain deadline.
    drop(watch);

    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}
