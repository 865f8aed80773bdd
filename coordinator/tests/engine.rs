//! The actor system end to end on a real (tiny) model: concurrent requests through two
//! in-process workers give exactly the tokens of a lone sequence, and a dropped stream
//! frees its KV blocks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyserve_coordinator::api::{
    Engine, EngineStats, GenerateRequest, ModelInfo, TokenEvent, TokenStream,
};
use hyserve_coordinator::engine::{EngineConfig, EngineHandle, ExecutorFactory, Reply, WorkerLink};
use hyserve_coordinator::scheduler::SchedulerConfig;
use hyserve_coordinator::scheduler::spec::{ProposerKind, SpecConfig};
use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::sampling::SamplingParams;
use hyserve_kernels::{DType, Precision};
use hyserve_model::graph::TpShard;
use hyserve_model::init::{InitOptions, WeightFormat, init_model};
use hyserve_model::{Arch, Checkpoint, InProcess, Model};
use hyserve_worker::{Executor, ExecutorHandle, GenerateOptions, Step, generate};

struct Fixture {
    _dir: tempfile::TempDir,
    ck: Arc<Checkpoint>,
    cfg: hyserve_model::ModelConfig,
}

fn fixture() -> Fixture {
    fixture_seeded(3)
}

fn fixture_seeded(seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        arch: Arch::HunyuanLarge,
        preset: "tiny".into(),
        seed,
        dtype: DType::BF16,
        format: WeightFormat::Safetensors,
        max_shard_bytes: 1 << 30,
    };
    let cfg = init_model(dir.path(), &opts, &mut |_, _| {}).unwrap();
    let ck = Checkpoint::open(dir.path(), &mut |_| {}).unwrap();
    ck.validate(&cfg).unwrap();
    Fixture {
        _dir: dir,
        ck: Arc::new(ck),
        cfg,
    }
}

fn executor(f: &Fixture, n_blocks: usize) -> ExecutorHandle {
    spawn_executor("test", &f.ck, &f.cfg, n_blocks).unwrap()
}

/// An executor thread on a CPU backend with the whole model.
fn spawn_executor(
    name: &str,
    ck: &Checkpoint,
    cfg: &hyserve_model::ModelConfig,
    n_blocks: usize,
) -> std::io::Result<ExecutorHandle> {
    let backend = CpuBackend::new(Precision::Bf16);
    let model = Model::load(&backend, cfg.clone(), ck, &mut |_| {});
    ExecutorHandle::spawn(
        name,
        Executor::with_threads(backend, model, n_blocks, 16, 1),
    )
}

/// Each prompt's greedy tokens alone, through the plain generation driver.
fn lone_greedy(f: &Fixture, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let lone = executor(f, 64);
    let opts = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        prefill_chunk: 512,
        collect_logits: false,
    };
    prompts
        .iter()
        .map(|p| generate(&lone, p, &opts).unwrap().generated)
        .collect()
}

async fn start(f: &Fixture, n_workers: usize, n_blocks: usize) -> EngineHandle {
    let (ck, cfg) = (f.ck.clone(), f.cfg.clone());
    let factory: ExecutorFactory =
        Arc::new(move |_| Ok(Box::new(spawn_executor("worker", &ck, &cfg, n_blocks)?) as _));
    start_with(f, n_workers, n_blocks, factory, false, SpecConfig::off()).await
}

async fn start_with(
    f: &Fixture,
    n_workers: usize,
    n_blocks: usize,
    factory: ExecutorFactory,
    lockstep: bool,
    speculation: SpecConfig,
) -> EngineHandle {
    EngineHandle::start(
        config(f, n_workers, n_blocks, lockstep, speculation),
        factory,
    )
    .await
    .unwrap()
}

