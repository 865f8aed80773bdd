//! The executor: runs one step (a batch of prefill chunks and decode tokens) through
//! the model, on a thread of its own so the async runtime never blocks on compute.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use hyserve_kernels::{Backend, KvSpec, Precision, RecordKey};
use hyserve_model::exchange::{Round, Rows};
use hyserve_model::graph::Mlp;
use hyserve_model::{Exchange, ExchangeError, ExpertParallel, Model, ModelConfig, SeqChunk};
use hyserve_telemetry::{StepReport, WorkerMetrics};

use crate::warm_up::{self, WarmUp, WarmedUp};

/// The KV cache shape for `cfg`: one (K, V) per CLA cache layer.
pub fn kv_spec(
    cfg: &ModelConfig,
    precision: Precision,
    n_blocks: usize,
    block_size: usize,
) -> KvSpec {
    KvSpec {
        n_cache_layers: cfg.n_cache_layers,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        block_size,
        n_blocks,
        dtype: precision.storage_dtype(),
    }
}

/// `spec` with room for the padding sequences of recorded steps ([`pad_for_recording`])
/// after the blocks the scheduler hands out: never part of a sequence.
fn with_scratch(spec: KvSpec) -> KvSpec {
    KvSpec {
        n_blocks: spec.n_blocks + RecordKey::MAX_SEQ_ROWS.div_ceil(spec.block_size),
        ..spec
    }
}

/// Pads a step whose sequences all have the same rows (a decode step, or a
/// verification of one depth) with dummy sequences up to the batch size the backend
/// records ([`Backend::padded_sequences`]): token 0 at the scratch slots past the
/// scheduler's blocks (every dummy the same slots: what they compute is dropped, and no
/// sequence reads those slots). Returns how many sequences are real.
fn pad_for_recording<B: Backend>(
    backend: &B,
    model: &Model<B>,
    spec: KvSpec,
    chunks: &mut Vec<SeqChunk>,
) -> usize {
    let n = chunks.len();
    let Some(first) = chunks.first() else {
        return 0;
    };
    let (rows, all_logits, argmax_only) = (first.tokens.len(), first.all_logits, first.argmax_only);
    if !first.recordable()
        || chunks
            .iter()
            .any(|c| c.tokens.len() != rows || c.all_logits != all_logits)
    {
        return n;
    }
    let (top_k, n_experts) = model.moe_shape();
    let padded = backend.padded_sequences(n, rows, top_k, n_experts);
    let scratch = spec.n_blocks * spec.block_size;
    chunks.extend((n..padded).map(|_| SeqChunk {
        tokens: vec![0; rows],
        first_pos: 0,
        slots: (scratch..scratch + rows).collect(),
        all_logits,
        argmax_only,
    }));
    n
}

/// One sequence's share of a step.
#[derive(Clone, Debug)]
pub struct SeqStep {
    pub seq_id: u64,
    /// The client request it belongs to (logged in the step's span; empty for work
    /// that is not a request's).
    pub request_id: Arc<str>,
    /// New tokens at positions `first_pos..`.
    pub tokens: Vec<u32>,
    pub first_pos: usize,
    /// Blocks covering positions `0..first_pos + tokens.len()`.
    pub blocks: Vec<u32>,
    /// Logits for every new token (prompt scoring, verification) or only the last.
    pub all_logits: bool,
    /// Only those rows' arg-max tokens are wanted (a greedy draw with nothing else to
    /// read in the row): [`StepOutput::argmax`] holds them and its logits are empty.
    pub argmax_only: bool,
    /// Speculation by this worker's draft model: tokens it proposes after `tokens` are
    /// verified in the same forward pass (their logits rows follow `tokens`' own). Depth
    /// 0: the draft only reads `tokens` (a prompt chunk), to be current when it proposes.
    pub draft: Option<DraftRequest>,
}

/// A step's request ids, comma-separated (formatted only when its span is enabled).
struct RequestIds<'a>(&'a [SeqStep]);

impl std::fmt::Display for RequestIds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&s.request_id)?;
        }
        Ok(())
    }
}

/// What the draft model proposes for one sequence of a step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DraftRequest {
    /// Tokens to propose (the step's blocks hold them); 0: only read `context` and the
    /// step's tokens.
    pub depth: usize,
    /// The draft's cache holds this sequence's positions `0..first_pos`.
    pub first_pos: usize,
    /// The tokens at `first_pos..` up to the step's own `first_pos`: the draft reads
    /// them, then the step's tokens, before it proposes.
    pub context: Vec<u32>,
}

/// A batch for one forward pass.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub seqs: Vec<SeqStep>,
    /// Under expert parallelism: the cluster-wide step number (orders the exchange)
    /// and the placement epoch the step runs under. Unused otherwise.
    pub step_id: u64,
    pub epoch: u64,
}

/// A step's output: per sequence, in step order, its logits rows or their arg-max tokens.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    /// Per sequence: its logits rows (`[rows, vocab]`), empty for one that asked for
    /// [`SeqStep::argmax_only`].
    pub logits: Vec<Vec<f32>>,
    /// Per sequence: the arg-max token of each of its rows where it asked for only
    /// those, empty otherwise (or empty altogether where no sequence did).
    pub argmax: Vec<Vec<u32>>,
    pub vocab_size: usize,
    /// Under expert parallelism: rows this worker routed during the step,
    /// `[layer][expert]` flattened; empty otherwise.
    pub expert_load: Vec<u64>,
    /// Per sequence, the tokens the draft model proposed (empty where none was asked
    /// for); their logits rows follow the sequence's own.
    pub proposals: Vec<Vec<u32>>,
    /// Wall time the draft model took, included in the step's.
    pub draft_seconds: f64,
    /// A forward pass of the step (target's or draft's) ran a new shape that is being
    /// recorded ([`Backend::warm_up_passes`]): its time is a warm-up's.
    pub warming: bool,
    /// Where the step's time went on the worker's side.
    pub timing: StepTiming,
}

