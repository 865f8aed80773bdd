//! Token sampling on the host: greedy, temperature, top-k, top-p, min-p and the
//! repetition / presence / frequency penalties, with a per-request seeded RNG.
//!
//! Order of operations (as the common OpenAI-compatible servers apply them):
//! penalties, temperature, top-k, top-p, min-p, then a draw. Temperature 0 is greedy
//! (argmax, ties to the lowest id) and ignores the filters.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Per-request sampling parameters. Validation of ranges happens at the API edge.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables; applied to tokens of prompt and output (divides positive logits).
    pub repetition_penalty: f32,
    /// Subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }

    /// Whether any penalty changes the logits (otherwise they are read as they are).
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether a sampled draw is cut to candidates (top-k, top-p, min-p): sorted, where
    /// an untruncated draw walks the row in id order.
    pub fn truncates(&self) -> bool {
        self.top_k > 0 || self.top_p < 1.0 || self.min_p > 0.0
    }
}

/// Index of the largest value (lowest index on ties). `NaN`s never win (all `NaN`:
/// the last index).
///
/// Two passes that compilers turn into vector code: the maximum in lanes, then the first
/// block of lanes holding it, and its index there; with AVX2 where the CPU has it. A
/// compare-and-branch loop took ~3 ns a value: 0.4 ms for one of Hunyuan-Large's
/// 129K-entry rows, per sequence per step; so did the second pass as a plain scan (~1 ns
/// a value: 0.13 ms of a batch-32 step's 0.23 ms in the scheduler with a 4352-entry
/// vocabulary, `coordinator/examples/step_overhead.rs`).
pub fn argmax(xs: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { argmax_avx2(xs) };
    }
    argmax_lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn argmax_avx2(xs: &[f32]) -> usize {
    argmax_lanes(xs)
}

#[inline(always)]
fn argmax_lanes(xs: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks.clone() {
        for (m, &x) in lanes.iter_mut().zip(c) {
            // A NaN compares false: it never replaces the lane's value.
            *m = if x > *m { x } else { *m };
        }
    }
    // Never NaN, so nothing but a value equal to it (a zero of either sign for a zero)
    // matches below.
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for (k, c) in chunks.enumerate() {
        // Every lane compared, no early exit: one vector compare and a mask per block.
        let hit = c.iter().fold(false, |h, &x| h | (x == max));
        if hit {
            let at = c.iter().position(|&x| x == max).unwrap_or(0);
            return k * LANES + at;
        }
    }
    let start = xs.len() - tail.len();
    tail.iter()
        .position(|&x| x == max)
        .map_or(xs.len().saturating_sub(1), |at| start + at)
}

/// [`argmax`] as a compare-and-branch loop: the definition it is checked against.
#[cfg(test)]
fn argmax_scalar(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best
}

