//! The engine's host overhead per step, without a model: the scheduler actor, the
//! messaging and the token streams, against workers that answer every step at once
//! (each a thread behind a queue, as an executor is, writing a logits row per sequence
//! whose largest entry is a fixed function of the sequence and position: the others 0
//! (`flat`), or falling as `-1.1 ln(1 + rank)` from it (`peaked`, Zipf-like); or, for a
//! sequence that asks for only its arg-max token (greedy), that token, as a GPU worker
//! sends it).
//!
//! ```sh
//! cargo run --release -p hyserve-coordinator --example step_overhead -- 1,8,32
//! cargo run --release -p hyserve-coordinator --example step_overhead -- 1,8,32 16 0.7
//! cargo run --release -p hyserve-coordinator --example step_overhead -- 1,8,32 8 0.7 0.9 peaked
//! ```
//!
//! Prints, per batch size, the step's wall time and its parts (ms): the scheduler's own
//! time (planning, sampling, delivering tokens), the answering thread's, and the rest
//! (messaging). Arguments: batch sizes, rounds (16), temperature (0: greedy), top-p
//! (1: no truncation), rows (`flat` or `peaked`). No speculation, 128 tokens per
//! request, prompts of 48 tokens.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyserve_coordinator::api::{Engine, EngineStats, GenerateRequest, ModelInfo, TokenEvent};
use hyserve_coordinator::engine::{EngineConfig, EngineHandle, ExecutorFactory, Reply, WorkerLink};
use hyserve_coordinator::scheduler::SchedulerConfig;
use hyserve_coordinator::scheduler::spec::SpecConfig;
use hyserve_kernels::sampling::SamplingParams;
use hyserve_worker::{Step, StepOutput, StepTiming};

const VOCAB: usize = 4352;
const PROMPT: usize = 48;
const MAX_TOKENS: usize = 128;

/// A worker that answers each step on its own thread, in order.
struct AtOnce {
    tx: mpsc::Sender<(Step, Reply, Instant)>,
}

impl AtOnce {
    fn spawn(peaked: bool) -> Self {
        let (tx, rx) = mpsc::channel::<(Step, Reply, Instant)>();
        let zipf: Vec<f32> = (0..VOCAB).map(|k| -1.1 * (1.0 + k as f32).ln()).collect();
        std::thread::Builder::new()
            .name("answer".into())
            .spawn(move || {
                for (step, reply, sent) in rx {
                    let t0 = Instant::now();
                    let best = |s: &hyserve_worker::SeqStep, r: usize| {
                        let pos = s.first_pos + if s.all_logits { r } else { s.tokens.len() - 1 };
                        (s.seq_id as usize * 131 + pos * 7) % VOCAB
                    };
                    let n_rows = |s: &hyserve_worker::SeqStep| {
                        if s.all_logits { s.tokens.len() } else { 1 }
                    };
                    // A sequence that asks for only the arg-max tokens gets those (a GPU
                    // worker takes them on the device), the others their rows.
                    let argmax = step
                        .seqs
                        .iter()
                        .map(|s| {
                            if s.argmax_only {
                                (0..n_rows(s)).map(|r| best(s, r) as u32).collect()
                            } else {
                                Vec::new()
                            }
                        })
                        .collect();
                    let logits = step
                        .seqs
                        .iter()
                        .map(|s| {
                            if s.argmax_only {
                                return Vec::new();
                            }
                            let rows = n_rows(s);
                            let mut l = vec![0.0f32; rows * VOCAB];
                            for r in 0..rows {
                                let best = best(s, r);
                                let row = &mut l[r * VOCAB..(r + 1) * VOCAB];
                                if peaked {
                                    row[best..].copy_from_slice(&zipf[..VOCAB - best]);
                                    row[..best].copy_from_slice(&zipf[VOCAB - best..]);
                                } else {
                                    row[best] = 1.0;
                                }
                            }
                            l
                        })
                        .collect();
                    let worker_seconds = t0.elapsed().as_secs_f64();
                    reply(Ok(StepOutput {
                        logits,
                        argmax,
                        vocab_size: VOCAB,
                        timing: StepTiming {
                            queued_seconds: (t0 - sent).as_secs_f64(),
                            worker_seconds,
                            forward_seconds: worker_seconds,
                        },
                        ..StepOutput::default()
                    }));
                }
            })
            .expect("spawning the answering thread");
        Self { tx }
    }
}

impl WorkerLink for AtOnce {
    fn submit(&self, step: Step, reply: Reply) -> Result<(), String> {
        self.tx
            .send((step, reply, Instant::now()))
            .map_err(|_| "the answering thread is gone".to_string())
    }

    fn is_alive(&self) -> bool {
        true
    }
}