/// A step's time on the worker, for the host-overhead accounting of benchmarks and
/// `/metrics` (what the caller waited for beyond these is messaging).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTiming {
    /// From the step's submission to the executor thread taking it up.
    pub queued_seconds: f64,
    /// From taking it up to its output: the step as the executor ran it.
    pub worker_seconds: f64,
    /// Of which the target model's forward pass (with the device's work and the logits'
    /// download on a GPU; the expert exchange under expert parallelism).
    pub forward_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("sequence {seq_id}: {reason}")]
    BadStep { seq_id: u64, reason: String },
    #[error("executor thread stopped")]
    Stopped,
    #[error("expert exchange: {0}")]
    Exchange(#[from] ExchangeError),
    #[error(
        "step is for placement epoch {want}, but this worker has {have} and nothing staged for it"
    )]
    Epoch { want: u64, have: u64 },
}

/// `[layer][expert]`: the ranks holding each routed expert.
pub type Holders = Vec<Vec<Vec<u32>>>;

/// A placement epoch's experts, loaded beside the serving model and waiting for the
/// first step of that epoch.
pub struct Staged<B: Backend> {
    pub epoch: u64,
    pub holders: Holders,
    pub experts: Vec<((usize, usize), Mlp<B>)>,
}

/// Where staged experts are handed to the executor thread.
pub type StageSlot<B> = Arc<Mutex<Option<Staged<B>>>>;

/// The `(layer, expert)`s a worker's model holds now, published by its executor.
pub type HeldExperts = Arc<Mutex<HashSet<(usize, usize)>>>;

/// An executor's place in an expert-parallel group.
struct EpState<B: Backend> {
    exchange: Box<dyn Exchange>,
    epoch: u64,
    holders: Holders,
    load: Vec<Vec<u64>>,
    staged: StageSlot<B>,
    /// The experts the model holds now, for whoever stages the next epoch.
    held: HeldExperts,
}

/// A small model of the same family and vocabulary that proposes tokens for the
/// target to verify. Whole on every worker (never expert-parallel); its cache uses the
/// target's block table, so a sequence's blocks hold both models' KV.
struct Draft<B: Backend> {
    model: Model<B>,
    kv: B::Kv,
}

/// Runs steps for the sequences and KV cache it owns.
pub struct Executor<B: Backend> {
    backend: B,
    model: Model<B>,
    kv: B::Kv,
    spec: KvSpec,
    ep: Option<EpState<B>>,
    draft: Option<Draft<B>>,
    /// The kernels' threads. A forward pass runs inside this pool, so the hundred or so
    /// parallel kernel calls of a decode step are local work-stealing pushes rather than
    /// cross-thread wake-ups (measured: ~30% of a small model's decode step). None for
    /// a backend that does not use rayon ([`Backend::uses_thread_pool`]): its passes
    /// run on the executor's thread.
    pool: Option<rayon::ThreadPool>,
    /// Where this worker's step metrics go, and its `worker` label.
    metrics: Option<(Arc<WorkerMetrics>, String)>,
    /// `[layer][expert]` rows routed in the current step.
    load: Vec<Vec<u64>>,
    /// When the device's expert-load counters were last read.
    load_read: std::time::Instant,
}

/// Dummy passes of one shape at most before a warm-up gives it up (the backend records
/// on the third, and the fourth confirms it replays).
const WARM_UP_MAX_PASSES: usize = 6;

/// How often an executor reads expert load counted on the device.
const DEVICE_LOAD_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// An exchange that counts what crosses it: bytes sent and seconds spent sending and
/// waiting (the all-to-all metrics).
struct Counted<'a> {
    inner: &'a mut dyn Exchange,
    bytes: u64,
    seconds: f64,
}

fn rows_bytes(r: &Rows) -> u64 {
    (r.data.len() * std::mem::size_of::<f32>() + r.blocks.len() * 8) as u64
}

impl Exchange for Counted<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn send_to(
        &mut self,
        round: Round,
        peers: &[usize],
        rows: Vec<Rows>,
    ) -> Result<(), ExchangeError> {
        let t = std::time::Instant::now();
        let me = self.inner.rank();
        self.bytes += peers
            .iter()
            .filter(|&&p| p != me)
            .filter_map(|&p| rows.get(p))
            .map(rows_bytes)
            .sum::<u64>();
        let r = self.inner.send_to(round, peers, rows);
        self.seconds += t.elapsed().as_secs_f64();
        r
    }
    fn recv_from(&mut self, round: Round, peers: &[usize]) -> Result<Vec<Rows>, ExchangeError> {
        let t = std::time::Instant::now();
        let r = self.inner.recv_from(round, peers);
        self.seconds += t.elapsed().as_secs_f64();
        r
    }
}

impl<B: Backend> Executor<B> {
    /// An executor whose kernels use as many threads as rayon's global pool.
    pub fn new(backend: B, model: Model<B>, n_blocks: usize, block_size: usize) -> Self {
        Self::with_threads(
            backend,
            model,
            n_blocks,
            block_size,
            rayon::current_num_threads(),
        )
    }

