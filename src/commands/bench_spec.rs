//! `hyserve bench-spec`: speculative decoding against plain decoding on the same engine
//! (scheduler, workers, sampling: everything but the HTTP front), per proposer, batch
//! size and workload: tokens per second, inter-token latency, acceptance, and whether
//! every output is the plain one.
//!
//! Workloads come from held-out text the model never saw: `edit` asks the model to put
//! a passage into modern English (the answer mostly copies the prompt: repetition is
//! natural), `free` continues a chapter from its first verse (no repetition to find).
//! Each measurement keeps `batch` requests in flight until `batch * rounds` are done.
//! Before the measurements of a batch size, every engine serves one unmeasured
//! measurement's worth of requests (a speculating engine up to three, until its guard
//! has measured both arms at that load), so that what is measured is a server in its
//! steady state: kernels compiled, step shapes recorded, and the speculation guard
//! settled on where speculation pays.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hyserve_coordinator::api::{Engine, GenerateRequest, ModelInfo, TokenEvent};
use hyserve_coordinator::engine::{EngineConfig, EngineHandle};
use hyserve_coordinator::scheduler::SchedulerConfig;
use hyserve_coordinator::scheduler::spec::{ProposerKind, SpecConfig, guard_bucket};
use hyserve_kernels::Precision;
use hyserve_kernels::sampling::SamplingParams;
use hyserve_model::tokenizer::{ChatMessage, Tokenizer};
use hyserve_model::{Checkpoint, ModelConfig};
use serde::Serialize;

use super::serve::{WeightSource, local_factory, open_draft, warm_up_plan};
use crate::config::uniform_steps;
use crate::load;

/// Unmeasured measurements' worth of requests a speculating engine serves at most
/// before a batch size is measured, while its guard has not measured both arms there.
const WARM_UP_ROUNDS: usize = 3;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Draft model (default with the embedded model: its draft).
    #[arg(long)]
    draft_model: Option<PathBuf>,
    /// Held-out passages, JSON lines with `prompt_edit` and `prompt_free` (default: the
    /// embedded model's).
    #[arg(long)]
    workload: Option<PathBuf>,
    /// cpu, or cuda (one GPU).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Proposers, each on its own engine: off, ngram, draft. `off` named twice runs
    /// a second plain engine, reported as `off-again`: an A/A comparison whose ratio
    /// is the run's noise.
    #[arg(long, value_delimiter = ',', default_value = "off,ngram,draft")]
    proposers: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "edit,free")]
    workloads: Vec<String>,
    /// Requests per measurement: `batch * rounds`, at least `min_requests`.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long, default_value_t = 8)]
    min_requests: usize,
    /// Measurements per configuration, interleaved with the other proposers'; the
    /// median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Propose exactly this many tokens wherever possible (default: adaptive).
    #[arg(long)]
    spec_depth: Option<usize>,
    #[arg(long, default_value_t = 6)]
    spec_max_depth: usize,
    /// One depth for every sequence of a speculating step (auto: on with cuda).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    spec_uniform: String,
    #[arg(long, default_value_t = 256)]
    kv_cache_mib: usize,
    /// Step shapes each GPU engine records at start-up, as `serve --warm-up-shapes`
    /// does (0, the default: none, every shape then recorded when serving first meets
    /// it).
    #[arg(long, default_value_t = 0)]
    warm_up_shapes: usize,
    /// Each speculating engine also serves every measurement once more with requests
    /// that opt out of speculation (reported as `<proposer>-opted-out`), next to its
    /// speculating run in the same repetition: the ratio to that run is speculation's
    /// own, with whatever tells engine instances apart (thread placement, memory)
    /// left out.
    #[arg(long)]
    own_plain: bool,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    workload: String,
    batch: usize,
    proposer: String,
    requests: usize,
    tokens: usize,
    seconds: f64,
    tokens_per_second: f64,
    /// Median over repetitions, over plain decoding's median in the same run.
    speedup: f64,
    /// The median of the repetitions' own ratios: each repetition's tokens per second
    /// over its plain runs' (the geometric mean of `off` and `off-again` where both
    /// ran, `off` alone for `off-again` itself). A drift of the machine's speed over
    /// the run, which moves whole repetitions, cancels here and not in `speedup`.
    speedup_paired: f64,
    /// The lowest and highest of those ratios.
    speedup_min: f64,
    speedup_max: f64,
    /// With `--own-plain`, for a speculating engine: the median of the repetitions'
    /// tokens per second over the same engine's opted-out run in the same repetition,
    /// and the lowest and highest of those ratios.
    speedup_own: Option<f64>,
    speedup_own_min: Option<f64>,
    speedup_own_max: Option<f64>,
    /// Mean over requests (of every repetition) of (last token time - first token
    /// time) / (tokens - 1).
    itl_ms_mean: f64,
    itl_ms_p90: f64,
    ttft_ms_mean: f64,
    proposed: u64,
    accepted: u64,
    acceptance: f64,
    /// Accepted tokens per verification of one sequence.
    accepted_per_verify: f64,
    steps: u64,
    /// Of those, steps that verified proposals, and steps that ran a shape still being
    /// recorded (CUDA graphs).
    spec_steps: u64,
    warming_steps: u64,
    /// Per step: milliseconds from sending the step to the workers to their last reply
    /// (draft rounds included), and of the scheduler's own work (planning, verifying).
    model_ms_per_step: f64,
    scheduler_ms_per_step: f64,
    /// Per step: its wall time (planning to results applied), and of the model time
    /// the slowest worker's own (of which its forward pass) and its executor queue's.
    step_ms_per_step: f64,
    worker_ms_per_step: f64,
    forward_ms_per_step: f64,
    queued_ms_per_step: f64,
    /// Steps that computed a prompt chunk (alongside decodes; never speculative), and
    /// their mean wall time in milliseconds.
    prompt_steps: u64,
    prompt_step_ms: f64,
    /// Requests whose output equals plain decoding's.
    same_as_plain: usize,
}

