//! Speculative decoding: who proposes tokens, how many each sequence gets per step, and
//! how the target model's logits verify them. Plain code, tested without a model.
//!
//! - Proposers ([`ProposerKind`]): prompt lookup ([`ngram_proposals`]: the tokens that
//!   followed the latest earlier occurrence of the sequence's last n tokens), or the
//!   workers' draft model (the step asks the worker for `depth` greedy draft tokens).
//!   Both propose deterministic tokens.
//! - Verification ([`verify`]): the target samples each proposed position exactly as
//!   plain decoding would (same sampler, same per-position random stream, same
//!   penalties over the tokens accepted so far) and keeps proposals while they equal
//!   its own draw. For a deterministic proposal `x` this is rejection sampling: `x` is
//!   accepted with probability `p(x)` (= min(1, p(x)/q(x)) with `q` a point mass) and a
//!   rejection draws from `p` without `x`, renormalised; so every emitted token has
//!   exactly the target distribution. It also makes a seeded request's output the same
//!   with and without speculation, and a greedy one's identical to greedy decoding.
//! - Depth ([`plan_depths`]): per sequence from its acceptance rate, per step from a
//!   learned cost of the step's size ([`CostModel`]): depths are raised one token at a
//!   time where the expected gain is largest, and the step keeps the prefix of those
//!   raises with the best expected tokens per second. A batch that is already
//!   compute-bound gains less than the verification costs, so speculation switches
//!   itself off there.

use hyserve_kernels::sampling::{SamplingParams, log_softmax};

use crate::api::TokenLogprob;

/// Where proposals come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposerKind {
    /// No speculation.
    Off,
    /// Prompt lookup: no extra weights.
    Ngram,
    /// The workers' draft model.
    Draft,
}

impl ProposerKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(ProposerKind::Off),
            "ngram" => Some(ProposerKind::Ngram),
            "draft" => Some(ProposerKind::Draft),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProposerKind::Off => "off",
            ProposerKind::Ngram => "ngram",
            ProposerKind::Draft => "draft",
        }
    }
}

/// The speculation settings of an engine.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecConfig {
    pub proposer: ProposerKind,
    /// Most tokens proposed for one sequence in one step.
    pub max_depth: usize,
    /// Prompt lookup matches the last `ngram_max` down to `ngram_min` tokens.
    pub ngram_max: usize,
    pub ngram_min: usize,
    /// Prompt lookup searches this many tokens back at most.
    pub ngram_window: usize,
    /// Every sequence proposes this many tokens (as far as proposals exist), with no
    /// cost model: benchmarks and tests. `None`: adaptive.
    pub fixed_depth: Option<usize>,
    /// Every speculating sequence of a step verifies the same number of tokens (prompt
    /// lookup's proposals are filled up where they run short): a step's shape is then
    /// set by its batch size and one depth, so a backend that records steps (CUDA
    /// graphs) replays a few recordings instead of launching every verification anew.
    /// Where each verified token costs its own compute (the CPU), this is off.
    pub uniform: bool,
}

impl SpecConfig {
    pub fn off() -> Self {
        Self {
            proposer: ProposerKind::Off,
            ..Self::new(ProposerKind::Off)
        }
    }

    /// Defaults for `proposer`: up to 6 tokens, adaptive; prompt lookup of 3 down to 1
    /// tokens over the last 16K.
    pub fn new(proposer: ProposerKind) -> Self {
        Self {
            proposer,
            max_depth: 6,
            ngram_max: 3,
            ngram_min: 1,
            ngram_window: 16 << 10,
            fixed_depth: None,
            uniform: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.proposer != ProposerKind::Off && self.max_depth > 0
    }
}

/// The tokens that followed the most recent earlier occurrence of `tokens`' last `n`
/// tokens, for the longest `n` in `max_n..=min_n` that occurs, at most `depth` of them,
/// looking back at most `window` tokens. A match that runs into the end of the text
/// is continued by matching again on the text with the proposals appended, so a
/// passage that repeats (a loop, a refrain) is proposed as deep as asked.
pub fn ngram_proposals(
    tokens: &[u32],
    min_n: usize,
    max_n: usize,
    depth: usize,
    window: usize,
) -> Vec<u32> {
    let mut out = Vec::new();
    // Only the last `window` tokens are searched; the proposals are appended to them
    // when a match runs into the end (copied once, and only then).
    let mut text = std::borrow::Cow::Borrowed(&tokens[tokens.len().saturating_sub(window)..]);
    while out.len() < depth {
        let Some(from) = latest_match(&text, min_n, max_n, window) else {
            break;
        };
        let to = (from + depth - out.len()).min(text.len());
        let more = text[from..to].to_vec();
        out.extend_from_slice(&more);
        if out.len() < depth {
            text.to_mut().extend(more);
        }
    }
    out
}

/// Where the text after the latest earlier occurrence of `text`'s last `n` tokens
/// begins, for the longest `n` in `max_n..=min_n` that occurs within the last `window`.
fn latest_match(text: &[u32], min_n: usize, max_n: usize, window: usize) -> Option<usize> {
    let len = text.len();
    let lo = len.saturating_sub(window);
    for n in (min_n.max(1)..=max_n).rev() {
        if n >= len {
            continue;
        }
        let suffix = &text[len - n..];
        // Latest start first; the match must end before the suffix itself begins.
        for start in (lo..len - n).rev() {
            if &text[start..start + n] == suffix {
                return Some(start + n);
            }
        }
    }
    None
}

/// `proposals` filled up to `depth` tokens for a step of uniform depth: with the last
/// proposal (or the last token) repeated. A filler is a proposal like any other (it is
/// verified, and accepted only if it is the target's own token); it just rarely is.
pub fn fill_proposals(tokens: &[u32], mut proposals: Vec<u32>, depth: usize) -> Vec<u32> {
    if let Some(&last) = proposals.last().or(tokens.last()) {
        proposals.resize(depth.max(proposals.len()), last);
    }
    proposals
}

/// A sequence's acceptance rate: the probability that one proposed token is accepted,
/// estimated from the recent ones (a decayed Beta(1, 1) posterior mean).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Acceptance {
    accepted: f64,
    proposed: f64,
}

impl Default for Acceptance {
    fn default() -> Self {
        Self {
            accepted: 0.0,
            proposed: 0.0,
        }
    }
}

/// How fast old observations fade, per token judged since: a token's weight after 10
/// more is ~0.35.
const ACCEPTANCE_DECAY: f64 = 0.9;

/// How many observations a new sequence's rate starts from ([`Acceptance::starting_at`]).
const ACCEPTANCE_PRIOR_WEIGHT: f64 = 8.0;

impl Acceptance {
    /// A new sequence's rate: near `rate` (the engine's recent acceptance), worth a few
    /// observations of its own. Starting every sequence from an even chance makes a
    /// planner that finds extra tokens dear never try a new sequence, and so never learn
    /// that its proposals are good.
    pub fn starting_at(rate: f64) -> Self {
        let rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            0.5
        };
        Self {
            accepted: rate * ACCEPTANCE_PRIOR_WEIGHT,
            proposed: ACCEPTANCE_PRIOR_WEIGHT,
        }
    }

    pub fn rate(&self) -> f64 {
        (self.accepted + 1.0) / (self.proposed + 2.0)
    }

    /// `accepted` of `proposed` tokens were accepted, in order: the first rejection
    /// ends a run, so later proposals were never judged and do not count.
    pub fn observe(&mut self, proposed: usize, accepted: usize) {
        let judged = (accepted + 1).min(proposed);
        let keep = ACCEPTANCE_DECAY.powi(judged as i32);
        self.accepted = self.accepted * keep + accepted as f64;
        self.proposed = self.proposed * keep + judged as f64;
    }
}

/// Observations a cost bucket needs before its measured time is trusted over the
/// optimistic guess (so one slow step does not rule out a shape for good).
const TRUSTED_SAMPLES: u32 = 3;
/// Weight of a new observation in a bucket's running mean.
const COST_EWMA: f64 = 0.2;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Bucket {
    seconds: f64,
    samples: u32,
}

/// Measured seconds per step by the step's size, in buckets: one per token count up to
/// 16, then two per power of two. A bucket not yet measured (or measured fewer than
/// [`TRUSTED_SAMPLES`] times) is guessed optimistically as the nearest measured smaller
/// one, so the planner tries it, learns, and stops if it was wrong.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostCurve {
    buckets: Vec<Bucket>,
}

fn bucket_of(n: usize) -> usize {
    if n <= 16 {
        return n;
    }
    // 17..=24 -> 17, 25..=32 -> 18, 33..=48 -> 19, 49..=64 -> 20, ...
    let p = n.next_power_of_two();
    let octave = p.trailing_zeros() as usize; // 2^octave >= n
    let upper_half = n > p / 4 * 3;
    17 + 2 * (octave - 5) + usize::from(upper_half)
}

impl CostCurve {
    pub fn observe(&mut self, n_tokens: usize, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let i = bucket_of(n_tokens);
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, Bucket::default());
        }
        let b = &mut self.buckets[i];
        b.seconds = if b.samples == 0 {
            seconds
        } else {
            b.seconds + COST_EWMA * (seconds - b.seconds)
        };
        b.samples = b.samples.saturating_add(1);
    }

    /// Estimated seconds of a step of `n_tokens`; `None` before any measurement.
    pub fn estimate(&self, n_tokens: usize) -> Option<f64> {
        let i = bucket_of(n_tokens);
        let below = self.measured(..i.min(self.buckets.len())).next_back();
        match self.buckets.get(i).filter(|b| b.samples > 0) {
            Some(b) if b.samples >= TRUSTED_SAMPLES => Some(b.seconds),
            Some(b) => Some(below.map_or(b.seconds, |x| x.min(b.seconds))),
            // Nothing measured below: the smallest measured step is the best guess.
            None => below.or_else(|| self.measured(..).next()),
        }
    }

    /// Measured buckets' seconds within `range`, in bucket order.
    fn measured(
        &self,
        range: impl std::slice::SliceIndex<[Bucket], Output = [Bucket]>,
    ) -> impl DoubleEndedIterator<Item = f64> + '_ {
        self.buckets[range]
            .iter()
            .filter(|b| b.samples > 0)
            .map(|b| b.seconds)
    }
}

