//! Scheduler policy tests. Each test is a script of requests, steps, cancellations and
//! expectations run by one helper, [`check`], against a fake executor whose "KV cache"
//! records which token each slot holds: every step checks that what a sequence reads
//! back through its block table is exactly its own tokens, so a wrong block, a stale
//! prefix-cache hit or a lost write fails the test where it happens.

use std::collections::HashMap;

use super::*;

const VOCAB: usize = 64;

type Shape = Vec<(usize, Vec<(SeqId, usize, usize)>)>;

/// `(worker, [(seq, first_pos, n_tokens)])` in plan order.
type StepShape = &'static [(usize, &'static [(SeqId, usize, usize)])];

#[derive(Debug)]
enum Op {
    /// `add` succeeds (the seed is the id).
    Add(SeqId, GenerateRequest),
    /// `add` fails: the InvalidRequest field, or "overloaded".
    Reject(SeqId, GenerateRequest, &'static str),
    Cancel(SeqId),
    /// `restrict` the next steps to these sequences (`None`: to none).
    Restrict(Option<&'static [SeqId]>),
    /// Schedule, run on the fake executor, complete: the plan has this shape.
    Step(StepShape),
    /// `schedule` returns nothing.
    NoStep,
    /// Schedule, run and complete whatever comes (if anything).
    AnyStep,
    /// Schedule whatever comes (if anything) and abort it.
    AnyAbort,
    /// Schedule and keep the plan in flight (for Cancel/Abort/Complete in between).
    Plan(StepShape),
    /// Run and complete the plan in flight.
    Complete,
    /// Complete the plan in flight with outputs that do not match it.
    CompleteBad,
    /// Run the plan in flight, and complete it with its first arg-max id out of the
    /// vocabulary.
    CompleteOutOfVocab,
    /// Complete an old copy of the last plan: must change nothing.
    CompleteStale,
    /// Abort an old copy of the last plan: must change nothing.
    AbortStale,
    Abort,
    /// The next logits row produced for the sequence (whatever step it is in).
    Logits(SeqId, Vec<f32>),
    /// Steps until idle.
    Run,
    /// How many events the sequence received.
    NumEvents(SeqId, usize),
    /// Everything the sequence received, exactly.
    Events(SeqId, Vec<TokenEvent>),
    Finished(SeqId, FinishReason, Usage),
    /// Generated tokens equal those of the same request run alone in a roomy engine.
    SameAsAlone(SeqId),
    /// The first `n` blocks of the two sequences' latest block tables are the same.
    Shared(SeqId, SeqId, usize),
    /// `(name, stat, value)`.
    Stat(&'static str, fn(&EngineStats) -> u64, u64),
    StatAtLeast(&'static str, fn(&EngineStats) -> u64, u64),
    /// Logprob report of the sequence's first token: the chosen `(id, probability)`,
    /// then the top ones.
    TopLogprobs(SeqId, (u32, f32), &'static [(u32, f32)]),
    /// In the last plan, whether each sequence asked for only its rows' arg-max tokens.
    ArgmaxOnly(&'static [(SeqId, bool)]),
}

fn used(s: &EngineStats) -> u64 {
    s.kv_blocks_used as u64
}
fn cached(s: &EngineStats) -> u64 {
    s.kv_blocks_cached as u64
}
fn waiting(s: &EngineStats) -> u64 {
    s.waiting as u64
}
fn running(s: &EngineStats) -> u64 {
    s.running as u64
}
fn preempted(s: &EngineStats) -> u64 {
    s.preempted_total
}
fn hits(s: &EngineStats) -> u64 {
    s.prefix_cache_hit_tokens
}
fn queries(s: &EngineStats) -> u64 {
    s.prefix_cache_queries_tokens
}
fn step_tokens(s: &EngineStats) -> u64 {
    s.step_tokens_total
}

/// One worker, 64 blocks of 4 tokens, 64 tokens a step, prefill chunks of 16.
fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        n_workers: 1,
        n_blocks_per_worker: 64,
        block_size: 4,
        max_batch_tokens: 64,
        max_running: 8,
        max_waiting: 16,
        prefill_chunk: 16,
        max_context: 256,
        enable_prefix_cache: true,
        speculation: SpecConfig::off(),
    }
}

/// `n_tokens` prompt tokens; different `seed`s differ from the first token on.
fn prompt(seed: u32, n_tokens: usize) -> Vec<u32> {
    (0..n_tokens as u32)
        .map(|i| (seed * 31 + i * 7 + i * i) % VOCAB as u32)
        .collect()
}

/// Greedy, no stop ids, no logprobs.
fn req(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: String::new(),
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop_token_ids: Vec::new(),
        logprobs: None,
        speculate: true,
    }
}

fn sampled(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        },
        ..req(prompt, max_tokens)
    }
}

fn one_hot(token: u32) -> Vec<f32> {
    let mut l = vec![0.0; VOCAB];
    l[token as usize] = 10.0;
    l
}

/// The fake model: logits depend on every token of the context and its position, and
/// lean towards copying (the token that followed the last token's previous occurrence
/// gets a boost), as language models do; so prompt lookup is sometimes right.
fn model_logits(context: &[u32]) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (pos, &t) in context.iter().enumerate() {
        h = (h ^ u64::from(t) ^ ((pos as u64) << 32)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut l: Vec<f32> = (0..VOCAB as u64)
        .map(|i| {
            let x = (h ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (x >> 54) as f32 / 256.0
        })
        .collect();
    if let Some((&last, head)) = context.split_last()
        && let Some(i) = head.iter().rposition(|&t| t == last)
    {
        l[context[i + 1] as usize] += 2.0;
    }
    l
}

/// A scheduler, a fake KV cache per worker, and everything delivered so far.
struct Harness {
    sched: Scheduler,
    /// Per worker and slot: the (token, position) written there.
    kv: Vec<Vec<Option<(u32, usize)>>>,
    /// The same for the draft model's cache.
    draft_kv: Vec<Vec<Option<(u32, usize)>>>,
    reqs: HashMap<SeqId, GenerateRequest>,
    events: HashMap<SeqId, Vec<TokenEvent>>,
    logits: HashMap<SeqId, Vec<f32>>,
    in_flight: Option<Plan>,
    last_plan: Option<Plan>,
    last_blocks: HashMap<SeqId, Vec<u32>>,
}

impl Harness {
    fn new(cfg: SchedulerConfig) -> Self {
        let n_slots = cfg.n_blocks_per_worker * cfg.block_size;
        Self {
            kv: vec![vec![None; n_slots]; cfg.n_workers],
            draft_kv: vec![vec![None; n_slots]; cfg.n_workers],
            sched: Scheduler::new(cfg),
            reqs: HashMap::new(),
            events: HashMap::new(),
            logits: HashMap::new(),
            in_flight: None,
            last_plan: None,
            last_blocks: HashMap::new(),
        }
    }

    fn generated(&self, id: SeqId) -> Vec<u32> {
        self.events
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                TokenEvent::Token { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// The fake executor: reads each sequence's context back through its blocks,
    /// checks it against the sequence's true tokens, writes the new tokens.
    fn execute(&mut self, plan: &Plan) -> Vec<StepOutput> {
        let bs = self.sched.config().block_size;
        let mut outputs = Vec::new();
        for (w, step) in &plan.steps {
            let mut rows = Vec::new();
            let mut argmax = Vec::new();
            let mut proposals = Vec::new();
            for s in &step.seqs {
                let truth = [
                    self.reqs[&s.seq_id].prompt.clone(),
                    self.generated(s.seq_id),
                ]
                .concat();
                // A verification is one decode token then proposals.
                let n_real = if s.all_logits { 1 } else { s.tokens.len() };
                let drafted = match &s.draft {
                    Some(d) => self.draft(*w, s, d, &truth[..s.first_pos + n_real]),
                    None => Vec::new(),
                };
                let tokens = [s.tokens.clone(), drafted.clone()].concat();
                let n_ctx = s.first_pos + tokens.len();
                assert!(
                    !s.tokens.is_empty() && s.blocks.len() * bs >= n_ctx,
                    "{s:?}"
                );
                let kv = &mut self.kv[*w];
                let mut context = Vec::with_capacity(n_ctx);
                for p in 0..n_ctx {
                    let slot = s.blocks[p / bs] as usize * bs + p % bs;
                    if p >= s.first_pos {
                        kv[slot] = Some((tokens[p - s.first_pos], p));
                    }
                    match kv[slot] {
                        Some((t, q)) if q == p => context.push(t),
                        other => panic!("seq {} reads {other:?} at position {p}", s.seq_id),
                    }
                }
                assert_eq!(
                    context[..s.first_pos + n_real],
                    truth[..s.first_pos + n_real],
                    "seq {}: KV is not its tokens",
                    s.seq_id
                );
                let row = if s.all_logits || !drafted.is_empty() {
                    (s.first_pos..n_ctx)
                        .flat_map(|p| model_logits(&context[..=p]))
                        .collect()
                } else {
                    self.logits
                        .remove(&s.seq_id)
                        .unwrap_or_else(|| model_logits(&context))
                };
                // A worker asked for only the arg-max tokens sends those, not rows.
                if s.argmax_only {
                    argmax.push(hyserve_kernels::backend::argmax_each(&row, VOCAB));
                    rows.push(Vec::new());
                } else {
                    argmax.push(Vec::new());
                    rows.push(row);
                }
                proposals.push(drafted);
                self.last_blocks.insert(s.seq_id, s.blocks.clone());
            }
            outputs.push(StepOutput {
                logits: rows,
                argmax,
                vocab_size: VOCAB,
                expert_load: Vec::new(),
                proposals,
                draft_seconds: 0.0,
                warming: false,
                ..StepOutput::default()
            });
        }
        outputs
    }

    /// The fake draft model: checks that its cache holds `known` (the sequence's true
    /// tokens through the step's token) up to where the scheduler says, writes the rest,
    /// and proposes the fake model's greedy tokens, wrong at every position whose
    /// hash says so (so some proposals are rejected).
    fn draft(&mut self, w: usize, s: &SeqStep, d: &DraftRequest, known: &[u32]) -> Vec<u32> {
        let bs = self.sched.config().block_size;
        let slot = |p: usize| s.blocks[p / bs] as usize * bs + p % bs;
        let kv = &mut self.draft_kv[w];
        for (p, &t) in known.iter().enumerate().take(d.first_pos) {
            assert_eq!(
                kv[slot(p)],
                Some((t, p)),
                "seq {}: the draft's cache is wrong at position {p}",
                s.seq_id
            );
        }
        assert_eq!(
            d.context[..],
            known[d.first_pos..s.first_pos],
            "draft context"
        );
        let mut ctx = known.to_vec();
        for (p, &t) in known.iter().enumerate().skip(d.first_pos) {
            kv[slot(p)] = Some((t, p));
        }
        let mut out = Vec::new();
        for r in 0..d.depth {
            if r > 0 {
                let p = ctx.len() - 1;
                kv[slot(p)] = Some((ctx[p], p));
            }
            let best = hyserve_kernels::sampling::argmax(&model_logits(&ctx)) as u32;
            let wrong = (ctx.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62 == 0;
            let t = if wrong {
                (best + 1) % VOCAB as u32
            } else {
                best
            };
            out.push(t);
            ctx.push(t);
        }
        out
    }

    fn deliver(&mut self, events: Vec<(SeqId, TokenEvent)>) {
        for (id, e) in events {
            let got = self.events.entry(id).or_default();
            assert!(
                !matches!(got.last(), Some(TokenEvent::Finished { .. })),
                "seq {id}: {e:?} after Finished"
            );
            if let TokenEvent::Finished { .. } = e {
                assert!(
                    matches!(got.last(), Some(TokenEvent::Token { .. })),
                    "seq {id}"
                );
            }
            got.push(e);
        }
    }

    fn schedule(&mut self) -> Option<Shape> {
        let plan = self.sched.schedule()?;
        let shape = plan
            .steps
            .iter()
            .map(|(w, s)| {
                let seqs = s
                    .seqs
                    .iter()
                    .map(|q| (q.seq_id, q.first_pos, q.tokens.len()));
                (*w, seqs.collect())
            })
            .collect();
        self.last_plan = Some(plan.clone());
        self.in_flight = Some(plan);
        Some(shape)
    }

    fn complete(&mut self) {
        // A step costs the same whatever its size here: speculation pays.
        self.complete_in(1e-3, 1e-3);
    }

    /// Completes the step in flight as if it took `plain` seconds, or `speculative`
    /// if it verified proposals.
    fn complete_in(&mut self, plain: f64, speculative: f64) {
        self.complete_by(|plan| {
            let speculated = plan.steps.iter().flat_map(|(_, s)| &s.seqs).any(|s| {
                (s.all_logits && s.tokens.len() > 1)
                    || s.draft.as_ref().is_some_and(|d| d.depth > 0)
            });
            if speculated { speculative } else { plain }
        });
    }

    /// Completes the step in flight as if it took `seconds(plan)`.
    fn complete_by(&mut self, seconds: impl Fn(&Plan) -> f64) {
        let plan = self.in_flight.take().expect("a plan in flight");
        let secs = seconds(&plan);
        let outputs = self.execute(&plan);
        let events = self.sched.complete_timed(plan, outputs, Some(secs));
        self.sched.step_wall_time(secs);
        self.deliver(events);
    }

    fn run(&mut self) {
        for _ in 0..100_000 {
            if self.schedule().is_none() {
                assert!(
                    self.sched.is_idle(),
                    "no step but not idle: {:?}",
                    self.sched.stats()
                );
                return;
            }
            self.complete();
        }
        panic!("not idle after 100000 steps");
    }
}

/// What `request` generates alone, with room to spare and no cache.
fn alone(max_context: usize, request: &GenerateRequest, seed: u64) -> Vec<u32> {
    let mut h = Harness::new(SchedulerConfig {
        n_workers: 1,
        n_blocks_per_worker: 1024,
        block_size: 4,
        max_batch_tokens: 4096,
        max_running: 1,
        max_waiting: 1,
        prefill_chunk: 4096,
        max_context,
        enable_prefix_cache: false,
        speculation: SpecConfig::off(),
    });
    h.reqs.insert(seed, request.clone());
    h.sched
        .add(seed, request.clone(), seed)
        .expect("a valid request");
    h.run();
    h.generated(seed)
}

fn shape(s: StepShape) -> Shape {
    s.iter().map(|(w, seqs)| (*w, seqs.to_vec())).collect()
}

/// Runs `script` on a fresh scheduler with `cfg`; at the end, an idle scheduler must
/// hold no blocks.
fn check(cfg: SchedulerConfig, script: Vec<Op>) {
    let max_context = cfg.max_context;
    let mut h = Harness::new(cfg);
    for (i, op) in script.into_iter().enumerate() {
        let at = format!("op {i} ({op:?})");
        match op {
            Op::Add(id, r) => {
                h.reqs.insert(id, r.clone());
                assert_eq!(h.sched.add(id, r, id), Ok(()), "{at}");
            }
            Op::Reject(id, r, what) => match (h.sched.add(id, r, id), what) {
                (Err(ServeError::Overloaded { retry_after, .. }), "overloaded") => {
                    assert_eq!(retry_after, Duration::from_secs(1), "{at}");
                }
                (Err(ServeError::Internal { .. }), "duplicate") => {}
                (Err(ServeError::InvalidRequest { field, .. }), _) => {
                    assert_eq!(field, what, "{at}");
                }
                (got, _) => panic!("{at}: got {got:?}"),
            },
            Op::Cancel(id) => h.sched.cancel(id),
            Op::Restrict(only) => h.sched.restrict(only.map(<[SeqId]>::to_vec)),
            Op::Step(want) => {
                assert_eq!(h.schedule(), Some(shape(want)), "{at}");
                h.complete();
            }
            Op::NoStep => assert!(h.sched.schedule().is_none(), "{at}"),
            Op::AnyStep => {
                if h.schedule().is_some() {
                    h.complete();
                }
            }
            Op::AnyAbort => {
                if h.schedule().is_some() {
                    h.sched
                        .abort_step(h.in_flight.take().expect("a plan in flight"));
                }
            }
            Op::Plan(want) => assert_eq!(h.schedule(), Some(shape(want)), "{at}"),
            Op::Complete => h.complete(),
            Op::ArgmaxOnly(want) => {
                let plan = h.last_plan.as_ref().expect("a plan");
                for &(id, only) in want {
                    let s = plan
                        .steps
                        .iter()
                        .flat_map(|(_, st)| &st.seqs)
                        .find(|s| s.seq_id == id)
                        .unwrap_or_else(|| panic!("{at}: sequence {id} is not in the plan"));
                    assert_eq!(s.argmax_only, only, "{at}: sequence {id}");
                }
            }
            Op::CompleteBad => {
                let plan = h.in_flight.take().expect("a plan in flight");
                assert_eq!(h.sched.complete(plan, Vec::new()), Vec::new(), "{at}");
            }
            Op::CompleteOutOfVocab => {
                let plan = h.in_flight.take().expect("a plan in flight");
                let mut outputs = h.execute(&plan);
                let id = outputs
                    .iter_mut()
                    .flat_map(|o| o.argmax.iter_mut().flatten())
                    .next()
                    .expect("an arg-max id");
                *id = VOCAB as u32;
                assert_eq!(h.sched.complete(plan, outputs), Vec::new(), "{at}");
            }
            Op::CompleteStale => {
                let plan = h.last_plan.clone().expect("a plan");
                let outputs = h.execute(&plan);
                let before = h.sched.stats();
                assert_eq!(h.sched.complete(plan, outputs), Vec::new(), "{at}");
                assert_eq!(h.sched.stats(), before, "{at}");
            }
            Op::AbortStale => {
                let before = h.sched.stats();
                h.sched.abort_step(h.last_plan.clone().expect("a plan"));
                assert_eq!(h.sched.stats(), before, "{at}");
            }
            Op::Abort => h
                .sched
                .abort_step(h.in_flight.take().expect("a plan in flight")),
            Op::Logits(id, l) => {
                h.logits.insert(id, l);
            }
            Op::Run => h.run(),
            Op::NumEvents(id, n) => {
                assert_eq!(h.events.get(&id).map_or(0, Vec::len), n, "{at}");
            }
            Op::Events(id, want) => assert_eq!(h.events.get(&id), Some(&want), "{at}"),
            Op::Finished(id, reason, usage) => assert_eq!(
                h.events.get(&id).and_then(|e| e.last()),
                Some(&TokenEvent::Finished { reason, usage }),
                "{at}"
            ),
            Op::SameAsAlone(id) => {
                assert_eq!(
                    h.generated(id),
                    alone(max_context, &h.reqs[&id], id),
                    "{at}"
                );
            }
            Op::Shared(a, b, n) => {
                let (x, y) = (&h.last_blocks[&a], &h.last_blocks[&b]);
                assert_eq!(x[..n], y[..n], "{at}");
            }
            Op::Stat(name, stat, want) => {
                assert_eq!(stat(&h.sched.stats()), want, "{at}: {name}");
            }
            Op::StatAtLeast(name, stat, least) => {
                let got = stat(&h.sched.stats());
                assert!(got >= least, "{at}: {name} is {got}");
            }
            Op::TopLogprobs(id, chosen, want) => {
                let Some(TokenEvent::Token {
                    id: got,
                    logprob,
                    top,
                }) = h.events.get(&id).and_then(|e| e.first())
                else {
                    panic!("{at}: no token");
                };
                assert_eq!(*got, chosen.0, "{at}");
                let p = logprob.map(f32::exp).expect("a logprob");
                assert!((p - chosen.1).abs() < 1e-5, "{at}: chosen p {p}");
                let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
                let want_ids: Vec<u32> = want.iter().map(|w| w.0).collect();
                assert_eq!(ids, want_ids, "{at}");
                for (t, w) in top.iter().zip(want) {
                    assert!((t.logprob.exp() - w.1).abs() < 1e-5, "{at}: {t:?}");
                }
            }
        }
    }
    if h.sched.is_idle() {
        assert_eq!(h.sched.stats().kv_blocks_used, 0, "idle but holding blocks");
    }
}

#[test]
fn decode_goes_first_then_prefill_chunks_then_admission() {
    check(
        SchedulerConfig {
            prefill_chunk: 8,
            max_batch_tokens: 16,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 4), 4)),
            Op::Add(2, req(prompt(2, 20), 4)),
            Op::Step(&[(0, &[(1, 0, 4), (2, 0, 8)])]),
            Op::Add(3, req(prompt(3, 6), 2)),
            // 1 decodes, 2 continues its prompt, 3 is admitted with what is left (6 of 7).
            Op::Step(&[(0, &[(1, 4, 1), (2, 8, 8), (3, 0, 6)])]),
            // 3 now decodes, and decodes go before 2's older prefill.
            Op::Step(&[(0, &[(1, 5, 1), (3, 6, 1), (2, 16, 4)])]),
            Op::Step(&[(0, &[(1, 6, 1), (2, 20, 1)])]),
            Op::Finished(
                3,
                FinishReason::Length,
                Usage {
                    prompt_tokens: 6,
                    completion_tokens: 2,
                    cached_tokens: 0,
                },
            ),
            Op::Run,
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
            Op::SameAsAlone(3),
        ],
    );
}

#[test]
fn prefill_is_chunked_within_the_step_token_budget() {
    check(
        SchedulerConfig {
            prefill_chunk: 16,
            max_batch_tokens: 20,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 40), 2)),
            Op::Add(2, req(prompt(2, 40), 2)),
            Op::Step(&[(0, &[(1, 0, 16), (2, 0, 4)])]),
            Op::Step(&[(0, &[(1, 16, 16), (2, 4, 4)])]),
            Op::Step(&[(0, &[(1, 32, 8), (2, 8, 12)])]),
            Op::Step(&[(0, &[(1, 40, 1), (2, 20, 16)])]),
            Op::Step(&[(0, &[(2, 36, 4)])]),
            Op::Step(&[(0, &[(2, 40, 1)])]),
            Op::Stat("step tokens", step_tokens, 41 + 41),
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
        ],
    );
}