#[derive(Serialize)]
struct Report {
    device: String,
    model: String,
    draft: Option<String>,
    cores: usize,
    temperature: f32,
    max_tokens: usize,
    spec_depth: Option<usize>,
    spec_max_depth: usize,
    spec_uniform: bool,
    warm_up_shapes: usize,
    rows: Vec<Row>,
}

/// What one column of measurements runs: an engine, with its requests speculating
/// (as the engine is configured) or opted out.
struct Arm {
    /// Index into the engines.
    engine: usize,
    label: String,
    speculate: bool,
    /// The arm measuring the same engine opted out, for a speculating arm that has one.
    opted_out: Option<usize>,
}

/// The arms in the order repetition `rep` measures them: an engine's speculating and
/// opted-out arms one after the other, which first taking turns, so that a drift of
/// the machine within a repetition favours neither.
fn measuring_order(arms: &[Arm], rep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..arms.len()).collect();
    if rep % 2 == 1 {
        for (i, arm) in arms.iter().enumerate() {
            if let Some(j) = arm.opted_out {
                order.swap(i, j);
            }
        }
    }
    order
}

/// One timed run of `n` requests on one engine.
#[derive(Clone)]
struct Measured {
    seconds: f64,
    done: Vec<Done>,
    before: hyserve_coordinator::api::EngineStats,
    after: hyserve_coordinator::api::EngineStats,
}

impl Measured {
    fn tokens(&self) -> usize {
        self.done.iter().map(|d| d.tokens.len()).sum()
    }

    fn tokens_per_second(&self) -> f64 {
        self.tokens() as f64 / self.seconds
    }
}

/// The median tokens per second of repeated runs.
fn median_tps(runs: &[Measured]) -> f64 {
    let mut t: Vec<f64> = runs.iter().map(|m| m.tokens_per_second()).collect();
    t.sort_by(f64::total_cmp);
    percentile(&t, 0.5)
}

/// Each repetition's tokens per second over `reference`'s of the same repetition, in
/// ascending order.
fn paired_ratios(runs: &[Measured], reference: &[f64]) -> Vec<f64> {
    let mut r: Vec<f64> = runs
        .iter()
        .zip(reference)
        .map(|(m, r)| m.tokens_per_second() / r)
        .collect();
    r.sort_by(f64::total_cmp);
    r
}