/// What a step of a given shape costs, learned from the steps run so far: the target's
/// pass by its tokens, and one draft round by the sequences drafting in it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostModel {
    pub target: CostCurve,
    pub draft_round: CostCurve,
}

impl CostModel {
    /// Seconds of a step of `n_tokens` target tokens and `rounds` draft rounds over
    /// `n_drafting` sequences. Unknown costs are guessed as free, so they get tried.
    pub fn step_seconds(&self, n_tokens: usize, rounds: usize, n_drafting: usize) -> f64 {
        let target = self.target.estimate(n_tokens).unwrap_or(0.0);
        let draft = if rounds == 0 {
            0.0
        } else {
            rounds as f64 * self.draft_round.estimate(n_drafting).unwrap_or(0.0)
        };
        target + draft
    }
}

/// Observations an arm of the [`Guard`] needs before it is compared: enough that a few
/// odd steps do not decide (steps whose shape is still being recorded are not counted
/// at all, up to [`GUARD_MAX_SKIPPED`]).
const GUARD_MIN_SAMPLES: u32 = 12;
/// Every so many steps of a batch size, the guard runs the arm that is losing for
/// [`GUARD_PROBE_STEPS`] steps (several: a draft model that fell behind while off needs a
/// step to catch up before its steps are steady), so a changed workload can change its
/// mind. The interval starts at the first and doubles, up to the second, each time a
/// probe confirms the winner (a probe of a losing draft costs its catch-up), or, at a
/// load not measured yet, each time a probe measured nothing there.
const GUARD_PROBE_EVERY: (u64, u64) = (128, 4096);
const GUARD_PROBE_STEPS: u32 = 8;
/// At most this share of a batch size's decode time is lost to each arm where it was
/// not the better one (its steps' time less what the other arm would have taken for
/// their tokens): a probe that costs much (a draft model that fell behind re-reads
/// every sequence's context, a prefill of the whole batch) waits until its arm's losses
/// are paid for, while probes that cost little, or turn out to gain, keep their
/// schedule. Speculation is charged for all its steps, not only its probes, so a
/// verdict for it that its costs then overturn delays its next probe too.
const GUARD_PROBE_SHARE: f64 = 0.01;
/// Speculation must be this much faster to be kept: a coin flip between equals costs
/// the exploration of both.
const GUARD_MARGIN: f64 = 1.02;
/// Once plain decoding has won at a load, speculation must be this much faster to win
/// it back. Speculation's rate is only refreshed by its own steps, so while plain
/// decoding wins it is an old measurement; plain decoding's rate, refreshed every step,
/// wanders by a few percent around it. With one threshold for both directions the
/// verdict would follow that wander (on an H100, 30 changes in 1666 steps at one
/// sequence), and each change to speculation pays a draft's catch-up. Turning
/// speculation off keeps the lower threshold, so a kept verdict is never one that
/// loses time.
const GUARD_SWITCH_ON: f64 = 1.05;

/// While speculation wins a load, a fall of its yield (tokens per sequence and step,
/// over its window) below this share of what it was when plain decoding was last
/// measured there means the workload changed under it, and plain decoding's rate, of
/// the old workload, no longer says what plain decoding would do: the guard measures
/// plain decoding afresh at once ([`GUARD_MIN_SAMPLES`] steps, its old window
/// dropped) instead of at the next probe, up to [`GUARD_PROBE_EVERY`]`.1` steps away.
/// A yield counts tokens, not time, so host jitter does not move it. On an H100 at
/// batch 32 (run37, sampled), prompt lookup kept the verdict it had won on edits
/// through a whole repetition of free text at 0.80x of plain decoding: plain
/// decoding's rate was the edits' (slower steps, longer contexts), and the veto's par
/// with it.
const GUARD_YIELD_DROP: f64 = 0.85;
/// The yield is checked every so many steps of the guard.
const GUARD_YIELD_EVERY: u64 = 16;

/// The guard's batch-size buckets: powers of two (1, 2-3, 4-7, 8-15, ...), coarse so
/// that each is learned from many steps.
pub fn guard_bucket(n_decode: usize) -> usize {
    n_decode.max(1).ilog2() as usize
}

/// Recent steps an arm keeps, at least; its rate is their tokens over their
/// sequence-seconds.
const GUARD_WINDOW: usize = 16;
/// ... and as many more as [`GUARD_WINDOW_SECONDS`] of steps take (up to
/// [`GUARD_WINDOW_MAX`]): on a GPU a plain step of a small model takes half a
/// millisecond, and 16 of them (8 ms) fall inside one stretch of host jitter (runs of
/// steps two to four times slower, measured on H100 hosts), so a window of steps alone
/// would compare the arms' luck; a window of time averages the stretches out. Where a
/// step takes longer (a CPU, a large model) the 16 steps are the window.
const GUARD_WINDOW_SECONDS: f64 = 0.1;
const GUARD_WINDOW_MAX: usize = 512;
/// A step that took this many times the window's median step time stalled (a page
/// fault, a preempted thread): it is left out of the rate, so one such step does not
/// decide anything.
const GUARD_STALL: f64 = 3.0;
/// Warm-up steps (a shape being recorded) an arm leaves out before it counts them
/// too: where shapes keep changing, warming up is the steady state.
const GUARD_MAX_SKIPPED: u32 = 64;

/// What speculation's steps really took while it held a batch size's verdict, in
/// blocks of at least [`GUARD_WINDOW`] steps and [`GUARD_WINDOW_SECONDS`]: all of them,
/// warm-ups and stalls included, against what plain decoding would have taken for
/// their tokens. Speculation's rate leaves those out (so that a verdict is not decided
/// by a few odd steps), but where they are the norm (at batch 32 on a GPU, a draft
/// whose step shapes are new nearly every step and that catches up on each admitted
/// request, measured at 0.75x of plain decoding over a whole repetition while its rate
/// said it was level) the rate says nothing about the time they cost. A block that
/// took more than [`GUARD_MARGIN`] times its par turns the verdict to plain decoding
/// and empties speculation's window, which probes then measure afresh.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Tenure {
    steps: usize,
    seconds: f64,
    par_seconds: f64,
}

/// One step in an arm's window.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Step {
    tokens: f64,
    seconds: f64,
    sequences: f64,
    /// The guard's step count when it was observed.
    at: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Rate {
    /// The recent steps, oldest first: at least [`GUARD_WINDOW`], more up to
    /// [`GUARD_WINDOW_SECONDS`] of them.
    recent: std::collections::VecDeque<Step>,
    /// The seconds of `recent`.
    recent_seconds: f64,
    samples: u32,
    /// Warm-up steps left out so far.
    skipped: u32,
    /// When the first step entered the window (the guard's step count).
    first: Option<u64>,
}

impl Rate {
    /// Whether the step entered the window (a warm-up may be left out).
    fn observe(
        &mut self,
        n_decode: usize,
        tokens: f64,
        seconds: f64,
        warming: bool,
        at: u64,
    ) -> bool {
        if warming && self.skipped < GUARD_MAX_SKIPPED {
            self.skipped += 1;
            return false;
        }
        self.recent.push_back(Step {
            tokens,
            seconds,
            sequences: n_decode.max(1) as f64,
            at,
        });
        self.recent_seconds += seconds;
        while let Some(&Step {
            seconds: oldest, ..
        }) = self.recent.front()
        {
            let enough = self.recent.len() > GUARD_WINDOW
                && self.recent_seconds - oldest >= GUARD_WINDOW_SECONDS;
            if !enough && self.recent.len() <= GUARD_WINDOW_MAX {
                break;
            }
            self.recent.pop_front();
            self.recent_seconds -= oldest;
        }
        self.samples = self.samples.saturating_add(1);
        self.first.get_or_insert(at);
        true
    }

    /// The window's tokens per sequence and step (its yield).
    fn tokens_per_sequence_step(&self) -> f64 {
        let (tokens, sequences) = self
            .recent
            .iter()
            .fold((0.0, 0.0), |(t, n), r| (t + r.tokens, n + r.sequences));
        if sequences > 0.0 {
            tokens / sequences
        } else {
            0.0
        }
    }

    /// Whether the window holds enough steps to be compared.
    fn full(&self) -> bool {
        self.recent.len() >= GUARD_MIN_SAMPLES as usize
    }

    /// Whether the window still holds steps from before `other` was first measured.
    fn older_than(&self, other: &Rate) -> bool {
        match (self.recent.front(), other.first) {
            (Some(oldest), Some(first)) => oldest.at < first,
            _ => false,
        }
    }

    /// Forgets the window (not the samples: the arm stays measured).
    fn clear(&mut self) {
        self.recent.clear();
        self.recent_seconds = 0.0;
    }

    /// The window's tokens per sequence and second: its tokens over the sum of its
    /// steps' seconds times their sequences, stalled steps left out.
    ///
    /// A ratio of sums, not a median of per-step rates: a speculative step's yield
    /// varies (a rejected proposal emits one token, an accepted run many), and the
    /// median of such steps says little about their throughput. Per sequence, not per
    /// step: a bucket spans loads up to twice each other (a batch draining from 7
    /// sequences to 4), and tokens per second fall with the load, so an arm measured
    /// last, on the smaller load, would look slower than the other for that alone (and
    /// the arms would take turns); tokens per sequence-second hardly change with the
    /// load where a step's time hardly does, and still rank the arms as tokens per
    /// second do at any one load.
    fn tokens_per_sequence_second(&self) -> f64 {
        let mut secs: Vec<f64> = self.recent.iter().map(|r| r.seconds).collect();
        secs.sort_by(f64::total_cmp);
        let Some(&median) = secs.get(secs.len() / 2) else {
            return 0.0;
        };
        let (tokens, seq_seconds) = self
            .recent
            .iter()
            .filter(|r| r.seconds <= GUARD_STALL * median)
            .fold((0.0, 0.0), |(t, s), r| {
                (t + r.tokens, s + r.seconds * r.sequences)
            });
        if seq_seconds > 0.0 {
            tokens / seq_seconds
        } else {
            0.0
        }
    }
}