#[test]
fn admission_needs_free_blocks_and_a_running_slot() {
    // 6 blocks: 1's prompt takes 4 (5 with its tokens); 2's 12-token chunk needs 3.
    check(
        SchedulerConfig {
            n_blocks_per_worker: 6,
            enable_prefix_cache: false,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 16), 4)),
            Op::Add(2, req(prompt(2, 12), 2)),
            Op::Step(&[(0, &[(1, 0, 16)])]),
            Op::Stat("used", used, 4),
            Op::Stat("waiting", waiting, 1),
            Op::Step(&[(0, &[(1, 16, 1)])]),
            Op::Step(&[(0, &[(1, 17, 1)])]),
            Op::Step(&[(0, &[(1, 18, 1)])]),
            Op::Finished(
                1,
                FinishReason::Length,
                Usage {
                    prompt_tokens: 16,
                    completion_tokens: 4,
                    cached_tokens: 0,
                },
            ),
            Op::Step(&[(0, &[(2, 0, 12)])]),
            Op::Run,
        ],
    );
    // One running slot: the second request waits although blocks are free.
    check(
        SchedulerConfig {
            max_running: 1,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 4), 2)),
            Op::Add(2, req(prompt(2, 4), 1)),
            Op::Step(&[(0, &[(1, 0, 4)])]),
            Op::Step(&[(0, &[(1, 4, 1)])]),
            Op::Step(&[(0, &[(2, 0, 4)])]),
            Op::NoStep,
        ],
    );
}