/// Milliseconds each of `n` steps that took `seconds` in all (0 for none).
fn ms_each(seconds: f64, n: u64) -> f64 {
    1e3 * seconds / n.max(1) as f64
}

/// One table row from a configuration's repeated runs: the median run's speed, latency
/// and acceptance over all of them, and how many outputs equal plain decoding's.
fn summarize(
    workload: &str,
    batch: usize,
    label: &str,
    runs: &[Measured],
    plain: Option<&[Measured]>,
    reference: &[f64],
    plain_out: Option<&[Vec<u32>]>,
) -> Row {
    let tps = median_tps(runs);
    let plain_tps = plain.map(median_tps);
    let paired = paired_ratios(runs, reference);
    let all: Vec<&Done> = runs.iter().flat_map(|m| &m.done).collect();
    let mut itl: Vec<f64> = all
        .iter()
        .filter_map(|d| d.itl.map(|x| x.as_secs_f64() * 1e3))
        .collect();
    itl.sort_by(f64::total_cmp);
    let delta = |f: fn(&hyserve_coordinator::api::EngineStats) -> u64| -> u64 {
        runs.iter().map(|m| f(&m.after) - f(&m.before)).sum()
    };
    let steps = delta(|s| s.steps_total).max(1) as f64;
    let seconds = |f: fn(&hyserve_coordinator::api::EngineStats) -> f64| -> f64 {
        runs.iter().map(|m| f(&m.after) - f(&m.before)).sum()
    };
    let per_step =
        |f: fn(&hyserve_coordinator::api::EngineStats) -> f64| -> f64 { 1e3 * seconds(f) / steps };
    let prompt_steps = delta(|s| s.prompt_steps_total);
    let proposed = delta(|s| s.spec.proposed_tokens);
    let accepted = delta(|s| s.spec.accepted_tokens);
    let verifies = delta(|s| s.spec.accepted_length_counts.iter().sum());
    let same = match plain_out {
        Some(p) => runs
            .iter()
            .map(|m| {
                m.done
                    .iter()
                    .zip(p)
                    .filter(|(d, t)| &d.tokens == *t)
                    .count()
            })
            .sum(),
        None => 0,
    };
    Row {
        workload: workload.into(),
        batch,
        proposer: label.into(),
        requests: all.len(),
        tokens: runs.iter().map(Measured::tokens).sum(),
        seconds: runs.iter().map(|m| m.seconds).sum(),
        tokens_per_second: tps,
        speedup: plain_tps.map_or(1.0, |p| tps / p),
        speedup_paired: median(&paired).unwrap_or(1.0),
        speedup_min: paired.first().copied().unwrap_or(1.0),
        speedup_max: paired.last().copied().unwrap_or(1.0),
        speedup_own: None,
        speedup_own_min: None,
        speedup_own_max: None,
        itl_ms_mean: mean(&itl),
        itl_ms_p90: percentile(&itl, 0.9),
        ttft_ms_mean: mean(
            &all.iter()
                .map(|d| d.ttft.as_secs_f64() * 1e3)
                .collect::<Vec<_>>(),
        ),
        proposed,
        accepted,
        acceptance: if proposed > 0 {
            accepted as f64 / proposed as f64
        } else {
            0.0
        },
        accepted_per_verify: if verifies > 0 {
            accepted as f64 / verifies as f64
        } else {
            0.0
        },
        steps: delta(|s| s.steps_total),
        spec_steps: delta(|s| s.spec.steps),
        warming_steps: delta(|s| s.steps_warming_total),
        model_ms_per_step: per_step(|s| s.model_seconds_total),
        scheduler_ms_per_step: per_step(|s| s.scheduler_seconds_total),
        step_ms_per_step: per_step(|s| s.step_seconds_total),
        worker_ms_per_step: per_step(|s| s.worker_seconds_total),
        forward_ms_per_step: per_step(|s| s.forward_seconds_total),
        queued_ms_per_step: per_step(|s| s.worker_queued_seconds_total),
        prompt_steps,
        prompt_step_ms: ms_each(seconds(|s| s.prompt_step_seconds_total), prompt_steps),
        same_as_plain: same,
    }
}