/// The last word on whether a step speculates: per number of decoding sequences (in
/// powers of two), the tokens per sequence and second of whole steps (planning,
/// forward pass, verification) measured with speculation and without, and the faster
/// one wins.
/// The cost model plans depths from estimates; the guard checks the result on the
/// clock, so speculation that does not pay on this machine at this batch size (steps
/// too costly for what they verify, proposals that are rarely accepted) is switched off
/// there. A batch size not measured yet starts from the nearest measured one's verdict.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Guard {
    /// `[plain, speculative]` per batch-size bucket.
    arms: Vec<[Rate; 2]>,
    /// Per bucket: the probe in progress or the next one.
    probing: Vec<Probe>,
    /// What [`Guard::allow`] said last: (bucket, speculation allowed, it went against
    /// the verdict). The step it planned is the next one observed.
    last_choice: Option<(usize, bool, bool)>,
    /// Steps allowed against the verdict so far.
    probe_steps: u64,
    /// Times a measured verdict turned over so far.
    verdict_changes: u64,
    /// Per bucket: the verdict once both arms are measured there (it depends on the
    /// previous one: [`GUARD_SWITCH_ON`]).
    verdicts: Vec<Option<bool>>,
    /// Per bucket: speculation's steps under its verdict, in the current block.
    tenures: Vec<Tenure>,
    /// Times a block of speculation's steps lost its verdict for it ([`Tenure`]).
    vetoes: u64,
    /// Steps observed so far (the clock of [`Step::at`]).
    clock: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Probe {
    /// Steps of the probe in progress left.
    left: u32,
    until_next: u64,
    every: u64,
    /// Whether speculation was winning when the probe began.
    winner: bool,
    /// The probed arm's samples when the probe began.
    samples_before: u32,
    /// Speculation's yield when plain decoding was last measured here while
    /// speculation won (0: not known) ([`GUARD_YIELD_DROP`]).
    yield_then: f64,
    /// Seconds of decode steps observed at this batch size, and per arm (plain,
    /// speculative) the seconds it lost against the other ([`GUARD_PROBE_SHARE`]).
    seconds: f64,
    lost_seconds: [f64; 2],
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            left: 0,
            until_next: GUARD_PROBE_EVERY.0,
            every: GUARD_PROBE_EVERY.0,
            winner: false,
            samples_before: 0,
            yield_then: 0.0,
            seconds: 0.0,
            lost_seconds: [0.0; 2],
        }
    }
}

impl Guard {
    fn bucket(&mut self, n_decode: usize) -> usize {
        let b = guard_bucket(n_decode);
        if self.arms.len() <= b {
            self.arms.resize(b + 1, Default::default());
            self.probing.resize(b + 1, Probe::default());
            self.verdicts.resize(b + 1, None);
            self.tenures.resize(b + 1, Tenure::default());
        }
        b
    }

    /// Whether a step with `n_decode` decoding sequences may speculate.
    pub fn allow(&mut self, n_decode: usize) -> bool {
        let b = self.bucket(n_decode);
        let (allowed, against) = self.choose(b);
        self.last_choice = Some((b, allowed, against));
        self.probe_steps += u64::from(against);
        allowed
    }

    /// Whether bucket `b` speculates this step, and whether that goes against the
    /// verdict (a probe of the losing arm).
    fn choose(&mut self, b: usize) -> (bool, bool) {
        let own = self.verdict(b);
        // A load not measured yet starts with the nearest measured load's verdict and
        // measures the other arm in probes: exploring both arms at every load costs
        // the loser's steps at each.
        let Some(spec_wins) = own.or_else(|| self.nearest_verdict(b)) else {
            // Nothing is measured at any load: plain decoding first, then speculation,
            // then plain decoding again until its window holds none of its steps from
            // before speculation's ([`Guard::judge`]).
            let [plain, spec] = &self.arms[b];
            let measured = |r: &Rate| r.samples >= GUARD_MIN_SAMPLES;
            return (measured(plain) && !measured(spec), false);
        };
        let [plain, spec] = &self.arms[b];
        let p = &mut self.probing[b];
        if p.left > 0 {
            p.left -= 1;
            if p.left == 0 {
                tracing::debug!(
                    batch_bucket = 1usize << b,
                    plain_tokens_per_sequence_second = plain.tokens_per_sequence_second(),
                    speculative_tokens_per_sequence_second = spec.tokens_per_sequence_second(),
                    measured_here = own.is_some(),
                    speculation_wins = spec_wins,
                    "speculation guard probe over"
                );
                // The probe is over: the same winner as before, measured at this load,
                // backs the next one off. So does a probe at a load not measured yet
                // that measured nothing there (its steps all left out as warm-ups or
                // planned as plain ones): probing again as soon would cost as much
                // and teach as little (on an H100 at batch 32, a draft engine probed
                // the 16-31 loads of its draining batches 19-22 times a run, its probes
                // there planned into plain steps, and never measured them).
                let taught = self.arms[b][usize::from(!p.winner)].samples > p.samples_before;
                p.every = if (own.is_some() && spec_wins == p.winner) || (own.is_none() && !taught)
                {
                    (p.every * 2).min(GUARD_PROBE_EVERY.1)
                } else {
                    GUARD_PROBE_EVERY.0
                };
                p.until_next = p.every;
                p.yield_then = if spec_wins {
                    spec.tokens_per_sequence_step()
                } else {
                    0.0
                };
            }
            return (!p.winner, p.winner == spec_wins);
        }
        let yield_now =
            (spec_wins && p.yield_then > 0.0 && self.clock.is_multiple_of(GUARD_YIELD_EVERY))
                .then(|| spec.tokens_per_sequence_step());
        if yield_now.is_some_and(|y| y < GUARD_YIELD_DROP * p.yield_then)
            && p.lost_seconds[0] <= GUARD_PROBE_SHARE * p.seconds
        {
            tracing::debug!(
                batch_bucket = 1usize << b,
                yield_then = p.yield_then,
                yield_now,
                "speculation guard: the workload changed, plain decoding measured afresh"
            );
            *p = Probe {
                left: GUARD_MIN_SAMPLES - 1,
                winner: true,
                samples_before: plain.samples,
                ..*p
            };
            self.arms[b][0].clear();
            return (false, true);
        }
        p.until_next = p.until_next.saturating_sub(1);
        if p.until_next == 0
            && p.lost_seconds[usize::from(!spec_wins)] <= GUARD_PROBE_SHARE * p.seconds
        {
            *p = Probe {
                left: GUARD_PROBE_STEPS - 1,
                winner: spec_wins,
                samples_before: self.arms[b][usize::from(!spec_wins)].samples,
                ..*p
            };
            return (!spec_wins, true);
        }
        (spec_wins, false)
    }

    /// A step of only decoding sequences emitted `emitted` tokens in `seconds`;
    /// `warming`: it ran a shape the backend was still recording, so it is left out
    /// (up to [`GUARD_MAX_SKIPPED`] such steps per arm).
    pub fn observe(
        &mut self,
        n_decode: usize,
        speculated: bool,
        emitted: usize,
        seconds: f64,
        warming: bool,
    ) {
        if seconds <= 0.0 || !seconds.is_finite() {
            return;
        }
        let b = self.bucket(n_decode);
        // What the other arm, as measured here, would have taken for this step's
        // tokens, for a step the guard ran against the verdict (a probe that the
        // planner did not turn into a plain step) and, once both arms are measured at
        // this load, for every speculative step: speculation's rate leaves out its
        // warm-ups (new shapes recorded), a draft's catch-ups and stalls, and a verdict
        // for speculation can be a lucky measurement; all of that is charged against
        // plain decoding here, so the probes that follow wait until it is paid for.
        // (The steps a new load runs on the nearest load's verdict before its own is
        // measured are exploration, not charged.)
        let probed = self
            .last_choice
            .take()
            .is_some_and(|(cb, allowed, against)| cb == b && against && allowed == speculated);
        let measured = self.verdict(b).is_some();
        let par = Some(!speculated)
            .filter(|_| probed || (speculated && measured))
            .map(|w| self.arms[b][usize::from(w)].tokens_per_sequence_second())
            .filter(|&rate| rate > 0.0)
            .map(|rate| emitted as f64 / (rate * n_decode.max(1) as f64));
        let p = &mut self.probing[b];
        p.seconds += seconds;
        if let Some(par) = par {
            // A losing step that did better than par pays back earlier losses.
            let lost = &mut p.lost_seconds[usize::from(speculated)];
            *lost = (*lost + seconds - par).max(0.0);
        }
        let before = self.verdict(b);
        self.clock += 1;
        let counted = self.arms[b][usize::from(speculated)].observe(
            n_decode,
            emitted as f64,
            seconds,
            warming,
            self.clock,
        );
        let mut after = self.judge(b, before);
        if before == Some(false) && after == Some(true) && !(speculated && counted) {
            // Speculation wins a load back only on a step of its own. Between probes
            // its rate is an old measurement, and plain decoding's, refreshed every
            // step, wanders by more than GUARD_SWITCH_ON around it (on an H100 at 32
            // sequences, 535-580 tokens per sequence-second within 0.1 s: dozens of
            // changes a second, each paying a draft's catch-up). Checked when
            // speculation is measured again, both rates are of the same moment.
            after = before;
        }
        if speculated && before == Some(true) && after == Some(true) {
            after = self.keep_up(b, seconds, par);
        }
        self.verdicts[b] = after;
        if after != before {
            self.tenures[b] = Tenure::default();
            // Both arms are of this moment when a verdict turns: what speculation
            // yields now is what a changed workload is told by.
            self.probing[b].yield_then = if after == Some(true) {
                self.arms[b][1].tokens_per_sequence_step()
            } else {
                0.0
            };
            // The first verdict at a load is not a change of mind.
            self.verdict_changes += u64::from(before.is_some());
            let [plain, spec] = &self.arms[b];
            tracing::debug!(
                batch_bucket = 1usize << b,
                plain_tokens_per_sequence_second = plain.tokens_per_sequence_second(),
                speculative_tokens_per_sequence_second = spec.tokens_per_sequence_second(),
                speculation_wins = after,
                "speculation guard verdict changed"
            );
        }
    }