    pub fn with_threads(
        backend: B,
        model: Model<B>,
        n_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> Self {
        let mut spec = kv_spec(&model.cfg, backend.precision(), n_blocks, block_size);
        // A tensor-parallel shard caches its own KV heads only.
        spec.n_kv_heads = model.local_heads().1;
        let kv = backend.alloc_kv(with_scratch(spec));
        let pool = backend.uses_thread_pool().then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(|i| format!("kernels-{i}"))
                .build()
                .expect("spawning kernel threads")
        });
        Self {
            backend,
            model,
            kv,
            spec,
            ep: None,
            draft: None,
            pool,
            metrics: None,
            load: Vec::new(),
            load_read: std::time::Instant::now(),
        }
    }

    /// Reports every step to `metrics` under the label `worker`.
    pub fn set_metrics(&mut self, metrics: Arc<WorkerMetrics>, worker: String) {
        self.load = self.model.expert_load_shape();
        self.metrics = Some((metrics, worker));
    }

    /// Gives this executor a draft model for speculation ([`SeqStep::draft`]). It must
    /// share the target's vocabulary and hold every expert of its own.
    pub fn set_draft(&mut self, model: Model<B>) -> Result<(), String> {
        let cfg = &self.model.cfg;
        if model.cfg.vocab_size != cfg.vocab_size {
            return Err(format!(
                "the draft model's vocabulary ({}) is not the target's ({})",
                model.cfg.vocab_size, cfg.vocab_size
            ));
        }
        if model.tp.size != 1
            || (0..model.cfg.n_layers)
                .any(|l| (0..model.cfg.layers[l].n_experts).any(|x| !model.holds_expert(l, x)))
        {
            return Err("the draft model must be whole on every worker".into());
        }
        let mut spec = kv_spec(
            &model.cfg,
            self.backend.precision(),
            self.spec.n_blocks,
            self.spec.block_size,
        );
        spec.n_kv_heads = model.local_heads().1;
        let kv = self.backend.alloc_kv(with_scratch(spec));
        self.draft = Some(Draft { model, kv });
        Ok(())
    }

    /// Records the step shapes `plan` names before any request comes
    /// ([`crate::warm_up`]): dummy decode steps and verifications of every padded batch
    /// size, through the target model and the draft model, on the scratch slots past
    /// the scheduler's blocks (every dummy row attends only to rows written in the same
    /// pass). A backend that records nothing, and a rank of an expert-parallel group
    /// (whose steps run in lockstep with its peers), do nothing. Call it after
    /// [`Executor::set_metrics`]: the recordings count expert load or not as the
    /// executor's steps will. Expert load counted during the warm-up is discarded.
    pub fn warm_up(&mut self, plan: &WarmUp) -> WarmedUp {
        let t0 = std::time::Instant::now();
        let mut done = WarmedUp::default();
        let capacity = self.backend.recording_capacity();
        if self.ep.is_some() || capacity == 0 || plan.max_shapes == 0 {
            return done;
        }
        let max_shapes = plan.max_shapes.min(capacity);
        let shapes = {
            let (backend, target, draft) = (&self.backend, &self.model, self.draft.as_ref());
            warm_up::shapes(plan, draft.is_some(), &|is_draft, n, rows| {
                let m = match draft {
                    Some(d) if is_draft => &d.model,
                    _ => target,
                };
                let (top_k, n_experts) = m.moe_shape();
                backend.padded_sequences(n, rows, top_k, n_experts)
            })
        };
        tracing::info!(
            candidates = shapes.len(),
            max_shapes,
            "recording step shapes before serving"
        );
        self.backend.set_counted_tokens(0);
        let scratch = self.spec.n_blocks * self.spec.block_size;
        let vocab = self.model.cfg.vocab_size;
        let mut skipped = None;
        for shape in shapes {
            if done.shapes >= max_shapes {
                break;
            }
            let bytes = 2 * shape.batch * shape.rows * vocab;
            if skipped == Some(shape.series()) || done.bytes + bytes > plan.max_bytes {
                skipped = Some(shape.series());
                continue;
            }
            // Row r sits at position context - rows + r and every position reads one
            // of the rows' own slots, written by this pass before attention reads it.
            let first_pos = shape.context - shape.rows;
            let chunk = SeqChunk {
                tokens: vec![0; shape.rows],
                first_pos,
                slots: (0..shape.context)
                    .map(|p| scratch + p.saturating_sub(first_pos).min(shape.rows - 1))
                    .collect(),
                all_logits: shape.rows > 1,
                argmax_only: false,
            };
            let chunks = vec![chunk; shape.batch];
            // Recorded as serving will run it: the target's steps count expert load
            // where this worker reports metrics (nothing, with 0 tokens counted), the
            // draft's never do.
            let (model, kv, mut load) = match self.draft.as_mut() {
                Some(d) if shape.draft => (&d.model, &mut d.kv, None),
                _ => (
                    &self.model,
                    &mut self.kv,
                    self.metrics
                        .is_some()
                        .then(|| self.model.expert_load_shape()),
                ),
            };
            let backend = &self.backend;
            let mut passes = 0;
            let warmed = loop {
                let before = backend.warm_up_passes();
                in_pool(&self.pool, || {
                    model.forward_counted(backend, kv, &chunks, load.as_deref_mut())
                });
                passes += 1;
                if backend.warm_up_passes() == before {
                    // Replayed: recorded by the passes before (none: not recordable).
                    break passes > 1;
                }
                if passes == WARM_UP_MAX_PASSES {
                    break false;
                }
            };
            done.passes += passes;
            if !warmed {
                skipped = Some(shape.series());
                continue;
            }
            done.shapes += 1;
            done.bytes += bytes;
            if done.shapes.is_multiple_of(32) {
                tracing::info!(
                    shapes = done.shapes,
                    seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
                    "recording step shapes"
                );
            }
        }
        let mut discard = self.model.expert_load_shape();
        self.backend.take_expert_load(&mut discard);
        done.seconds = t0.elapsed().as_secs_f64();
        tracing::info!(
            shapes = done.shapes,
            passes = done.passes,
            output_mib = done.bytes >> 20,
            seconds = format!("{:.2}", done.seconds),
            "step shapes recorded"
        );
        done
    }

    /// Makes this executor one rank of an expert-parallel group: its model holds a
    /// shard of the experts (placement `holders` at `epoch`), and every step exchanges
    /// rows with the other ranks through `exchange`. Returns the slot where the next
    /// epoch's experts are staged and the set of experts held now.
    pub fn expert_parallel(
        &mut self,
        exchange: Box<dyn Exchange>,
        epoch: u64,
        holders: Holders,
    ) -> (StageSlot<B>, HeldExperts) {
        let cfg = &self.model.cfg;
        let load = cfg.layers.iter().map(|l| vec![0; l.n_experts]).collect();
        let staged: StageSlot<B> = Arc::new(Mutex::new(None));
        let held = Arc::new(Mutex::new(self.held_experts()));
        self.ep = Some(EpState {
            exchange,
            epoch,
            holders,
            load,
            staged: staged.clone(),
            held: held.clone(),
        });
        (staged, held)
    }

    fn held_experts(&self) -> HashSet<(usize, usize)> {
        let cfg = &self.model.cfg;
        (0..cfg.n_layers)
            .flat_map(|l| (0..cfg.layers[l].n_experts).map(move |x| (l, x)))
            .filter(|&(l, x)| self.model.holds_expert(l, x))
            .collect()
    }

    /// Switches to the staged placement of `epoch`, at a step boundary.
    fn switch_epoch(&mut self, epoch: u64) -> Result<(), ExecutorError> {
        let Some(ep) = self.ep.as_mut() else {
            return Ok(());
        };
        if ep.epoch == epoch {
            return Ok(());
        }
        // Only a slot for this very epoch is taken: a newer one staged early stays.
        let staged = ep
            .staged
            .lock()
            .ok()
            .and_then(|mut s| s.take_if(|s| s.epoch == epoch));
        let Some(staged) = staged else {
            return Err(ExecutorError::Epoch {
                want: epoch,
                have: ep.epoch,
            });
        };
        let rank = ep.exchange.rank() as u32;
        let holders = staged.holders;
        let keep = |l: usize, x: usize| holders[l][x].contains(&rank);
        self.backend.before_weight_swap();
        self.model.set_experts(staged.experts, &keep);
        let held = self.held_experts();
        let ep = self.ep.as_mut().expect("checked above");
        if let Ok(mut h) = ep.held.lock() {
            *h = held;
        }
        tracing::info!(epoch, rank, "switched to a new expert placement");
        ep.holders = holders;
        ep.epoch = epoch;
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    pub fn kv_spec(&self) -> KvSpec {
        self.spec
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Checks a step against the model and cache before any compute: a bad step is
    /// an error for that step, never a panic inside a kernel.
    fn validate(&self, step: &Step) -> Result<(), ExecutorError> {
        let cfg = &self.model.cfg;
        for s in &step.seqs {
            let bad = |reason: String| ExecutorError::BadStep {
                seq_id: s.seq_id,
                reason,
            };
            if s.tokens.is_empty() {
                return Err(bad("no tokens".into()));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(bad(format!(
                    "token id {t} >= vocab size {}",
                    cfg.vocab_size
                )));
            }
            let depth = s.draft.as_ref().map_or(0, |d| d.depth);
            let Some(ctx) = s
                .first_pos
                .checked_add(s.tokens.len())
                .and_then(|n| n.checked_add(depth))
            else {
                return Err(bad(format!("position {} is out of range", s.first_pos)));
            };
            if let Some(d) = &s.draft {
                if d.first_pos + d.context.len() != s.first_pos {
                    return Err(bad(format!(
                        "the draft's context ends at {}, not at the step's position {}",
                        d.first_pos + d.context.len(),
                        s.first_pos
                    )));
                }
                if d.depth > RecordKey::MAX_SEQ_ROWS {
                    return Err(bad(format!(
                        "draft depth {} is above {}",
                        d.depth,
                        RecordKey::MAX_SEQ_ROWS
                    )));
                }
                if let Some(t) = d.context.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                    return Err(bad(format!("draft context token {t} >= vocab size")));
                }
            }
            if ctx.div_ceil(self.spec.block_size) > s.blocks.len() {
                return Err(bad(format!(
                    "{} blocks cannot hold {ctx} tokens",
                    s.blocks.len()
                )));
            }
            if let Some(b) = s.blocks.iter().find(|&&b| b as usize >= self.spec.n_blocks) {
                return Err(bad(format!("block {b} >= {} blocks", self.spec.n_blocks)));
            }
        }
        Ok(())
    }

    /// The draft model's proposals for every sequence of `step` that asks for them
    /// (empty for the others, and for all when this executor has no draft model):
    /// greedy, one batched draft pass per proposed position. The first pass reads the
    /// tokens the draft has not seen yet; each later one the previous proposal. The
    /// draft's KV for the proposals it reads back is written at the sequence's next
    /// positions, whose blocks the scheduler reserved.
    fn propose(&mut self, step: &Step) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); step.seqs.len()];
        let Some(draft) = self.draft.as_mut() else {
            return out;
        };
        let bs = self.spec.block_size;
        let slots = |s: &SeqStep, ctx: usize| -> Vec<usize> {
            (0..ctx)
                .map(|p| s.blocks[p / bs] as usize * bs + p % bs)
                .collect()
        };
        let wanted: Vec<(usize, &SeqStep, &DraftRequest)> = step
            .seqs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.draft.as_ref().map(|d| (i, s, d)))
            .collect();
        // Depth 0 asks only that the draft read along (a prompt chunk), in round 0.
        let rounds = wanted.iter().map(|w| w.2.depth.max(1)).max().unwrap_or(0);
        let (model, backend, kv) = (&draft.model, &self.backend, &mut draft.kv);
        for round in 0..rounds {
            let mut rows = Vec::new();
            let mut chunks: Vec<SeqChunk> = wanted
                .iter()
                .filter(|(_, _, d)| d.depth.max(1) > round)
                .map(|&(i, s, d)| {
                    rows.push(i);
                    let (tokens, first_pos) = if round == 0 {
                        let mut t = d.context.clone();
                        t.extend_from_slice(&s.tokens);
                        (t, d.first_pos)
                    } else {
                        (
                            vec![out[i][round - 1]],
                            s.first_pos + s.tokens.len() + round - 1,
                        )
                    };
                    let ctx = first_pos + tokens.len();
                    // A short catch-up asks for every row, so the pass keeps a
                    // recordable shape; only the last row is used.
                    let all_logits = tokens.len() > 1 && tokens.len() <= RecordKey::MAX_SEQ_ROWS;
                    // The draft proposes greedily: only its rows' tokens come back.
                    SeqChunk {
                        slots: slots(s, ctx),
                        tokens,
                        first_pos,
                        all_logits,
                        argmax_only: true,
                    }
                })
                .collect();
            pad_for_recording(backend, model, self.spec, &mut chunks);
            let (logits, _) = in_pool(&self.pool, || {
                model.forward_counted(backend, kv, &chunks, None)
            });
            for (&i, ids) in rows.iter().zip(&logits.argmax) {
                if step.seqs[i].draft.as_ref().is_some_and(|d| d.depth > round)
                    && let Some(&last) = ids.last()
                {
                    out[i].push(last);
                }
            }
        }
        out
    }

    /// Runs one forward pass over every sequence of `step` (after the draft model's
    /// proposals, when the step asks for them).
    pub fn step(&mut self, step: &Step) -> Result<StepOutput, ExecutorError> {
        // The requests a step serves, so a request's work can be followed from the
        // gateway through the scheduler into every worker process (`HYSERVE_LOG=debug`).
        let _span = tracing::debug_span!(
            "step",
            step_id = step.step_id,
            worker = self.metrics.as_ref().map_or("", |m| m.1.as_str()),
            requests = %RequestIds(&step.seqs),
        )
        .entered();
        let t_step = std::time::Instant::now();
        self.validate(step)?;
        self.switch_epoch(step.epoch)?;
        let warm_ups = self.backend.warm_up_passes();
        let t_draft = std::time::Instant::now();
        let proposals = self.propose(step);
        let draft_seconds = if step.seqs.iter().any(|s| s.draft.is_some()) {
            t_draft.elapsed().as_secs_f64()
        } else {
            0.0
        };
        let bs = self.spec.block_size;
        let chunks: Vec<SeqChunk> = step
            .seqs
            .iter()
            .zip(&proposals)
            .map(|(s, p)| {
                let mut tokens = s.tokens.clone();
                tokens.extend_from_slice(p);
                let ctx = s.first_pos + tokens.len();
                SeqChunk {
                    tokens,
                    first_pos: s.first_pos,
                    slots: (0..ctx)
                        .map(|p| s.blocks[p / bs] as usize * bs + p % bs)
                        .collect(),
                    all_logits: s.all_logits || !p.is_empty(),
                    argmax_only: s.argmax_only,
                }
            })
            .collect();
        let n_tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let (model, backend, kv) = (&self.model, &self.backend, &mut self.kv);
        let Some(ep) = self.ep.as_mut() else {
            let mut chunks = chunks;
            let real = pad_for_recording(backend, model, self.spec, &mut chunks);
            let counting = self.metrics.is_some();
            for l in &mut self.load {
                l.fill(0);
            }
            let load = counting.then_some(&mut self.load[..]);
            if counting {
                backend.set_counted_tokens(n_tokens);
            }
            let t_forward = std::time::Instant::now();
            let (mut logits, mut counted) = in_pool(&self.pool, || {
                model.forward_counted(backend, kv, &chunks, load)
            });
            let forward_seconds = t_forward.elapsed().as_secs_f64();
            logits.truncate(real);
            // A backend counting on the device is read every DEVICE_LOAD_EVERY (the
            // copy waits for the device); the counts wait there in between.
            if counting && !counted && self.load_read.elapsed() >= DEVICE_LOAD_EVERY {
                counted = backend.take_expert_load(&mut self.load);
                self.load_read = std::time::Instant::now();
            }
            let out = StepOutput {
                logits: logits.rows,
                argmax: logits.argmax,
                vocab_size: self.model.cfg.vocab_size,
                expert_load: Vec::new(),
                proposals,
                draft_seconds,
                warming: backend.warm_up_passes() != warm_ups,
                timing: StepTiming {
                    forward_seconds,
                    ..StepTiming::default()
                },
            };
            tracing::debug!(
                tokens = n_tokens,
                ms = t_draft.elapsed().as_secs_f64() * 1e3,
                "step done"
            );
            if let Some((m, worker)) = &self.metrics {
                let load: &[Vec<u64>] = if counted { &self.load } else { &[] };
                m.observe_step(
                    worker,
                    StepReport {
                        seconds: t_draft.elapsed().as_secs_f64(),
                        tokens: n_tokens,
                        expert_load: load,
                        ..StepReport::default()
                    },
                );
            }
            return Ok(out.timed(t_step));
        };
        for l in &mut ep.load {
            l.fill(0);
        }
        let mut counted = Counted {
            inner: ep.exchange.as_mut(),
            bytes: 0,
            seconds: 0.0,
        };
        let mut ctx = ExpertParallel {
            exchange: &mut counted,
            holders: &ep.holders,
            step: step.step_id,
            load: &mut ep.load,
            timing: None,
            fence: None,
        };
        let t_forward = std::time::Instant::now();
        let logits = in_pool(&self.pool, || {
            model.forward_ep(backend, kv, &chunks, &mut ctx)
        })?;
        let forward_seconds = t_forward.elapsed().as_secs_f64();
        let (a2a_bytes, a2a_seconds) = (counted.bytes, counted.seconds);
        tracing::debug!(
            tokens = n_tokens,
            ms = t_draft.elapsed().as_secs_f64() * 1e3,
            all_to_all_bytes = a2a_bytes,
            "step done"
        );
        if let Some((m, worker)) = &self.metrics {
            m.observe_step(
                worker,
                StepReport {
                    seconds: t_draft.elapsed().as_secs_f64(),
                    tokens: n_tokens,
                    expert_load: &ep.load,
                    all_to_all_bytes: a2a_bytes,
                    all_to_all_seconds: a2a_seconds,
                },
            );
        }
        Ok(StepOutput {
            logits: logits.rows,
            argmax: logits.argmax,
            vocab_size: self.model.cfg.vocab_size,
            expert_load: ep.load.iter().flatten().copied().collect(),
            proposals,
            draft_seconds,
            warming: backend.warm_up_passes() != warm_ups,
            timing: StepTiming {
                forward_seconds,
                ..StepTiming::default()
            },
        }
        .timed(t_step))
    }
}