#[test]
fn preempted_sequences_resume_with_identical_tokens() {
    // 4 blocks of 4 tokens; each sequence alone needs 3. Both decode until the older
    // one needs a block: the newer is preempted, re-prefills all 9 tokens once the
    // older finishes, and samples (temperature 1) exactly what it would have.
    check(
        SchedulerConfig {
            n_blocks_per_worker: 4,
            enable_prefix_cache: false,
            ..cfg()
        },
        vec![
            Op::Add(1, sampled(prompt(1, 4), 8)),
            Op::Add(2, sampled(prompt(2, 4), 8)),
            Op::Step(&[(0, &[(1, 0, 4), (2, 0, 4)])]),
            Op::Step(&[(0, &[(1, 4, 1), (2, 4, 1)])]),
            Op::Step(&[(0, &[(1, 5, 1), (2, 5, 1)])]),
            Op::Step(&[(0, &[(1, 6, 1), (2, 6, 1)])]),
            Op::Step(&[(0, &[(1, 7, 1), (2, 7, 1)])]),
            Op::Step(&[(0, &[(1, 8, 1)])]),
            Op::Stat("preempted", preempted, 1),
            Op::Stat("waiting", waiting, 1),
            Op::Step(&[(0, &[(1, 9, 1)])]),
            Op::Step(&[(0, &[(1, 10, 1)])]),
            Op::Step(&[(0, &[(2, 0, 9)])]),
            Op::Run,
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
            Op::Finished(
                2,
                FinishReason::Length,
                Usage {
                    prompt_tokens: 4,
                    completion_tokens: 8,
                    cached_tokens: 0,
                },
            ),
        ],
    );
    // The newer sequence needs the block: the older one is preempted (never the one
    // that needs it), even though it was already planned into this step.
    check(
        SchedulerConfig {
            n_blocks_per_worker: 4,
            enable_prefix_cache: false,
            ..cfg()
        },
        vec![
            Op::Add(1, sampled(prompt(1, 4), 6)),
            Op::Add(2, sampled(prompt(2, 6), 6)),
            Op::Step(&[(0, &[(1, 0, 4), (2, 0, 6)])]),
            Op::Step(&[(0, &[(1, 4, 1), (2, 6, 1)])]),
            Op::Step(&[(0, &[(1, 5, 1), (2, 7, 1)])]),
            Op::Step(&[(0, &[(2, 8, 1)])]),
            Op::Stat("preempted", preempted, 1),
            Op::Run,
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
        ],
    );
}