fn config(
    f: &Fixture,
    n_workers: usize,
    n_blocks: usize,
    lockstep: bool,
    speculation: SpecConfig,
) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig {
            n_workers,
            n_blocks_per_worker: n_blocks,
            block_size: 16,
            max_batch_tokens: 64,
            max_running: 8,
            max_waiting: 64,
            prefill_chunk: 24,
            max_context: 512,
            enable_prefix_cache: true,
            speculation,
        },
        model: ModelInfo {
            id: "tiny".into(),
            max_context: 512,
            vocab_size: f.cfg.vocab_size,
            created_unix: 0,
        },
        step_timeout: Duration::from_secs(30),
        lockstep,
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: "t".into(),
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop_token_ids: vec![],
        logprobs: None,
        speculate: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_match_lone_generation() {
    let f = fixture();
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|i| {
            (0..(5 + 3 * i))
                .map(|j| 260 + (i * 31 + j * 7) % 500)
                .collect()
        })
        .collect();
    // Expected: each prompt alone through the plain generation driver.
    let want = lone_greedy(&f, &prompts, 10);
    let engine = start(&f, 2, 32).await;
    let mut tasks = Vec::new();
    for p in prompts.clone() {
        let mut stream = engine.submit(request(p, 10)).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(ev) = stream.recv().await {
                match ev {
                    TokenEvent::Token { id, .. } => ids.push(id),
                    TokenEvent::Finished { usage, .. } => {
                        assert_eq!(usage.completion_tokens, ids.len());
                        break;
                    }
                    TokenEvent::Failed(e) => panic!("{e}"),
                }
            }
            ids
        }));
    }
    for (t, w) in tasks.into_iter().zip(&want) {
        assert_eq!(&t.await.unwrap(), w);
    }
    let s = engine.stats();
    assert!(
        s.steps_total > 0 && s.running == 0 && s.waiting == 0,
        "{s:?}"
    );
    // A step's time in parts, each inside the one around it: the forward pass inside
    // the worker's step, the worker's inside the wait for the workers' replies, that
    // inside the step from planning to results applied.
    assert!(
        0.0 < s.forward_seconds_total
            && s.forward_seconds_total <= s.worker_seconds_total
            && s.worker_seconds_total <= s.model_seconds_total
            && s.model_seconds_total <= s.step_seconds_total,
        "{s:?}"
    );
    assert!(engine.health().ready);
    engine.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_frees_its_blocks() {
    let f = fixture();
    let engine = start(&f, 1, 64).await;
    let mut stream = engine.submit(request((300..340).collect(), 400)).unwrap();
    // Wait for a few tokens: the sequence is running and holds blocks.
    for _ in 0..3 {
        assert!(matches!(
            stream.recv().await,
            Some(TokenEvent::Token { .. })
        ));
    }
    assert!(engine.stats().kv_blocks_used > 0);
    drop(stream);
    let mut freed = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = engine.stats();
        if s.kv_blocks_used == 0 && s.running == 0 {
            freed = true;
            break;
        }
    }
    assert!(freed, "blocks still held: {:?}", engine.stats());
    engine.stop();
}

/// A worker link that fails its first step, then passes steps to a real executor.
struct Faulty {
    inner: ExecutorHandle,
    /// Drop the first step unanswered and die (else: keep its answer forever).
    die: bool,
    seen: AtomicBool,
    dead: AtomicBool,
    held: Mutex<Vec<Reply>>,
}

impl Faulty {
    fn new(inner: ExecutorHandle, die: bool) -> Self {
        Self {
            inner,
            die,
            seen: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
        }
    }
}

impl WorkerLink for Faulty {
    fn submit(&self, step: Step, reply: Reply) -> Result<(), String> {
        if self.dead.load(Ordering::Acquire) {
            return Err("dead".into());
        }
        if !self.seen.swap(true, Ordering::AcqRel) {
            if self.die {
                self.dead.store(true, Ordering::Release);
                drop(reply);
            } else {
                self.held.lock().unwrap().push(reply);
            }
            return Ok(());
        }
        self.inner.submit(step, reply)
    }

    fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }
}