fn config(batch: usize) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig {
            n_workers: 1,
            n_blocks_per_worker: batch * (PROMPT + MAX_TOKENS).div_ceil(16) + 64,
            block_size: 16,
            max_batch_tokens: 2048,
            max_running: batch,
            max_waiting: 4 * batch,
            prefill_chunk: 512,
            max_context: 4096,
            enable_prefix_cache: true,
            speculation: SpecConfig::off(),
        },
        model: ModelInfo {
            id: "step-overhead".into(),
            max_context: 4096,
            vocab_size: VOCAB,
            created_unix: 0,
        },
        step_timeout: Duration::from_secs(30),
        lockstep: false,
    }
}

/// Keeps `batch` requests in flight until `n` are done.
async fn run(
    engine: &EngineHandle,
    batch: usize,
    n: usize,
    salt: u32,
    temperature: f32,
    top_p: f32,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    let submit = |i: usize| {
        let prompt = (0..PROMPT as u32)
            .map(|j| (salt * 7919 + i as u32 * 613 + j * 31) % VOCAB as u32)
            .collect();
        let mut stream = engine
            .submit(GenerateRequest {
                request_id: format!("r{i}"),
                prompt,
                sampling: if temperature > 0.0 {
                    SamplingParams {
                        temperature,
                        top_p,
                        seed: Some(i as u64),
                        ..SamplingParams::default()
                    }
                } else {
                    SamplingParams::greedy()
                },
                max_tokens: MAX_TOKENS,
                stop_token_ids: vec![],
                logprobs: None,
                speculate: false,
            })
            .expect("submitting");
        async move {
            let mut n = 0;
            while let Some(ev) = stream.recv().await {
                match ev {
                    TokenEvent::Token { .. } => n += 1,
                    TokenEvent::Finished { .. } => break,
                    TokenEvent::Failed(e) => panic!("{e}"),
                }
            }
            assert_eq!(n, MAX_TOKENS);
        }
    };
    while started < batch.min(n) {
        tasks.spawn(submit(started));
        started += 1;
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a request failed");
        if started < n {
            tasks.spawn(submit(started));
            started += 1;
        }
    }
}

fn per_step(a: &EngineStats, b: &EngineStats) -> (u64, [f64; 4]) {
    let steps = (a.steps_total - b.steps_total).max(1);
    let ms = |x: f64| x * 1e3 / steps as f64;
    (
        a.steps_total - b.steps_total,
        [
            ms(a.step_seconds_total - b.step_seconds_total),
            ms(a.scheduler_seconds_total - b.scheduler_seconds_total),
            ms(a.worker_seconds_total - b.worker_seconds_total),
            ms(a.model_seconds_total - b.model_seconds_total),
        ],
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let batches: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "1,8,32".into())
        .split(',')
        .map(|b| b.trim().parse().expect("batch sizes: e.g. 1,8,32"))
        .collect();
    let rounds: usize = std::env::args()
        .nth(2)
        .map(|r| r.parse().expect("rounds: a number"))
        .unwrap_or(16);
    let temperature: f32 = std::env::args()
        .nth(3)
        .map(|t| t.parse().expect("temperature: a number"))
        .unwrap_or(0.0);
    let top_p: f32 = std::env::args()
        .nth(4)
        .map(|t| t.parse().expect("top-p: a number in (0, 1]"))
        .unwrap_or(1.0);
    let peaked = match std::env::args().nth(5).as_deref() {
        None | Some("flat") => false,
        Some("peaked") => true,
        Some(other) => panic!("rows: flat or peaked, not {other}"),
    };
    println!("| batch | steps | step ms | scheduler | answering thread | messaging | tok/s |");
    println!("|---|---|---|---|---|---|---|");
    for batch in batches {
        let factory: ExecutorFactory = Arc::new(move |_| Ok(Box::new(AtOnce::spawn(peaked)) as _));
        let engine = EngineHandle::start(config(batch), factory)
            .await
            .expect("starting the engine");
        // One unmeasured round first (allocations, the runtime's threads).
        run(&engine, batch, batch, 0, temperature, top_p).await;
        let before = engine.stats();
        let t0 = Instant::now();
        let n = batch * rounds;
        run(&engine, batch, n, 1, temperature, top_p).await;
        let secs = t0.elapsed().as_secs_f64();
        let (steps, [step, sched, worker, model]) = per_step(&engine.stats(), &before);
        eprintln!("batch {batch}: {n} requests in {secs:.2} s");
        println!(
            "| {batch} | {steps} | {step:.4} | {sched:.4} | {worker:.4} | {:.4} | {:.0} |",
            model - worker,
            (n * MAX_TOKENS) as f64 / secs
        );
        engine.stop();
    }
}
