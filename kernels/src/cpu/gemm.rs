//! Batch-invariant GEMM: `y[m, n] = x[m, k] · W[n, k]ᵀ` with f32 accumulation over
//! bf16, f16 or f32 weights.
//!
//! Why our own kernel and not a GEMM crate: (1) weights stay in their stored 16-bit
//! format and are widened on the fly, so a decode step streams each weight byte once;
//! (2) the reduction order of every output element is fixed (see [`PERM16`]): 8 FMA
//! lanes over `k`, a fixed horizontal sum, then the `k % 8` tail in order. It does not
//! depend on `m`, on the tile an element falls in, or on the thread count, so a
//! sequence's logits do not depend on what else is in its batch. General-purpose GEMM
//! crates pick blockings (and so reduction orders) by problem size, which breaks that.
//!
//! Work is split over the `n` (output feature) dimension with rayon.

use rayon::prelude::*;

use crate::numeric::{DType, bf16_bits_to_f32, f16_bits_to_f32};
use crate::weight::HostMatrix;

/// Weight rows per task are a multiple of this (the prefill row tile is 3 rows).
const ROW_ALIGN: usize = 12;

/// Below this many weight bytes a matrix is multiplied on the calling thread: waking
/// the pool costs more than it saves.
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// Computes `y = x · Wᵀ` where `x` is `[m, w.cols]` and `y` is `[m, w.rows]`.
pub fn matmul(x: &[f32], m: usize, w: &HostMatrix, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        m * k,
        "matmul: x has {} values, want {m}x{k}",
        x.len()
    );
    assert_eq!(
        y.len(),
        m * n,
        "matmul: y has {} values, want {m}x{n}",
        y.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    let wb = w.bytes.as_slice();
    let es = w.dtype.size_bytes();
    // A few contiguous row ranges per thread: enough to balance, few enough that
    // dispatch stays negligible next to streaming the weights.
    let threads = rayon::current_num_threads();
    let n_tasks = if wb.len() < PARALLEL_MIN_BYTES || threads == 1 {
        1
    } else {
        (threads * if m <= 2 { 1 } else { 4 }).min(n.div_ceil(ROW_ALIGN))
    };
    let rows_per_task = n.div_ceil(n_tasks).next_multiple_of(ROW_ALIGN).min(n);
    if m == 1 {
        // Decode: each task writes its slice of the single output row directly.
        let task = |(t, out): (usize, &mut [f32])| {
            let r0 = t * rows_per_task;
            let nb = out.len();
            block(
                x,
                1,
                k,
                w.dtype,
                &wb[r0 * k * es..(r0 + nb) * k * es],
                nb,
                out,
            );
        };
        if n_tasks == 1 {
            task((0, y));
        } else {
            y.par_chunks_mut(rows_per_task).enumerate().for_each(task);
        }
        return;
    }
    let run = |t: usize| {
        let r0 = t * rows_per_task;
        let r1 = (r0 + rows_per_task).min(n);
        let mut out = vec![0f32; m * (r1 - r0)];
        block(
            x,
            m,
            k,
            w.dtype,
            &wb[r0 * k * es..r1 * k * es],
            r1 - r0,
            &mut out,
        );
        (r0, out)
    };
    let blocks: Vec<(usize, Vec<f32>)> = if n_tasks == 1 {
        vec![run(0)]
    } else {
        (0..n.div_ceil(rows_per_task))
            .into_par_iter()
            .map(run)
            .collect()
    };
    for (r0, out) in blocks {
        let nb = out.len() / m;
        for i in 0..m {
            y[i * n + r0..i * n + r0 + nb].copy_from_slice(&out[i * nb..(i + 1) * nb]);
        }
    }
}

/// The canonical lane order. Within each full block of 16 elements, lane `l` of the
/// 8-lane accumulator takes element `PERM16[l]`, then `PERM16[8 + l]`; a trailing
/// chunk of 8 is taken in natural order, then the last `k % 8` elements one by one
/// after the horizontal sum. This order is what a bf16 row gives for free: unpacking
/// 16 bf16 values (one 256-bit load) into their low and high halves yields exactly
/// elements `PERM16[..8]` and `PERM16[8..]` as f32, with no conversion instructions.
/// Every path (streaming, tiled, portable) computes each element in this order, on
/// operands permuted the same way, so they agree to the last bit.
pub const PERM16: [usize; 16] = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];