/// A worker that dies with a step (its answer dropped), and one that never answers a
/// step (the watchdog's timeout), each lose no request: the step's sequences are
/// recomputed, by a restarted worker or the same one, and give the lone tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_silent_worker_loses_no_request() {
    let f = fixture();
    let prompts: Vec<Vec<u32>> = vec![(300..330).collect(), (400..410).collect()];
    let want = lone_greedy(&f, &prompts, 8);
    for die in [true, false] {
        let built = Arc::new(AtomicUsize::new(0));
        let (ck, cfg, n) = (f.ck.clone(), f.cfg.clone(), built.clone());
        let factory: ExecutorFactory = Arc::new(move |_| {
            let inner = spawn_executor("worker", &ck, &cfg, 64)?;
            Ok(if n.fetch_add(1, Ordering::AcqRel) == 0 {
                Box::new(Faulty::new(inner, die)) as _
            } else {
                Box::new(inner) as _
            })
        });
        // The dead worker's step must fail at once, not at the watchdog's timeout
        // (four step timeouts: two minutes here).
        let mut config = config(&f, 1, 64, false, SpecConfig::off());
        config.step_timeout = Duration::from_millis(if die { 30_000 } else { 50 });
        let engine = EngineHandle::start(config, factory).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), generate_all(&engine, &prompts, 8))
            .await
            .unwrap_or_else(|_| panic!("die: {die}: no answer in 20 s"));
        assert_eq!(got, want, "die: {die}");
        // Only the dead worker was built again.
        assert_eq!(built.load(Ordering::Acquire), 1 + usize::from(die));
        let s = engine.stats();
        assert_eq!((s.running, s.waiting, s.workers_alive), (0, 0, 1), "{s:?}");
        engine.stop();
    }
}

/// A worker link whose first `n` steps fail with an error (the worker stays up).
struct Erring {
    inner: ExecutorHandle,
    left: AtomicUsize,
}

impl WorkerLink for Erring {
    fn submit(&self, step: Step, reply: Reply) -> Result<(), String> {
        let failing = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            reply(Err("injected step failure".into()));
            return Ok(());
        }
        self.inner.submit(step, reply)
    }

    fn is_alive(&self) -> bool {
        true
    }
}

/// A worker that dies and cannot be built again at once (its first two rebuilds fail):
/// no step is planned while it is down (one failed step in all, not one per turn of
/// the scheduler), the rebuild is retried, and every request still gets the lone tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_wait_for_a_dead_worker_to_be_rebuilt() {
    let f = fixture();
    let prompts: Vec<Vec<u32>> = vec![(300..330).collect(), (400..410).collect()];
    let want = lone_greedy(&f, &prompts, 8);
    let built = Arc::new(AtomicUsize::new(0));
    let (ck, cfg, n) = (f.ck.clone(), f.cfg.clone(), built.clone());
    let factory: ExecutorFactory = Arc::new(move |_| {
        let k = n.fetch_add(1, Ordering::AcqRel);
        if k == 1 || k == 2 {
            return Err(std::io::Error::other("the device is not back yet"));
        }
        let inner = spawn_executor("worker", &ck, &cfg, 64)?;
        Ok(if k == 0 {
            Box::new(Faulty::new(inner, true)) as _
        } else {
            Box::new(inner) as _
        })
    });
    let engine = EngineHandle::start(config(&f, 1, 64, false, SpecConfig::off()), factory)
        .await
        .unwrap();
    // Rebuilds are retried after 0.5 s and 1 s.
    let got = tokio::time::timeout(Duration::from_secs(20), generate_all(&engine, &prompts, 8))
        .await
        .expect("no answer in 20 s");
    assert_eq!(got, want);
    assert_eq!(built.load(Ordering::Acquire), 4);
    let s = engine.stats();
    assert_eq!(s.steps_failed_total, 1, "{s:?}");
    assert_eq!((s.running, s.waiting, s.workers_alive), (0, 0, 1), "{s:?}");
    engine.stop();
}