/// One request's outcome.
#[derive(Clone)]
struct Done {
    tokens: Vec<u32>,
    ttft: Duration,
    /// Mean gap between tokens.
    itl: Option<Duration>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !a.batches.is_empty() && a.batches.iter().all(|&b| (1..=256).contains(&b)),
        "--batches must be in 1..=256"
    );
    anyhow::ensure!(
        a.rounds >= 1 && a.reps >= 1,
        "--rounds and --reps must be >= 1"
    );
    anyhow::ensure!(
        (1..=15).contains(&a.spec_max_depth)
            && a.spec_depth
                .is_none_or(|d| (1..=a.spec_max_depth).contains(&d)),
        "--spec-max-depth must be in 1..=15 and --spec-depth in 1..=--spec-max-depth"
    );
    anyhow::ensure!(
        a.warm_up_shapes <= hyserve_kernels::cuda::MAX_RECORDINGS,
        "--warm-up-shapes must be at most {}",
        hyserve_kernels::cuda::MAX_RECORDINGS
    );
    let proposers: Vec<ProposerKind> = a
        .proposers
        .iter()
        .map(|p| ProposerKind::parse(p).with_context(|| format!("unknown proposer '{p}'")))
        .collect::<anyhow::Result<_>>()?;
    let dir = load::resolve_model_dir(a.model.as_deref())?;
    let default_draft = match a.model {
        None => load::default_draft_dir()?,
        Some(_) => None,
    };
    let draft_dir = a.draft_model.clone().or(default_draft);
    if proposers.contains(&ProposerKind::Draft) {
        anyhow::ensure!(
            draft_dir.is_some(),
            "the draft proposer needs --draft-model"
        );
    }
    let workload_path = match &a.workload {
        Some(p) => p.clone(),
        None => load::default_workload_path()?
            .context("no --workload given and the model has no held-out workload")?,
    };
    let passages = read_workload(&workload_path)?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open(&dir, &mut |_| {})?;
    ck.validate(&cfg)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let draft = match &draft_dir {
        Some(d) if proposers.contains(&ProposerKind::Draft) => Some(open_draft(d, &cfg)?),
        _ => None,
    };
    let precision = if a.device == "cuda" {
        Precision::Bf16
    } else {
        load::precision_for(None, &ck)?
    };
    let block_size = 16;
    let bytes_per_token = hyserve_worker::kv_spec(&cfg, precision, 1, block_size).bytes_per_token();
    let n_blocks = (a.kv_cache_mib << 20) / (bytes_per_token * block_size);
    let max_context = cfg.max_position_embeddings.min(n_blocks * block_size);
    let max_batch = a.batches.iter().copied().max().unwrap_or(1);
    let uniform = uniform_steps(&a.spec_uniform, &a.device);
    let source = Arc::new(WeightSource {
        ck: Some(ck),
        random_seed: None,
        cfg: cfg.clone(),
        draft,
        metrics: None,
        // Every engine records the same shapes, as a server speculating at this depth
        // would: the plain engine's verification recordings are never replayed.
        warm_up: warm_up_plan(
            a.warm_up_shapes,
            max_batch,
            uniform.then(|| a.spec_depth.unwrap_or(a.spec_max_depth)),
            max_context,
        ),
    });
    let threads = rayon::current_num_threads();
    let factory = local_factory(&a.device, precision, source, n_blocks, block_size, threads)?;
    let stop_ids = tokenizer.stop_ids().to_vec();
    let prompts: BTreeMap<String, Vec<Vec<u32>>> = a
        .workloads
        .iter()
        .map(|w| Ok((w.clone(), prompts_for(w, &passages, &tokenizer)?)))
        .collect::<anyhow::Result<_>>()?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        ..SamplingParams::greedy()
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    // One engine per proposer, all started first, so the measurements of one
    // (workload, batch) interleave proposers and repetitions: a machine that drifts
    // (clocks, other load) drifts for all of them alike.
    let mut engines = Vec::new();
    for &proposer in &proposers {
        let engine = rt.block_on(EngineHandle::start(
            EngineConfig {
                scheduler: SchedulerConfig {
                    n_workers: 1,
                    n_blocks_per_worker: n_blocks,
                    block_size,
                    max_batch_tokens: 512,
                    max_running: max_batch,
                    max_waiting: 4 * max_batch,
                    prefill_chunk: 256,
                    max_context,
                    enable_prefix_cache: true,
                    speculation: SpecConfig {
                        max_depth: a.spec_max_depth,
                        fixed_depth: a.spec_depth,
                        uniform,
                        ..SpecConfig::new(proposer)
                    },
                },
                model: ModelInfo {
                    id: "bench".into(),
                    max_context,
                    vocab_size: cfg.vocab_size,
                    created_unix: 0,
                },
                step_timeout: Duration::from_secs(120),
                lockstep: false,
            },
            factory.clone(),
        ))?;
        // Warm up: kernels compiled, the first graphs recorded, the cost model fed.
        for w in prompts.values() {
            let req = |p: &Vec<u32>| request(p, &sampling, a.max_tokens, &stop_ids, 0, true);
            rt.block_on(run_batch(
                &engine,
                w,
                4.min(max_batch),
                4.min(w.len()),
                &req,
            ))?;
        }
        // A second engine of the same proposer is told apart (an A/A comparison).
        let label = match engines.iter().filter(|(p, _, _)| *p == proposer).count() {
            0 => proposer.name().to_string(),
            1 => format!("{}-again", proposer.name()),
            n => format!("{}-{}", proposer.name(), n + 1),
        };
        engines.push((proposer, label, engine));
    }
    // What is measured: each engine's requests as configured, and with `--own-plain`
    // each speculating engine's requests opted out of speculation too.
    let mut arms: Vec<Arm> = Vec::new();
    for (i, (proposer, label, _)) in engines.iter().enumerate() {
        arms.push(Arm {
            engine: i,
            label: label.clone(),
            speculate: true,
            opted_out: None,
        });
        if a.own_plain && *proposer != ProposerKind::Off {
            let twin = arms.len();
            arms[twin - 1].opted_out = Some(twin);
            arms.push(Arm {
                engine: i,
                label: format!("{label}-opted-out"),
                speculate: false,
                opted_out: None,
            });
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    for (wname, w) in &prompts {
        for &batch in &a.batches {
            let n = (batch * a.rounds).max(a.min_requests);
            // One unmeasured measurement's worth of requests at this batch size first
            // (other prompts, another seed): its step shapes are recorded, the cost
            // model and the guard learn them, before the clock starts. A speculating
            // engine whose guard has not measured both arms at this load yet serves
            // more, up to WARM_UP_ROUNDS: on an H100 at batch 32 a draft was still
            // exploring after one (nearly all its speculative steps there record new
            // shapes, which the guard leaves out), and its one-time exploration fell
            // into the first repetition (0.94-0.95x of its own plain decoding, 100
            // speculative steps, 103 recording; the later repetitions at par).
            let bucket = guard_bucket(batch);
            let verdict =
                |e: &EngineHandle| e.stats().spec.guard_verdicts.get(bucket).copied().flatten();
            for (proposer, label, engine) in &engines {
                let warm = |p: &Vec<u32>| request(p, &sampling, a.max_tokens, &stop_ids, 3, true);
                let speculating = *proposer != ProposerKind::Off;
                let mut rounds = 0;
                while rounds < WARM_UP_ROUNDS {
                    rt.block_on(run_batch(engine, &w[n % w.len()..], batch, n, &warm))?;
                    rounds += 1;
                    if !speculating || verdict(engine).is_some() {
                        break;
                    }
                }
                if speculating {
                    eprintln!(
                        "bench-spec: {wname} batch {batch}, {label} warmed up with {rounds} measurement(s) of requests; its guard {}",
                        match verdict(engine) {
                            Some(true) => "speculates at this load",
                            Some(false) => "decodes plainly at this load",
                            None => "has not measured both arms at this load",
                        }
                    );
                }
            }
            let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); arms.len()];
            for rep in 0..a.reps {
                for i in measuring_order(&arms, rep) {
                    let arm = &arms[i];
                    let (label, engine) = (&arm.label, &engines[arm.engine].2);
                    eprintln!(
                        "bench-spec: {wname} batch {batch}, {label} ({n} requests), repetition {}/{}",
                        rep + 1,
                        a.reps
                    );
                    let speculate = arm.speculate;
                    let req =
                        |p: &Vec<u32>| request(p, &sampling, a.max_tokens, &stop_ids, 7, speculate);
                    let before = engine.stats();
                    let t0 = Instant::now();
                    let done = rt.block_on(run_batch(engine, w, batch, n, &req))?;
                    let m = Measured {
                        seconds: t0.elapsed().as_secs_f64(),
                        done,
                        before,
                        after: engine.stats(),
                    };
                    let (b, a) = (&m.before, &m.after);
                    let n_steps = (a.steps_total - b.steps_total).max(1) as f64;
                    let ms = |f: fn(&hyserve_coordinator::api::EngineStats) -> f64| {
                        1e3 * (f(a) - f(b)) / n_steps
                    };
                    eprintln!(
                        "  {:.1} tok/s: {} steps, {} speculative ({} with a draft catching up), {} where the guard probed its losing arm, {} where prompt lookup's planner declined before searching, {} warming up; the guard's verdict changed {} times, {} of them vetoes; per step {:.3} ms: {:.3} scheduler, {:.3} worker ({:.3} forward), {:.3} the rest; {} with a prompt chunk ({:.3} ms each)",
                        m.tokens_per_second(),
                        a.steps_total - b.steps_total,
                        a.spec.steps - b.spec.steps,
                        a.spec.catch_up_steps - b.spec.catch_up_steps,
                        a.spec.probe_steps - b.spec.probe_steps,
                        a.spec.searches_skipped - b.spec.searches_skipped,
                        a.steps_warming_total - b.steps_warming_total,
                        a.spec.verdict_changes - b.spec.verdict_changes,
                        a.spec.vetoes - b.spec.vetoes,
                        ms(|s| s.step_seconds_total),
                        ms(|s| s.scheduler_seconds_total),
                        ms(|s| s.worker_seconds_total),
                        ms(|s| s.forward_seconds_total),
                        ms(|s| s.step_seconds_total
                            - s.scheduler_seconds_total
                            - s.worker_seconds_total),
                        a.prompt_steps_total - b.prompt_steps_total,
                        ms_each(
                            a.prompt_step_seconds_total - b.prompt_step_seconds_total,
                            a.prompt_steps_total - b.prompt_steps_total
                        ),
                    );
                    runs[i].push(m);
                }
            }
            let plain_idx: Vec<usize> = (0..arms.len())
                .filter(|&i| engines[arms[i].engine].0 == ProposerKind::Off)
                .collect();
            let plain_runs = plain_idx.first().map(|&i| runs[i].as_slice());
            let plain_out: Option<Vec<Vec<u32>>> = plain_idx
                .first()
                .map(|&i| runs[i][0].done.iter().map(|d| d.tokens.clone()).collect());
            // Per repetition: the plain runs' tokens per second (geometric mean), the
            // first plain engine's alone for the other plain engines; none without one.
            let reference = |among: &[usize]| -> Vec<f64> {
                if among.is_empty() {
                    return Vec::new();
                }
                (0..a.reps)
                    .map(|r| {
                        let logs: f64 = among
                            .iter()
                            .map(|&i| runs[i][r].tokens_per_second().ln())
                            .sum();
                        (logs / among.len() as f64).exp()
                    })
                    .collect()
            };
            let all_plain = reference(&plain_idx);
            let first_plain = reference(&plain_idx[..plain_idx.len().min(1)]);
            for (i, (arm, m)) in arms.iter().zip(&runs).enumerate() {
                let reference = if plain_idx.contains(&i) {
                    &first_plain
                } else {
                    &all_plain
                };
                let mut row = summarize(
                    wname,
                    batch,
                    &arm.label,
                    m,
                    plain_runs,
                    reference,
                    plain_out.as_deref(),
                );
                if let Some(j) = arm.opted_out {
                    let twin: Vec<f64> = runs[j].iter().map(Measured::tokens_per_second).collect();
                    let own = paired_ratios(m, &twin);
                    row.speedup_own = median(&own);
                    row.speedup_own_min = own.first().copied();
                    row.speedup_own_max = own.last().copied();
                }
                let own = match (row.speedup_own, row.speedup_own_min, row.speedup_own_max) {
                    (Some(x), Some(lo), Some(hi)) => {
                        format!("; over its own opted-out runs {x:.2}x, {lo:.2}-{hi:.2}x")
                    }
                    _ => String::new(),
                };
                eprintln!(
                    "  {}: {:.1} tok/s ({:.2}x plain; paired by repetition {:.2}x, {:.2}-{:.2}x{own}), ITL {:.2} ms, acceptance {:.0}%, {} steps ({} speculative, {} warming up; {:.3} ms model + {:.3} ms scheduler per step), {}/{} outputs as plain",
                    row.proposer,
                    row.tokens_per_second,
                    row.speedup,
                    row.speedup_paired,
                    row.speedup_min,
                    row.speedup_max,
                    row.itl_ms_mean,
                    100.0 * row.acceptance,
                    row.steps,
                    row.spec_steps,
                    row.warming_steps,
                    row.model_ms_per_step,
                    row.scheduler_ms_per_step,
                    row.same_as_plain,
                    row.requests
                );
                eprintln!(
                    "    {}: a step took {:.3} ms: {:.3} scheduler, {:.3} model ({:.3} on the worker, {:.3} of it the forward pass; {:.3} queued), {:.3} messaging",
                    row.proposer,
                    row.step_ms_per_step,
                    row.scheduler_ms_per_step,
                    row.model_ms_per_step,
                    row.worker_ms_per_step,
                    row.forward_ms_per_step,
                    row.queued_ms_per_step,
                    row.step_ms_per_step - row.scheduler_ms_per_step - row.worker_ms_per_step
                );
                rows.push(row);
            }
            // Written after every measurement: a run cut short keeps what it measured.
            if let Some(p) = &a.json_out {
                write_report(p, &a, &dir, draft_dir.as_deref(), &rows)?;
            }
        }
    }
    for (_, _, e) in &engines {
        e.stop();
    }
    // The workers' threads end with the engines' actors; give them a moment.
    std::thread::sleep(Duration::from_millis(200));
    print_table(&rows);
    Ok(())
}