    /// Per batch-size bucket ([`guard_bucket`]), the verdict where both arms are
    /// measured: whether speculation wins there.
    pub fn verdicts(&self) -> &[Option<bool>] {
        &self.verdicts
    }

    /// Steps allowed against the verdict so far (probes).
    pub fn probe_steps(&self) -> u64 {
        self.probe_steps
    }

    /// Times a batch size's measured verdict turned over so far (its first verdict
    /// not counted): a guard that keeps changing its mind is measuring noise.
    pub fn verdict_changes(&self) -> u64 {
        self.verdict_changes
    }

    /// Times speculation's own steps, all of them counted, lost it a verdict its rate
    /// gave it ([`Tenure`]).
    pub fn vetoes(&self) -> u64 {
        self.vetoes
    }

    /// A speculative step of `seconds` (par: what plain decoding would have taken for
    /// its tokens) under a verdict for speculation at bucket `b`: whether the verdict
    /// stands once the block it completes is weighed ([`Tenure`]).
    fn keep_up(&mut self, b: usize, seconds: f64, par: Option<f64>) -> Option<bool> {
        let Some(par) = par else {
            return Some(true);
        };
        let t = &mut self.tenures[b];
        t.steps += 1;
        t.seconds += seconds;
        t.par_seconds += par;
        if t.steps < GUARD_WINDOW || t.seconds < GUARD_WINDOW_SECONDS {
            return Some(true);
        }
        let block = std::mem::take(t);
        if block.seconds <= GUARD_MARGIN * block.par_seconds {
            return Some(true);
        }
        tracing::debug!(
            batch_bucket = 1usize << b,
            steps = block.steps,
            seconds = block.seconds,
            plain_seconds = block.par_seconds,
            "speculation guard veto: its steps took longer than plain decoding would have"
        );
        self.vetoes += 1;
        self.arms[b][1].clear();
        Some(false)
    }

    /// Whether speculation was measured faster at `n_decode` sequences, or, where that
    /// load is not measured yet, at the nearest load that is; not where nothing is.
    #[cfg(test)]
    pub fn prefers_speculation(&self, n_decode: usize) -> bool {
        let b = guard_bucket(n_decode);
        self.verdict(b)
            .or_else(|| self.nearest_verdict(b))
            .unwrap_or(false)
    }

    /// Whether speculation wins at bucket `b`, once both arms are measured there.
    fn verdict(&self, b: usize) -> Option<bool> {
        self.verdicts.get(b).copied().flatten()
    }

    /// The verdict at bucket `b` from its arms' measurements, given the one before:
    /// speculation wins by [`GUARD_MARGIN`], and by [`GUARD_SWITCH_ON`] where plain
    /// decoding was winning.
    ///
    /// The very first verdict (no load measured yet) waits until neither arm's window
    /// holds steps from before the other was first measured: an engine's first steps
    /// run shapes it has not recorded yet (on an H100 at 32 sequences, plain decoding's
    /// first window measured 206-624 tokens per sequence-second where it runs at
    /// 700-1000), and the arm measured first would be judged on them against the
    /// other's steady steps: a first verdict for speculation that its own steps could
    /// not overturn either, the veto's par being that same slow rate (a fresh engine's
    /// first repetition at 0.88x of plain decoding). Plain decoding, measured first,
    /// runs again until its window has moved past them: a whole window
    /// ([`GUARD_WINDOW`] steps and [`GUARD_WINDOW_SECONDS`]). A load measured later,
    /// from the nearest verdict, keeps running that arm (its window stays current)
    /// and is judged once probes have measured the other.
    fn judge(&self, b: usize, before: Option<bool>) -> Option<bool> {
        match self.arms.get(b) {
            Some([plain, spec])
                if before.is_none()
                    && self.nearest_verdict(b).is_none()
                    && (plain.older_than(spec) || spec.older_than(plain)) =>
            {
                None
            }
            Some([plain, spec])
                if plain.samples >= GUARD_MIN_SAMPLES && spec.samples >= GUARD_MIN_SAMPLES =>
            {
                // Speculation's window emptied by a veto wins nothing until probes
                // have filled it again.
                if !spec.full() {
                    return Some(false);
                }
                // Plain decoding's, emptied when the workload changed, decides nothing
                // until it is filled again.
                if !plain.full() {
                    return before;
                }
                let margin = if before == Some(false) {
                    GUARD_SWITCH_ON
                } else {
                    GUARD_MARGIN
                };
                Some(
                    spec.tokens_per_sequence_second()
                        >= margin * plain.tokens_per_sequence_second(),
                )
            }
            _ => None,
        }
    }

    /// The verdict of the measured bucket nearest to `b` (the smaller load of two at
    /// the same distance).
    fn nearest_verdict(&self, b: usize) -> Option<bool> {
        (1..=self.arms.len()).find_map(|d| {
            b.checked_sub(d)
                .and_then(|i| self.verdict(i))
                .or_else(|| self.verdict(b + d))
        })
    }

    /// Measured tokens per sequence and second (plain, speculative) at `n_decode`
    /// sequences' bucket.
    pub fn rates(&self, n_decode: usize) -> Option<(f64, f64)> {
        self.arms.get(guard_bucket(n_decode)).map(|[p, s]| {
            (
                p.tokens_per_sequence_second(),
                s.tokens_per_sequence_second(),
            )
        })
    }
}

/// One sequence the planner may speculate for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Its acceptance rate ([`Acceptance::rate`]).
    pub rate: f64,
    /// The most tokens it can propose this step (prompt lookup found fewer, or the
    /// context or the KV blocks end).
    pub max_depth: usize,
    /// Of those, the proposals worth their rate: prompt lookup's own (fillers past
    /// them count as gaining nothing), or all of them.
    pub known: usize,
}

/// Depths for `candidates` in a step that already computes `base_tokens` target tokens
/// (one per decoding sequence plus any prefill chunks), given at most `budget` more.
/// `draft`: the proposals cost draft rounds (as many as the deepest sequence's depth).
pub fn plan_depths(
    candidates: &[Candidate],
    base_tokens: usize,
    budget: usize,
    draft: bool,
    cost: &CostModel,
) -> Vec<usize> {
    let mut depths = vec![0; candidates.len()];
    if candidates.is_empty() || budget == 0 {
        return depths;
    }
    // Every decoding sequence emits at least one token; raising a depth from k to k+1
    // adds rate^(k+1) expected tokens. Those gains fall with k, so taking the largest
    // gain first walks the best allocation for every total.
    let seconds = |depths: &[usize], extra: usize| {
        let rounds = if draft {
            depths.iter().copied().max().unwrap_or(0)
        } else {
            0
        };
        let drafting = depths.iter().filter(|&&d| d > 0).count();
        cost.step_seconds(base_tokens + extra, rounds, drafting)
    };
    let mut expected = candidates.len() as f64;
    let objective = |expected: f64, secs: f64| {
        if secs > 0.0 {
            expected / secs
        } else {
            f64::INFINITY
        }
    };
    let mut best = (objective(expected, seconds(&depths, 0)), 0);
    let mut path = Vec::new();
    let mut gains: Vec<f64> = candidates.iter().map(|c| c.rate).collect();
    for extra in 1..=budget {
        let Some(i) = (0..candidates.len())
            .filter(|&i| depths[i] < candidates[i].max_depth)
            .max_by(|&a, &b| gains[a].total_cmp(&gains[b]).then(b.cmp(&a)))
        else {
            break;
        };
        expected += gains[i];
        depths[i] += 1;
        gains[i] *= candidates[i].rate;
        path.push(i);
        let value = objective(expected, seconds(&depths, extra));
        // Ties go to the deeper allocation: an unmeasured cost is guessed free, and
        // trying it is how it gets measured.
        if value >= best.0 {
            best = (value, extra);
        }
    }
    let mut out = vec![0; candidates.len()];
    for &i in &path[..best.1] {
        out[i] += 1;
    }
    out
}

/// One depth for every candidate of a step ([`SpecConfig::uniform`]): the `d` up to
/// the longest known proposal with the best expected tokens per second, where
/// candidate `i` verifies `min(d, max_depth_i)` tokens and gains `rate_i^k` for its
/// `k`-th proposal up to `known_i` (fillers are counted as gaining nothing: the
/// estimate errs towards shallower steps). Ties go to the deeper step, as in
/// [`plan_depths`].
pub fn plan_uniform_depth(
    candidates: &[Candidate],
    base_tokens: usize,
    budget: usize,
    draft: bool,
    cost: &CostModel,
) -> usize {
    // Deeper than any proposal worth its rate gains nothing.
    let deepest = candidates
        .iter()
        .map(|c| c.known.min(c.max_depth))
        .max()
        .unwrap_or(0);
    let mut expected = candidates.len() as f64;
    let mut gains: Vec<f64> = candidates.iter().map(|c| c.rate).collect();
    let seconds = |d: usize, extra: usize| {
        let drafting = candidates.iter().filter(|c| c.max_depth.min(d) > 0).count();
        cost.step_seconds(base_tokens + extra, if draft { d } else { 0 }, drafting)
    };
    let objective = |expected: f64, secs: f64| {
        if secs > 0.0 {
            expected / secs
        } else {
            f64::INFINITY
        }
    };
    let mut best = (objective(expected, seconds(0, 0)), 0);
    for d in 1..=deepest {
        let extra: usize = candidates.iter().map(|c| c.max_depth.min(d)).sum();
        if extra > budget {
            break;
        }
        for (c, g) in candidates.iter().zip(&mut gains) {
            if d <= c.known.min(c.max_depth) {
                expected += *g;
                *g *= c.rate;
            }
        }
        let value = objective(expected, seconds(d, extra));
        if value >= best.0 {
            best = (value, d);
        }
    }
    best.1
}

