//! Test fixtures shared by the HTTP and gRPC tests: a byte-level tokenizer and a fake
//! engine whose output is scripted, so every assertion can name exact text and tokens.

#![allow(dead_code)] // each test binary uses a different part

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyserve_coordinator::api::{
    Engine, EngineStats, FinishReason, GenerateRequest, Health, ModelInfo, ServeError, TokenEvent,
    TokenLogprob, TokenStream, Usage,
};
use hyserve_gateway::{Gateway, GatewayConfig};
use hyserve_model::tokenizer::{Tokenizer, write_tiktoken_dir};
use tokio::sync::mpsc;

pub const MODEL: &str = "test-model";
pub const MAX_CONTEXT: usize = 256;
/// Prompt tokens the fake engine reports as served from the prefix cache.
pub const CACHED_TOKENS: usize = 3;

/// The 256 single bytes plus the Hunyuan specials: every character of a multi-byte UTF-8
/// encoding is its own token, and the built-in Hunyuan chat template applies.
pub fn tokenizer() -> Arc<Tokenizer> {
    let dir = tempfile::tempdir().unwrap();
    let ranks: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    write_tiktoken_dir(dir.path(), &ranks).unwrap();
    Arc::new(Tokenizer::from_dir(dir.path()).unwrap())
}

/// An engine that "generates" the encoding of `reply` (with `{seed}` replaced by the
/// request's seed) followed by the tokenizer's first stop id.
pub struct FakeEngine {
    tokenizer: Arc<Tokenizer>,
    pub reply: Mutex<String>,
    pub overloaded: AtomicBool,
    pub live: AtomicBool,
    pub ready: AtomicBool,
    /// Fail the sequence with an internal error after this many tokens.
    pub fail_after: Mutex<Option<usize>>,
    pub submitted: Mutex<Vec<GenerateRequest>>,
    /// Streams dropped by the gateway (cancellations, and ends of consumed streams).
    pub dropped: Arc<AtomicUsize>,
}

impl FakeEngine {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Arc<Self> {
        Arc::new(Self {
            tokenizer,
            reply: Mutex::new("Hello world".into()),
            overloaded: AtomicBool::new(false),
            live: AtomicBool::new(true),
            ready: AtomicBool::new(true),
            fail_after: Mutex::new(None),
            submitted: Mutex::new(Vec::new()),
            dropped: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn set_reply(&self, reply: &str) {
        *self.reply.lock().unwrap() = reply.to_string();
    }

    pub fn seeds(&self) -> Vec<u64> {
        self.submitted
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.sampling.seed.unwrap())
            .collect()
    }
}

impl Engine for FakeEngine {
    fn submit(&self, request: GenerateRequest) -> Result<TokenStream, ServeError> {
        if self.overloaded.load(Ordering::SeqCst) {
            return Err(ServeError::Overloaded {
                message: "queue full".into(),
                retry_after: Duration::from_secs(2),
            });
        }
        let reply = self.reply.lock().unwrap().clone();
        if reply == "PANIC" {
            panic!("the fake engine was told to panic");
        }
        let seed = request.sampling.seed.unwrap_or_default();
        let mut ids = self
            .tokenizer
            .encode(&reply.replace("{seed}", &seed.to_string()), false)
            .unwrap();
        ids.push(self.tokenizer.stop_ids()[0]);
        let fail_after = *self.fail_after.lock().unwrap();
        self.submitted.lock().unwrap().push(request.clone());

        let (tx, rx) = mpsc::channel(4);
        let prompt_tokens = request.prompt.len();
        tokio::spawn(async move {
            let mut generated = 0;
            let mut reason = FinishReason::Length;
            for id in ids {
                if generated == request.max_tokens {
                    break;
                }
                if fail_after == Some(generated) {
                    let _ = tx
                        .send(TokenEvent::Failed(ServeError::Internal {
                            message: "worker 3 died".into(),
                        }))
                        .await;
                    return;
                }
                let k = request.logprobs.unwrap_or(0) as u32;
                let event = TokenEvent::Token {
                    id,
                    logprob: request.logprobs.map(|_| -0.5),
                    top: (0..k)
                        .map(|j| TokenLogprob {
                            id: u32::from(b'a') + j,
                            logprob: -1.0 - j as f32,
                        })
                        .collect(),
                };
                if tx.send(event).await.is_err() {
                    return; // cancelled
                }
                generated += 1;
                if request.stop_token_ids.contains(&id) {
                    reason = FinishReason::Stop;
                    break;
                }
            }
            let _ = tx
                .send(TokenEvent::Finished {
                    reason,
                    usage: Usage {
                        prompt_tokens,
                        completion_tokens: generated,
                        cached_tokens: CACHED_TOKENS,
                    },
                })
                .await;
        });
        let dropped = Arc::clone(&self.dropped);
        Ok(TokenStream::new(rx, prompt_tokens, move || {
            dropped.fetch_add(1, Ordering::SeqCst);
        }))
    }

    fn model_info(&self) -> ModelInfo {
        ModelInfo {
            id: MODEL.into(),
            max_context: MAX_CONTEXT,
            vocab_size: self.tokenizer.vocab_size(),
            created_unix: 1_700_000_000,
        }
    }

    fn health(&self) -> Health {
        Health {
            live: self.live.load(Ordering::SeqCst),
            ready: self.ready.load(Ordering::SeqCst),
        }
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            waiting: 1,
            running: 2,
            kv_blocks_total: 100,
            kv_blocks_used: 10,
            kv_blocks_cached: 4,
            steps_total: 7,
            model_seconds_total: 1.5,
            ..EngineStats::default()
        }
    }
}

pub fn config() -> GatewayConfig {
    GatewayConfig {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        model_name: MODEL.into(),
        api_keys: None,
        max_body_bytes: 64 * 1024,
        max_prompt_tokens: 200,
        max_n: 16,
        log_prompts: false,
        metrics_registry: None,
    }
}

/// A gateway over a fresh fake engine.
pub fn gateway(cfg: GatewayConfig) -> (Gateway, Arc<FakeEngine>) {
    let tok = tokenizer();
    let engine = FakeEngine::new(Arc::clone(&tok));
    let gw = Gateway::new(cfg, Arc::clone(&engine) as Arc<dyn Engine>, tok);
    (gw, engine)
}