fn write_report(
    path: &std::path::Path,
    a: &Args,
    model: &std::path::Path,
    draft: Option<&std::path::Path>,
    rows: &[Row],
) -> anyhow::Result<()> {
    let report = Report {
        device: device_name(&a.device),
        model: model.display().to_string(),
        draft: draft.map(|d| d.display().to_string()),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        spec_depth: a.spec_depth,
        spec_max_depth: a.spec_max_depth,
        spec_uniform: uniform_steps(&a.spec_uniform, &a.device),
        warm_up_shapes: a.warm_up_shapes,
        rows: rows.to_vec(),
    };
    std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn request(
    prompt: &[u32],
    sampling: &SamplingParams,
    max_tokens: usize,
    stop_ids: &[u32],
    seed: u64,
    speculate: bool,
) -> GenerateRequest {
    GenerateRequest {
        request_id: "bench".into(),
        prompt: prompt.to_vec(),
        sampling: SamplingParams {
            seed: Some(seed),
            ..sampling.clone()
        },
        max_tokens,
        stop_token_ids: stop_ids.to_vec(),
        logprobs: None,
        speculate,
    }
}

/// Runs `n` requests (prompts in order, cycled) keeping `batch` in flight.
async fn run_batch(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    batch: usize,
    n: usize,
    make: &dyn Fn(&Vec<u32>) -> GenerateRequest,
) -> anyhow::Result<Vec<Done>> {
    let mut tasks = Vec::new();
    for lane in 0..batch.min(n) {
        let reqs: Vec<GenerateRequest> = (lane..n)
            .step_by(batch)
            .map(|i| make(&prompts[i % prompts.len()]))
            .collect();
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for r in reqs {
                out.push(one(&engine, r).await?);
            }
            anyhow::Ok(out)
        }));
    }
    let mut by_lane = Vec::new();
    for t in tasks {
        by_lane.push(t.await??);
    }
    // Back in request order.
    let mut done = Vec::with_capacity(n);
    let mut iters: Vec<_> = by_lane.into_iter().map(Vec::into_iter).collect();
    for i in 0..n {
        if let Some(d) = iters[i % batch].next() {
            done.push(d);
        }
    }
    Ok(done)
}