#[test]
fn stalled_prefills_free_the_newest_instead_of_deadlocking() {
    // Both prompts got half their blocks; neither can go on until the newer is preempted.
    check(
        SchedulerConfig {
            n_blocks_per_worker: 4,
            prefill_chunk: 8,
            enable_prefix_cache: false,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 12), 1)),
            Op::Add(2, req(prompt(2, 12), 1)),
            Op::Step(&[(0, &[(1, 0, 8), (2, 0, 8)])]),
            Op::Step(&[(0, &[(1, 8, 4)])]),
            Op::Stat("preempted", preempted, 1),
            Op::Step(&[(0, &[(2, 0, 8)])]),
            Op::Step(&[(0, &[(2, 8, 4)])]),
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
        ],
    );
}

#[test]
fn cancellation_frees_blocks() {
    check(
        cfg(),
        vec![
            // Waiting: it never runs.
            Op::Add(1, req(prompt(1, 8), 4)),
            Op::Cancel(1),
            Op::Cancel(1),
            Op::NoStep,
            Op::Stat("waiting", waiting, 0),
            // Running, between steps: blocks go back to what the other holds.
            Op::Add(2, req(prompt(2, 8), 8)),
            Op::Step(&[(0, &[(2, 0, 8)])]),
            Op::Stat("used", used, 2),
            Op::Add(3, req(prompt(3, 8), 8)),
            Op::Step(&[(0, &[(2, 8, 1), (3, 0, 8)])]),
            Op::Stat("used", used, 5),
            Op::Cancel(3),
            Op::Stat("used", used, 3),
            Op::Stat("running", running, 1),
            // In the step in flight: dropped when the step ends, with no event.
            Op::Plan(&[(0, &[(2, 9, 1)])]),
            Op::Cancel(2),
            Op::Stat("used", used, 3),
            Op::Complete,
            Op::Stat("used", used, 0),
            Op::NumEvents(2, 2),
            Op::NoStep,
        ],
    );
}

#[test]
fn identical_prompts_share_cached_prefix_blocks() {
    // 40-token prompts in blocks of 16: two full blocks (32 tokens) are reusable.
    check(
        SchedulerConfig {
            block_size: 16,
            prefill_chunk: 64,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 40), 4)),
            Op::Step(&[(0, &[(1, 0, 40)])]),
            Op::Add(2, req(prompt(1, 40), 4)),
            Op::Step(&[(0, &[(1, 40, 1), (2, 32, 8)])]),
            Op::Shared(1, 2, 2),
            Op::Stat("used", used, 4),
            Op::Stat("hit tokens", hits, 32),
            Op::Stat("queried tokens", queries, 80),
            Op::Run,
            Op::Finished(
                1,
                FinishReason::Length,
                Usage {
                    prompt_tokens: 40,
                    completion_tokens: 4,
                    cached_tokens: 0,
                },
            ),
            Op::Finished(
                2,
                FinishReason::Length,
                Usage {
                    prompt_tokens: 40,
                    completion_tokens: 4,
                    cached_tokens: 32,
                },
            ),
            Op::SameAsAlone(2),
            Op::Stat("cached", cached, 2),
            // A prompt that is exactly the cached blocks still computes its last token.
            Op::Add(3, req(prompt(1, 32), 1)),
            Op::Step(&[(0, &[(3, 16, 16)])]),
            Op::SameAsAlone(3),
        ],
    );
}

#[test]
fn evicted_prefix_blocks_are_never_reused() {
    // 6 blocks of 4. 1 leaves 4 cached prompt blocks; 2 (5 blocks) evicts 3 of them,
    // tail first; 3 (1's prompt again) reuses only the surviving head; 4 (6 blocks)
    // evicts everything, so 5 (1's prompt again) reuses nothing.
    check(
        SchedulerConfig {
            n_blocks_per_worker: 6,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 16), 2)),
            Op::Run,
            Op::Stat("cached", cached, 4),
            Op::Add(2, req(prompt(2, 16), 2)),
            Op::Step(&[(0, &[(2, 0, 16)])]),
            Op::Run,
            Op::Add(3, req(prompt(1, 16), 2)),
            Op::Step(&[(0, &[(3, 4, 12)])]),
            Op::Run,
            Op::SameAsAlone(3),
            Op::Stat("hit tokens", hits, 4),
            Op::Add(4, req(prompt(4, 24), 1)),
            Op::Run,
            Op::Add(5, req(prompt(1, 16), 2)),
            Op::Step(&[(0, &[(5, 0, 16)])]),
            Op::Run,
            Op::SameAsAlone(5),
            Op::Stat("hit tokens", hits, 4),
        ],
    );
}