/// A token the target emitted, with its logprob and top alternatives when asked for.
pub type Sampled = (u32, Option<f32>, Vec<TokenLogprob>);

/// What one sequence's verification needs from it.
#[derive(Clone, Copy, Debug)]
pub struct VerifyInput<'a> {
    pub sampling: &'a SamplingParams,
    pub seed: u64,
    /// Prompt then generated tokens; the last one is the step's decode token.
    pub tokens: &'a [u32],
    pub prompt_len: usize,
    pub logprobs: Option<usize>,
}

/// Verifies `proposals` (placed after `input.tokens`) against the target's logits
/// `rows` (`[1 + proposals.len(), vocab]`: row `i` predicts the token after proposal
/// `i - 1`). Returns the emitted tokens: the accepted proposals, then the target's own
/// draw at the first position it disagreed (or after the last proposal). Always at
/// least one token.
pub fn verify(
    input: VerifyInput<'_>,
    rows: &[f32],
    vocab: usize,
    proposals: &[u32],
) -> Vec<Sampled> {
    let mut out = Vec::with_capacity(proposals.len() + 1);
    let (prompt, generated) = input
        .tokens
        .split_at(input.prompt_len.min(input.tokens.len()));
    // The tokens generated so far matter only to penalties: copied (a long generation's
    // are many) only where there are some.
    let penalties = input.sampling.has_penalties();
    let mut output = if penalties {
        generated.to_vec()
    } else {
        Vec::new()
    };
    for i in 0..=proposals.len() {
        let Some(row) = rows.get(i * vocab..(i + 1) * vocab) else {
            break;
        };
        let position = input.tokens.len() + i;
        let mut sampler = hyserve_kernels::sampling::Sampler::at_position(
            input.sampling.clone(),
            input.seed,
            position,
        );
        let id = sampler.sample(row, prompt, &output);
        out.push(with_logprobs(id, row, input.logprobs));
        if proposals.get(i) != Some(&id) {
            break;
        }
        if penalties {
            output.push(id);
        }
    }
    out
}

/// [`verify`] of a greedy sequence with no penalty and no logprobs, from its rows'
/// arg-max tokens alone (`argmax[i]`: row `i`'s): what `verify` emits from the rows.
pub fn verify_argmax(argmax: &[u32], proposals: &[u32]) -> Vec<Sampled> {
    let mut out = Vec::with_capacity(proposals.len() + 1);
    for (i, &id) in argmax.iter().enumerate().take(proposals.len() + 1) {
        out.push((id, None, Vec::new()));
        if proposals.get(i) != Some(&id) {
            break;
        }
    }
    out
}

fn with_logprobs(id: u32, row: &[f32], logprobs: Option<usize>) -> Sampled {
    let Some(n_top) = logprobs else {
        return (id, None, Vec::new());
    };
    let lp = log_softmax(row);
    let chosen = lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
    (id, Some(chosen), top_logprobs(&lp, n_top))
}

/// The `n` most likely tokens, descending, ties by lower id.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    let n = n.min(logprobs.len());
    if n == 0 {
        return Vec::new();
    }
    let by_rank = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logprobs.len() as u32).collect();
    if n < ids.len() {
        // A partial selection first: the vocabulary is large and `n` small.
        ids.select_nth_unstable_by(n - 1, by_rank);
        ids.truncate(n);
    }
    ids.sort_unstable_by(by_rank);
    ids.into_iter()
        .map(|id| TokenLogprob {
            id,
            logprob: logprobs[id as usize],
        })
        .collect()
}

/// Speculation counters for metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecStats {
    /// Steps that verified proposals.
    pub steps: u64,
    /// Tokens proposed and accepted.
    pub proposed_tokens: u64,
    pub accepted_tokens: u64,
    /// Verifications by accepted length (index = accepted proposals).
    pub accepted_length_counts: Vec<u64>,
    /// Estimated time speculation saved (negative: it cost more than it gave):
    /// per step, the extra tokens at the plain step's estimated cost per token, less
    /// the step's measured extra time.
    pub time_saved_seconds: f64,
    /// Speculative steps in which a draft model first caught up on context it had not
    /// read (it was off, or the sequence is new to it).
    pub catch_up_steps: u64,
    /// Steps the guard ran against its verdict (probes of the losing arm).
    pub probe_steps: u64,
    /// Steps the guard allowed to speculate in which prompt lookup's search was
    /// skipped: the planner would have verified nothing whatever it found.
    pub searches_skipped: u64,
    /// Times the guard's measured verdict at a batch size turned over.
    pub verdict_changes: u64,
    /// Of those, turns to plain decoding because speculation's steps, all of them
    /// counted, took longer than plain decoding would have (a veto).
    pub vetoes: u64,
    /// Per batch-size bucket ([`guard_bucket`]: 1, 2-3, 4-7, ... decoding sequences),
    /// the guard's verdict once it has measured both arms there: whether speculation
    /// runs. `None`: not measured yet (the nearest measured bucket's verdict applies).
    pub guard_verdicts: Vec<Option<bool>>,
}

impl SpecStats {
    pub fn observe(&mut self, proposed: usize, accepted: usize) {
        self.proposed_tokens += proposed as u64;
        self.accepted_tokens += accepted as u64;
        if self.accepted_length_counts.len() <= accepted {
            self.accepted_length_counts.resize(accepted + 1, 0);
        }
        self.accepted_length_counts[accepted] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_continues_the_latest_longest_match() {
        let t = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3];
        // "2 3" occurs at 1 and 5; the latest (5) is followed by 7 8 5 2 3.
        assert_eq!(ngram_proposals(&t, 1, 3, 3, 1 << 10), vec![7, 8, 5]);
        // Only "2 3" is matched here; its continuation runs into the end of the text
        // after 5 tokens, and matching again on the text with them appended (the
        // suffix "2 3" again) goes on with "7 8 5".
        assert_eq!(
            ngram_proposals(&t, 2, 2, 8, 1 << 10),
            vec![7, 8, 5, 2, 3, 7, 8, 5]
        );
        // A loop is proposed as deep as asked.
        assert_eq!(
            ngram_proposals(&[4, 6, 4, 6, 4], 1, 3, 5, 64),
            [6, 4, 6, 4, 6]
        );
        // Nothing repeats: no proposal; the window bounds the search.
        assert!(ngram_proposals(&[1, 2, 3, 4], 1, 3, 4, 1 << 10).is_empty());
        assert!(ngram_proposals(&t, 1, 3, 3, 4).is_empty());
        assert!(ngram_proposals(&[], 1, 3, 3, 16).is_empty());
    }

    #[test]
    fn acceptance_tracks_recent_verifications() {
        let a = Acceptance::starting_at(0.9);
        assert!((0.8..0.9).contains(&a.rate()), "{}", a.rate());
        assert_eq!(Acceptance::starting_at(f64::NAN).rate(), 0.5);
        let mut a = Acceptance::default();
        assert_eq!(a.rate(), 0.5);
        for _ in 0..20 {
            a.observe(4, 4);
        }
        assert!(a.rate() > 0.9, "{}", a.rate());
        for _ in 0..20 {
            a.observe(4, 0);
        }
        assert!(a.rate() < 0.25, "{}", a.rate());
    }

    #[test]
    fn cost_buckets_cover_every_size_and_guess_optimistically() {
        let sizes = [1, 16, 17, 24, 25, 32, 33, 48, 49, 64, 65, 96, 97, 128];
        let buckets: Vec<usize> = sizes.iter().map(|&n| bucket_of(n)).collect();
        assert_eq!(
            buckets,
            [1, 16, 17, 17, 18, 18, 19, 19, 20, 20, 21, 21, 22, 22]
        );
        let mut c = CostCurve::default();
        assert_eq!(c.estimate(5), None);
        c.observe(1, 1.0);
        assert_eq!(c.estimate(8), Some(1.0), "unmeasured: as cheap as below");
        c.observe(8, 3.0);
        assert_eq!(c.estimate(8), Some(1.0), "not yet trusted");
        c.observe(8, 3.0);
        c.observe(8, 3.0);
        assert_eq!(c.estimate(8), Some(3.0));
        assert_eq!(c.estimate(200), Some(3.0));
    }

    fn learned(per_step: f64, per_token: f64) -> CostModel {
        let mut m = CostModel::default();
        for n in 1..=64 {
            for _ in 0..TRUSTED_SAMPLES {
                m.target.observe(n, per_step + per_token * n as f64);
            }
        }
        m
    }

    #[test]
    fn depth_follows_acceptance_and_cost() {
        let c = |rate: f64| Candidate {
            rate,
            max_depth: 6,
            known: 6,
        };
        // Memory-bound (a step costs the same whatever its size): speculate deeply
        // where proposals are accepted, less where they are not.
        let flat = learned(1.0, 0.0);
        let d = plan_depths(&[c(0.9), c(0.3)], 2, 64, false, &flat);
        assert_eq!(d, [6, 6], "free tokens are always worth verifying");
        let cheap = learned(1.0, 0.05);
        let d = plan_depths(&[c(0.9), c(0.3)], 2, 64, false, &cheap);
        assert!(d[0] >= 4 && d[1] <= 1, "{d:?}");
        // Compute-bound (no fixed cost per step): every verified token costs a full
        // token's time and gains less than one; speculation is off.
        let compute = learned(0.0, 1.0);
        assert_eq!(plan_depths(&[c(0.9); 4], 4, 64, false, &compute), [0; 4]);
        // A big batch of a mostly fixed-cost step is near compute-bound too.
        let batch = learned(1.0, 0.1);
        let d = plan_depths(&[c(0.5); 32], 32, 64, false, &batch);
        assert_eq!(d.iter().sum::<usize>(), 0, "{d:?}");
        // The budget and each sequence's limit bound the depths.
        let d = plan_depths(
            &[
                Candidate {
                    rate: 0.9,
                    max_depth: 2,
                    known: 2,
                },
                c(0.9),
            ],
            2,
            3,
            false,
            &flat,
        );
        assert_eq!(d.iter().sum::<usize>(), 3);
        assert!(d[0] <= 2);
    }