async fn one(engine: &EngineHandle, r: GenerateRequest) -> anyhow::Result<Done> {
    let t0 = Instant::now();
    let mut stream = engine.submit(r).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut tokens, mut first, mut last) = (Vec::new(), None, t0);
    while let Some(ev) = stream.recv().await {
        match ev {
            TokenEvent::Token { id, .. } => {
                last = Instant::now();
                first.get_or_insert(last);
                tokens.push(id);
            }
            TokenEvent::Finished { .. } => break,
            TokenEvent::Failed(e) => anyhow::bail!("request failed: {e}"),
        }
    }
    let first = first.unwrap_or(last);
    Ok(Done {
        itl: (tokens.len() > 1).then(|| (last - first) / (tokens.len() as u32 - 1)),
        ttft: first - t0,
        tokens,
    })
}

#[derive(serde::Deserialize)]
struct Passage {
    prompt_edit: String,
    prompt_free: String,
}

fn read_workload(path: &std::path::Path) -> anyhow::Result<Vec<Passage>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let passages: Vec<Passage> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1))
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!passages.is_empty(), "{}: no passages", path.display());
    Ok(passages)
}

/// The token prompts of workload `name`: `edit` through the chat template, `free` as
/// plain text.
fn prompts_for(name: &str, passages: &[Passage], tok: &Tokenizer) -> anyhow::Result<Vec<Vec<u32>>> {
    passages
        .iter()
        .map(|p| match name {
            "edit" => {
                let text =
                    tok.apply_chat_template(&[ChatMessage::new("user", &p.prompt_edit)], true)?;
                Ok(tok.encode(&text, true)?)
            }
            "free" => Ok(tok.encode(&p.prompt_free, false)?),
            other => anyhow::bail!("unknown workload '{other}' (edit, free)"),
        })
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Of sorted `xs`.
/// The median of sorted `xs` (the mean of the middle two of an even count).
fn median(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    match n {
        0 => None,
        _ if n.is_multiple_of(2) => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
        _ => Some(xs[n / 2]),
    }
}

fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

fn device_name(device: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let when = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{device} ({cpu}; unix time {when})")
}

fn print_table(rows: &[Row]) {
    println!(
        "| workload | batch | proposer | tok/s | vs plain: medians; paired (range); own (range) | ITL ms (mean / p90) | acceptance | accepted per verify | steps | ms per step (all / model / worker / scheduler) | same as plain |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.2}x; {:.2}x ({:.2}-{:.2}){} | {:.2} / {:.2} | {} | {:.2} | {} | {:.3} / {:.3} / {:.3} / {:.3} | {}/{} |",
            r.workload,
            r.batch,
            r.proposer,
            r.tokens_per_second,
            r.speedup,
            r.speedup_paired,
            r.speedup_min,
            r.speedup_max,
            match (r.speedup_own, r.speedup_own_min, r.speedup_own_max) {
                (Some(x), Some(lo), Some(hi)) => format!("; own {x:.2}x ({lo:.2}-{hi:.2})"),
                _ => String::new(),
            },
            r.itl_ms_mean,
            r.itl_ms_p90,
            if r.proposed > 0 {
                format!("{:.0}%", 100.0 * r.acceptance)
            } else {
                "-".into()
            },
            r.accepted_per_verify,
            r.steps,
            r.step_ms_per_step,
            r.model_ms_per_step,
            r.worker_ms_per_step,
            r.scheduler_ms_per_step,
            r.same_as_plain,
            r.requests
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_and_its_opted_out_twin_take_turns_going_first() {
        let arm = |engine, speculate, opted_out| Arm {
            engine,
            label: String::new(),
            speculate,
            opted_out,
        };
        // off, draft, draft-opted-out, off-again.
        let arms = [
            arm(0, true, None),
            arm(1, true, Some(2)),
            arm(1, false, None),
            arm(2, true, None),
        ];
        assert_eq!(measuring_order(&arms, 0), [0, 1, 2, 3]);
        assert_eq!(measuring_order(&arms, 1), [0, 2, 1, 3]);
        assert_eq!(measuring_order(&arms, 2), [0, 1, 2, 3]);
        // Without twins the order never changes.
        let alone = [arm(0, true, None), arm(1, true, None)];
        assert_eq!(measuring_order(&alone, 1), [0, 1]);
    }
}