#[test]
fn a_long_prompt_does_not_starve_a_short_request() {
    check(
        SchedulerConfig {
            prefill_chunk: 8,
            max_batch_tokens: 16,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 64), 2)),
            Op::Step(&[(0, &[(1, 0, 8)])]),
            Op::Add(2, req(prompt(2, 4), 3)),
            Op::Step(&[(0, &[(1, 8, 8), (2, 0, 4)])]),
            Op::Step(&[(0, &[(2, 4, 1), (1, 16, 8)])]),
            Op::Step(&[(0, &[(2, 5, 1), (1, 24, 8)])]),
            Op::Finished(
                2,
                FinishReason::Length,
                Usage {
                    prompt_tokens: 4,
                    completion_tokens: 3,
                    cached_tokens: 0,
                },
            ),
            Op::Stat("running", running, 1),
            Op::Run,
            Op::SameAsAlone(1),
        ],
    );
}

#[test]
fn stop_ids_and_max_tokens_end_sequences() {
    let token = |id| TokenEvent::Token {
        id,
        logprob: None,
        top: vec![],
    };
    let finished = |reason, completion_tokens| TokenEvent::Finished {
        reason,
        usage: Usage {
            prompt_tokens: 4,
            completion_tokens,
            cached_tokens: 0,
        },
    };
    let stop_at = |stop: Vec<u32>| GenerateRequest {
        stop_token_ids: stop,
        ..req(prompt(1, 4), 10)
    };
    check(
        cfg(),
        vec![
            // A stop id ends the sequence and is emitted.
            Op::Add(1, stop_at(vec![9, 11])),
            Op::Logits(1, one_hot(5)),
            Op::Step(&[(0, &[(1, 0, 4)])]),
            Op::Logits(1, one_hot(9)),
            Op::Step(&[(0, &[(1, 4, 1)])]),
            Op::Events(1, vec![token(5), token(9), finished(FinishReason::Stop, 2)]),
            // Also as the very first token.
            Op::Add(2, stop_at(vec![11])),
            Op::Logits(2, one_hot(11)),
            Op::Step(&[(0, &[(2, 0, 4)])]),
            Op::Events(2, vec![token(11), finished(FinishReason::Stop, 1)]),
            // max_tokens.
            Op::Add(3, req(prompt(1, 4), 3)),
            Op::Logits(3, one_hot(1)),
            Op::Step(&[(0, &[(3, 0, 4)])]),
            Op::Logits(3, one_hot(2)),
            Op::Step(&[(0, &[(3, 4, 1)])]),
            Op::Logits(3, one_hot(3)),
            Op::Step(&[(0, &[(3, 5, 1)])]),
            Op::Events(
                3,
                vec![
                    token(1),
                    token(2),
                    token(3),
                    finished(FinishReason::Length, 3),
                ],
            ),
            Op::NoStep,
        ],
    );
}

#[test]
fn logprobs_report_the_chosen_token_and_the_sorted_top() {
    // Probabilities 1/9, 3/9, 3/9, 2/9 for ids 0..4, ~0 for the rest.
    let mut l = vec![-1e4f32; VOCAB];
    l[..4].copy_from_slice(&[0.0, 3f32.ln(), 3f32.ln(), 2f32.ln()]);
    let with_logprobs = |n| GenerateRequest {
        logprobs: n,
        ..req(prompt(1, 4), 1)
    };
    check(
        cfg(),
        vec![
            Op::Add(1, with_logprobs(Some(3))),
            Op::Logits(1, l.clone()),
            Op::Add(2, with_logprobs(Some(0))),
            Op::Logits(2, l.clone()),
            Op::Add(3, with_logprobs(None)),
            Op::Logits(3, l),
            Op::Step(&[(0, &[(1, 0, 4), (2, 0, 4), (3, 0, 4)])]),
            Op::TopLogprobs(
                1,
                (1, 1.0 / 3.0),
                &[(1, 1.0 / 3.0), (2, 1.0 / 3.0), (3, 2.0 / 9.0)],
            ),
            Op::TopLogprobs(2, (1, 1.0 / 3.0), &[]),
            Op::Events(
                3,
                vec![
                    TokenEvent::Token {
                        id: 1,
                        logprob: None,
                        top: vec![],
                    },
                    TokenEvent::Finished {
                        reason: FinishReason::Length,
                        usage: Usage {
                            prompt_tokens: 4,
                            completion_tokens: 1,
                            cached_tokens: 0,
                        },
                    },
                ],
            ),
        ],
    );
}

/// Only sequences whose next token is a plain greedy draw (no penalty, no logprobs),
/// or whose step leaves some of the prompt to compute, get back arg-max tokens instead
/// of rows; and what every one generates is unchanged.
#[test]
fn only_plain_greedy_draws_and_mid_prompt_chunks_ask_for_arg_max_tokens_alone() {
    let penalised = GenerateRequest {
        sampling: SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        },
        ..req(prompt(3, 6), 3)
    };
    let with_logprobs = GenerateRequest {
        logprobs: Some(0),
        ..req(prompt(4, 6), 3)
    };
    check(
        cfg(),
        vec![
            Op::Add(1, req(prompt(1, 6), 3)),
            Op::Add(2, sampled(prompt(2, 6), 3)),
            Op::Add(3, penalised),
            Op::Add(4, with_logprobs),
            // 40 tokens: chunks of 16, 16 and 8.
            Op::Add(5, sampled(prompt(5, 40), 3)),
            Op::Step(&[(0, &[(1, 0, 6), (2, 0, 6), (3, 0, 6), (4, 0, 6), (5, 0, 16)])]),
            Op::ArgmaxOnly(&[(1, true), (2, false), (3, false), (4, false), (5, true)]),
            Op::Step(&[(
                0,
                &[(1, 6, 1), (2, 6, 1), (3, 6, 1), (4, 6, 1), (5, 16, 16)],
            )]),
            Op::ArgmaxOnly(&[(1, true), (2, false), (3, false), (4, false), (5, true)]),
            Op::Step(&[(0, &[(1, 7, 1), (2, 7, 1), (3, 7, 1), (4, 7, 1), (5, 32, 8)])]),
            Op::ArgmaxOnly(&[(1, true), (5, false)]),
            Op::Run,
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
            Op::SameAsAlone(3),
            Op::SameAsAlone(5),
        ],
    );
}

#[test]
fn new_sequences_go_to_the_cache_hit_or_the_freest_worker() {
    check(
        SchedulerConfig {
            n_workers: 2,
            n_blocks_per_worker: 8,
            ..cfg()
        },
        vec![
            // Equal workers: the lowest index. 1 leaves its head block cached on 0.
            Op::Add(1, req(prompt(1, 8), 1)),
            Op::Step(&[(0, &[(1, 0, 8)])]),
            Op::Add(2, req(prompt(2, 8), 4)),
            Op::Add(3, req(prompt(3, 8), 4)),
            // 2 ties again (cached blocks count as free) and takes 0; 3 takes the freer 1.
            Op::Step(&[(0, &[(2, 0, 8)]), (1, &[(3, 0, 8)])]),
            // 1's prompt again: worker 0 has fewer free blocks but its first block cached.
            Op::Add(4, req(prompt(1, 8), 4)),
            Op::Step(&[(0, &[(2, 8, 1), (4, 4, 4)]), (1, &[(3, 8, 1)])]),
            Op::Run,
            Op::SameAsAlone(4),
        ],
    );
}