/// Steps that fail in a row (the worker answers with an error and stays up) are retried
/// after growing pauses, 10 ms from the second failure on and doubling, and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_failing_in_a_row_are_retried_after_growing_pauses() {
    let f = fixture();
    let prompts: Vec<Vec<u32>> = vec![(300..330).collect(), (400..410).collect()];
    let want = lone_greedy(&f, &prompts, 8);
    let (ck, cfg) = (f.ck.clone(), f.cfg.clone());
    let factory: ExecutorFactory = Arc::new(move |_| {
        Ok(Box::new(Erring {
            inner: spawn_executor("worker", &ck, &cfg, 64)?,
            left: AtomicUsize::new(5),
        }) as _)
    });
    let engine = EngineHandle::start(config(&f, 1, 64, false, SpecConfig::off()), factory)
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(20), generate_all(&engine, &prompts, 8))
        .await
        .expect("no answer in 20 s");
    let took = t0.elapsed();
    assert_eq!(got, want);
    let s = engine.stats();
    assert_eq!(s.steps_failed_total, 5, "{s:?}");
    // Pauses after the 2nd to 5th failures: 10 + 20 + 40 + 80 ms at least.
    assert!(took >= Duration::from_millis(150), "took {took:?}");
    assert_eq!((s.running, s.waiting, s.workers_alive), (0, 0, 1), "{s:?}");
    engine.stop();
}

/// A worker link that fails every step holding token [`POISON`] (the worker stays up).
struct Poisoned(ExecutorHandle);

const POISON: u32 = 666;

impl WorkerLink for Poisoned {
    fn submit(&self, step: Step, reply: Reply) -> Result<(), String> {
        if step.seqs.iter().any(|s| s.tokens.contains(&POISON)) {
            reply(Err("injected failure of a poisoned step".into()));
            return Ok(());
        }
        self.0.submit(step, reply)
    }

    fn is_alive(&self) -> bool {
        true
    }
}

/// An engine of one worker whose steps fail whenever they hold [`POISON`].
async fn start_poisoned(f: &Fixture) -> EngineHandle {
    let (ck, cfg) = (f.ck.clone(), f.cfg.clone());
    let factory: ExecutorFactory =
        Arc::new(move |_| Ok(Box::new(Poisoned(spawn_executor("worker", &ck, &cfg, 64)?)) as _));
    EngineHandle::start(config(f, 1, 64, false, SpecConfig::off()), factory)
        .await
        .unwrap()
}

/// The poisoned request's answer: an internal error (HTTP 500) after 8 failed steps;
/// its text.
async fn given_up(stream: &mut TokenStream) -> String {
    let answer = tokio::time::timeout(Duration::from_secs(30), stream.recv())
        .await
        .expect("the poisoned request got no answer in 30 s");
    match answer {
        Some(TokenEvent::Failed(e)) => {
            let text = e.to_string();
            assert!(text.contains("in 8 failed steps"), "{text}");
            assert_eq!(e.http_status(), 500);
            text
        }
        other => panic!("the poisoned request got {other:?}, not an error"),
    }
}

/// The engine's stats once `settled` holds of them, or after 2 s: an error reaches the
/// client before the failed step's own bookkeeping is published.
async fn stats_once(engine: &EngineHandle, settled: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut s = engine.stats();
    while !settled(&s) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        s = engine.stats();
    }
    s
}

/// A request that breaks every step it is in (a "query of death") is failed with an
/// internal error after 8 failed steps in a row, not retried forever; the engine then
/// serves the next request as if nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_breaks_every_step_fails_and_the_engine_goes_on() {
    let f = fixture();
    let healthy: Vec<Vec<u32>> = vec![(300..330).collect()];
    let want = lone_greedy(&f, &healthy, 8);
    let engine = start_poisoned(&f).await;
    let mut stream = engine
        .submit(request(vec![400, 401, POISON, 402], 8))
        .unwrap();
    let text = given_up(&mut stream).await;
    assert!(text.contains("injected failure"), "{text}");
    let s = stats_once(&engine, |s| (s.steps_failed_total, s.waiting) == (8, 0)).await;
    assert_eq!(
        (s.steps_failed_total, s.requests_given_up_total),
        (8, 1),
        "{s:?}"
    );
    assert_eq!((s.running, s.waiting), (0, 0), "{s:?}");
    let got = tokio::time::timeout(Duration::from_secs(20), generate_all(&engine, &healthy, 8))
        .await
        .expect("no answer in 20 s after the poisoned request");
    assert_eq!(got, want);
    assert_eq!(engine.stats().steps_failed_total, 8);
    engine.stop();
}

