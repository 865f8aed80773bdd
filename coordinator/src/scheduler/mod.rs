//! The scheduler: continuous batching over in-process workers as a plain state machine,
//! so every policy (what runs in the next step, who gets KV blocks, who is preempted,
//! when a sequence ends) is decided here and unit-tested without threads, actors or
//! clocks. The engine's actors only carry its [`Plan`]s to executors and the outputs back.
//!
//! One step at a time: [`Scheduler::schedule`] plans a step (one [`Step`] per worker),
//! the executors run it, and [`Scheduler::complete`] samples, appends and finishes
//! sequences (or [`Scheduler::abort_step`] puts them back in the queue).
//!
//! Per worker and step: one decode token for every running sequence that has a single
//! token left to compute (oldest first), then prefill chunks of sequences still
//! prefilling (oldest first), then admission of waiting sequences (FIFO) while the
//! token budget, `max_running` and free KV blocks allow. Decodes take precedence for
//! blocks: a decode that cannot get one preempts (by recomputation) the worker's most
//! recently admitted other sequence; a prefill that cannot get one waits. Sampling is
//! stateless per (seed, position), so recomputation reproduces the same tokens.
//!
//! Speculation ([`spec`]): after the step is planned, decoding sequences may get
//! proposed tokens to verify in the same pass (prompt lookup here, or the workers' draft
//! model), as deep as their acceptance rates and the learned cost of a bigger step make
//! worth it. Their KV blocks are reserved for the proposals, and what is rejected is
//! rolled back: the sequence's computed length counts only accepted tokens and blocks
//! past its tokens are released, so rejected positions are never read and are
//! overwritten later.

pub mod blocks;
pub mod spec;

#[cfg(test)]
mod tests;

use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use hyserve_kernels::sampling::SamplingParams;
use hyserve_worker::{DraftRequest, SeqStep, Step, StepOutput};

use crate::api::{
    EngineStats, FinishReason, GenerateRequest, HistogramCounts, ServeError, TokenEvent, Usage,
};
use blocks::{BlockHash, BlockPool, PrefixMatch};
use hyserve_telemetry::catalogue::QUEUE_TIME_SECONDS;
use spec::{
    Acceptance, CostModel, Guard, ProposerKind, Sampled, SpecConfig, SpecStats, VerifyInput,
};

/// Weight of a decode step in the running share of decode steps that speculated
/// (~20 steps).
const SPEC_SHARE_EWMA: f64 = 0.05;

/// A step's sampling work (over all the rows that come back to the scheduler, in
/// values an `argmax` scans: [`SAMPLED_DRAW_COST`]) from which it runs on rayon's
/// threads: two of Hunyuan-Large's rows take about as long to scan as waking a pool
/// (tens of microseconds); below, one thread reads them sooner.
const PARALLEL_SAMPLING_VALUES: usize = 1 << 18;

/// What a sampled draw costs per value against an `argmax` scan (0.4-0.5 ns a value):
/// untruncated, a weight per value and a walk over them (2.6-2.9 ns on the development
/// VM, `step_overhead` at batch 32); cut by top-k, top-p or min-p, a sort of the
/// candidates too (7.4-8.1 ns on Zipf-like rows at top-p 0.9). Rounded down, so that a
/// batch of 8 untruncated draws of the small model's rows stays on one thread (on the
/// 2-core VM a pool made it slower). Since greedy draws come back as ids, most rows
/// that reach the scheduler are sampled ones.
const SAMPLED_DRAW_COST: [usize; 2] = [4, 16];

/// The engine's name for one sequence (one `GenerateRequest`).
pub type SeqId = u64;

/// How long a client rejected for a full queue should wait: about one step of a busy
/// engine drains a few requests.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// In-process workers, each with its own KV pool.
    pub n_workers: usize,
    pub n_blocks_per_worker: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Token budget per step per worker (decode tokens and prefill chunks together).
    pub max_batch_tokens: usize,
    /// Sequences per worker admitted at once (running or prefilling).
    pub max_running: usize,
    /// Requests queued beyond this are refused with `ServeError::Overloaded`.
    pub max_waiting: usize,
    /// Most prompt tokens one sequence prefills per step, so a long prompt shares steps.
    pub prefill_chunk: usize,
    /// Prompt + generated tokens limit (the model's max positions).
    pub max_context: usize,
    pub enable_prefix_cache: bool,
    pub speculation: SpecConfig,
}

/// A planned step: what each worker runs. Hand it back, unchanged, to
/// [`Scheduler::complete`] or [`Scheduler::abort_step`].
#[derive(Clone, Debug)]
pub struct Plan {
    /// `(worker, step)` in worker order; only workers with work appear.
    pub steps: Vec<(usize, Step)>,
    /// Matches the plan to the step in flight: a stale or foreign plan is ignored.
    id: u64,
}

impl Plan {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Tokens computed by the whole step, over all workers.
    pub fn n_tokens(&self) -> usize {
        self.steps
            .iter()
            .flat_map(|(_, s)| &s.seqs)
            .map(|s| s.tokens.len())
            .sum()
    }
}

/// One sequence's share of the step in flight. Kept by the scheduler rather than read
/// back from the plan, whose fields the caller can touch.
#[derive(Clone, Debug)]
struct Scheduled {
    id: SeqId,
    /// The sequence's own tokens computed (prompt chunk or decode token).
    n_tokens: usize,
    /// Prompt-lookup proposals sent after them.
    proposals: Vec<u32>,
    /// How many of the proposals are the proposer's own, not fillers of a uniform step
    /// (a sequence's acceptance rate is learned from those alone).
    known: usize,
    /// Draft tokens asked of the worker.
    draft_depth: usize,
    /// Tokens the draft reads before the step's own (a long catch-up is a prefill for it).
    draft_context: usize,
    /// The draft reads the step's prompt chunk along.
    draft_reads: bool,
    /// Only its rows' arg-max tokens come back ([`Seq::wants_argmax_only`]).
    argmax_only: bool,
    /// It decodes: its one token follows a computed prompt (not a prompt chunk, even a
    /// last one, whose first token the step also emits).
    decode: bool,
}

/// One sequence's part of a finished step: its worker's output rows and the proposals
/// they verify.
struct SeqResult {
    worker: usize,
    vocab: usize,
    s: Scheduled,
    proposals: Vec<u32>,
    rows: Vec<f32>,
    /// Where it asked for only them: its rows' arg-max tokens (and no rows).
    argmax: Vec<u32>,
}

#[derive(Debug)]
struct InFlight {
    plan_id: u64,
    steps: Vec<(usize, Vec<Scheduled>)>,
}

