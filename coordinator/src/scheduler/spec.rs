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
        }
    }

    pub fn enabled(&self) -> bool {
        self.proposer != ProposerKind::Off && self.max_depth > 0
    }
}

/// The tokens that followed the most recent earlier occurrence of `tokens`' last `n`
/// tokens, for the longest `n` in `max_n..=min_n` that occurs, at most `depth` of them,
/// looking back at most `window` tokens.
pub fn ngram_proposals(
    tokens: &[u32],
    min_n: usize,
    max_n: usize,
    depth: usize,
    window: usize,
) -> Vec<u32> {
    let len = tokens.len();
    let lo = len.saturating_sub(window);
    for n in (min_n.max(1)..=max_n).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest start first; the match must end before the suffix itself begins.
        for start in (lo..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                let to = (from + depth).min(len);
                return tokens[from..to].to_vec();
            }
        }
    }
    Vec::new()
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

impl Acceptance {
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

/// Observations an arm of the [`Guard`] needs before it is compared: enough that the
/// median is past a batch size's first steps, which are slow while their CUDA graphs
/// are recorded (a shape is recorded on its third step).
const GUARD_MIN_SAMPLES: u32 = 12;
/// Every so many steps of a batch size, the guard runs the arm that is losing for
/// [`GUARD_PROBE_STEPS`] steps (several: a draft model that fell behind while off needs a
/// step to catch up before its steps are steady), so a changed workload can change its
/// mind. The interval starts at the first and doubles, up to the second, each time a
/// probe confirms the winner (a probe of a losing draft costs its catch-up).
const GUARD_PROBE_EVERY: (u64, u64) = (128, 4096);
const GUARD_PROBE_STEPS: u32 = 8;
/// Speculation must be this much faster to be kept: a coin flip between equals costs
/// the exploration of both.
const GUARD_MARGIN: f64 = 1.02;

/// The guard's batch-size buckets: powers of two (1, 2-3, 4-7, 8-15, ...), coarse so
/// that each is learned from many steps.
fn guard_bucket(n_decode: usize) -> usize {
    n_decode.max(1).ilog2() as usize
}

/// Recent observations an arm keeps; its rate is their median, so one step that
/// stalls (a page fault, a graph being recorded) does not decide anything.
const GUARD_WINDOW: usize = 16;

#[derive(Clone, Debug, Default, PartialEq)]
struct Rate {
    /// Tokens per second of the last [`GUARD_WINDOW`] steps, oldest overwritten first.
    recent: Vec<f64>,
    next: usize,
    samples: u32,
}

impl Rate {
    fn observe(&mut self, x: f64) {
        if self.recent.len() < GUARD_WINDOW {
            self.recent.push(x);
        } else {
            self.recent[self.next] = x;
        }
        self.next = (self.next + 1) % GUARD_WINDOW;
        self.samples = self.samples.saturating_add(1);
    }

    fn tokens_per_second(&self) -> f64 {
        let mut v = self.recent.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
}

/// The last word on whether a step speculates: per number of decoding sequences (in
/// powers of two), the tokens per second of whole steps (planning, forward pass,
/// verification) measured with speculation and without, and the faster one wins. The cost model plans depths from
/// estimates; the guard checks the result on the clock, so speculation that does not
/// pay on this machine at this batch size (a verification step that misses a recorded
/// CUDA graph, proposals that are rarely accepted) is switched off there.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Guard {
    /// `[plain, speculative]` per batch-size bucket.
    arms: Vec<[Rate; 2]>,
    /// Per bucket: the probe in progress or the next one.
    probing: Vec<Probe>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Probe {
    /// Steps of the probe in progress left.
    left: u32,
    until_next: u64,
    every: u64,
    /// Whether speculation was winning when the probe began.
    winner: bool,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            left: 0,
            until_next: GUARD_PROBE_EVERY.0,
            every: GUARD_PROBE_EVERY.0,
            winner: false,
        }
    }
}

impl Guard {
    fn bucket(&mut self, n_decode: usize) -> usize {
        let b = guard_bucket(n_decode);
        if self.arms.len() <= b {
            self.arms.resize(b + 1, Default::default());
            self.probing.resize(b + 1, Probe::default());
        }
        b
    }