/// Rewrites `row` into the canonical order (full 16-element blocks permuted by
/// [`PERM16`], the remainder unchanged).
fn permute_row(row: &mut [f32]) {
    for blk in row.chunks_exact_mut(16) {
        let orig: [f32; 16] = blk.try_into().expect("16 elements");
        for (d, &p) in blk.iter_mut().zip(&PERM16) {
            *d = orig[p];
        }
    }
}

/// Computes `out[i, j] = x[i] · w[j]` for one block of `nb` weight rows (`out` is `[m, nb]`).
fn block(x: &[f32], m: usize, k: usize, dtype: DType, w: &[u8], nb: usize, out: &mut [f32]) {
    // Activations are small next to the weights: permute them once per call.
    let mut xp = x.to_vec();
    xp.chunks_exact_mut(k).for_each(permute_row);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            avx2::block(&xp, m, k, dtype, w, nb, out);
            return;
        }
    }
    portable::block(&xp, m, k, dtype, w, nb, out);
}

/// Decodes weight row `j` of a block into f32, in the canonical order.
fn decode_row(dtype: DType, w: &[u8], k: usize, j: usize, dst: &mut [f32]) {
    decode_row_natural(dtype, w, k, j, dst);
    permute_row(dst);
}

fn decode_row_natural(dtype: DType, w: &[u8], k: usize, j: usize, dst: &mut [f32]) {
    let es = dtype.size_bytes();
    let src = &w[j * k * es..(j + 1) * k * es];
    match dtype {
        DType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// Reference path for CPUs without AVX2+FMA, with the same lane structure (`x` and
/// the decoded rows are in the canonical order).
mod portable {
    use super::*;

    pub(super) fn block(
        x: &[f32],
        m: usize,
        k: usize,
        dtype: DType,
        w: &[u8],
        nb: usize,
        out: &mut [f32],
    ) {
        let mut row = vec![0f32; k];
        for j in 0..nb {
            decode_row(dtype, w, k, j, &mut row);
            for i in 0..m {
                out[i * nb + j] = dot(&x[i * k..(i + 1) * k], &row);
            }
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let k8 = a.len() / 8 * 8;
        let mut lanes = [0f32; 8];
        for c in (0..k8).step_by(8) {
            for l in 0..8 {
                lanes[l] = a[c + l].mul_add(b[c + l], lanes[l]);
            }
        }
        let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for c in k8..a.len() {
            s += a[c] * b[c];
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub(super) fn block(
        x: &[f32],
        m: usize,
        k: usize,
        dtype: DType,
        w: &[u8],
        nb: usize,
        out: &mut [f32],
    ) {
        assert_eq!(w.len(), nb * k * dtype.size_bytes());
        assert_eq!(x.len(), m * k);
        assert_eq!(out.len(), m * nb);
        // SAFETY: `available()` was checked by the caller, so AVX2 and FMA exist; the
        // slice lengths asserted above bound every load and store in the kernels.
        unsafe {
            if m <= 2 {
                streaming(x, m, k, dtype, w, nb, out);
            } else {
                tiled(x, m, k, dtype, w, nb, out);
            }
        }
    }

    /// Fixed-order horizontal sum of 8 lanes: ((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7)).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi); // [l0+l4, l1+l5, l2+l6, l3+l7]
        let a = _mm_add_ps(s, _mm_movehl_ps(s, s)); // [s0+s2, s1+s3, ..]
        // a0 = (l0+l4)+(l2+l6), a1 = (l1+l5)+(l3+l7); the sum a0 + a1 is the same
        // expression tree as the portable path's, up to the commutativity of `+`.
        let b = _mm_add_ss(a, _mm_shuffle_ps::<0b01>(a, a));
        _mm_cvtss_f32(b)
    }

    /// Element `idx` of `w`, widened (the `k % 8` tail).
    #[inline]
    fn w_scalar(dtype: DType, w: &[u8], idx: usize) -> f32 {
        let mut one = [0f32; 1];
        decode_row_natural(dtype, w, 1, idx, &mut one);
        one[0]
    }

    /// Decode path (1-2 tokens): weights are read straight from their stored format,
    /// one row at a time, once per call. One sequential stream per thread measured
    /// fastest for weights that come from DRAM (on the 2-core development machine:
    /// 67-75 decode tokens/s against 52-54 with 2- or 4-row tiles, whose interleaved
    /// streams the memory system serves worse), which is every real model's case.
    ///
    /// # Safety
    /// AVX2/FMA/F16C available; slice shapes as asserted by `block`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn streaming(
        x: &[f32],
        m: usize,
        k: usize,
        dtype: DType,
        w: &[u8],
        nb: usize,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded preconditions; each instantiation reads `dtype`'s elements.
        unsafe {
            match dtype {
                DType::BF16 => streaming_t::<Bf16>(x, m, k, w, nb, out),
                DType::F16 => streaming_t::<F16>(x, m, k, w, nb, out),
                DType::F32 => streaming_t::<F32>(x, m, k, w, nb, out),
            }
        }
    }

    /// Widening loads of 8 weights of one stored type.
    trait Load {
        const DTYPE: DType;
        /// # Safety
        /// 8 elements must be readable at `p`.
        unsafe fn load8(p: *const u8) -> __m256;

        /// Elements `PERM16[..8]` and `PERM16[8..]` of the 16 at `p`, widened.
        ///
        /// # Safety
        /// 16 elements must be readable at `p`.
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> (__m256, __m256) {
            // SAFETY: the caller guarantees 16 readable elements.
            unsafe {
                let a = Self::load8(p);
                let b = Self::load8(p.add(8 * Self::DTYPE.size_bytes()));
                (
                    _mm256_permute2f128_ps::<0x20>(a, b),
                    _mm256_permute2f128_ps::<0x31>(a, b),
                )
            }
        }
    }

    struct Bf16;
    struct F16;
    struct F32;

    impl Load for Bf16 {
        const DTYPE: DType = DType::BF16;

        /// Interleaving zeros below each bf16 value makes it an f32: one load and two
        /// unpacks widen 16 weights, already in the canonical lane order.
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> (__m256, __m256) {
            // SAFETY: the caller guarantees 32 readable bytes; the load is unaligned.
            unsafe {
                let w = _mm256_loadu_si256(p as *const __m256i);
                let z = _mm256_setzero_si256();
                (
                    _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, w)),
                    _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, w)),
                )
            }
        }

        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            // SAFETY: the caller guarantees 16 readable bytes; the load is unaligned.
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }

    impl Load for F16 {
        const DTYPE: DType = DType::F16;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            // SAFETY: the caller guarantees 16 readable bytes; the load is unaligned.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
    }

    impl Load for F32 {
        const DTYPE: DType = DType::F32;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            // SAFETY: the caller guarantees 32 readable bytes; the load is unaligned.
            unsafe { _mm256_loadu_ps(p as *const f32) }
        }
    }

    /// # Safety
    /// AVX2/FMA/F16C available; `w` holds `nb` rows of `k` elements of `L::DTYPE`,
    /// `x` holds `m` rows of `k`, `out` holds `m * nb`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn streaming_t<L: Load>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[u8],
        nb: usize,
        out: &mut [f32],
    ) {
        let es = L::DTYPE.size_bytes();
        let k8 = k / 8 * 8;
        let row_bytes = k * es;
        let tail = |i: usize, row: usize, s: f32| {
            let mut s = s;
            for t in k8..k {
                s += x[i * k + t] * w_scalar(L::DTYPE, w, row * k + t);
            }
            s
        };
        let k16 = k / 16 * 16;
        for i in 0..m {
            let xp = x[i * k..].as_ptr();
            for j in 0..nb {
                // SAFETY: row j < nb; c + 16 <= k16 (c + 8 <= k8 for the trailing
                // chunk) bound every load of x row i and weight row j.
                unsafe {
                    let p = w.as_ptr().add(j * row_bytes);
                    let mut acc = _mm256_setzero_ps();
                    let mut c = 0;
                    while c < k16 {
                        let (lo, hi) = L::load16(p.add(c * es));
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c)), lo, acc);
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c + 8)), hi, acc);
                        c += 16;
                    }
                    if c < k8 {
                        acc = _mm256_fmadd_ps(
                            _mm256_loadu_ps(xp.add(c)),
                            L::load8(p.add(c * es)),
                            acc,
                        );
                    }
                    out[i * nb + j] = tail(i, j, hsum(acc));
                }
            }
        }
    }

    /// Prefill path: 3 weight rows are widened once into f32 scratch, then a 3x4
    /// register tile (12 accumulators) sweeps the tokens.
    ///
    /// # Safety
    /// AVX2/FMA/F16C available; slice shapes as asserted by `block`.
    #[allow(clippy::needless_range_loop)] // indexed loops keep the tile in registers
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tiled(
        x: &[f32],
        m: usize,
        k: usize,
        dtype: DType,
        w: &[u8],
        nb: usize,
        out: &mut [f32],
    ) {
        const R: usize = 3;
        const T: usize = 4;
        let k8 = k / 8 * 8;
        let mut scratch = vec![0f32; R * k];
        let mut j = 0;
        while j < nb {
            let r = (nb - j).min(R);
            for rr in 0..r {
                decode_row(dtype, w, k, j + rr, &mut scratch[rr * k..(rr + 1) * k]);
            }
            let sp = scratch.as_ptr();
            let mut i = 0;
            while i < m {
                let t = (m - i).min(T);
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let mut c = 0;
                while c < k8 {
                    // SAFETY: c + 8 <= k, rows j..j+r of scratch and tokens i..i+t are
                    // in bounds of their slices.
                    unsafe {
                        let w0 = _mm256_loadu_ps(sp.add(c));
                        let w1 = _mm256_loadu_ps(sp.add(k + c));
                        let w2 = _mm256_loadu_ps(sp.add(2 * k + c));
                        for tt in 0..t {
                            let xv = _mm256_loadu_ps(x.as_ptr().add((i + tt) * k + c));
                            acc[0][tt] = _mm256_fmadd_ps(xv, w0, acc[0][tt]);
                            acc[1][tt] = _mm256_fmadd_ps(xv, w1, acc[1][tt]);
                            acc[2][tt] = _mm256_fmadd_ps(xv, w2, acc[2][tt]);
                        }
                    }
                    c += 8;
                }
                for (rr, acc_r) in acc.iter().enumerate().take(r) {
                    for (tt, a) in acc_r.iter().enumerate().take(t) {
                        let mut s = hsum(*a);
                        for e in k8..k {
                            s += x[(i + tt) * k + e] * scratch[rr * k + e];
                        }
                        out[(i + tt) * nb + j + rr] = s;
                    }
                }
                i += t;
            }
            j += r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::round_bf16;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|e| x[i * k + e] as f64 * w[j * k + e] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_naive_for_all_dtypes_and_shapes() {
        let mut seed = 7;
        for &(m, n, k) in &[
            (1, 5, 3),
            (2, 97, 19),
            (3, 200, 64),
            (9, 193, 131),
            (17, 7, 8),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let wv: Vec<f32> = (0..n * k).map(|_| round_bf16(lcg(&mut seed))).collect();
            let want = naive(&x, m, &wv, n, k);
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let w = HostMatrix::from_f32(dtype, n, k, &wv);
                let mut y = vec![0f32; m * n];
                matmul(&x, m, &w, &mut y);
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-3,
                        "{dtype} m={m} n={n} k={k}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_batch_composition() {
        let (n, k) = (300, 136);
        let mut seed = 3;
        let wv: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let w = HostMatrix::from_f32(DType::BF16, n, k, &wv);
        let x: Vec<f32> = (0..13 * k).map(|_| lcg(&mut seed)).collect();
        let mut full = vec![0f32; 13 * n];
        matmul(&x, 13, &w, &mut full);
        for i in 0..13 {
            for m in [1usize, 2, 3, 5] {
                // Row i placed at the end of an m-row batch of other rows.
                let mut xs = vec![];
                for r in 0..m - 1 {
                    xs.extend_from_slice(&x[((i + r + 1) % 13) * k..][..k]);
                }
                xs.extend_from_slice(&x[i * k..(i + 1) * k]);
                let mut y = vec![0f32; m * n];
                matmul(&xs, m, &w, &mut y);
                assert_eq!(
                    &y[(m - 1) * n..],
                    &full[i * n..(i + 1) * n],
                    "row {i} in batch {m}"
                );
            }
        }
    }
}