/// What the last completed step did, for the guard once its wall time is known.
#[derive(Clone, Copy, Debug)]
struct StepRecord {
    /// Only decoding sequences (no prefill chunk): comparable with other such steps.
    pure_decode: bool,
    /// It computed a prompt chunk.
    prompt: bool,
    n_decode: usize,
    speculated: bool,
    /// A forward pass ran a shape the backend was still recording (a warm-up).
    warming: bool,
    emitted: usize,
    /// The workers' round trip, where the step was timed.
    model_seconds: Option<f64>,
}

/// What one worker's step is taking shape as during `schedule`.
#[derive(Debug)]
struct WorkerPlan {
    seqs: Vec<Scheduled>,
    n_budget_tokens: usize,
}

impl WorkerPlan {
    fn push(&mut self, id: SeqId, n_tokens: usize) {
        self.seqs.push(Scheduled {
            id,
            n_tokens,
            proposals: Vec::new(),
            known: 0,
            draft_depth: 0,
            draft_context: 0,
            draft_reads: false,
            argmax_only: false,
            decode: false,
        });
        self.n_budget_tokens = self.n_budget_tokens.saturating_sub(n_tokens);
    }

    /// Takes `id` back out of the step (it was preempted after being planned).
    fn remove(&mut self, id: SeqId) {
        if let Some(pos) = self.seqs.iter().position(|s| s.id == id) {
            let s = self.seqs.remove(pos);
            self.n_budget_tokens += s.n_tokens;
        }
    }
}

#[derive(Debug)]
struct Seq {
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    sampling: SamplingParams,
    seed: u64,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    logprobs: Option<usize>,
    /// Tokens whose KV is written in `blocks` (reset to the cache hit on admission).
    n_computed: usize,
    /// `Some` while running (admitted), `None` while waiting.
    worker: Option<usize>,
    blocks: Vec<u32>,
    /// Chained hashes of the leading full blocks already registered or found cached.
    block_hashes: Vec<BlockHash>,
    /// Admission order: an aborted step requeues its sequences oldest first.
    admitted_at: u64,
    /// Prompt tokens reused at the first admission (what `usage` reports; later
    /// readmissions after preemption are the engine's business, not the client's).
    cached_tokens: Option<usize>,
    in_step: bool,
    /// Cancelled while in the step in flight: dropped when the step ends.
    cancelled: bool,
    /// The request allows speculation.
    speculate: bool,
    acceptance: Acceptance,
    /// Positions `0..draft_computed` are in the draft model's cache.
    draft_computed: usize,
    /// The client request it belongs to (for the logs).
    request_id: std::sync::Arc<str>,
    /// When it was submitted; taken at its first admission (queue time).
    queued_at: Option<std::time::Instant>,
}

impl Seq {
    fn n_left(&self) -> usize {
        self.tokens.len().saturating_sub(self.n_computed)
    }

    fn n_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether a step computing its next `n_tokens` needs no more of its logits rows
    /// than their arg-max tokens: a prompt chunk that leaves some of the prompt to
    /// compute (its rows predict known tokens), or a greedy draw with no penalty and no
    /// logprobs (and greedy verification: a proposal is kept while it is the arg-max).
    /// Its worker then sends back token ids instead of rows: on a GPU the rows are not
    /// even downloaded.
    fn wants_argmax_only(&self, n_tokens: usize) -> bool {
        let mid_prompt = self.n_computed + n_tokens < self.tokens.len();
        mid_prompt
            || (self.sampling.is_greedy()
                && !self.sampling.has_penalties()
                && self.logprobs.is_none())
    }

    /// Back to "nothing computed", holding no blocks (the caller released them).
    fn reset_to_waiting(&mut self) {
        self.blocks.clear();
        self.block_hashes.clear();
        self.n_computed = 0;
        self.draft_computed = 0;
        self.worker = None;
        self.in_step = false;
    }
}

/// Where a waiting sequence would go and what it would take there.
#[derive(Debug)]
struct Candidate {
    worker: usize,
    prefix: PrefixMatch,
    n_hit_tokens: usize,
    n_chunk_tokens: usize,
    n_free_blocks: usize,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pools: Vec<BlockPool>,
    /// Every waiting or running sequence. Bounded: `add` refuses beyond `max_waiting`
    /// waiting, and at most `max_running` per worker run.
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// Per worker, in admission order (oldest first).
    running: Vec<Vec<SeqId>>,
    in_flight: Option<InFlight>,
    next_plan_id: u64,
    next_admission: u64,
    preempted_total: u64,
    queue_seconds: HistogramCounts,
    prefix_cache_queries_tokens: u64,
    prefix_cache_hit_tokens: u64,
    steps_total: u64,
    steps_warming_total: u64,
    step_tokens_total: u64,
    /// Steps that computed a prompt chunk, and their wall time.
    prompt_steps_total: u64,
    prompt_step_seconds_total: f64,
    cost: CostModel,
    guard: Guard,
    /// The share of recent decode steps that verified proposals.
    spec_share: f64,
    /// Recent acceptance over all sequences: where a new sequence's starts.
    acceptance: Acceptance,
    last_step: Option<StepRecord>,
    spec_stats: SpecStats,
    /// While a failing step's culprit is being singled out (`restrict`): the only
    /// sequences (sorted) that steps may hold.
    only: Option<Vec<SeqId>>,
}