    #[test]
    fn draft_rounds_are_part_of_the_cost() {
        let c = Candidate {
            rate: 0.8,
            max_depth: 6,
            known: 6,
        };
        let mut m = learned(1.0, 0.0);
        // A draft round as dear as a target step: proposing k tokens costs k steps and
        // gains less than k tokens.
        for _ in 0..TRUSTED_SAMPLES {
            m.draft_round.observe(1, 1.0);
        }
        assert_eq!(plan_depths(&[c], 1, 64, true, &m), [0]);
        // A cheap draft: worth several rounds.
        let mut m = learned(1.0, 0.0);
        for _ in 0..TRUSTED_SAMPLES {
            m.draft_round.observe(1, 0.05);
        }
        assert!(plan_depths(&[c], 1, 64, true, &m)[0] >= 3);
    }

    #[test]
    fn a_uniform_depth_weighs_every_sequence_of_the_step() {
        let c = |rate: f64, known: usize| Candidate {
            rate,
            max_depth: 6,
            known,
        };
        // Memory-bound: as deep as anyone has proposals (fillers ride along for free).
        let flat = learned(1.0, 0.0);
        assert_eq!(
            plan_uniform_depth(&[c(0.9, 2), c(0.3, 4)], 2, 64, false, &flat),
            4
        );
        // Each step token costs: the depth stops where the likely proposals end.
        let dear = learned(1.0, 0.2);
        let d = plan_uniform_depth(&[c(0.9, 6), c(0.9, 6), c(0.2, 6)], 3, 64, false, &dear);
        assert_eq!(d, 3);
        // Compute-bound or nothing known: no speculation.
        let compute = learned(0.0, 1.0);
        assert_eq!(
            plan_uniform_depth(&[c(0.9, 6); 4], 4, 64, false, &compute),
            0
        );
        assert_eq!(plan_uniform_depth(&[c(0.9, 0); 4], 4, 64, false, &flat), 0);
        // The budget holds for the whole step: 4 sequences x 2 = 8 tokens.
        assert_eq!(plan_uniform_depth(&[c(0.9, 6); 4], 4, 9, false, &flat), 2);
        // Fillers: the last proposal, else the last token, up to the depth.
        assert_eq!(fill_proposals(&[1, 2], vec![7], 3), [7, 7, 7]);
        assert_eq!(fill_proposals(&[1, 2], vec![], 2), [2, 2]);
        assert_eq!(fill_proposals(&[1, 2], vec![5, 6, 7], 2), [5, 6, 7]);
    }