impl StepOutput {
    /// Stamps the worker's time for a step that started at `start`.
    fn timed(mut self, start: std::time::Instant) -> Self {
        self.timing.worker_seconds = start.elapsed().as_secs_f64();
        self
    }
}

/// Runs `f` inside the kernels' pool, or on this thread for a backend without one.
fn in_pool<R: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Where a step's result goes: called on the executor thread when the step finishes.
/// If the executor thread dies mid-step, the callback is dropped unanswered.
type Reply = Box<dyn FnOnce(Result<StepOutput, ExecutorError>) + Send>;
type Job = (Step, std::time::Instant, Reply);

/// An [`Executor`] on its own thread; steps are sent to it and answered by channel.
pub struct ExecutorHandle {
    tx: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    cfg: ModelConfig,
    spec: KvSpec,
}

impl ExecutorHandle {
    /// Moves `executor` to a new thread named `name`.
    pub fn spawn<B: Backend>(name: &str, mut executor: Executor<B>) -> std::io::Result<Self> {
        let cfg = executor.config().clone();
        let spec = executor.kv_spec();
        // One step in flight plus one queued: the caller waits for answers anyway.
        let (tx, rx) = mpsc::sync_channel::<Job>(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok((step, submitted, reply)) = rx.recv() {
                    let queued_seconds = submitted.elapsed().as_secs_f64();
                    reply(executor.step(&step).map(|mut out| {
                        out.timing.queued_seconds = queued_seconds;
                        out
                    }));
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            cfg,
            spec,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn kv_spec(&self) -> KvSpec {
        self.spec
    }

    /// Submits a step; `reply` runs on the executor thread with its result. Blocks
    /// only while another step is queued (the queue holds one).
    pub fn submit_with(
        &self,
        step: Step,
        reply: impl FnOnce(Result<StepOutput, ExecutorError>) + Send + 'static,
    ) -> Result<(), ExecutorError> {
        self.tx
            .as_ref()
            .ok_or(ExecutorError::Stopped)?
            .send((step, std::time::Instant::now(), Box::new(reply)))
            .map_err(|_| ExecutorError::Stopped)
    }

    /// Submits a step and waits for its output.
    pub fn run(&self, step: Step) -> Result<StepOutput, ExecutorError> {
        let (tx, rx) = mpsc::channel();
        self.submit_with(step, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| ExecutorError::Stopped)?
    }

    /// Whether the executor thread is still running.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for ExecutorHandle {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use hyserve_kernels::DType;
    use hyserve_kernels::cpu::CpuBackend;
    use hyserve_model::init::{InitOptions, WeightFormat, init_model};
    use hyserve_model::{Arch, Checkpoint};

    use super::*;

    fn executor(arch: Arch, precision: Precision) -> Executor<CpuBackend> {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            arch,
            preset: "tiny".into(),
            seed: 11,
            dtype: DType::BF16,
            format: WeightFormat::Safetensors,
            max_shard_bytes: 1 << 30,
        };
        let cfg = init_model(dir.path(), &opts, &mut |_, _| {}).unwrap();
        let ck = Checkpoint::open(dir.path(), &mut |_| {}).unwrap();
        ck.validate(&cfg).unwrap();
        let backend = CpuBackend::new(precision);
        let model = Model::load(&backend, cfg, &ck, &mut |_| {});
        Executor::new(backend, model, 64, 16)
    }

    fn seq(id: u64, tokens: &[u32], first_pos: usize, blocks: &[u32]) -> SeqStep {
        SeqStep {
            seq_id: id,
            request_id: "".into(),
            tokens: tokens.to_vec(),
            first_pos,
            blocks: blocks.to_vec(),
            all_logits: true,
            argmax_only: false,
            draft: None,
        }
    }

    /// A sequence's logits are bitwise the same alone or sharing steps with others,
    /// whether its partner is prefilling or decoding.
    #[test]
    fn logits_do_not_depend_on_batch_composition() {
        for arch in [Arch::HunyuanLarge, Arch::HunyuanV1Moe] {
            let a_prompt: Vec<u32> = (0..21).map(|i| 260 + i * 3).collect();
            let b_prompt: Vec<u32> = (0..9).map(|i| 400 + i).collect();
            // Alone: prefill, then two decode steps.
            let mut alone = executor(arch, Precision::Bf16);
            let mut want = alone
                .step(&Step {
                    seqs: vec![seq(1, &a_prompt, 0, &[0, 1])],
                    ..Default::default()
                })
                .unwrap()
                .logits;
            want.extend(
                alone
                    .step(&Step {
                        seqs: vec![seq(1, &[7], 21, &[0, 1])],
                        ..Default::default()
                    })
                    .unwrap()
                    .logits,
            );
            want.extend(
                alone
                    .step(&Step {
                        seqs: vec![seq(1, &[8], 22, &[0, 1])],
                        ..Default::default()
                    })
                    .unwrap()
                    .logits,
            );
            // Shared: B prefills beside A's prefill, then B prefills more while A decodes,
            // then both decode. A uses other blocks than before.
            let mut shared = executor(arch, Precision::Bf16);
            let s1 = shared
                .step(&Step {
                    seqs: vec![
                        seq(2, &b_prompt[..4], 0, &[9]),
                        seq(1, &a_prompt, 0, &[5, 6]),
                    ],
                    ..Default::default()
                })
                .unwrap();
            let s2 = shared
                .step(&Step {
                    seqs: vec![seq(1, &[7], 21, &[5, 6]), seq(2, &b_prompt[4..], 4, &[9])],
                    ..Default::default()
                })
                .unwrap();
            let s3 = shared
                .step(&Step {
                    seqs: vec![seq(2, &[3], 9, &[9]), seq(1, &[8], 22, &[5, 6])],
                    ..Default::default()
                })
                .unwrap();
            let got = vec![
                s1.logits[1].clone(),
                s2.logits[0].clone(),
                s3.logits[1].clone(),
            ];
            assert_eq!(got, want, "{arch:?}: batch composition changed the logits");
        }
    }

    #[test]
    fn f32_and_bf16_precisions_agree_within_bf16_error() {
        let prompt: Vec<u32> = (0..12).map(|i| 300 + i).collect();
        let a = executor(Arch::HunyuanLarge, Precision::F32)
            .step(&Step {
                seqs: vec![seq(1, &prompt, 0, &[0])],
                ..Default::default()
            })
            .unwrap();
        let b = executor(Arch::HunyuanLarge, Precision::Bf16)
            .step(&Step {
                seqs: vec![seq(1, &prompt, 0, &[0])],
                ..Default::default()
            })
            .unwrap();
        let (x, y) = (&a.logits[0], &b.logits[0]);
        let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        let den: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        assert!(rel > 0.0 && rel < 0.1, "relative difference {rel}");
    }

    #[test]
    fn bad_steps_are_errors_not_panics() {
        let mut e = executor(Arch::HunyuanLarge, Precision::Bf16);
        let vocab = e.config().vocab_size as u32;
        for (s, what) in [
            (seq(1, &[vocab], 0, &[0]), "vocab"),
            (seq(1, &[1; 17], 0, &[0]), "blocks cannot hold"),
            (seq(1, &[1], 0, &[64]), "block 64"),
            (seq(1, &[], 0, &[0]), "no tokens"),
        ] {
            let err = e
                .step(&Step {
                    seqs: vec![s],
                    ..Default::default()
                })
                .unwrap_err()
                .to_string();
            assert!(err.contains(what), "{err}");
        }
    }

    /// A step switches to a staged placement only when it is for that epoch; a slot
    /// staged for a later epoch waits for its step instead of being thrown away.
    #[test]
    fn epochs_switch_only_to_the_placement_staged_for_them() {
        let mut e = executor(Arch::HunyuanLarge, Precision::Bf16);
        let cfg = e.config().clone();
        let all: Holders = cfg
            .layers
            .iter()
            .map(|l| vec![vec![0u32]; l.n_experts])
            .collect();
        let ex = hyserve_model::InProcess::group(1, std::time::Duration::from_secs(1)).remove(0);
        let (slot, held) = e.expert_parallel(Box::new(ex), 1, all.clone());
        let n_experts = held.lock().unwrap().len();
        let step = |epoch: u64, id: u64| Step {
            seqs: vec![seq(1, &[5, 6], 0, &[0])],
            step_id: id,
            epoch,
        };
        assert!(e.step(&step(1, 1)).is_ok());
        // Epoch 3 is staged early; a step of epoch 2 (nothing staged for it) fails and
        // leaves epoch 3's experts where they are.
        *slot.lock().unwrap() = Some(Staged {
            epoch: 3,
            holders: all.clone(),
            experts: Vec::new(),
        });
        let err = e.step(&step(2, 2)).unwrap_err();
        assert!(
            matches!(err, ExecutorError::Epoch { want: 2, have: 1 }),
            "{err}"
        );
        assert_eq!(slot.lock().unwrap().as_ref().map(|s| s.epoch), Some(3));
        // Epoch 3's step switches; every expert is still held (rank 0 holds all).
        let out = e.step(&step(3, 3)).unwrap();
        let picks: usize = cfg.layers.iter().map(|l| l.top_k).sum();
        assert_eq!(out.expert_load.iter().sum::<u64>(), 2 * picks as u64);
        assert!(slot.lock().unwrap().is_none());
        assert_eq!(held.lock().unwrap().len(), n_experts);
    }

    /// A sequence that asks for only its rows' arg-max tokens gets exactly the arg-max
    /// of the rows it would have got, in a step where every sequence asks (the backend
    /// takes them) and in a mixed one (the executor does), and no rows.
    #[test]
    fn greedy_sequences_get_the_arg_max_of_their_rows() {
        let mut e = executor(Arch::HunyuanLarge, Precision::Bf16);
        let prompts: [Vec<u32>; 3] = [
            (0..12).map(|i| 260 + 3 * i).collect(),
            (0..5).map(|i| 400 + i).collect(),
            (0..8).map(|i| 90 + 7 * i).collect(),
        ];
        let blocks = |i: usize| vec![2 * i as u32, 2 * i as u32 + 1];
        // Prefill, a decode step and a verification of 3 tokens (each run three times
        // over the same positions: rows; arg-max only; every other sequence arg-max).
        let steps: Vec<Vec<SeqStep>> = vec![
            (0..3)
                .map(|i| seq(i as u64, &prompts[i], 0, &blocks(i)))
                .collect(),
            (0..3)
                .map(|i| {
                    let mut s = seq(i as u64, &[7 + i as u32], prompts[i].len(), &blocks(i));
                    s.all_logits = false;
                    s
                })
                .collect(),
            (0..3)
                .map(|i| seq(i as u64, &[7, 11, 13, 17], prompts[i].len(), &blocks(i)))
                .collect(),
        ];
        for seqs in steps {
            let run = |e: &mut Executor<CpuBackend>, only: &dyn Fn(usize) -> bool| {
                let seqs = seqs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| SeqStep {
                        argmax_only: only(i),
                        ..s.clone()
                    })
                    .collect();
                e.step(&Step {
                    seqs,
                    ..Default::default()
                })
                .unwrap()
            };
            let rows = run(&mut e, &|_| false);
            let vocab = rows.vocab_size;
            let want: Vec<Vec<u32>> = rows
                .logits
                .iter()
                .map(|r| hyserve_kernels::backend::argmax_each(r, vocab))
                .collect();
            assert!(want.iter().all(|w| !w.is_empty()));
            let all = run(&mut e, &|_| true);
            assert_eq!(all.argmax, want);
            assert!(all.logits.iter().all(Vec::is_empty));
            let mixed = run(&mut e, &|i| i % 2 == 0);
            for (i, w) in want.iter().enumerate() {
                if i % 2 == 0 {
                    assert_eq!(&mixed.argmax[i], w, "sequence {i}");
                    assert!(mixed.logits[i].is_empty());
                } else {
                    assert!(mixed.argmax[i].is_empty());
                    assert_eq!(mixed.logits[i], rows.logits[i], "sequence {i}");
                }
            }
        }
    }

    /// The draft model's proposals are its own greedy continuation (after catching up on
    /// the whole prompt), and the rows that verify them are bitwise the logits plain
    /// decode steps give at those positions.
    #[test]
    fn draft_proposals_are_verified_in_the_same_pass() {
        let mut plain = executor(Arch::HunyuanLarge, Precision::Bf16);
        let mut spec = executor(Arch::HunyuanLarge, Precision::Bf16);
        // The draft: another tiny model of the same vocabulary.
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            arch: Arch::HunyuanLarge,
            preset: "tiny".into(),
            seed: 12,
            dtype: DType::BF16,
            format: WeightFormat::Safetensors,
            max_shard_bytes: 1 << 30,
        };
        let dcfg = init_model(dir.path(), &opts, &mut |_, _| {}).unwrap();
        let dck = Checkpoint::open(dir.path(), &mut |_| {}).unwrap();
        let backend = CpuBackend::new(Precision::Bf16);
        let draft_alone = Model::load(&backend, dcfg.clone(), &dck, &mut |_| {});
        spec.set_draft(Model::load(&backend, dcfg, &dck, &mut |_| {}))
            .unwrap();
        let prompt: Vec<u32> = (0..10).map(|i| 270 + 5 * i).collect();
        let blocks = [0, 1];
        for e in [&mut plain, &mut spec] {
            e.step(&Step {
                seqs: vec![seq(1, &prompt, 0, &blocks)],
                ..Default::default()
            })
            .unwrap();
        }
        let t = 300;
        let mut step = seq(1, &[t], 10, &blocks);
        step.all_logits = false;
        step.draft = Some(DraftRequest {
            depth: 3,
            first_pos: 0,
            context: prompt.clone(),
        });
        let out = spec
            .step(&Step {
                seqs: vec![step],
                ..Default::default()
            })
            .unwrap();
        // The draft alone, greedily, on the same context.
        let mut kv = backend.alloc_kv(kv_spec(&draft_alone.cfg, Precision::Bf16, 64, 16));
        let mut ctx = [prompt.clone(), vec![t]].concat();
        let mut want = Vec::new();
        for _ in 0..3 {
            let chunk = SeqChunk {
                tokens: ctx.clone(),
                first_pos: 0,
                slots: (0..ctx.len()).collect(),
                all_logits: false,
                argmax_only: false,
            };
            let l = draft_alone.forward(&backend, &mut kv, &[chunk]).remove(0);
            let next = hyserve_kernels::sampling::argmax(&l) as u32;
            want.push(next);
            ctx.push(next);
        }
        assert_eq!(out.proposals, vec![want.clone()]);
        let vocab = out.vocab_size;
        assert_eq!(out.logits[0].len(), 4 * vocab);
        // Plain decode steps over the step's token and the proposals.
        for (i, &tok) in [t].iter().chain(&want).enumerate() {
            let mut s = seq(1, &[tok], 10 + i, &blocks);
            s.all_logits = false;
            let row = plain
                .step(&Step {
                    seqs: vec![s],
                    ..Default::default()
                })
                .unwrap()
                .logits
                .remove(0);
            assert_eq!(
                row[..],
                out.logits[0][i * vocab..(i + 1) * vocab],
                "row {i}"
            );
        }
        // A draft whose context does not end at the step is refused.
        let mut bad = seq(1, &[t], 10, &blocks);
        bad.draft = Some(DraftRequest {
            depth: 2,
            first_pos: 3,
            context: vec![1],
        });
        let err = spec
            .step(&Step {
                seqs: vec![bad],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("draft"), "{err}");
    }

    #[test]
    fn executor_thread_answers_steps() {
        let handle = ExecutorHandle::spawn(
            "test-executor",
            executor(Arch::HunyuanLarge, Precision::Bf16),
        )
        .unwrap();
        let out = handle
            .run(Step {
                seqs: vec![seq(1, &[1, 2, 3], 0, &[0])],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(out.logits[0].len(), 3 * out.vocab_size);
    }

    /// The CLA cache of the real Hunyuan-Large: one (K, V) per layer pair.
    #[test]
    fn real_hunyuan_large_kv_cache_is_81920_bytes_per_token() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures": ["HunYuanForCausalLM"], "model_type": "hunyuan",
            "hidden_size": 6400, "intermediate_size": 18304, "num_hidden_layers": 64,
            "num_attention_heads": 80, "num_key_value_heads": 8, "vocab_size": 129024,
            "num_experts": 16, "moe_topk": 1, "num_shared_expert": 1, "use_mixed_mlp_moe": true,
            "use_cla": true, "cla_share_factor": 2, "use_qk_norm": true,
            "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}}"#,
        )
        .unwrap();
        let spec = kv_spec(&cfg, Precision::Bf16, 1, 16);
        assert_eq!(spec.n_cache_layers, 32);
        assert_eq!(spec.bytes_per_token(), 81_920);
        // Full multi-head attention would need 1,638,400 bytes: GQA + CLA is 5% of it.
        assert_eq!(2 * 64 * 80 * 80 * 2, 1_638_400);
        assert_eq!(
            kv_spec(&cfg, Precision::F32, 1, 16).bytes_per_token(),
            163_840
        );
    }
}