/// A query of death batched with healthy requests is singled out (each failure halves
/// the suspects) and fails alone; the others generate what they would alone. Its poison
/// lies in its second prompt chunk, so the step of its first chunk succeeds every time:
/// a success that gives the suspect no token does not end the fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_breaks_every_step_is_singled_out_of_its_batch() {
    let f = fixture();
    let healthy: Vec<Vec<u32>> = (0..7u32)
        .map(|i| (0..6).map(|j| 300 + 20 * i + j).collect())
        .collect();
    let want = lone_greedy(&f, &healthy, 8);
    let engine = start_poisoned(&f).await;
    // Third of eight: in the first half the first probe holds.
    let (before, after) = healthy.split_at(2);
    let mut tasks = submit_all(&engine, before, 8);
    let mut poisoned: Vec<u32> = (400..440).collect();
    poisoned[30] = POISON;
    let mut stream = engine.submit(request(poisoned, 8)).unwrap();
    tasks.extend(submit_all(&engine, after, 8));
    let got = tokio::time::timeout(Duration::from_secs(30), collect(tasks))
        .await
        .expect("the healthy requests got no answer in 30 s");
    assert_eq!(got, want);
    given_up(&mut stream).await;
    let s = stats_once(&engine, |s| s.requests_given_up_total == 1).await;
    assert_eq!(
        (s.steps_failed_total, s.requests_given_up_total),
        (8, 1),
        "{s:?}"
    );
    engine.stop();
}

/// Three in-process workers of one expert-parallel group (each holding a third of the
/// experts, expert 0 replicated on all), stepping in lockstep through the engine,
/// generate exactly what one whole model does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_parallel_workers_match_lone_generation() {
    let f = fixture();
    let prompts: Vec<Vec<u32>> = (0..5u32)
        .map(|i| {
            (0..(4 + 5 * i))
                .map(|j| 300 + (i * 17 + j * 11) % 400)
                .collect()
        })
        .collect();
    let want = lone_greedy(&f, &prompts, 8);
    let holders: Vec<Vec<Vec<u32>>> = f
        .cfg
        .layers
        .iter()
        .map(|l| {
            (0..l.n_experts)
                .map(|e| {
                    if e == 0 {
                        vec![0, 1, 2]
                    } else {
                        vec![(e % 3) as u32]
                    }
                })
                .collect()
        })
        .collect();
    let group = std::sync::Mutex::new(
        InProcess::group(3, Duration::from_secs(30))
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
    );
    let (ck, cfg) = (f.ck.clone(), f.cfg.clone());
    let factory: ExecutorFactory = Arc::new(move |i| {
        let backend = CpuBackend::new(Precision::Bf16);
        let holds = |l: usize, e: usize| holders[l][e].contains(&(i as u32));
        let model = Model::load_shard(
            &backend,
            cfg.clone(),
            &ck,
            &holds,
            TpShard::WHOLE,
            &mut |_| {},
        );
        let mut exec = Executor::with_threads(backend, model, 32, 16, 1);
        let ex = group.lock().unwrap()[i].take().expect("one end per worker");
        exec.expert_parallel(Box::new(ex), 0, holders.clone());
        Ok(Box::new(ExecutorHandle::spawn("ep-worker", exec)?) as _)
    });
    let engine = start_with(&f, 3, 32, factory, true, SpecConfig::off()).await;
    let mut tasks = Vec::new();
    for p in prompts {
        let mut stream = engine.submit(request(p, 8)).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(ev) = stream.recv().await {
                match ev {
                    TokenEvent::Token { id, .. } => ids.push(id),
                    TokenEvent::Finished { .. } => break,
                    TokenEvent::Failed(e) => panic!("{e}"),
                }
            }
            ids
        }));
    }
    for (t, w) in tasks.into_iter().zip(&want) {
        assert_eq!(&t.await.unwrap(), w);
    }
    let load = engine.take_expert_load();
    assert_eq!(load.len(), f.cfg.n_layers * f.cfg.layers[0].n_experts);
    assert!(load.iter().sum::<u64>() > 0);
    engine.stop();
}