#[test]
fn invalid_requests_name_the_field_and_a_full_queue_is_overloaded() {
    // 4 blocks of 4 tokens hold 16 tokens of KV: 13 prompt + 4 generated fits (the
    // last token's KV is never written), 13 + 5 does not.
    check(
        SchedulerConfig {
            n_blocks_per_worker: 4,
            max_context: 20,
            max_waiting: 2,
            ..cfg()
        },
        vec![
            Op::Reject(1, req(vec![], 4), "prompt"),
            Op::Reject(1, req(prompt(1, 4), 0), "max_tokens"),
            Op::Reject(1, req(prompt(1, 4), 17), "max_tokens"),
            Op::Reject(1, req(prompt(1, 13), 5), "max_tokens"),
            Op::Add(1, req(prompt(1, 13), 4)),
            Op::Add(2, req(prompt(2, 4), 13)),
            Op::Reject(3, req(prompt(3, 4), 1), "overloaded"),
            Op::Step(&[(0, &[(1, 0, 13)])]),
            Op::Add(3, req(prompt(3, 4), 1)),
            Op::Run,
        ],
    );
}

#[test]
fn aborted_and_mismatched_steps_requeue_their_sequences() {
    check(
        cfg(),
        vec![
            Op::Add(1, sampled(prompt(1, 6), 5)),
            Op::Add(2, sampled(prompt(2, 6), 5)),
            Op::Step(&[(0, &[(1, 0, 6), (2, 0, 6)])]),
            Op::Plan(&[(0, &[(1, 6, 1), (2, 6, 1)])]),
            Op::Abort,
            Op::Stat("waiting", waiting, 2),
            Op::Stat("used", used, 0),
            Op::Stat("cached (the worker's cache is dropped)", cached, 0),
            // Back in admission order, with their generated token, recomputed.
            Op::Plan(&[(0, &[(1, 0, 7), (2, 0, 7)])]),
            Op::CompleteBad,
            Op::Stat("waiting", waiting, 2),
            Op::Run,
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
        ],
    );
}

/// A worker's arg-max id outside the vocabulary is never emitted: the step is treated as
/// a mismatched one, and its sequences computed again.
#[test]
fn an_arg_max_id_outside_the_vocabulary_requeues_the_step() {
    check(
        cfg(),
        vec![
            Op::Add(1, req(prompt(1, 6), 5)),
            Op::Add(2, req(prompt(2, 6), 5)),
            Op::Step(&[(0, &[(1, 0, 6), (2, 0, 6)])]),
            Op::Plan(&[(0, &[(1, 6, 1), (2, 6, 1)])]),
            Op::CompleteOutOfVocab,
            Op::Stat("waiting", waiting, 2),
            Op::NumEvents(1, 1),
            Op::Run,
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
        ],
    );
}

/// What the engine does to single out a request that breaks every step it is in: steps
/// hold only the listed sequences, the others (running, waiting, or new) keep their
/// places, and a restriction none of whose sequences can run holds no one back.
#[test]
fn restricted_steps_hold_only_the_listed_sequences() {
    check(
        cfg(),
        vec![
            Op::Add(1, req(prompt(1, 6), 5)),
            Op::Add(2, req(prompt(2, 6), 5)),
            Op::Add(3, req(prompt(3, 6), 5)),
            Op::Step(&[(0, &[(1, 0, 6), (2, 0, 6), (3, 0, 6)])]),
            Op::Plan(&[(0, &[(1, 6, 1), (2, 6, 1), (3, 6, 1)])]),
            Op::Abort,
            // 1, first in the queue, is passed over in place.
            Op::Restrict(Some(&[3, 2])),
            Op::Step(&[(0, &[(2, 0, 7), (3, 0, 7)])]),
            Op::Add(4, req(prompt(4, 6), 5)),
            // 2 and 3 run but are held back, and so is the new request.
            Op::Restrict(Some(&[1])),
            Op::Step(&[(0, &[(1, 0, 7)])]),
            Op::Stat("waiting", waiting, 1),
            Op::Restrict(Some(&[1])),
            Op::Cancel(1),
            // Nothing of the restriction is left: every sequence goes.
            Op::Step(&[(0, &[(2, 7, 1), (3, 7, 1), (4, 0, 6)])]),
            Op::Restrict(Some(&[2])),
            Op::Step(&[(0, &[(2, 8, 1)])]),
            Op::Restrict(None),
            Op::Run,
            Op::SameAsAlone(2),
            Op::SameAsAlone(3),
            Op::SameAsAlone(4),
        ],
    );
    // 2 waits for blocks that 1 holds: the restricted step would be empty, so 1 decodes.
    check(
        SchedulerConfig {
            n_blocks_per_worker: 4,
            ..cfg()
        },
        vec![
            Op::Add(1, req(prompt(1, 8), 4)),
            Op::Step(&[(0, &[(1, 0, 8)])]),
            Op::Add(2, req(prompt(2, 12), 4)),
            Op::Restrict(Some(&[2])),
            Op::Step(&[(0, &[(1, 8, 1)])]),
            Op::Restrict(None),
            Op::Run,
            Op::SameAsAlone(1),
            Op::SameAsAlone(2),
        ],
    );
}

#[test]
fn any_call_order_is_safe() {
    check(
        cfg(),
        vec![
            Op::NoStep,
            Op::Cancel(7),
            Op::Add(1, req(prompt(1, 4), 3)),
            Op::Reject(1, req(prompt(1, 4), 3), "duplicate"),
            Op::Plan(&[(0, &[(1, 0, 4)])]),
            // A second plan while one is in flight is refused.
            Op::NoStep,
            Op::Complete,
            // Completing or aborting the same plan again changes nothing.
            Op::CompleteStale,
            Op::AbortStale,
            Op::Step(&[(0, &[(1, 4, 1)])]),
            Op::AbortStale,
            Op::CompleteStale,
            Op::Cancel(1),
            Op::Cancel(1),
            Op::NoStep,
            Op::Stat("used", used, 0),
        ],
    );
}

/// Many sequences with shared prefixes on two small workers, with cancellations and
/// failed steps: everything that is not cancelled generates what it would alone, and
/// the pools end empty.
#[test]
fn a_crowded_engine_generates_what_each_request_would_alone() {
    crowded(SpecConfig::off(), sampled);
}

/// Speculation changes no output: greedy or seeded, every request of a crowded engine
/// (preemption, aborted steps, cancellations, prefix hits, blocks of 4 tokens so
/// proposals cross block edges and are rolled back) generates what it would alone
/// without speculation; proposals were made, some accepted and some rejected.
#[test]
fn speculation_generates_what_plain_decoding_would() {
    for proposer in [ProposerKind::Ngram, ProposerKind::Draft] {
        for fixed_depth in [Some(3), None] {
            for uniform in [false, true] {
                for make in [req as fn(Vec<u32>, usize) -> GenerateRequest, sampled] {
                    let spec = SpecConfig {
                        fixed_depth,
                        max_depth: 4,
                        uniform,
                        ..SpecConfig::new(proposer)
                    };
                    crowded(spec, make);
                }
            }
        }
    }
}

fn proposed(s: &EngineStats) -> u64 {
    s.spec.proposed_tokens
}
fn accepted(s: &EngineStats) -> u64 {
    s.spec.accepted_tokens
}
fn rejected(s: &EngineStats) -> u64 {
    s.spec.proposed_tokens - s.spec.accepted_tokens
}