thread_local! {
    /// A sampling thread's softmax weights, kept between draws (a row's worth).
    static WEIGHTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fills `out` with `e^((x - max) * inv_t)` for each `x` of `xs` (the softmax's
/// unnormalised weights at temperature `1 / inv_t`; `max` the row's largest value) and
/// returns their sum, block by block as [`inverse_cdf`] walks them. Weights below
/// `e^-87` are rounded up to it, and a `NaN` logit gets that least weight. The exponent
/// is rounded to f32 before [`exp_f32`], so a weight is off by up to `|exponent|` f32
/// ulps (seven for a weight of `e^-7`, a thousandth of the largest): below what the
/// 24-bit uniform draw of [`Sampler`] resolves for any token that has a chance.
///
/// `exp` in f64 through the C library took ~10 ns a value: 45 µs per sequence and step
/// for a 4352-entry row, over 1.6 ms of a batch-32 step's scheduler time on the
/// development VM (`coordinator/examples/step_overhead.rs` at temperature 0.7). This is
/// [`exp_f32`] in lanes that compilers vectorise (AVX2 and FMA where the CPU has them),
/// summed per block of [`BLOCK`] in f32 and across blocks in f64.
pub fn softmax_weights(xs: &[f32], max: f32, inv_t: f32, out: &mut Vec<f32>) -> f64 {
    out.clear();
    out.resize(xs.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { softmax_weights_avx2(xs, max, inv_t, out) };
    }
    softmax_weights_lanes(xs, max, inv_t, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_weights_avx2(xs: &[f32], max: f32, inv_t: f32, out: &mut [f32]) -> f64 {
    softmax_weights_lanes(xs, max, inv_t, out)
}

#[inline(always)]
fn softmax_weights_lanes(xs: &[f32], max: f32, inv_t: f32, out: &mut [f32]) -> f64 {
    let mut total = 0.0;
    for (oc, xc) in out.chunks_mut(BLOCK).zip(xs.chunks(BLOCK)) {
        for (w, &v) in oc.iter_mut().zip(xc) {
            *w = exp_f32((v - max) * inv_t);
        }
        total += block_sum(oc);
    }
    total
}

/// Weights per block of the inverse-CDF walk ([`softmax_weights`], [`inverse_cdf`]).
pub const BLOCK: usize = 16;

/// A block's weight: its values summed in f32 (one definition, so the total and the
/// walk agree to the bit); a whole block as a tree of halves, which vectorises where a
/// chain of 16 dependent adds does not, a short last block in order.
#[inline(always)]
fn block_sum(ws: &[f32]) -> f64 {
    let Ok(b) = <&[f32; BLOCK]>::try_from(ws) else {
        return f64::from(ws.iter().sum::<f32>());
    };
    let mut h = [0.0f32; 8];
    for (i, x) in h.iter_mut().enumerate() {
        *x = b[i] + b[i + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    f64::from((q[0] + q[2]) + (q[1] + q[3]))
}

/// The index where the running sum of `weights` first exceeds `target` (`u` times the
/// total from [`softmax_weights`], `u` in [0, 1)): whole blocks first, then the values
/// of the block holding it. Where rounding inside that block leaves the target beyond
/// its values' sum, its last nonzero value; past the end (a target not below the
/// total), the last nonzero value of all.
pub fn inverse_cdf(weights: &[f32], target: f64) -> usize {
    let mut acc = 0.0;
    for (k, c) in weights.chunks(BLOCK).enumerate() {
        let s = block_sum(c);
        if target < acc + s {
            let mut a = acc;
            for (i, &w) in c.iter().enumerate() {
                a += f64::from(w);
                if target < a {
                    return k * BLOCK + i;
                }
            }
            return k * BLOCK + c.iter().rposition(|&w| w > 0.0).unwrap_or(0);
        }
        acc += s;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// `e^x` for `x <= 0` within 2 f32 ulps, branch-free so that loops of it vectorise;
/// `x` below -87 (and `NaN`) gives `e^-87`, the smallest a normal f32 holds here.
///
/// Range reduction `x = k ln 2 + r`, `|r| <= ln 2 / 2`, with `ln 2` in two parts
/// (Cody and Waite); `e^r` from its Taylor polynomial to `r^7` (truncation below 1e-8
/// relative); `2^k` written into the exponent bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // `max` first: a NaN becomes -87 (`clamp` would keep the NaN).
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(0.0);
    let j = x * std::f32::consts::LOG2_E + ROUND;
    let k = j - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let k_int = j.to_bits() as i32 - ROUND.to_bits() as i32;
    p * f32::from_bits(((k_int + 127) as u32) << 23)
}

/// The largest power of two `f` such that the weights of at least `f` sum to `target`
/// or more (`weights` from [`softmax_weights`]: positive and normal, at most 1), by one
/// pass that sums them per binary exponent; 0 where none does. Top-p's nucleus, a
/// prefix of the weights sorted in descending order, lies among those of at least `f`
/// but for rounding (the caller checks).
pub fn nucleus_floor(weights: &[f32], target: f64) -> f32 {
    let mut mass = [0.0f64; 256];
    for &q in weights {
        mass[(q.to_bits() >> 23) as usize & 255] += f64::from(q);
    }
    let mut acc = 0.0;
    for e in (0..256u32).rev() {
        acc += mass[e as usize];
        if acc >= target {
            return f32::from_bits(e << 23);
        }
    }
    0.0
}

/// `log_softmax` of `logits` in f64 accumulation.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    logits.iter().map(|&l| l - lse).collect()
}

/// A sampler with its own RNG stream: the same seed gives the same tokens.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// `fallback_seed` is used when the request names no seed (e.g. a request counter).
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(fallback_seed);
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A sampler for the token at `position` of a sequence with `seed`: the draw
    /// depends only on (seed, position, logits), so a sequence preempted and recomputed,
    /// or moved to another worker, samples exactly the same tokens.
    pub fn at_position(params: SamplingParams, seed: u64, position: usize) -> Self {
        let mixed = seed
            ^ (position as u64)
                .wrapping_add(1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(mixed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the penalties to `logits` in place. `prompt` and `output` are the
    /// sequence's tokens so far.
    pub fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, s) in logits.iter_mut().zip(seen) {
                if s {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Picks the next token from raw `logits`.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], output: &[u32]) -> u32 {
        // A copy only where penalties change the row (a copy of Hunyuan-Large's is
        // 0.5 MB, per sequence per step).
        let penalised;
        let l: &[f32] = if self.params.has_penalties() {
            let mut l = logits.to_vec();
            self.apply_penalties(&mut l, prompt, output);
            penalised = l;
            &penalised
        } else {
            logits
        };
        if self.params.is_greedy() {
            return argmax(l) as u32;
        }
        // A uniform draw in [0, 1) from the top 24 bits: deterministic per seed.
        let u = (self.rng.next_u64() >> 40) as f64 / (1u64 << 24) as f64;
        let p = &self.params;
        if !p.truncates() {
            // No truncation: the inverse CDF in token-id order is as exact a sample as
            // any order, and needs no sort of the vocabulary (129K entries for
            // Hunyuan-Large, per sequence per step).
            let inv_t = 1.0 / p.temperature.max(1e-6);
            let max = l.get(argmax(l)).copied().unwrap_or(0.0);
            return WEIGHTS.with_borrow_mut(|w| {
                let total = softmax_weights(l, max, inv_t, w);
                inverse_cdf(w, u * total) as u32
            });
        }
        // Truncated: a walk over the candidates in descending probability (ties by id).
        let probs = self.filtered_probs(l);
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        let mut acc = 0.0;
        for &(id, p) in &probs {
            acc += p / total;
            if u < acc {
                return id;
            }
        }
        probs.last().map(|&(id, _)| id).unwrap_or(0)
    }

    /// The candidate set after temperature, top-k, top-p and min-p, as `(id, prob)`
    /// in descending probability; probabilities are not renormalised.
    ///
    /// The weights are [`softmax_weights`]', as in the untruncated draw. With top-p only
    /// the tokens down to [`nucleus_floor`] are sorted, where the weights from the top
    /// first reach top-p (on a peaked row a small part of it); where
    /// rounding leaves the cut beyond them, the whole row is. Scheduler time per
    /// batch-32 step at top-p 0.9 on the development VM, rows of 4352
    /// (`docs/bench/cpu/step-overhead-top-p.txt`): peaked rows 1.74 ms with `exp` in f64
    /// and a sort of the top 1024, 1.13-1.17 with these weights, 0.91-0.96 sorting the
    /// nucleus only; nearly flat rows (a nucleus of most of the row) 3.14-3.36, 2.54-2.63,
    /// 2.27-2.33. The untruncated draw takes 0.48.
    pub fn filtered_probs(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature.max(1e-6);
        let max = logits.get(argmax(logits)).copied().unwrap_or(0.0);
        let cmp = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Whether the top-k and top-p cuts fall inside `head`, a sorted prefix of the
        // row (the same sums as the cut below, so the answer is exact).
        let cut_inside = |head: &[(u32, f64)]| {
            let by_k = p.top_k > 0 && p.top_k <= head.len();
            let by_p = p.top_p < 1.0 && {
                let mut acc = 0.0;
                head.iter().any(|&(_, q)| {
                    acc += q;
                    acc >= p.top_p as f64
                })
            };
            by_k || by_p
        };
        let (mut probs, sorted) = WEIGHTS.with_borrow_mut(|w| {
            let z = softmax_weights(logits, max, inv_t, w);
            let pairs = |floor: f32| -> Vec<(u32, f64)> {
                w.iter()
                    .enumerate()
                    .filter(|&(_, &q)| q >= floor)
                    .map(|(i, &q)| (i as u32, f64::from(q) / z))
                    .collect()
            };
            if p.top_p < 1.0 {
                // Every token outside has a smaller weight than every token inside,
                // so the sorted nucleus candidates are a prefix of the sorted row.
                let mut head = pairs(nucleus_floor(w, f64::from(p.top_p) * z));
                head.sort_by(cmp);
                if cut_inside(&head) {
                    return (head, true);
                }
            }
            (pairs(0.0), false)
        });
        // Sort the head first; the tail only when a truncation can reach into it.
        // (The top-k tokens, where top-k is smaller.)
        const HEAD: usize = 1024;
        let head_len = match p.top_k {
            0 => HEAD,
            k => k.min(HEAD),
        };
        if !sorted && probs.len() > head_len {
            probs.select_nth_unstable_by(head_len - 1, cmp);
            probs[..head_len].sort_by(cmp);
            let head = &probs[..head_len];
            let by_min = p.min_p > 0.0 && head[head_len - 1].1 < head[0].1 * p.min_p as f64;
            if cut_inside(head) || by_min {
                probs.truncate(head_len);
            } else {
                probs[head_len..].sort_by(cmp);
            }
        } else if !sorted {
            probs.sort_by(cmp);
        }
        if p.top_k > 0 && p.top_k < probs.len() {
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &(_, q)) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = probs[0].1 * p.min_p as f64;
            probs.retain(|&(_, q)| q >= floor);
        }
        probs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::greedy()
        }
    }

    /// The two-pass argmax picks what the compare-and-branch loop picks, over rows of
    /// every length around the lane width with ties, NaNs, infinities and signed zeros.
    #[test]
    fn argmax_matches_its_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 3.0];
        let mut checked = 0;
        for len in (0..70).chain([4352, 4353]) {
            for round in 0..40 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| match rng.next_u32() % 8 {
                        0 if round % 2 == 0 => specials[rng.next_u32() as usize % specials.len()],
                        1 => 3.0, // ties with the special 3.0
                        _ => (rng.next_u32() % 1000) as f32 / 100.0 - 5.0,
                    })
                    .collect();
                assert_eq!(argmax(&xs), argmax_scalar(&xs), "{xs:?}");
                checked += 1;
            }
        }
        for xs in [vec![f32::NAN; 5], vec![f32::NEG_INFINITY; 3], vec![]] {
            assert_eq!(argmax(&xs), argmax_scalar(&xs), "{xs:?}");
        }
        assert_eq!(checked, 72 * 40);
    }

    #[test]
    fn exp_f32_is_within_two_ulps() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            // One ulp of an f32 near `want`.
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulps");
        assert_eq!(exp_f32(0.0), 1.0);
        let floor = f64::from(exp_f32(-87.0));
        assert!((floor / (-87f64).exp() - 1.0).abs() < 1e-6);
        for x in [-88.0, -1e9, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(exp_f32(x), exp_f32(-87.0), "{x}");
        }
    }

    #[test]
    fn softmax_weights_follow_their_definition() {
        let mut w = Vec::new();
        for n in [1, 15, 16, 17, 100, 4352] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
                .collect();
            let max = xs[argmax(&xs)];
            let total = softmax_weights(&xs, max, 1.0 / 0.7, &mut w);
            assert_eq!(w.len(), n);
            let want: Vec<f64> = xs
                .iter()
                .map(|&x| ((f64::from(x) - f64::from(max)) / 0.7).exp())
                .collect();
            for (i, (&g, &e)) in w.iter().zip(&want).enumerate() {
                let floor = (-87f64).exp();
                // The exponent, rounded to f32 first, is off by up to half an ulp of
                // its size: a relative error of that in the weight.
                let arg = (f64::from(xs[i]) - f64::from(max)) / 0.7;
                let tol = 3e-7 + arg.abs() * f64::from(f32::EPSILON);
                assert!(
                    (f64::from(g) - e.max(floor)).abs() <= tol * e.max(floor),
                    "n {n}, {i}: {g} against {e}"
                );
            }
            let sum: f64 = want.iter().sum();
            assert!(
                (total / sum - 1.0).abs() < 1e-6,
                "n {n}: {total} against {sum}"
            );
        }
        // The walk: each index where the running sum first passes the target.
        let xs: Vec<f32> = (0..40).map(|i| (i % 7) as f32 * 0.5).collect();
        let total = softmax_weights(&xs, 3.0, 1.0, &mut w);
        let mut acc = 0.0;
        for (i, &wi) in w.iter().enumerate() {
            // Inside `i`'s stretch of the running sum: a tenth and nine tenths in.
            for f in [0.1, 0.9] {
                assert_eq!(inverse_cdf(&w, acc + f * f64::from(wi)), i, "{i} {f}");
            }
            acc += f64::from(wi);
        }
        assert!((acc - total).abs() < 1e-5 * total);
        assert_eq!(inverse_cdf(&w, 0.0), 0);
        assert_eq!(inverse_cdf(&w, total), 39);
        // A NaN logit gets the least weight, not a NaN sum.
        let total = softmax_weights(&[0.0, f32::NAN, 0.0], 0.0, 1.0, &mut w);
        assert!((total - 2.0).abs() < 1e-6, "{total}");
    }

    #[test]
    fn greedy_takes_lowest_index_on_ties() {
        let mut s = Sampler::new(params(0.0), 0);
        assert_eq!(s.sample(&[1.0, 3.0, 3.0], &[], &[]), 1);
    }

    #[test]
    fn seed_reproduces_and_distribution_follows_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()]; // probs 1/6, 2/6, 3/6
        let p = SamplingParams {
            seed: Some(42),
            ..params(1.0)
        };
        let draw = |n| {
            let mut s = Sampler::new(p.clone(), 0);
            (0..n)
                .map(|_| s.sample(&logits, &[], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(50), draw(50));
        let xs = draw(30_000);
        for (id, want) in [(0u32, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 0.5)] {
            let f = xs.iter().filter(|&&x| x == id).count() as f64 / xs.len() as f64;
            assert!((f - want).abs() < 0.015, "token {id}: {f} vs {want}");
        }
    }

    /// The truncated candidates are exactly those of the plain definition (every
    /// token's probability, all sorted, then the top-k, top-p and min-p cuts), over
    /// peaked, flat and tied rows, short and Hunyuan-Large-sized, with the filters
    /// alone and together.
    #[test]
    fn filtered_probs_match_the_plain_definition() {
        let plain = |s: &Sampler, logits: &[f32]| -> Vec<(u32, f64)> {
            let p = s.params();
            let max = logits[argmax(logits)];
            let mut w = Vec::new();
            let z = softmax_weights(logits, max, 1.0 / p.temperature, &mut w);
            let mut probs: Vec<(u32, f64)> = w
                .iter()
                .enumerate()
                .map(|(i, &q)| (i as u32, f64::from(q) / z))
                .collect();
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.top_k > 0 {
                probs.truncate(p.top_k);
            }
            let mut acc = 0.0;
            if let Some(i) = probs.iter().position(|&(_, q)| {
                acc += q;
                acc >= f64::from(p.top_p)
            }) {
                probs.truncate(i + 1);
            }
            let floor = probs[0].1 * f64::from(p.min_p);
            probs.retain(|&(_, q)| q >= floor);
            probs
        };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut sorted_part = 0;
        for len in [5, 300, 4352, 129_024] {
            for shape in 0..4 {
                // Zipf-like ranks (peaked), nearly flat, ties in steps of 0.5, random.
                let logits: Vec<f32> = (0..len)
                    .map(|i| {
                        let r = ((i * 7919 + shape) % len) as f32;
                        match shape {
                            0 => -1.1 * (1.0 + r).ln(),
                            1 => (rng.next_u32() % 3) as f32 * 1e-3,
                            2 => (rng.next_u32() % 8) as f32 * 0.5,
                            _ => (rng.next_u32() % 1000) as f32 / 100.0,
                        }
                    })
                    .collect();
                for (top_k, top_p, min_p) in [
                    (0, 0.9, 0.0),
                    (0, 0.5, 0.0),
                    (0, 0.999, 0.0),
                    (40, 0.95, 0.0),
                    (2000, 0.9, 0.0),
                    (0, 0.9, 0.05),
                    (50, 1.0, 0.0),
                    (0, 1.0, 0.1),
                ] {
                    for t in [0.7, 1.0, 1.3] {
                        let s = Sampler::new(
                            SamplingParams {
                                top_k,
                                top_p,
                                min_p,
                                ..params(t)
                            },
                            0,
                        );
                        let got = s.filtered_probs(&logits);
                        let want = plain(&s, &logits);
                        assert_eq!(got, want, "len {len} shape {shape} {:?}", s.params());
                        sorted_part += usize::from(top_p < 1.0 && got.len() * 4 < len);
                    }
                }
            }
        }
        assert!(sorted_part > 0, "no case kept a small nucleus");
    }

    /// The floor is the largest power of two whose weights at or above it reach the
    /// target.
    #[test]
    fn nucleus_floor_follows_its_definition() {
        let w: Vec<f32> = (0..1000).map(|i| exp_f32(-(i as f32) / 50.0)).collect();
        let total: f64 = w.iter().map(|&q| f64::from(q)).sum();
        let at_least =
            |f: f32| -> f64 { w.iter().filter(|&&q| q >= f).map(|&q| f64::from(q)).sum() };
        for share in [0.01, 0.3, 0.5, 0.9, 0.999, 1.0] {
            let target = share * total;
            let f = nucleus_floor(&w, target);
            assert_eq!(f.to_bits() & 0x7f_ffff, 0, "{f} is a power of two");
            assert!(at_least(f) >= target, "share {share}: {f}");
            assert!(
                at_least(f * 2.0) < target,
                "share {share}: {f} is the largest"
            );
        }
        assert_eq!(nucleus_floor(&w, 2.0 * total), 0.0);
    }

    #[test]
    fn filters_cut_the_tail() {
        let logits = [4.0f32, 3.0, 2.0, 1.0, 0.0];
        let s = Sampler::new(
            SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            0,
        );
        assert_eq!(s.filtered_probs(&logits).len(), 2);
        let s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                ..params(1.0)
            },
            0,
        );
        assert_eq!(s.filtered_probs(&logits).len(), 1);
        let s = Sampler::new(
            SamplingParams {
                min_p: 0.3,
                ..params(1.0)
            },
            0,
        );
        assert_eq!(s.filtered_probs(&logits).len(), 2); // e^-1 = 0.37 >= 0.3, e^-2 < 0.3
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..params(1.0)
            },
            0,
        );
        let mut l = vec![2.0f32, -2.0, 1.0, 1.0];
        s.apply_penalties(&mut l, &[0], &[1, 2, 2]);
        assert_eq!(l, vec![1.0, -4.0 - 0.75, 0.5 - 1.0, 1.0]);
    }
}