/// Every prompt's greedy tokens through `engine`, submitted at once.
async fn generate_all(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<Vec<u32>> {
    collect(submit_all(engine, prompts, max_tokens)).await
}

/// Submits the prompts in order (before returning), each streamed by its own task.
fn submit_all(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<tokio::task::JoinHandle<Vec<u32>>> {
    let mut tasks = Vec::new();
    for p in prompts {
        let mut stream = engine.submit(request(p.clone(), max_tokens)).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(ev) = stream.recv().await {
                match ev {
                    TokenEvent::Token { id, .. } => ids.push(id),
                    TokenEvent::Finished { usage, .. } => {
                        assert_eq!(usage.completion_tokens, ids.len());
                        break;
                    }
                    TokenEvent::Failed(e) => panic!("{e}"),
                }
            }
            ids
        }));
    }
    tasks
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<u32>>>) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Speculative decoding through real executors, whole and expert-parallel (three
/// lockstep workers, each verifying its sequences' proposals through the exchange):
/// with prompt lookup, with a draft model that always agrees (the target's own
/// weights) and with one that rarely does (other weights), greedy outputs are exactly
/// those of plain generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_through_real_executors_matches_lone_generation() {
    let f = fixture();
    let other = fixture_seeded(9);
    // Repetitive prompts, so prompt lookup finds something.
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|i| {
            let p: Vec<u32> = (0..(6 + 3 * i))
                .map(|j| 260 + (i * 31 + j * 7) % 500)
                .collect();
            [p.clone(), p].concat()
        })
        .collect();
    let want = lone_greedy(&f, &prompts, 12);
    let holders: Vec<Vec<Vec<u32>>> = f
        .cfg
        .layers
        .iter()
        .map(|l| (0..l.n_experts).map(|e| vec![(e % 3) as u32]).collect())
        .collect();
    for (name, proposer, draft) in [
        ("ngram", ProposerKind::Ngram, None),
        ("same-draft", ProposerKind::Draft, Some(&f)),
        ("other-draft", ProposerKind::Draft, Some(&other)),
    ] {
        for ep in [false, true] {
            let (ck, cfg) = (f.ck.clone(), f.cfg.clone());
            let draft = draft.map(|d| (d.ck.clone(), d.cfg.clone()));
            let holders = holders.clone();
            let group = std::sync::Mutex::new(
                InProcess::group(3, Duration::from_secs(30))
                    .into_iter()
                    .map(Some)
                    .collect::<Vec<_>>(),
            );
            let factory: ExecutorFactory = Arc::new(move |i| {
                let backend = CpuBackend::new(Precision::Bf16);
                let holds = |l: usize, e: usize| !ep || holders[l][e].contains(&(i as u32));
                let model = Model::load_shard(
                    &backend,
                    cfg.clone(),
                    &ck,
                    &holds,
                    TpShard::WHOLE,
                    &mut |_| {},
                );
                let d = draft
                    .as_ref()
                    .map(|(ck, cfg)| Model::load(&backend, cfg.clone(), ck, &mut |_| {}));
                let mut exec = Executor::with_threads(backend, model, 32, 16, 1);
                if let Some(d) = d {
                    exec.set_draft(d).unwrap();
                }
                if ep {
                    let ex = group.lock().unwrap()[i].take().expect("one end per worker");
                    exec.expert_parallel(Box::new(ex), 0, holders.clone());
                }
                Ok(Box::new(ExecutorHandle::spawn("spec-worker", exec)?) as _)
            });
            let spec = SpecConfig {
                fixed_depth: Some(3),
                ..SpecConfig::new(proposer)
            };
            let n_workers = if ep { 3 } else { 1 };
            let engine = start_with(&f, n_workers, 32, factory, ep, spec).await;
            let got = generate_all(&engine, &prompts, 12).await;
            assert_eq!(got, want, "{name}, expert parallel: {ep}");
            let st = engine.stats().spec;
            assert!(st.proposed_tokens > 0, "{name}: {st:?}");
            if name == "same-draft" {
                assert_eq!(st.accepted_tokens, st.proposed_tokens, "{name}: {st:?}");
            }
            engine.stop();
        }
    }
}