/// A random workload of 40 requests made by `make`, checked against each request alone.
fn crowded(spec: SpecConfig, make: fn(Vec<u32>, usize) -> GenerateRequest) {
    let speculating = spec.enabled();
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let mut script = Vec::new();
    let mut live = Vec::new();
    for id in 1..=40 {
        // One of three shared heads of 0 to 3 blocks, then a tail of its own.
        let head = prompt(next(3) as u32, 4 * next(4));
        let tail = prompt(10 + id as u32, 1 + next(12));
        // The tail again: something for prompt lookup to find.
        let again = tail[..next(tail.len() + 1)].to_vec();
        script.push(Op::Add(
            id,
            make([head, tail, again].concat(), 1 + next(12)),
        ));
        live.push(id);
        for _ in 0..next(4) {
            script.push(if next(15) == 0 {
                Op::AnyAbort
            } else {
                Op::AnyStep
            });
        }
        if next(8) == 0 {
            script.push(Op::Cancel(live.remove(next(live.len()))));
        }
    }
    // Last, a long request that ends alone: decode-only steps enough (a step that
    // finishes a prompt is none) for the adaptive guard to measure plain decoding and
    // try speculation.
    script.push(Op::Add(41, make(prompt(99, 8), 30)));
    live.push(41);
    script.push(Op::Run);
    script.extend(live.into_iter().map(Op::SameAsAlone));
    script.push(Op::StatAtLeast("preempted", preempted, 1));
    script.push(Op::StatAtLeast("hit tokens", hits, 1));
    if speculating && spec.fixed_depth.is_some() {
        script.push(Op::StatAtLeast("proposed", proposed, 20));
        script.push(Op::StatAtLeast("accepted", accepted, 5));
        script.push(Op::StatAtLeast("rejected", rejected, 5));
    } else if speculating {
        // Adaptive: the guard speculates only once plain decoding's decode-only steps
        // have been timed, which few steps of this busy script are until its end.
        script.push(Op::StatAtLeast("proposed", proposed, 1));
    }
    check(
        SchedulerConfig {
            n_workers: 2,
            n_blocks_per_worker: 12,
            max_batch_tokens: 24,
            max_running: 4,
            max_waiting: 64,
            prefill_chunk: 8,
            max_context: 64,
            speculation: spec,
            ..cfg()
        },
        script,
    );
}

/// A sequence that speculates holds exactly the blocks its tokens need after every
/// step: blocks reserved for rejected proposals, across block edges, are released, and
/// what it reads back through its blocks is always its own tokens (the harness checks).
#[test]
fn rejected_proposals_are_rolled_back_at_block_edges() {
    for proposer in [ProposerKind::Ngram, ProposerKind::Draft] {
        let mut h = Harness::new(SchedulerConfig {
            speculation: SpecConfig {
                fixed_depth: Some(3),
                ..SpecConfig::new(proposer)
            },
            ..cfg()
        });
        let p = prompt(5, 6);
        let r = req([p.clone(), p.clone(), p].concat(), 40);
        h.reqs.insert(1, r.clone());
        h.sched.add(1, r.clone(), 1).unwrap();
        let (mut steps, mut edges) = (0, 0);
        while h.schedule().is_some() {
            let plan = h.in_flight.clone().unwrap();
            let bs = h.sched.config().block_size;
            // A step whose proposals reach into a block the tokens do not need yet.
            if let Some(s) = plan.steps[0].1.seqs.first() {
                let ctx = s.first_pos + s.tokens.len() + s.draft.as_ref().map_or(0, |d| d.depth);
                if ctx.div_ceil(bs) > (s.first_pos + 1).div_ceil(bs) {
                    edges += 1;
                }
            }
            h.complete();
            steps += 1;
            if let Some(seq) = h.sched.seqs.get(&1).filter(|s| s.n_generated() > 0) {
                // No block past the tokens; every computed position in a block.
                assert!(
                    seq.blocks.len() <= seq.tokens.len().div_ceil(bs),
                    "step {steps}"
                );
                assert!(
                    seq.blocks.len() >= seq.n_computed.div_ceil(bs),
                    "step {steps}"
                );
                assert_eq!(h.sched.stats().kv_blocks_used, seq.blocks.len());
                assert_eq!(seq.n_computed + 1, seq.tokens.len());
            }
        }
        assert!(h.sched.is_idle());
        assert_eq!(h.sched.stats().kv_blocks_used, 0);
        assert_eq!(h.generated(1), alone(256, &r, 1), "{proposer:?}");
        let st = h.sched.stats().spec;
        assert!(
            edges >= 3,
            "{proposer:?}: {edges} steps crossed a block edge"
        );
        assert!(
            st.accepted_tokens > 0 && st.accepted_tokens < st.proposed_tokens,
            "{st:?}"
        );
        // Fewer steps than tokens: accepted proposals saved steps.
        assert!(steps < 40, "{proposer:?}: {steps} steps for 40 tokens");
    }
}

/// Under `uniform`, every sequence of a speculating step verifies the same number of
/// tokens (prompt lookup's proposals are filled up), near max_tokens too, and the
/// output is still plain decoding's.
#[test]
fn uniform_steps_give_every_sequence_one_depth() {
    for proposer in [ProposerKind::Ngram, ProposerKind::Draft] {
        let mut h = Harness::new(SchedulerConfig {
            n_blocks_per_worker: 256,
            speculation: SpecConfig {
                uniform: true,
                max_depth: 4,
                ..SpecConfig::new(proposer)
            },
            ..cfg()
        });
        let mut reqs = Vec::new();
        for id in 1..=6u64 {
            // Half repeat their prompt (lookup finds proposals), half do not.
            let p = prompt(id as u32, 9);
            let p = if id % 2 == 0 {
                [p.clone(), p].concat()
            } else {
                p
            };
            // Long enough for the guard to time plain steps first, then speculate.
            let r = req(p, 60 + 3 * id as usize);
            h.reqs.insert(id, r.clone());
            h.sched.add(id, r.clone(), id).unwrap();
            reqs.push((id, r));
        }
        let (mut uniform_steps, mut filled) = (0, 0);
        while h.schedule().is_some() {
            let plan = h.in_flight.clone().unwrap();
            let seqs = &plan.steps[0].1.seqs;
            let depths: Vec<usize> = seqs
                .iter()
                .map(|s| s.tokens.len() - 1 + s.draft.as_ref().map_or(0, |d| d.depth))
                .collect();
            let decoding = seqs.iter().all(|s| s.all_logits || s.tokens.len() == 1);
            if decoding && depths.iter().any(|&d| d > 0) {
                assert!(depths.iter().all(|&d| d == depths[0]), "{depths:?}");
                uniform_steps += 1;
                if seqs.len() > 1 {
                    filled += 1;
                }
            }
            h.complete();
        }
        assert!(
            uniform_steps >= 10 && filled >= 5,
            "{uniform_steps} {filled}"
        );
        for (id, r) in &reqs {
            assert_eq!(
                h.generated(*id),
                alone(256, r, *id),
                "{proposer:?} seq {id}"
            );
        }
        let st = h.sched.stats().spec;
        assert!(st.accepted_tokens > 0, "{st:?}");
    }
}