impl Scheduler {
    /// Sizes of zero that would stop all progress (`block_size`, `max_batch_tokens`,
    /// `max_running`, `prefill_chunk`) are raised to 1.
    pub fn new(cfg: SchedulerConfig) -> Self {
        let cfg = SchedulerConfig {
            block_size: cfg.block_size.max(1),
            max_batch_tokens: cfg.max_batch_tokens.max(1),
            max_running: cfg.max_running.max(1),
            prefill_chunk: cfg.prefill_chunk.max(1),
            ..cfg
        };
        let pools = (0..cfg.n_workers)
            .map(|_| {
                BlockPool::new(
                    cfg.n_blocks_per_worker,
                    cfg.block_size,
                    cfg.enable_prefix_cache,
                )
            })
            .collect();
        Self {
            running: vec![Vec::new(); cfg.n_workers],
            cfg,
            pools,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            in_flight: None,
            next_plan_id: 0,
            next_admission: 0,
            preempted_total: 0,
            queue_seconds: HistogramCounts::new(QUEUE_TIME_SECONDS.buckets),
            prefix_cache_queries_tokens: 0,
            prefix_cache_hit_tokens: 0,
            steps_total: 0,
            steps_warming_total: 0,
            prompt_steps_total: 0,
            prompt_step_seconds_total: 0.0,
            step_tokens_total: 0,
            cost: CostModel::default(),
            guard: Guard::default(),
            spec_share: 0.0,
            acceptance: Acceptance::default(),
            last_step: None,
            spec_stats: SpecStats::default(),
            only: None,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Admits a request into the waiting queue. Errors: `InvalidRequest` (field
    /// "prompt" when empty; "max_tokens" when zero, when prompt + max_tokens exceeds
    /// `max_context`, or when the sequence could never fit one worker's KV pool),
    /// `Overloaded` (waiting queue full), `Unavailable` (no workers), `Internal` (`id`
    /// already in use: an engine bug).
    /// `seed` is the request's effective seed (`sampling.seed` or one the caller picked).
    pub fn add(&mut self, id: SeqId, req: GenerateRequest, seed: u64) -> Result<(), ServeError> {
        self.validate(&req)?;
        if self.seqs.contains_key(&id) {
            return Err(ServeError::Internal {
                message: format!("sequence id {id} is already in use"),
            });
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(ServeError::Overloaded {
                message: format!("{} requests are already queued", self.waiting.len()),
                retry_after: OVERLOADED_RETRY_AFTER,
            });
        }
        let prompt_len = req.prompt.len();
        self.seqs.insert(
            id,
            Seq {
                request_id: req.request_id.as_str().into(),
                tokens: req.prompt,
                prompt_len,
                sampling: req.sampling,
                seed,
                max_tokens: req.max_tokens,
                stop_token_ids: req.stop_token_ids,
                logprobs: req.logprobs,
                n_computed: 0,
                worker: None,
                blocks: Vec::new(),
                block_hashes: Vec::new(),
                admitted_at: 0,
                cached_tokens: None,
                in_step: false,
                cancelled: false,
                speculate: req.speculate,
                acceptance: Acceptance::starting_at(self.acceptance.rate()),
                draft_computed: 0,
                queued_at: Some(std::time::Instant::now()),
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    fn validate(&self, req: &GenerateRequest) -> Result<(), ServeError> {
        if self.pools.is_empty() {
            return Err(ServeError::Unavailable {
                message: "the engine has no workers".into(),
            });
        }
        if req.prompt.is_empty() {
            return Err(ServeError::invalid("prompt", "the prompt is empty"));
        }
        if req.max_tokens == 0 {
            return Err(ServeError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let n_tokens = req.prompt.len().saturating_add(req.max_tokens);
        if n_tokens > self.cfg.max_context {
            return Err(ServeError::invalid(
                "max_tokens",
                format!(
                    "the prompt ({} tokens) plus max_tokens ({}) exceeds the context length \
                     ({} tokens)",
                    req.prompt.len(),
                    req.max_tokens,
                    self.cfg.max_context
                ),
            ));
        }
        // The last generated token is never fed back, so its KV is never written.
        let n_blocks = (n_tokens - 1).div_ceil(self.cfg.block_size);
        if n_blocks > self.cfg.n_blocks_per_worker {
            return Err(ServeError::invalid(
                "max_tokens",
                format!(
                    "the prompt ({} tokens) plus max_tokens ({}) needs {n_blocks} KV blocks; \
                     a worker has {}",
                    req.prompt.len(),
                    req.max_tokens,
                    self.cfg.n_blocks_per_worker
                ),
            ));
        }
        Ok(())
    }

    /// Cancels a waiting or running sequence and frees its blocks; a sequence in the
    /// step in flight is dropped when that step ends. Unknown ids are ignored.
    pub fn cancel(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        if seq.in_step {
            seq.cancelled = true;
        } else {
            self.remove(id);
        }
    }

    /// Steps hold only sequences of `only` (any order; `None`: every sequence), until
    /// the next call. Others keep their blocks and places in the queue, are neither
    /// admitted nor preempted for a prefill, and new requests wait. The engine singles
    /// out a request that breaks every step it is in this way. Should none of `only` be
    /// able to run (all gone, or waiting for blocks the others hold), the step is
    /// planned as if unrestricted.
    pub fn restrict(&mut self, only: Option<Vec<SeqId>>) {
        self.only = only.map(|mut o| {
            o.sort_unstable();
            o.dedup();
            o
        });
    }

    fn allowed(&self, id: SeqId) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.binary_search(&id).is_ok())
    }

    /// Plans the next step; `None` when there is nothing to run or a step is already
    /// in flight.
    pub fn schedule(&mut self) -> Option<Plan> {
        if self.in_flight.is_some() {
            return None;
        }
        if let Some(mut only) = self.only.take() {
            only.retain(|id| self.seqs.contains_key(id));
            if !only.is_empty() {
                self.only = Some(only);
                let plan = self.plan();
                if plan.is_some() {
                    return plan;
                }
                self.only = None;
            }
        }
        self.plan()
    }

    fn plan(&mut self) -> Option<Plan> {
        let mut plans: Vec<WorkerPlan> = (0..self.pools.len())
            .map(|_| WorkerPlan {
                seqs: Vec::new(),
                n_budget_tokens: self.cfg.max_batch_tokens,
            })
            .collect();
        for (w, plan) in plans.iter_mut().enumerate() {
            self.plan_running(w, plan);
        }
        self.admit(&mut plans);
        for s in plans.iter_mut().flat_map(|p| &mut p.seqs) {
            s.decode = s.n_tokens == 1
                && self
                    .seqs
                    .get(&s.id)
                    .is_some_and(|q| q.n_left() == 1 && q.n_generated() > 0);
        }
        if self.cfg.speculation.enabled() {
            let n_decode = plans
                .iter()
                .flat_map(|p| &p.seqs)
                .filter(|s| s.decode)
                .count();
            // Only steps of decodes speculate: a step with a prompt chunk is heavy
            // already, and only decode steps compare with each other on the clock. A fixed
            // depth is a measurement setting: no second-guessing it.
            let n_seqs: usize = plans.iter().map(|p| p.seqs.len()).sum();
            let allowed = self.cfg.speculation.fixed_depth.is_some()
                || (n_seqs == n_decode && self.guard.allow(n_decode));
            if allowed {
                for (w, plan) in plans.iter_mut().enumerate() {
                    self.speculate(w, plan);
                }
            }
        }

        // The draft reads prompt chunks along (so it is current when the sequence first
        // decodes) while most recent decode steps use it. Where the guard keeps it off,
        // reading would cost a draft pass in every prefill step for nothing; a draft
        // that did not read catches up when it is next asked to propose.
        let draft_reads_along = self.cfg.speculation.proposer == ProposerKind::Draft
            && (self.cfg.speculation.fixed_depth.is_some() || self.spec_share >= 0.5);
        let mut steps = Vec::new();
        let mut flight = Vec::new();
        for (w, plan) in plans.into_iter().enumerate() {
            let mut step = Step::default();
            let mut scheduled = Vec::with_capacity(plan.seqs.len());
            for mut s in plan.seqs {
                let Some(seq) = self.seqs.get_mut(&s.id) else {
                    continue;
                };
                let Some(tokens) = seq.tokens.get(seq.n_computed..seq.n_computed + s.n_tokens)
                else {
                    continue;
                };
                let mut tokens = tokens.to_vec();
                tokens.extend_from_slice(&s.proposals);
                let draft_reads = draft_reads_along && seq.speculate && seq.n_left() > 1;
                let draft = (s.draft_depth > 0 || draft_reads).then(|| DraftRequest {
                    depth: s.draft_depth,
                    first_pos: seq.draft_computed,
                    context: seq.tokens[seq.draft_computed..seq.n_computed].to_vec(),
                });
                s.draft_context = draft.as_ref().map_or(0, |d| d.context.len());
                s.draft_reads = draft_reads;
                s.argmax_only = seq.wants_argmax_only(s.n_tokens);
                step.seqs.push(SeqStep {
                    seq_id: s.id,
                    request_id: seq.request_id.clone(),
                    tokens,
                    first_pos: seq.n_computed,
                    blocks: seq.blocks.clone(),
                    all_logits: !s.proposals.is_empty(),
                    argmax_only: s.argmax_only,
                    draft,
                });
                seq.in_step = true;
                scheduled.push(s);
            }
            if !scheduled.is_empty() {
                steps.push((w, step));
                flight.push((w, scheduled));
            }
        }
        if steps.is_empty() {
            return None;
        }
        let id = self.next_plan_id;
        self.next_plan_id = self.next_plan_id.wrapping_add(1);
        self.in_flight = Some(InFlight {
            plan_id: id,
            steps: flight,
        });
        Some(Plan { steps, id })
    }

    /// Decodes, then prefill chunks, of the sequences already running on worker `w`.
    fn plan_running(&mut self, w: usize, plan: &mut WorkerPlan) {
        let Some(running) = self.running.get(w) else {
            return;
        };
        // Each pass plans something or preempts one sequence: at most `max_running` passes.
        let mut order = running.clone();
        loop {
            for &id in &order {
                if plan.n_budget_tokens == 0 {
                    break;
                }
                if !self.allowed(id) {
                    continue;
                }
                if self.left_on(id, w) == Some(1) && self.grow_or_preempt(w, id, plan) {
                    plan.push(id, 1);
                }
            }
            for &id in &order {
                if plan.n_budget_tokens == 0 {
                    break;
                }
                let Some(n_left) = self.left_on(id, w).filter(|&n| n > 1 && self.allowed(id))
                else {
                    continue;
                };
                let n_want_tokens = n_left.min(self.cfg.prefill_chunk).min(plan.n_budget_tokens);
                let n = self.grow_up_to(w, id, n_want_tokens);
                if n > 0 {
                    plan.push(id, n);
                }
            }
            let running = &self.running[w];
            if !plan.seqs.is_empty() || running.len() <= 1 || self.only.is_some() {
                return;
            }
            // Only prefills are left and each waits for blocks another holds (prefills
            // never preempt): free the newest so the older ones can go on.
            let Some(&victim) = running.last() else {
                return;
            };
            self.preempt(w, victim);
            order.retain(|&id| id != victim);
        }
    }

    /// Adds proposals to worker `w`'s planned decodes: which sequences speculate and how
    /// deep ([`spec::plan_depths`], one depth for all under [`SpecConfig::uniform`], or
    /// the fixed depth), within the step's token budget and the free KV blocks
    /// (speculation never preempts).
    fn speculate(&mut self, w: usize, plan: &mut WorkerPlan) {
        let spec = self.cfg.speculation.clone();
        let base_tokens: usize = plan.seqs.iter().map(|s| s.n_tokens).sum();
        // (index in plan.seqs, its sequence, depth room, useful depth)
        let mut slots = Vec::new();
        for (j, s) in plan.seqs.iter().enumerate() {
            let Some(seq) = self.seqs.get(&s.id) else {
                continue;
            };
            if !seq.speculate || s.n_tokens != 1 || seq.n_left() != 1 {
                continue;
            }
            // Proposals past the context cannot be computed; past max_tokens they would
            // never be emitted (a uniform step verifies them anyway, for its shape).
            let mut room = self
                .cfg
                .max_context
                .saturating_sub(seq.tokens.len() + 1)
                .min(spec.max_depth);
            let useful = room.min(seq.max_tokens.saturating_sub(seq.n_generated() + 1));
            if !spec.uniform {
                room = useful;
            }
            if room > 0 {
                slots.push((j, seq, room, useful));
            }
        }
        if slots.is_empty() {
            return;
        }
        // Prompt lookup at one depth for all: the planner's best case first. Where it
        // would verify nothing even had every sequence all the proposals it could use
        // (a depth's value only grows with what is known), the search for them, a scan
        // of each sequence's context, is skipped: the plan is the same.
        if spec.proposer == ProposerKind::Ngram && spec.uniform && spec.fixed_depth.is_none() {
            let best: Vec<spec::Candidate> = slots
                .iter()
                .map(|&(_, seq, room, useful)| spec::Candidate {
                    rate: seq.acceptance.rate(),
                    max_depth: room,
                    known: useful,
                })
                .collect();
            if spec::plan_uniform_depth(&best, base_tokens, plan.n_budget_tokens, false, &self.cost)
                == 0
            {
                self.spec_stats.searches_skipped += 1;
                return;
            }
        }
        let mut picked = Vec::new(); // (index in plan.seqs, candidate, prompt-lookup proposals)
        for (j, seq, room, useful) in slots {
            let proposals = match spec.proposer {
                ProposerKind::Ngram => spec::ngram_proposals(
                    &seq.tokens,
                    spec.ngram_min,
                    spec.ngram_max,
                    useful,
                    spec.ngram_window,
                ),
                _ => Vec::new(),
            };
            let (max_depth, known) = match spec.proposer {
                ProposerKind::Ngram if !spec.uniform => (proposals.len(), proposals.len()),
                ProposerKind::Ngram => (room, proposals.len()),
                _ => (room, useful),
            };
            if max_depth > 0 {
                let c = spec::Candidate {
                    rate: seq.acceptance.rate(),
                    max_depth,
                    known,
                };
                picked.push((j, c, proposals));
            }
        }
        if picked.is_empty() {
            return;
        }
        let candidates: Vec<spec::Candidate> = picked.iter().map(|p| p.1).collect();
        let draft = spec.proposer == ProposerKind::Draft;
        let depths: Vec<usize> = match (spec.fixed_depth, spec.uniform) {
            (Some(d), _) => {
                let mut left = plan.n_budget_tokens;
                candidates
                    .iter()
                    .map(|c| {
                        let k = d.min(c.max_depth).min(left);
                        left -= k;
                        k
                    })
                    .collect()
            }
            (None, true) => {
                let d = spec::plan_uniform_depth(
                    &candidates,
                    base_tokens,
                    plan.n_budget_tokens,
                    draft,
                    &self.cost,
                );
                candidates.iter().map(|c| d.min(c.max_depth)).collect()
            }
            (None, false) => spec::plan_depths(
                &candidates,
                base_tokens,
                plan.n_budget_tokens,
                draft,
                &self.cost,
            ),
        };
        for ((j, c, proposals), depth) in picked.into_iter().zip(depths) {
            let id = plan.seqs[j].id;
            // As deep as the free blocks allow.
            let Some(depth) = (1..=depth).rev().find(|&k| self.try_grow(w, id, 1 + k)) else {
                continue;
            };
            let s = &mut plan.seqs[j];
            s.known = c.known.min(depth);
            match spec.proposer {
                ProposerKind::Ngram => {
                    let mut p = proposals;
                    p.truncate(depth);
                    s.proposals = match self.seqs.get(&id) {
                        Some(seq) if spec.uniform => spec::fill_proposals(&seq.tokens, p, depth),
                        _ => p,
                    };
                }
                _ => s.draft_depth = depth,
            }
            plan.n_budget_tokens = plan.n_budget_tokens.saturating_sub(depth);
        }
    }

    /// Tokens left to compute for `id` if it is running on worker `w`.
    fn left_on(&self, id: SeqId, w: usize) -> Option<usize> {
        self.seqs
            .get(&id)
            .filter(|s| s.worker == Some(w))
            .map(Seq::n_left)
    }

    /// Gives decoding `id` a block for its next token, preempting the worker's most
    /// recently admitted other sequences until one frees up. False only if `id` is
    /// alone and still cannot grow (which `add`'s size check rules out).
    fn grow_or_preempt(&mut self, w: usize, id: SeqId, plan: &mut WorkerPlan) -> bool {
        loop {
            if self.try_grow(w, id, 1) {
                return true;
            }
            let Some(victim) = self.running[w].iter().rev().copied().find(|&v| v != id) else {
                return false;
            };
            plan.remove(victim);
            self.preempt(w, victim);
        }
    }

    /// Grows `id`'s blocks for `n_want_tokens` new tokens, or as many as the free blocks
    /// allow; returns how many tokens it can compute now.
    fn grow_up_to(&mut self, w: usize, id: SeqId, n_want_tokens: usize) -> usize {
        let (Some(seq), Some(pool)) = (self.seqs.get(&id), self.pools.get(w)) else {
            return 0;
        };
        let bs = self.cfg.block_size;
        let n_room_tokens = (seq.blocks.len() * bs).saturating_sub(seq.n_computed)
            + pool.n_available().saturating_mul(bs);
        let n = n_want_tokens.min(n_room_tokens);
        if n > 0 && self.try_grow(w, id, n) {
            n
        } else {
            0
        }
    }

    /// Gives `id` blocks covering `n_new_tokens` more tokens, all or nothing.
    fn try_grow(&mut self, w: usize, id: SeqId, n_new_tokens: usize) -> bool {
        let (Some(seq), Some(pool)) = (self.seqs.get_mut(&id), self.pools.get_mut(w)) else {
            return false;
        };
        let n_new_blocks = (seq.n_computed + n_new_tokens)
            .div_ceil(self.cfg.block_size)
            .saturating_sub(seq.blocks.len());
        if n_new_blocks > pool.n_available() {
            return false;
        }
        for _ in 0..n_new_blocks {
            match pool.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Recomputation preemption: frees `id`'s blocks and puts it first in the queue
    /// with every token it has; it re-prefills them when readmitted.
    fn preempt(&mut self, w: usize, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        if let Some(pool) = self.pools.get_mut(w) {
            pool.release(&seq.blocks);
        }
        tracing::debug!(request_id = %seq.request_id, seq_id = id, worker = w, "sequence preempted");
        seq.reset_to_waiting();
        self.running[w].retain(|&x| x != id);
        self.waiting.push_front(id);
        self.preempted_total += 1;
    }

    /// Admits waiting sequences in FIFO order while one fits somewhere; the first that
    /// fits nowhere stops admission (no overtaking, so long prompts are not starved).
    /// Sequences that `restrict` holds back are passed over in place.
    fn admit(&mut self, plans: &mut [WorkerPlan]) {
        let bs = self.cfg.block_size;
        let mut i = 0;
        while let Some(&id) = self.waiting.get(i) {
            let Some(seq) = self.seqs.get(&id) else {
                self.waiting.remove(i);
                continue;
            };
            if !self.allowed(id) {
                i += 1;
                continue;
            }
            let mut best: Option<Candidate> = None;
            for (w, pool) in self.pools.iter().enumerate() {
                let n_budget_tokens = plans.get(w).map_or(0, |p| p.n_budget_tokens);
                if self.running[w].len() >= self.cfg.max_running || n_budget_tokens == 0 {
                    continue;
                }
                // Leave at least one token to compute, so the step yields logits.
                let prefix = pool.lookup(&seq.tokens, (seq.tokens.len() - 1) / bs);
                let n_hit_tokens = prefix.n_blocks() * bs;
                let n_chunk_tokens = (seq.tokens.len() - n_hit_tokens)
                    .min(self.cfg.prefill_chunk)
                    .min(n_budget_tokens);
                let n_new_blocks = (n_hit_tokens + n_chunk_tokens).div_ceil(bs) - prefix.n_blocks();
                let n_free_blocks = pool.n_available().saturating_sub(prefix.n_evictable);
                if n_new_blocks > n_free_blocks {
                    continue;
                }
                // More cached tokens first, then more free blocks; ties keep the lower index.
                let better = best.as_ref().is_none_or(|b| {
                    (n_hit_tokens, n_free_blocks) > (b.n_hit_tokens, b.n_free_blocks)
                });
                if better {
                    best = Some(Candidate {
                        worker: w,
                        prefix,
                        n_hit_tokens,
                        n_chunk_tokens,
                        n_free_blocks,
                    });
                }
            }
            let Some(c) = best else {
                break;
            };
            self.waiting.remove(i);
            let w = c.worker;
            let (Some(seq), Some(pool)) = (self.seqs.get_mut(&id), self.pools.get_mut(w)) else {
                continue;
            };
            pool.acquire(&c.prefix);
            seq.blocks = c.prefix.blocks;
            seq.block_hashes = c.prefix.hashes;
            seq.n_computed = c.n_hit_tokens;
            seq.worker = Some(w);
            seq.admitted_at = self.next_admission;
            self.next_admission += 1;
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(c.n_hit_tokens.min(seq.prompt_len));
            }
            if let Some(t) = seq.queued_at.take() {
                self.queue_seconds.observe(t.elapsed().as_secs_f64());
            }
            tracing::debug!(
                request_id = %seq.request_id,
                seq_id = id,
                worker = w,
                cached_tokens = c.n_hit_tokens,
                "sequence admitted"
            );
            if self.cfg.enable_prefix_cache {
                self.prefix_cache_queries_tokens += seq.tokens.len() as u64;
                self.prefix_cache_hit_tokens += c.n_hit_tokens as u64;
            }
            self.running[w].push(id);
            // Checked above; should it fail anyway, the sequence prefills next step.
            if self.try_grow(w, id, c.n_chunk_tokens) {
                plans[w].push(id, c.n_chunk_tokens);
            }
        }
    }

    /// Applies the executor outputs of the step in flight (one per planned worker, in
    /// plan order): samples for every sequence whose known tokens are now all computed
    /// (verifying its proposals, if any), appends, finishes sequences on a stop id,
    /// `max_tokens` or a full context, and returns the events to deliver. A plan that is
    /// not the one in flight is ignored; outputs that do not match the plan are treated
    /// as [`Self::abort_step`].
    pub fn complete(&mut self, plan: Plan, outputs: Vec<StepOutput>) -> Vec<(SeqId, TokenEvent)> {
        self.complete_timed(plan, outputs, None)
    }

    /// [`Self::complete`] with the step's measured wall time, which teaches the cost
    /// model what steps of its size cost.
    pub fn complete_timed(
        &mut self,
        plan: Plan,
        outputs: Vec<StepOutput>,
        seconds: Option<f64>,
    ) -> Vec<(SeqId, TokenEvent)> {
        let Some(flight) = self.take_in_flight(&plan) else {
            return Vec::new();
        };
        // Per sequence: the proposals its rows verify (prompt lookup's, or the draft's).
        let mut proposed: Vec<Vec<Vec<u32>>> = Vec::with_capacity(flight.steps.len());
        let mut fits = outputs.len() == flight.steps.len();
        for ((_, seqs), out) in flight.steps.iter().zip(&outputs) {
            fits &= out.vocab_size > 0 && out.logits.len() == seqs.len();
            let mut props = Vec::with_capacity(seqs.len());
            for (i, s) in seqs.iter().enumerate() {
                let drafted = out.proposals.get(i).filter(|p| !p.is_empty());
                let p = match drafted {
                    Some(d) if d.len() <= s.draft_depth => d.clone(),
                    Some(_) => {
                        fits = false;
                        Vec::new()
                    }
                    None => s.proposals.clone(),
                };
                let rows = 1 + p.len();
                let logits = out.logits.get(i);
                // Ids are emitted as they come: each must be a token of the vocabulary.
                fits &= if s.argmax_only {
                    logits.is_some_and(Vec::is_empty)
                        && out.argmax.get(i).is_some_and(|a| {
                            a.len() == rows && a.iter().all(|&t| (t as usize) < out.vocab_size)
                        })
                } else {
                    logits.is_some_and(|r| r.len() == rows * out.vocab_size)
                };
                props.push(p);
            }
            proposed.push(props);
        }
        if !fits {
            self.requeue(flight);
            return Vec::new();
        }
        self.steps_total += 1;
        let draft_seconds = outputs.iter().map(|o| o.draft_seconds).fold(0.0, f64::max);
        // A step whose shape was being recorded took a warm-up's time: it teaches the
        // cost model nothing about the steps to come.
        let warming = outputs.iter().any(|o| o.warming);
        self.steps_warming_total += u64::from(warming);
        let results: Vec<SeqResult> = flight
            .steps
            .into_iter()
            .zip(outputs)
            .zip(proposed)
            .flat_map(|(((worker, scheduled), out), props)| {
                let vocab = out.vocab_size;
                let mut argmax = out.argmax;
                argmax.resize(scheduled.len(), Vec::new());
                scheduled
                    .into_iter()
                    .zip(props)
                    .zip(out.logits.into_iter().zip(argmax))
                    .map(move |((s, proposals), (rows, argmax))| SeqResult {
                        worker,
                        vocab,
                        s,
                        proposals,
                        rows,
                        argmax,
                    })
            })
            .collect();
        // Sampling reads a whole vocabulary row per sequence (129K entries for
        // Hunyuan-Large): for all sequences first, then applied in order; in parallel
        // where the rows are worth waking threads for (a small model's rows are read
        // in less time than a wake-up takes).
        let seqs = &self.seqs;
        let verify = |r: &SeqResult| {
            let seq = seqs.get(&r.s.id)?;
            let done = (seq.n_computed + r.s.n_tokens).min(seq.tokens.len()) >= seq.tokens.len();
            (!seq.cancelled && done).then(|| {
                let input = VerifyInput {
                    sampling: &seq.sampling,
                    seed: seq.seed,
                    tokens: &seq.tokens,
                    prompt_len: seq.prompt_len,
                    logprobs: seq.logprobs,
                };
                if r.s.argmax_only {
                    spec::verify_argmax(&r.argmax, &r.proposals)
                } else {
                    spec::verify(input, &r.rows, r.vocab, &r.proposals)
                }
            })
        };
        let work: usize = results
            .iter()
            .filter(|r| !r.rows.is_empty())
            .map(|r| {
                let cost = match seqs.get(&r.s.id).map(|q| &q.sampling) {
                    Some(p) if !p.is_greedy() => SAMPLED_DRAW_COST[usize::from(p.truncates())],
                    _ => 1,
                };
                r.rows.len() * cost
            })
            .sum();
        let emitted: Vec<Option<Vec<Sampled>>> = if work >= PARALLEL_SAMPLING_VALUES {
            results.par_iter().map(verify).collect()
        } else {
            results.iter().map(verify).collect()
        };
        if let Some(secs) = seconds.filter(|_| !warming) {
            self.learn_cost(&results, &emitted, secs, draft_seconds);
        }
        let n_decode = emitted.iter().flatten().count();
        let speculated = results.iter().any(|r| !r.proposals.is_empty());
        // Only decodes, each of which emitted: a step that also computed a prompt chunk
        // is heavier, even the last chunk's, which emits the prompt's first token (the
        // guard measured it as a plain decoding step).
        let prompt = results.iter().any(|r| !r.s.decode);
        let pure_decode = n_decode > 0 && n_decode == results.len() && !prompt;
        if pure_decode {
            let x = if speculated { 1.0 } else { 0.0 };
            self.spec_share += SPEC_SHARE_EWMA * (x - self.spec_share);
        }
        self.spec_stats.steps += u64::from(speculated);
        self.spec_stats.catch_up_steps +=
            u64::from(speculated && results.iter().any(|r| r.s.draft_context > 1));
        self.last_step = Some(StepRecord {
            pure_decode,
            prompt,
            n_decode,
            speculated,
            warming,
            emitted: emitted.iter().flatten().map(Vec::len).sum(),
            model_seconds: seconds,
        });
        let mut events = Vec::new();
        for (r, e) in results.into_iter().zip(emitted) {
            self.step_tokens_total += (r.s.n_tokens + r.proposals.len()) as u64;
            self.apply(r.worker, r.s, &r.proposals, e, &mut events);
        }
        events
    }

    /// Teaches the cost model this step's time, and adds the time speculation saved
    /// (or lost) in it to the estimate.
    fn learn_cost(
        &mut self,
        results: &[SeqResult],
        emitted: &[Option<Vec<Sampled>>],
        seconds: f64,
        draft_seconds: f64,
    ) {
        // The step lasts as long as its busiest worker: (tokens, proposals) of each.
        let mut per_worker: HashMap<usize, (usize, usize)> = HashMap::new();
        for r in results {
            let t = per_worker.entry(r.worker).or_default();
            t.0 += r.s.n_tokens + r.proposals.len();
            t.1 += r.proposals.len();
        }
        let Some(&(n_tokens, n_proposed)) = per_worker.values().max() else {
            return;
        };
        self.cost
            .target
            .observe(n_tokens, (seconds - draft_seconds).max(0.0));
        let rounds = results.iter().map(|r| r.s.draft_depth).max().unwrap_or(0);
        let drafting = results.iter().filter(|r| r.s.draft_depth > 0).count();
        // A draft that caught up on many tokens ran a prefill: not a round's cost.
        let steady = results.iter().all(|r| r.s.draft_context <= 1);
        if rounds > 0 && draft_seconds > 0.0 && steady {
            self.cost
                .draft_round
                .observe(drafting, draft_seconds / rounds as f64);
        }
        let n_decode = emitted.iter().flatten().count();
        let n_emitted: usize = emitted.iter().flatten().map(Vec::len).sum();
        if n_proposed > 0
            && n_decode > 0
            && let Some(plain) = self.cost.target.estimate(n_tokens - n_proposed)
        {
            // Plain decoding would have needed n_emitted / n_decode steps without the
            // proposals to emit as much.
            self.spec_stats.time_saved_seconds +=
                n_emitted as f64 / n_decode as f64 * plain - seconds;
        }
    }

    /// The wall time of the step completed last, from planning it to applying its
    /// results: what the guard compares speculation and plain decoding by. A step in
    /// which a draft model caught up on tokens it had not read counts as it is: that
    /// is what switching a draft on costs (one far slower than the others is left out
    /// as a stall, like any).
    pub fn step_wall_time(&mut self, seconds: f64) {
        let Some(r) = self.last_step.take() else {
            return;
        };
        if r.pure_decode {
            tracing::trace!(
                n_decode = r.n_decode,
                speculated = r.speculated,
                emitted = r.emitted,
                warming = r.warming,
                wall_ms = 1e3 * seconds,
                model_ms = r.model_seconds.map_or(0.0, |m| 1e3 * m),
                "guard step"
            );
            self.guard
                .observe(r.n_decode, r.speculated, r.emitted, seconds, r.warming);
        } else if r.prompt {
            self.prompt_steps_total += 1;
            self.prompt_step_seconds_total += seconds;
        }
    }

    fn take_in_flight(&mut self, plan: &Plan) -> Option<InFlight> {
        if self.in_flight.as_ref()?.plan_id != plan.id {
            return None;
        }
        self.in_flight.take()
    }

    /// One sequence's result of the step: `emitted` are its next tokens (with logprobs):
    /// the accepted `proposed` ones, then the target's own, drawn from the logits after
    /// its last new token when its prompt is all computed. Rejected proposals are rolled
    /// back: only accepted positions count as computed, and blocks past the tokens are
    /// released.
    fn apply(
        &mut self,
        w: usize,
        s: Scheduled,
        proposed: &[u32],
        emitted: Option<Vec<Sampled>>,
        events: &mut Vec<(SeqId, TokenEvent)>,
    ) {
        let Some(seq) = self.seqs.get_mut(&s.id) else {
            return;
        };
        seq.in_step = false;
        if seq.cancelled {
            self.remove(s.id);
            return;
        }
        let first_pos = seq.n_computed;
        seq.n_computed = (seq.n_computed + s.n_tokens).min(seq.tokens.len());
        if s.draft_reads {
            seq.draft_computed = seq.n_computed;
        }
        self.register_full_blocks(w, s.id);
        let Some(seq) = self.seqs.get_mut(&s.id) else {
            return;
        };
        if seq.n_left() > 0 {
            return; // mid-prompt chunk: its logits predict a known token
        }
        let Some(emitted) = emitted else {
            return;
        };
        let n_accepted = emitted.len().saturating_sub(1).min(proposed.len());
        if !proposed.is_empty() {
            // A sequence's rate is its proposer's: fillers after its own proposals are
            // judged only if all of those were accepted, and do not count.
            let known = s.known.min(proposed.len());
            if known > 0 {
                seq.acceptance.observe(known, n_accepted.min(known));
                self.acceptance.observe(known, n_accepted.min(known));
            }
            self.spec_stats.observe(proposed.len(), n_accepted);
            if s.draft_depth > 0 {
                // The draft read the step's token and its proposals but the last: its
                // cache is good up to the accepted ones among them.
                seq.draft_computed = first_pos + 1 + n_accepted.min(proposed.len() - 1);
            }
        }
        let mut finished = None;
        for (j, (id, logprob, top)) in emitted.into_iter().enumerate() {
            seq.tokens.push(id);
            if j < n_accepted {
                seq.n_computed += 1; // an accepted proposal: its KV was written
            }
            events.push((s.id, TokenEvent::Token { id, logprob, top }));
            let reason = if seq.stop_token_ids.contains(&id) {
                Some(FinishReason::Stop)
            } else if seq.n_generated() >= seq.max_tokens
                || seq.tokens.len() >= self.cfg.max_context
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if reason.is_some() {
                finished = reason;
                break;
            }
        }
        if let Some(reason) = finished {
            let usage = Usage {
                prompt_tokens: seq.prompt_len,
                completion_tokens: seq.n_generated(),
                cached_tokens: seq.cached_tokens.unwrap_or(0),
            };
            tracing::debug!(
                request_id = %seq.request_id,
                seq_id = s.id,
                ?reason,
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                "sequence finished"
            );
            events.push((s.id, TokenEvent::Finished { reason, usage }));
            self.remove(s.id);
            return;
        }
        if !proposed.is_empty() {
            self.register_full_blocks(w, s.id);
            self.release_unused_blocks(w, s.id);
        }
    }

    /// Releases `id`'s blocks past those its tokens need (reserved for proposals that
    /// were rejected).
    fn release_unused_blocks(&mut self, w: usize, id: SeqId) {
        let (Some(seq), Some(pool)) = (self.seqs.get_mut(&id), self.pools.get_mut(w)) else {
            return;
        };
        let keep = seq.tokens.len().div_ceil(self.cfg.block_size);
        if seq.blocks.len() > keep {
            pool.release(&seq.blocks[keep..]);
            seq.blocks.truncate(keep);
        }
    }

    /// Offers `id`'s newly completed full blocks to the prefix cache: only now is their
    /// KV written, so only now may another sequence reuse it.
    fn register_full_blocks(&mut self, w: usize, id: SeqId) {
        if !self.cfg.enable_prefix_cache {
            return;
        }
        let (Some(seq), Some(pool)) = (self.seqs.get_mut(&id), self.pools.get_mut(w)) else {
            return;
        };
        let bs = self.cfg.block_size;
        let n_full = (seq.n_computed / bs).min(seq.blocks.len());
        while seq.block_hashes.len() < n_full {
            let i = seq.block_hashes.len();
            let Some(tokens) = seq.tokens.get(i * bs..(i + 1) * bs) else {
                break;
            };
            let parent = seq.block_hashes.last().copied();
            seq.block_hashes
                .push(pool.register(seq.blocks[i], parent, tokens));
        }
    }

    /// On a worker failure: every sequence of the step goes back to the front of the
    /// queue with its tokens so far (recomputed on readmission). So do the other
    /// sequences running on the step's workers, and those workers' prefix caches are
    /// dropped: a failed worker may come back with a fresh, empty KV cache. A plan that
    /// is not the one in flight is ignored.
    pub fn abort_step(&mut self, plan: Plan) {
        if let Some(flight) = self.take_in_flight(&plan) {
            self.requeue(flight);
        }
    }

    /// Workers `ws` lost their KV caches (they were assigned afresh): any step in flight
    /// is abandoned (its late result will be ignored) and every sequence running on those
    /// workers goes back to the queue, as after a failed step; their prefix caches go.
    pub fn reset_workers(&mut self, ws: &[usize]) {
        let mut steps: Vec<(usize, Vec<Scheduled>)> =
            self.in_flight.take().map(|f| f.steps).unwrap_or_default();
        for &w in ws {
            if !steps.iter().any(|(x, _)| *x == w) {
                steps.push((w, Vec::new()));
            }
        }
        self.requeue(InFlight { plan_id: 0, steps });
    }

    fn requeue(&mut self, flight: InFlight) {
        for (_, scheduled) in &flight.steps {
            for s in scheduled {
                if let Some(seq) = self.seqs.get_mut(&s.id) {
                    seq.in_step = false;
                    if seq.cancelled {
                        self.remove(s.id);
                    }
                }
            }
        }
        let mut requeued = Vec::new();
        for (w, _) in &flight.steps {
            let (Some(running), Some(pool)) = (self.running.get_mut(*w), self.pools.get_mut(*w))
            else {
                continue;
            };
            for id in std::mem::take(running) {
                if let Some(seq) = self.seqs.get_mut(&id) {
                    pool.release(&seq.blocks);
                    seq.reset_to_waiting();
                    requeued.push((seq.admitted_at, id));
                }
            }
            pool.clear_cache();
        }
        // Oldest admission ends up first in the queue.
        requeued.sort_unstable();
        for (_, id) in requeued.into_iter().rev() {
            self.waiting.push_front(id);
        }
    }

    /// Drops `id` wherever it is, freeing its blocks.
    fn remove(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        match seq.worker {
            Some(w) => {
                if let Some(running) = self.running.get_mut(w) {
                    running.retain(|&x| x != id);
                }
                if let Some(pool) = self.pools.get_mut(w) {
                    pool.release(&seq.blocks);
                }
            }
            None => self.waiting.retain(|&x| x != id),
        }
    }

    /// Counters of what the scheduler tracks; the time fields are the engine's to fill.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            waiting: self.waiting.len(),
            running: self.running.iter().map(Vec::len).sum(),
            preempted_total: self.preempted_total,
            kv_blocks_total: self.pools.iter().map(BlockPool::n_blocks).sum(),
            kv_blocks_used: self.pools.iter().map(BlockPool::n_held).sum(),
            kv_blocks_cached: self.pools.iter().map(BlockPool::n_cached).sum(),
            prefix_cache_queries_tokens: self.prefix_cache_queries_tokens,
            prefix_cache_hit_tokens: self.prefix_cache_hit_tokens,
            steps_total: self.steps_total,
            steps_warming_total: self.steps_warming_total,
            step_tokens_total: self.step_tokens_total,
            prompt_steps_total: self.prompt_steps_total,
            prompt_step_seconds_total: self.prompt_step_seconds_total,
            spec: SpecStats {
                probe_steps: self.guard.probe_steps(),
                verdict_changes: self.guard.verdict_changes(),
                vetoes: self.guard.vetoes(),
                guard_verdicts: self.guard.verdicts().to_vec(),
                ..self.spec_stats.clone()
            },
            preempted_waiting: self
                .waiting
                .iter()
                .filter(|id| self.seqs.get(id).is_some_and(|s| s.cached_tokens.is_some()))
                .count(),
            queue_seconds: self.queue_seconds.clone(),
            ..EngineStats::default()
        }
    }

    /// Nothing waiting, running or in flight.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty()
            && self.running.iter().all(Vec::is_empty)
            && self.in_flight.is_none()
    }
}