    /// The scheduler skips prompt lookup's search where the planner declines even the
    /// best case (every sequence knowing all it could use): sound only if knowing less
    /// never makes a depth worth it. Checked over many batches, rates and costs.
    #[test]
    fn a_uniform_depth_declined_at_best_is_declined_whatever_is_known() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        let (mut declined, mut checked) = (0, 0);
        for _ in 0..2_000 {
            let cost = learned(next(100) as f64 / 100.0, next(100) as f64 / 400.0);
            let n = 1 + next(32) as usize;
            let best: Vec<Candidate> = (0..n)
                .map(|_| {
                    let max_depth = 1 + next(8) as usize;
                    Candidate {
                        rate: next(101) as f64 / 100.0,
                        max_depth,
                        known: max_depth,
                    }
                })
                .collect();
            let budget = n + next(8 * n as u64) as usize;
            let found = |known: &mut dyn FnMut(usize) -> usize| -> Vec<Candidate> {
                best.iter()
                    .map(|c| Candidate {
                        known: known(c.known),
                        ..*c
                    })
                    .collect()
            };
            if plan_uniform_depth(&best, n, budget, false, &cost) > 0 {
                // A declined step with less known would contradict nothing here; the
                // best case speculating is the case the search is run for.
                continue;
            }
            declined += 1;
            for _ in 0..4 {
                let less = found(&mut |k| next(k as u64 + 1) as usize);
                assert_eq!(plan_uniform_depth(&less, n, budget, false, &cost), 0);
                checked += 1;
            }
            let none = found(&mut |_| 0);
            assert_eq!(plan_uniform_depth(&none, n, budget, false, &cost), 0);
        }
        assert!(declined > 100 && checked > 400, "{declined} declined");
    }

    /// Runs `steps` steps of `n` sequences through the guard, each costing its arm's
    /// (tokens, seconds); how many speculated.
    fn simulate(
        g: &mut Guard,
        n: usize,
        steps: usize,
        plain: (usize, f64),
        spec: (usize, f64),
    ) -> usize {
        (0..steps)
            .filter(|_| {
                let on = g.allow(n);
                let (tokens, seconds) = if on { spec } else { plain };
                g.observe(n, on, tokens, seconds, false);
                on
            })
            .count()
    }

    /// Runs steps of `n` sequences through the guard, each costing its arm's (tokens,
    /// seconds), until it has a verdict there; how many speculated.
    fn first_verdict(g: &mut Guard, n: usize, plain: (usize, f64), spec: (usize, f64)) -> usize {
        let mut on = 0;
        for _ in 0..10_000 {
            if g.verdict(guard_bucket(n)).is_some() {
                return on;
            }
            on += simulate(g, n, 1, plain, spec);
        }
        panic!("no verdict at {n} sequences after 10000 steps");
    }

    /// Runs `steps` steps of `n` sequences through the guard, `cost(step, speculating)`
    /// giving each its (tokens, seconds); the speculative steps, and the verdict
    /// changes made on plain steps.
    fn run_host(
        g: &mut Guard,
        n: usize,
        steps: usize,
        mut cost: impl FnMut(usize, bool) -> (usize, f64),
    ) -> (usize, usize) {
        let (mut spec_steps, mut on_plain_steps) = (0, 0);
        for i in 0..steps {
            let on = g.allow(n);
            let (tokens, seconds) = cost(i, on);
            let before = g.verdict_changes();
            g.observe(n, on, tokens, seconds, false);
            on_plain_steps += usize::from(!on && g.verdict_changes() > before);
            spec_steps += usize::from(on);
        }
        (spec_steps, on_plain_steps)
    }

    #[test]
    fn the_guard_keeps_the_faster_arm_and_probes_the_other() {
        let mut g = Guard::default();
        // At 8 sequences speculation emits twice the tokens in 1.5 times the time. With
        // nothing measured, plain decoding is measured first, then speculation, then
        // plain decoding again until its window holds none of the steps from before
        // speculation's (a full window: GUARD_WINDOW steps of a second).
        let n = GUARD_MIN_SAMPLES as usize;
        let first: Vec<bool> = (0..2 * n + GUARD_WINDOW)
            .map(|_| simulate(&mut g, 8, 1, (8, 1.0), (16, 1.5)) == 1)
            .collect();
        assert_eq!(
            first,
            [vec![false; n], vec![true; n], vec![false; GUARD_WINDOW]].concat()
        );
        assert_eq!(g.verdict(guard_bucket(8)), Some(true));
        // Then on, but for 8-step probes of plain decoding, 128 steps apart at first,
        // then rarer.
        let on = simulate(&mut g, 8, 1280, (8, 1.0), (16, 1.5));
        assert!((1280 - 32..=1280 - 16).contains(&on), "{on}");
        // At 32 speculation is slower (40 tokens in twice the time): the load starts
        // from the verdict at 8, measures plain decoding in probes, and turns it off.
        let early = simulate(&mut g, 32, 512, (32, 1.0), (40, 2.0));
        assert_eq!(g.verdict(guard_bucket(32)), Some(false), "{early}");
        let later = simulate(&mut g, 32, 1280, (32, 1.0), (40, 2.0));
        assert!((8..=32).contains(&later), "{later}");
        // Once speculation gets faster there (80 tokens), probes find out (their
        // interval has grown to 4096 steps while plain decoding kept winning).
        let on = simulate(&mut g, 32, 16384, (32, 1.0), (80, 2.0));
        assert!(on >= 16384 - 2 * 4096, "{on}");
        assert_eq!(g.verdict(guard_bucket(32)), Some(true));
    }

    #[test]
    fn a_draining_batch_does_not_make_the_arms_take_turns() {
        // Waves of 7 sequences finishing one by one down to 4 (one guard bucket), each
        // load for 10 steps; a step costs 1 s at any load (launch-bound). Speculation
        // is 5% slower per sequence. Whichever arm ran last ran on the smaller load, so
        // by tokens per second it would look slower, and the arms would take turns.
        let mut g = Guard::default();
        let mut spec_steps = 0;
        let mut steps = 0;
        for _wave in 0..60 {
            for n in (4..=7).rev() {
                for _ in 0..10 {
                    let on = g.allow(n);
                    let seconds = if on { 1.05 } else { 1.0 };
                    g.observe(n, on, n, seconds, false);
                    spec_steps += usize::from(on);
                    steps += 1;
                }
            }
        }
        assert_eq!(g.verdict(guard_bucket(7)), Some(false));
        // The first measurement of speculation, then probes.
        assert!(spec_steps <= steps / 20, "{spec_steps} of {steps}");
        assert!(g.verdict_changes() <= 2, "{}", g.verdict_changes());
    }

    #[test]
    fn an_old_measurement_of_speculation_does_not_make_the_verdict_flicker() {
        // Plain decoding was measured first, then speculation, once, at 1 token a
        // second; plain decoding's rate then wanders between 1/1.03 and 1/1.01
        // (speculation 3% and 1% faster).
        let mut g = Guard::default();
        for _ in 0..GUARD_WINDOW {
            g.observe(1, false, 1, 1.01, false);
        }
        for _ in 0..GUARD_WINDOW {
            g.observe(1, true, 1, 1.0, false);
        }
        for block in 0..40 {
            let seconds = if block % 2 == 0 { 1.01 } else { 1.03 };
            for _ in 0..GUARD_WINDOW {
                g.observe(1, false, 1, seconds, false);
            }
        }
        // Plain decoding won first (speculation was not 2% faster), and the wander
        // does not win speculation back.
        assert_eq!(g.verdict(0), Some(false));
        assert_eq!(g.verdict_changes(), 0);
        // A real gain does: plain decoding slows to 1/1.1, and once speculation is
        // measured again (a probe's step), it wins.
        for _ in 0..GUARD_WINDOW {
            g.observe(1, false, 1, 1.1, false);
        }
        assert_eq!(
            g.verdict(0),
            Some(false),
            "not on plain decoding's steps alone"
        );
        g.observe(1, true, 1, 1.0, false);
        assert_eq!(g.verdict(0), Some(true));
        assert_eq!(g.verdict_changes(), 1);
        // And speculation that falls 1% short of its margin over plain decoding is
        // turned off again.
        for _ in 0..GUARD_WINDOW {
            g.observe(1, false, 1, 0.99 * GUARD_MARGIN, false);
        }
        assert_eq!(g.verdict(0), Some(false));
    }

    #[test]
    fn plain_decodings_wander_does_not_turn_speculation_on_between_probes() {
        // 32 sequences, 10 ms a step: both arms equally fast, but one step in 17 takes
        // 2.9 times as long (host jitter, just short of a stall), so a window of 16
        // steps holds one or none and a rate wanders by 12%, more than
        // GUARD_SWITCH_ON. Judged whenever plain decoding's rate moved, speculation's
        // old rate won the verdict each time plain decoding's window held the slow
        // step and its own did not (193 changes here; on an H100, 43 in five
        // repetitions of 384 requests that had opted out of speculation). Judged when
        // speculation is measured too, it changes at most at probes.
        let mut g = Guard::default();
        let (spec_steps, on_plain_steps) = run_host(&mut g, 32, 20_000, |i, _| {
            (32, if i % 17 == 0 { 29e-3 } else { 10e-3 })
        });
        assert!(g.verdict(guard_bucket(32)).is_some());
        assert!(
            on_plain_steps == 0 && g.verdict_changes() <= 8,
            "{} verdict changes, {on_plain_steps} of them on plain steps \
             ({spec_steps} speculative steps)",
            g.verdict_changes()
        );
    }

    #[test]
    fn a_first_verdict_does_not_weigh_warm_up_steps_against_steady_ones() {
        // A fresh engine at 32 sequences: its first 20 steps run shapes it has not
        // recorded yet (4.4 ms a plain step, not flagged as warm-ups), then a plain
        // step takes 1.4 ms (714 tokens per sequence-second); a speculative step
        // takes 2 ms for 40 tokens (625). Speculation is measured second, on steady
        // steps: against plain decoding's first window (227) it would win the first
        // verdict and keep it until plain decoding's probes had replaced that window
        // (here 426 speculative steps, then 1 change; the veto's par is that same
        // window). Judged once plain decoding's window is of the same moment, it never
        // wins: its first measurement and 4 probes.
        let mut g = Guard::default();
        let (spec_steps, _) = run_host(&mut g, 32, 4000, |i, on| match (on, i < 20) {
            (true, _) => (40, 2e-3),
            (false, true) => (32, 4.4e-3),
            (false, false) => (32, 1.4e-3),
        });
        assert_eq!(g.verdict(guard_bucket(32)), Some(false));
        assert_eq!(g.verdict_changes(), 0);
        assert!(spec_steps <= 48, "{spec_steps} speculative steps");
    }

    #[test]
    fn speculation_whose_steps_do_not_keep_up_loses_its_verdict() {
        let mut g = Guard::default();
        // Plain decoding: a token a second; speculation's measured steps: two.
        first_verdict(&mut g, 1, (1, 1.0), (2, 1.0));
        assert_eq!(g.verdict(0), Some(true));
        // Then each speculative step records a new shape and takes 4 s for its two
        // tokens: its rate leaves them out (up to GUARD_MAX_SKIPPED), so by its rate
        // speculation still wins; a block of them, all counted, loses its verdict.
        let mut steps = 0;
        while g.verdict(0) == Some(true) && steps < 2 * GUARD_WINDOW {
            g.observe(1, true, 2, 4.0, true);
            steps += 1;
        }
        assert_eq!(g.verdict(0), Some(false), "after {steps} steps");
        assert_eq!(steps, GUARD_WINDOW);
        assert_eq!(g.vetoes(), 1);
        // Its rate is forgotten: plain decoding's steps do not hand the verdict back
        // on the old one...
        for _ in 0..GUARD_WINDOW {
            g.observe(1, false, 1, 1.0, false);
        }
        assert_eq!(g.verdict(0), Some(false));
        // ...and probes that measure it afresh can: its steps are fast again.
        for _ in 0..GUARD_MIN_SAMPLES {
            g.observe(1, true, 2, 1.0, false);
        }
        assert_eq!(g.verdict(0), Some(true));
        // A block of steps that keeps up (warm-ups as fast as the rest) is no veto.
        for _ in 0..4 * GUARD_WINDOW {
            g.observe(1, true, 2, 1.0, true);
        }
        assert_eq!(g.verdict(0), Some(true));
        assert_eq!(g.vetoes(), 1);
    }

    #[test]
    fn expensive_probes_wait_until_they_are_paid_for() {
        let mut g = Guard::default();
        // Speculation loses at one sequence.
        first_verdict(&mut g, 1, (1, 1.0), (1, 2.0));
        assert_eq!(g.verdict(0), Some(false));
        // Its probes start with a catch-up as long as 40 plain steps: they come about
        // every 4000 steps, not every few hundred, so that they cost about 1% of the
        // time.
        let mut losing = 0.0;
        let mut total = 0.0;
        let mut probes = 0;
        let mut last = false;
        for _ in 0..20_000 {
            let on = g.allow(1);
            let seconds = match (on, last) {
                (true, false) => 40.0,
                (true, true) => 2.0,
                (false, _) => 1.0,
            };
            probes += usize::from(on && !last);
            last = on;
            g.observe(1, on, 1, seconds, false);
            total += seconds;
            if on {
                losing += seconds;
            }
        }
        assert!(
            losing / total <= 2.0 * GUARD_PROBE_SHARE,
            "{}",
            losing / total
        );
        assert!((3..=8).contains(&probes), "{probes}");
    }

    #[test]
    fn speculation_pays_for_what_its_rate_leaves_out_before_it_is_probed_again() {
        // Plain decoding takes 1 s a token; speculation 1.1 s, but its probes are
        // lucky (0.7 s), enough to win it the verdict; the step after a probe then
        // catches the draft up (40 s, a warm-up, so left out of its rate), and the
        // steps after that lose until the verdict turns back. Counting only the probes'
        // own steps, the next probe would come 128 steps later and the cycle repeat
        // (a quarter of the time lost); charging every speculative step makes the next
        // probe wait until the catch-up is paid for.
        let mut g = Guard::default();
        first_verdict(&mut g, 1, (1, 1.0), (1, 1.1));
        assert_eq!(g.verdict(0), Some(false));
        let (mut total, mut tokens, mut stretch, mut flips) = (0.0, 0.0, 0, 0);
        for _ in 0..50_000 {
            let on = g.allow(1);
            stretch = if on { stretch + 1 } else { 0 };
            let (seconds, warming) = match stretch {
                0 => (1.0, false),
                1..=8 => (0.7, false),
                9 => (40.0, true),
                _ => (1.1, false),
            };
            let before = g.verdict(0);
            g.observe(1, on, 1, seconds, warming);
            flips += usize::from(before == Some(false) && g.verdict(0) == Some(true));
            total += seconds;
            tokens += 1.0;
        }
        assert!(flips >= 1, "the lucky probes never won the verdict");
        assert!(
            total / tokens <= 1.0 + 3.0 * GUARD_PROBE_SHARE,
            "{} s a token against plain decoding's 1.0 ({flips} turns to speculation)",
            total / tokens
        );
    }

    #[test]
    fn stretches_of_slow_steps_do_not_make_the_verdict_flicker() {
        // A GPU-like host: plain steps take 0.5 ms, speculative ones 1 ms for two
        // tokens (equal rates), and every step is three times slower in the first
        // 10 ms of every 40 (host jitter). Windows of 16 steps (8 ms) see either a slow
        // stretch or a fast one and the verdict follows the luck of the arm measured
        // last (58 changes); windows of 100 ms see about the same mix for both.
        let mut g = Guard::default();
        let mut clock = 0.0f64;
        let (spec_steps, _) = run_host(&mut g, 1, 40_000, |_, on| {
            let slow = (clock % 0.040) < 0.010;
            let (tokens, base) = if on { (2, 0.001) } else { (1, 0.0005) };
            let seconds = if slow { 3.0 * base } else { base };
            clock += seconds;
            (tokens, seconds)
        });
        assert!(
            g.verdict_changes() <= 4,
            "{} verdict changes ({spec_steps} speculative steps)",
            g.verdict_changes()
        );
    }

    #[test]
    fn the_guard_compares_throughput_not_the_typical_step() {
        let mut g = Guard::default();
        for _ in 0..GUARD_MIN_SAMPLES {
            g.observe(1, false, 1, 1.0, false);
        }
        // Most speculative steps have their proposal rejected (1 token in 1.2 s), one
        // in three accepts 6 (7 tokens): 9 tokens in 3.6 s beat plain's 3 in 3 s,
        // although the median step is slower.
        for i in 0..GUARD_WINDOW {
            let emitted = if i % 3 == 0 { 7 } else { 1 };
            g.observe(1, true, emitted, 1.2, false);
        }
        let (plain, spec) = g.rates(1).unwrap();
        assert_eq!(plain, 1.0);
        assert!(spec > 2.0, "{spec}");
        // Judged once plain decoding's window is of the same moment.
        for _ in 0..GUARD_WINDOW {
            g.observe(1, false, 1, 1.0, false);
        }
        assert!(g.prefers_speculation(1));
        // A step that stalled (ten times the others) is left out.
        g.observe(1, false, 1, 10.0, false);
        assert_eq!(g.rates(1).unwrap().0, 1.0);
    }

    #[test]
    fn an_unmeasured_load_takes_the_nearest_measured_verdict() {
        let mut g = Guard::default();
        let measure = |g: &mut Guard, n: usize, plain: f64, spec: f64| {
            first_verdict(g, n, (n, n as f64 / plain), (n, n as f64 / spec));
        };
        assert!(!g.prefers_speculation(8), "nothing is known");
        measure(&mut g, 8, 1.0, 2.0);
        assert!(g.prefers_speculation(8) && g.prefers_speculation(12));
        assert!(g.prefers_speculation(1) && g.prefers_speculation(64));
        measure(&mut g, 32, 2.0, 1.0);
        assert!(!g.prefers_speculation(40) && !g.prefers_speculation(200));
        // Between the two, the smaller load decides.
        assert!(g.prefers_speculation(20));
    }

    #[test]
    fn a_new_load_starts_from_the_nearest_verdict_and_probes() {
        let mut g = Guard::default();
        // Speculation loses at one sequence.
        first_verdict(&mut g, 1, (1, 1.0), (1, 2.0));
        // At 8 it starts off, and only probes try it (there speculation wins: 3 tokens
        // a step for 1): none in the first 127 steps, then enough within 600 that it is
        // measured there and turned on.
        let first: Vec<bool> = (0..600)
            .map(|_| simulate(&mut g, 8, 1, (8, 1.0), (24, 1.0)) == 1)
            .collect();
        assert!(!first[..127].contains(&true));
        assert_eq!(g.verdict(guard_bucket(8)), Some(true));
        // Measured now: it stays on but for probes of plain decoding.
        let on = simulate(&mut g, 8, 1024, (8, 1.0), (24, 1.0));
        assert!(on >= 1024 - 4 * GUARD_PROBE_STEPS as usize, "{on}");
        assert!(g.prefers_speculation(8) && !g.prefers_speculation(1));
    }

    #[test]
    fn probes_that_measure_nothing_at_a_new_load_back_off() {
        // At 16-31 sequences the probes' steps are never measured: in the first
        // engine each is a warm-up (a new shape: left out), in the second the planner
        // turns it into a plain step. They cost no more than plain decoding's, so
        // only the back-off limits them.
        for planned_plain in [false, true] {
            let mut g = Guard::default();
            first_verdict(&mut g, 32, (32, 1.0), (32, 2.0));
            let mut allowed = 0;
            for _ in 0..8192 {
                let on = g.allow(20);
                allowed += usize::from(on);
                let speculated = on && !planned_plain;
                let (tokens, seconds) = if speculated { (30, 1.5) } else { (20, 1.0) };
                g.observe(20, speculated, tokens, seconds, speculated);
            }
            assert_eq!(g.verdict(guard_bucket(20)), None, "measured after all");
            let verdicts = g.verdicts();
            assert_eq!(verdicts[guard_bucket(32)], Some(false));
            assert_eq!(verdicts[guard_bucket(20)], None);
            // Probes 128, 256, ..., 4096 steps apart: 6 in 8192 steps (every 128: 60).
            assert_eq!(allowed, 6 * GUARD_PROBE_STEPS as usize, "{planned_plain}");
        }
    }

    #[test]
    fn a_workload_that_changes_under_speculation_has_plain_decoding_measured_afresh() {
        // The first workload (edits): speculation emits 1.5 tokens a sequence in 1.1 s
        // where plain decoding's step takes 1 s. It wins, and its probes back off.
        let edits = |on: bool| if on { (48, 1.1) } else { (32, 1.0) };
        // Then free text: plain steps are faster (0.7 s) and speculation yields 1.16
        // tokens a sequence in 1 s, so plain decoding is 24% faster. Its rate, though,
        // is still the edits' (1 token a sequence-second against speculation's 1.16),
        // and so is the veto's par.
        let free = |on: bool| if on { (37, 1.0) } else { (32, 0.7) };
        for knows_the_yield in [true, false] {
            let mut g = Guard::default();
            run_host(&mut g, 32, 10_000, |_, on| edits(on));
            assert!(g.prefers_speculation(32));
            if !knows_the_yield {
                // Without speculation's yield from before the change (as before
                // GUARD_YIELD_DROP), only the next probe would tell.
                g.probing[guard_bucket(32)].yield_then = 0.0;
            }
            let (spec_steps, _) = run_host(&mut g, 32, 2000, |_, on| free(on));
            if knows_the_yield {
                assert!(!g.prefers_speculation(32), "still speculating");
                assert!(spec_steps <= 32, "{spec_steps} speculative steps");
            } else {
                assert_eq!(spec_steps, 2000);
            }
        }
    }

    #[test]
    fn a_yield_that_wanders_step_to_step_does_not_have_plain_decoding_measured_again() {
        // Speculation's steps emit 32-64 tokens (1.5 a sequence on average), each
        // step's acceptance its own: the window's yield wanders, the workload does not.
        let mut state = 12345u64;
        let mut wander = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            32 + (state >> 33) as usize % 33
        };
        let mut g = Guard::default();
        let (spec_steps, _) = run_host(&mut g, 32, 20_000, |_, on| {
            if on { (wander(), 1.1) } else { (32, 1.0) }
        });
        let mut steady = Guard::default();
        run_host(&mut steady, 32, 20_000, |_, on| {
            if on { (48, 1.1) } else { (32, 1.0) }
        });
        assert!(spec_steps > 19_000, "{spec_steps}");
        assert!(
            g.probe_steps() <= steady.probe_steps() + u64::from(GUARD_MIN_SAMPLES),
            "{} probe steps against {}",
            g.probe_steps(),
            steady.probe_steps()
        );
    }

    #[test]
    fn the_guard_leaves_warm_ups_out_until_they_are_the_norm() {
        let mut g = Guard::default();
        for _ in 0..GUARD_MIN_SAMPLES {
            g.observe(1, false, 1, 1.0, false);
        }
        // Speculation's first steps record their shapes, ten times slower: left out.
        for _ in 0..GUARD_MIN_SAMPLES {
            g.observe(1, true, 3, 10.0, true);
        }
        assert_eq!(g.rates(1), Some((1.0, 0.0)), "nothing measured yet");
        assert!(!g.prefers_speculation(1));
        for _ in 0..GUARD_MIN_SAMPLES {
            g.observe(1, true, 3, 1.0, false);
        }
        assert_eq!(g.rates(1), Some((1.0, 3.0)));
        // Judged once plain decoding's window is of the same moment.
        for _ in 0..GUARD_WINDOW {
            g.observe(1, false, 1, 1.0, false);
        }
        assert!(g.prefers_speculation(1));
        // A backend that never stops warming up is judged by its warm-ups.
        for _ in 0..GUARD_MAX_SKIPPED + GUARD_WINDOW as u32 {
            g.observe(1, true, 3, 10.0, true);
        }
        assert_eq!(g.rates(1), Some((1.0, 0.3)));
        assert!(!g.prefers_speculation(1));
    }

    fn input<'a>(sampling: &'a SamplingParams, tokens: &'a [u32]) -> VerifyInput<'a> {
        VerifyInput {
            sampling,
            seed: 7,
            tokens,
            prompt_len: 1,
            logprobs: None,
        }
    }

    fn rows(best: &[u32], vocab: usize) -> Vec<f32> {
        best.iter()
            .flat_map(|&b| (0..vocab).map(move |i| if i == b as usize { 5.0 } else { 0.0 }))
            .collect()
    }

    #[test]
    fn greedy_verification_keeps_the_agreeing_prefix_then_the_targets_token() {
        let g = SamplingParams::greedy();
        let t = [3, 4];
        let ids = |v: Vec<Sampled>| v.into_iter().map(|s| s.0).collect::<Vec<_>>();
        // The target's argmaxes: 5, 6, 2, 1 after each row.
        let r = rows(&[5, 6, 2, 1], 8);
        assert_eq!(ids(verify(input(&g, &t), &r, 8, &[5, 6, 7])), [5, 6, 2]);
        assert_eq!(ids(verify(input(&g, &t), &r, 8, &[5, 6, 2])), [5, 6, 2, 1]);
        assert_eq!(ids(verify(input(&g, &t), &r, 8, &[0, 6, 2])), [5]);
        assert_eq!(ids(verify(input(&g, &t), &r[..8], 8, &[])), [5]);
    }

    #[test]
    fn greedy_verification_from_arg_max_tokens_emits_what_the_rows_would() {
        let g = SamplingParams::greedy();
        let t = [3, 4];
        let best = [5, 6, 2, 1];
        let r = rows(&best, 8);
        for proposals in [&[5, 6, 7][..], &[5, 6, 2], &[0, 6, 2], &[5], &[]] {
            let n = proposals.len() + 1;
            assert_eq!(
                verify_argmax(&best[..n], proposals),
                verify(input(&g, &t), &r[..n * 8], 8, proposals),
                "{proposals:?}"
            );
        }
    }

    #[test]
    fn sampled_verification_draws_what_plain_sampling_draws() {
        let p = SamplingParams {
            temperature: 1.0,
            repetition_penalty: 1.3,
            ..SamplingParams::greedy()
        };
        let vocab = 8;
        let row: Vec<f32> = (0..vocab).map(|i| (i % 3) as f32 * 0.7).collect();
        let rows: Vec<f32> = row.iter().cycle().take(4 * vocab).copied().collect();
        for seed in 0..200u64 {
            let tokens = [1, 2];
            let inp = VerifyInput {
                seed,
                ..input(&p, &tokens)
            };
            // Plain decoding's three tokens, one at a time.
            let mut plain = tokens.to_vec();
            for _ in 0..3 {
                let mut s =
                    hyserve_kernels::sampling::Sampler::at_position(p.clone(), seed, plain.len());
                let id = s.sample(&row, &plain[..1], &plain[1..]);
                plain.push(id);
            }
            // Proposing plain decoding's own tokens accepts all of them.
            let got: Vec<u32> = verify(inp, &rows, vocab, &plain[2..5])
                .iter()
                .map(|s| s.0)
                .collect();
            assert_eq!(got[..3], plain[2..5], "seed {seed}");
        }
    }
}