/// A draft model reads prompts along only while recent decode steps use it: not when a
/// burst of requests starts from a few running sequences at a load where the guard
/// keeps it off (it would pay a draft pass in every prefill step for proposals the
/// guard will not ask for).
#[test]
fn a_draft_reads_prompts_along_only_while_it_is_used() {
    let mut h = Harness::new(SchedulerConfig {
        n_blocks_per_worker: 256,
        max_running: 8,
        speculation: SpecConfig::new(ProposerKind::Draft),
        ..cfg()
    });
    let mut id = 0;
    let mut add = |h: &mut Harness, n: usize, max_tokens: usize| {
        for _ in 0..n {
            id += 1;
            let r = req(prompt(id as u32, 8), max_tokens);
            h.reqs.insert(id, r.clone());
            h.sched.add(id, r, id).unwrap();
        }
    };
    let reads = |h: &Harness| {
        h.last_plan.as_ref().is_some_and(|p| {
            p.steps.iter().flat_map(|(_, s)| &s.seqs).any(|s| {
                s.tokens.len() > 1
                    && !s.all_logits
                    && s.draft.as_ref().is_some_and(|d| d.depth == 0)
            })
        })
    };
    // Alone, speculation pays (its steps cost what plain ones do).
    add(&mut h, 1, 200);
    while h.schedule().is_some() {
        h.complete();
    }
    assert!(h.sched.guard.prefers_speculation(1));
    // Eight at a time, its steps cost ten times a plain one: it loses there (while
    // the burst drains to one sequence, it still pays).
    add(&mut h, 8, 150);
    while h.schedule().is_some() {
        let load = h.in_flight.as_ref().map_or(0, |p| {
            p.steps.iter().map(|(_, s)| s.seqs.len()).sum::<usize>()
        });
        h.complete_in(1e-3, if load > 1 { 1e-2 } else { 1e-3 });
    }
    assert!(!h.sched.guard.prefers_speculation(8));
    // A new burst: its first request is admitted alone, but the load is eight.
    add(&mut h, 1, 4);
    h.schedule().unwrap();
    assert!(
        !reads(&h),
        "the draft read a prompt at a load where it loses"
    );
    h.complete();
    // Where the load stays one, it reads along again.
    while h.schedule().is_some() {
        h.complete();
    }
    for _ in 0..8 {
        add(&mut h, 1, 30);
        while h.schedule().is_some() {
            h.complete();
        }
    }
    add(&mut h, 1, 4);
    h.schedule().unwrap();
    assert!(reads(&h), "the draft did not read along where it pays");
}

/// A step that computes a prompt's last chunk emits that prompt's first token along
/// with its decodes' next ones, but it is no decode step: the guard does not take it
/// for a plain one. Here such steps take 2.5 times a decode step (under the guard's
/// stall cut), requests come one every three steps, and plain decoding's measured rate
/// is the decode steps' alone: a token per sequence and millisecond.
#[test]
fn steps_that_finish_a_prompt_are_not_measured_as_plain_decoding() {
    let mut h = Harness::new(SchedulerConfig {
        n_blocks_per_worker: 256,
        speculation: SpecConfig::new(ProposerKind::Ngram),
        ..cfg()
    });
    let step = |plan: &Plan| {
        let prompt = plan
            .steps
            .iter()
            .flat_map(|(_, s)| &s.seqs)
            .any(|s| s.tokens.len() > 1);
        if prompt { 2.5e-3 } else { 1e-3 }
    };
    for id in 1..=40 {
        // Opted out: every step is plain decoding's.
        let r = GenerateRequest {
            speculate: false,
            ..req(prompt(id as u32, 8), 20)
        };
        h.reqs.insert(id, r.clone());
        h.sched.add(id, r, id).unwrap();
        for _ in 0..3 {
            if h.schedule().is_some() {
                h.complete_by(step);
            }
        }
    }
    while h.schedule().is_some() {
        h.complete_by(step);
    }
    for n in [1, 2, 4] {
        let (plain, _) = h.sched.guard.rates(n).expect("loads measured");
        assert!(
            (plain - 1000.0).abs() < 1.0,
            "{n} sequences: plain decoding measured at {plain} tokens per sequence-second"
        );
    }
    let stats = h.sched.stats();
    assert_eq!(stats.prompt_steps_total, 40, "one step per admitted prompt");
    assert!((stats.prompt_step_seconds_total - 40.0 * 2.5e-3).abs() < 1e-9);
}

/// Speculative sampling keeps the target distribution: over 3000 seeds, the first two
/// generated tokens of a prompt (under draft proposals that are often wrong) match the
/// fake model's exact marginals by a chi-square test (p = 0.001 critical values; the
/// seeds are fixed, so the test is deterministic).
#[test]
fn speculative_sampling_matches_the_target_distribution() {
    let mut h = Harness::new(SchedulerConfig {
        n_blocks_per_worker: 256,
        max_running: 16,
        max_waiting: 4096,
        speculation: SpecConfig {
            fixed_depth: Some(3),
            ..SpecConfig::new(ProposerKind::Draft)
        },
        ..cfg()
    });
    let p = prompt(3, 5);
    let n = 3000u64;
    for id in 1..=n {
        let r = sampled(p.clone(), 2);
        h.reqs.insert(id, r.clone());
        h.sched.add(id, r, id * 7919).unwrap();
    }
    h.run();
    let probs = |ctx: &[u32]| {
        let l = model_logits(ctx);
        let m = l.iter().copied().fold(f32::MIN, f32::max);
        let e: Vec<f64> = l.iter().map(|&x| f64::from(x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
    };
    let first = probs(&p);
    let mut second = vec![0.0; VOCAB];
    for (t, &pt) in first.iter().enumerate() {
        let ctx = [p.clone(), vec![t as u32]].concat();
        for (u, q) in probs(&ctx).into_iter().enumerate() {
            second[u] += pt * q;
        }
    }
    for (k, want) in [(0, first), (1, second)] {
        let mut counts = vec![0u64; VOCAB];
        for id in 1..=n {
            counts[h.generated(id)[k] as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&want)
            .map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p))
            .sum();
        // 63 degrees of freedom: P(chi2 > 103.4) = 0.001.
        assert!(chi2 < 103.4, "token {k}: chi-square {chi2:.1}");
    }
    let st = h.sched.stats().spec;
    assert!(
        st.accepted_tokens > 0 && st.accepted_tokens < st.proposed_tokens,
        "{st:?}"
    );
}

/// Where verification costs what it saves (every step token costs its share of the
/// step's time), prompt lookup's planner declines at any depth, and the scheduler skips
/// the search for proposals it would not verify; the output is plain decoding's. A step
/// of requests that opted out has no search to skip and counts none.
#[test]
fn prompt_lookup_skips_its_search_where_no_depth_would_pay() {
    for opted_out in [false, true] {
        skipped_searches(opted_out);
    }
}

fn skipped_searches(opted_out: bool) {
    let mut h = Harness::new(SchedulerConfig {
        n_blocks_per_worker: 256,
        max_running: 8,
        speculation: SpecConfig {
            uniform: true,
            max_depth: 4,
            ..SpecConfig::new(ProposerKind::Ngram)
        },
        ..cfg()
    });
    let mut reqs = Vec::new();
    for id in 1..=8u64 {
        // Repeated prompts: the search would find proposals.
        let p = prompt(id as u32, 9);
        let r = GenerateRequest {
            speculate: !opted_out,
            ..req([p.clone(), p].concat(), 80)
        };
        h.reqs.insert(id, r.clone());
        h.sched.add(id, r.clone(), id).unwrap();
        reqs.push((id, r));
    }
    let tokens = |plan: &Plan| {
        plan.steps
            .iter()
            .flat_map(|(_, s)| &s.seqs)
            .map(|s| s.tokens.len() + s.draft.as_ref().map_or(0, |d| d.depth))
            .sum::<usize>()
    };
    while h.schedule().is_some() {
        h.complete_by(|plan| 1e-4 * tokens(plan) as f64);
    }
    for (id, r) in &reqs {
        assert_eq!(h.generated(*id), alone(256, r, *id), "seq {id}");
    }
    let st = h.sched.stats().spec;
    if opted_out {
        // No sequence to search for: nothing skipped.
        assert_eq!(st.searches_skipped, 0, "{st:?}");
    } else {
        assert!(st.searches_skipped >= 20, "{st:?}");
    }
}