    /// Whether a step with `n_decode` decoding sequences may speculate.
    pub fn allow(&mut self, n_decode: usize) -> bool {
        let b = self.bucket(n_decode);
        let [plain, spec] = &self.arms[b];
        if plain.samples < GUARD_MIN_SAMPLES {
            return false;
        }
        if spec.samples < GUARD_MIN_SAMPLES {
            return true;
        }
        let spec_wins = spec.tokens_per_second() >= GUARD_MARGIN * plain.tokens_per_second();
        let p = &mut self.probing[b];
        if p.left > 0 {
            p.left -= 1;
            if p.left == 0 {
                // The probe is over: the same winner as before backs the next one off.
                p.every = if spec_wins == p.winner {
                    (p.every * 2).min(GUARD_PROBE_EVERY.1)
                } else {
                    GUARD_PROBE_EVERY.0
                };
                p.until_next = p.every;
            }
            return !p.winner;
        }
        p.until_next = p.until_next.saturating_sub(1);
        if p.until_next == 0 {
            *p = Probe {
                left: GUARD_PROBE_STEPS - 1,
                winner: spec_wins,
                ..*p
            };
            return !spec_wins;
        }
        spec_wins
    }

    /// A step of only decoding sequences emitted `emitted` tokens in `seconds`.
    pub fn observe(&mut self, n_decode: usize, speculated: bool, emitted: usize, seconds: f64) {
        if seconds <= 0.0 || !seconds.is_finite() {
            return;
        }
        let b = self.bucket(n_decode);
        self.arms[b][usize::from(speculated)].observe(emitted as f64 / seconds);
    }

    /// Whether speculation is expected to pay at `n_decode` sequences: not yet known, or
    /// measured faster. (A draft model reads prompts along only where it will be used.)
    pub fn prefers_speculation(&self, n_decode: usize) -> bool {
        match self.arms.get(guard_bucket(n_decode)) {
            Some([plain, spec])
                if plain.samples >= GUARD_MIN_SAMPLES && spec.samples >= GUARD_MIN_SAMPLES =>
            {
                spec.tokens_per_second() >= GUARD_MARGIN * plain.tokens_per_second()
            }
            _ => true,
        }
    }

    /// Measured tokens per second (plain, speculative) at `n_decode` sequences.
    pub fn rates(&self, n_decode: usize) -> Option<(f64, f64)> {
        self.arms
            .get(guard_bucket(n_decode))
            .map(|[p, s]| (p.tokens_per_second(), s.tokens_per_second()))
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
    let mut output = generated.to_vec();
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
        output.push(id);
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
    /// Tokens proposed and accepted.
    pub proposed_tokens: u64,
    pub accepted_tokens: u64,
    /// Verifications by accepted length (index = accepted proposals).
    pub accepted_length_counts: Vec<u64>,
    /// Estimated time speculation saved (negative: it cost more than it gave):
    /// per step, the extra tokens at the plain step's estimated cost per token, less
    /// the step's measured extra time.
    pub time_saved_seconds: f64,
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
        // A longer suffix wins over a later shorter one: "5 2 3" never occurred
        // before, "2 3" did.
        assert_eq!(ngram_proposals(&t, 2, 2, 8, 1 << 10), vec![7, 8, 5, 2, 3]);
        // Nothing repeats: no proposal; the window bounds the search.
        assert!(ngram_proposals(&[1, 2, 3, 4], 1, 3, 4, 1 << 10).is_empty());
        assert!(ngram_proposals(&t, 1, 3, 3, 4).is_empty());
        assert!(ngram_proposals(&[], 1, 3, 3, 16).is_empty());
    }

    #[test]
    fn acceptance_tracks_recent_verifications() {
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
        let c = |rate: f64| Candidate { rate, max_depth: 6 };
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
    fn the_guard_keeps_the_faster_arm_and_probes_the_other() {
        let mut g = Guard::default();
        // Plain is measured first, then speculation.
        let n = GUARD_MIN_SAMPLES as usize;
        let mut first = Vec::new();
        for _ in 0..2 * n {
            let on = g.allow(8);
            first.push(on);
            // Speculation emits twice the tokens in 1.5 times the time.
            if on {
                g.observe(8, true, 16, 1.5);
            } else {
                g.observe(8, false, 8, 1.0);
            }
        }
        assert_eq!(first, [vec![false; n], vec![true; n]].concat());
        // On but for 8-step probes, 128 steps apart at first, then ever rarer.
        let off = (0..1280).filter(|_| !g.allow(8)).count();
        assert!((16..=32).contains(&off), "{off}");
        // Where speculation is slower, it is off but for the probes.
        for _ in 0..n {
            g.observe(32, false, 32, 1.0);
            g.observe(32, true, 40, 2.0);
        }
        let on = (0..1280).filter(|_| g.allow(32)).count();
        assert!((16..=32).contains(&on), "{on}");
        // Once the other arm is measured faster, the next probe switches over.
        for _ in 0..GUARD_WINDOW {
            g.observe(32, true, 80, 2.0);
        }
        let on = (0..2048).filter(|_| g.allow(32)).count();
        assert!(on >= 2048 - 1024 - 32, "{on}");
        assert_eq!(g.rates(32).map(|r| r.0), Some(32.0));
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
