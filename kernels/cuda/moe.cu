// Mixture-of-experts: routing, token permutation by expert, and the expert GEMVs of
// decode (a few tokens per expert: every weight byte read once per step).

// Router: fp32 softmax over each row, top-k (ties to the lowest index), optional
// renormalisation over the k and rounding to bf16. One thread per row; e <= 256.
template <typename T>
__device__ void route_row(const T* logits, int e, int k, int renorm, int round_w, int* experts,
                          float* weights) {
    float mx = -INFINITY;
    for (int i = 0; i < e; i++) mx = fmaxf(mx, (float)logits[i]);
    float sum = 0.f;
    for (int i = 0; i < e; i++) sum += expf((float)logits[i] - mx);
    float total = 0.f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        float bp = 0.f;
        for (int i = 0; i < e; i++) {
            bool taken = false;
            for (int t = 0; t < j; t++) taken |= experts[t] == i;
            if (taken) continue;
            float p = expf((float)logits[i] - mx) / sum;
            if (best < 0 || p > bp) {
                best = i;
                bp = p;
            }
        }
        experts[j] = best;
        weights[j] = bp;
        total += bp;
    }
    for (int j = 0; j < k; j++) {
        float w = renorm ? weights[j] / total : weights[j];
        weights[j] = round_w ? rb(w) : w;
    }
}

extern "C" __global__ void route_bf16(const bf16* logits, int rows, int e, int k, int renorm,
                                      int round_w, int* experts, float* weights) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) route_row(logits + (size_t)r * e, e, k, renorm, round_w, experts + r * k, weights + r * k);
}

extern "C" __global__ void route_f32(const float* logits, int rows, int e, int k, int renorm,
                                     int round_w, int* experts, float* weights) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) route_row(logits + (size_t)r * e, e, k, renorm, round_w, experts + r * k, weights + r * k);
}

// Stable counting sort of the (token, choice) pairs by expert, in one block (one warp
// per expert, ballots over the pairs). With `n_shared` > 0 the shared expert joins as
// expert index `n_experts`, taking every token: its entries are the pseudo-pairs
// n_pairs + t, placed last in token order. Outputs:
//   off[e]..off[e+1]: the positions of expert e's pairs in sorted order;
//   perm[i]: the pair at sorted position i; inv[p]: the sorted position of pair p;
//   active[0..n_active): experts with at least one pair, ascending; meta[0] = n_active.
// With `load` set (expert-load metrics), the pairs of the first real_tokens[0] tokens
// (a step's own rows, not the padding of a recorded shape) are added to load[expert].
extern "C" __global__ void moe_permute(const int* experts, int n_pairs, int n_experts, int n_shared,
                                       int* off, int* perm, int* inv, int* active, int* meta,
                                       unsigned long long* load, const int* real_tokens, int k) {
    if (load != nullptr) {
        const int n_real = min(n_pairs, real_tokens[0] * k);
        for (int i = threadIdx.x; i < n_real; i += blockDim.x) atomicAdd(&load[experts[i]], 1ull);
    }
    __shared__ int cnt[257];
    __shared__ int base[258];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, nw = blockDim.x / 32;
    const int n_all = n_experts + (n_shared > 0 ? 1 : 0);
    for (int e = threadIdx.x; e < n_all; e += blockDim.x) cnt[e] = e < n_experts ? 0 : n_shared;
    __syncthreads();
    for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) atomicAdd(&cnt[experts[i]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0, na = 0;
        for (int e = 0; e < n_all; e++) {
            base[e] = acc;
            off[e] = acc;
            if (cnt[e] > 0) active[na++] = e;
            acc += cnt[e];
        }
        base[n_all] = acc;
        off[n_all] = acc;
        meta[0] = na;
    }
    __syncthreads();
    for (int e = warp; e < n_experts; e += nw) {
        int at = base[e];
        for (int i0 = 0; i0 < n_pairs; i0 += 32) {
            int i = i0 + lane;
            bool mine = i < n_pairs && experts[i] == e;
            unsigned mask = __ballot_sync(0xffffffffu, mine);
            if (mine) {
                int p = at + __popc(mask & ((1u << lane) - 1));
                perm[p] = i;
                inv[i] = p;
            }
            at += __popc(mask);
        }
    }
    for (int t = threadIdx.x; t < n_shared; t += blockDim.x) {
        perm[n_pairs + t] = n_pairs + t;
        inv[n_pairs + t] = n_pairs + t;
    }
}

// out[r] = rb(shared[r] + rb(sum_j w[r*k+j] * y[r*k+j])), where the shared expert's
// output is y[n_pairs + r] (or zero without one): the decode MoE's combine.
extern "C" __global__ void combine_shared(bf16* out, const bf16* y, const float* w, int k, int cols,
                                          int n_pairs, int has_shared) {
    int r = blockIdx.x;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < k; j++) acc += w[r * k + j] * ld(y + ((size_t)r * k + j) * cols + c);
        float sh = has_shared ? ld(y + ((size_t)n_pairs + r) * cols + c) : 0.f;
        out[(size_t)r * cols + c] = st(sh + rb(acc));
    }
}

// out[i] = x[rows[i] / div]: gathers token rows into expert-sorted order (div = top-k).
extern "C" __global__ void gather_rows_div(const bf16* x, const int* rows, int div, bf16* out, int cols) {
    const bf16* src = x + (size_t)(rows[blockIdx.x] / div) * cols;
    bf16* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

#ifndef GEMV_MT
#define GEMV_MT 8   // token rows per pass over a weight row
#endif
#ifndef GEMV_U
#define GEMV_U 2    // 16-byte loads per lane in flight, per weight row (tuned on H200: 2 > 1, 4, 8)
#endif

// Fused expert gate/up GEMV with SwiGLU. Grid (column blocks, active-expert slots):
// block y serves the y-th active expert (blocks past the active count exit), and a
// warp owns one output column n: it reads gate row n and up row n once per pass of
// up to 8 tokens. act[i] (i = sorted pair position) = rb(silu(rb(x·g)) * rb(x·u)).
// x rows: token perm[i] / topk for routed pairs (perm[i] < n_routed), perm[i] - n_routed
// for the shared expert's pseudo-pairs. K must be a multiple of 8.
template <int MT>
__device__ void moe_gate_up_impl(const u64* gate_ptrs, const u64* up_ptrs, const bf16* x,
                                 const int* off, const int* perm, const int* active,
                                 const int* meta, int topk, int n_routed, bf16* act, int width,
                                 int K) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x / 32) + warp;
    if (n >= width || (int)blockIdx.y >= meta[0]) return;
    {
        const int e = active[blockIdx.y];
        const bf16* wg = reinterpret_cast<const bf16*>(gate_ptrs[e]) + (size_t)n * K;
        const bf16* wu = reinterpret_cast<const bf16*>(up_ptrs[e]) + (size_t)n * K;
        const int beg = off[e], end = off[e + 1];
        for (int m0 = beg; m0 < end; m0 += MT) {
            const int mt = min(MT, end - m0);
            const bf16* xr[MT];
#pragma unroll
            for (int mm = 0; mm < MT; mm++)
            {
                int p = perm[m0 + min(mm, mt - 1)];
                xr[mm] = x + (size_t)(p < n_routed ? p / topk : p - n_routed) * K;
            }
            float ag[MT], au[MT];
#pragma unroll
            for (int mm = 0; mm < MT; mm++) ag[mm] = au[mm] = 0.f;
            for (int k0 = lane * 8; k0 < K; k0 += 32 * 8 * GEMV_U) {
                uint4 g[GEMV_U], u[GEMV_U];
#pragma unroll
                for (int t = 0; t < GEMV_U; t++) {
                    int kk = k0 + t * 256;
                    if (kk < K) {
                        g[t] = ld_stream(wg + kk);
                        u[t] = ld_stream(wu + kk);
                    }
                }
#pragma unroll
                for (int t = 0; t < GEMV_U; t++) {
                    int kk = k0 + t * 256;
                    if (kk >= K) break;
                    float gf[8], uf[8];
                    unpack8(g[t], gf);
                    unpack8(u[t], uf);
#pragma unroll
                    for (int mm = 0; mm < MT; mm++) {
                        if (mm >= mt) break;
                        float xf[8];
                        unpack8(*reinterpret_cast<const uint4*>(xr[mm] + kk), xf);
#pragma unroll
                        for (int i = 0; i < 8; i++) {
                            ag[mm] = fmaf(gf[i], xf[i], ag[mm]);
                            au[mm] = fmaf(uf[i], xf[i], au[mm]);
                        }
                    }
                }
            }
#pragma unroll
            for (int mm = 0; mm < MT; mm++) {
                if (mm >= mt) break;
                float gs = warp_sum(ag[mm]), us = warp_sum(au[mm]);
                if (lane == 0) act[(size_t)(m0 + mm) * width + n] = st(silu_rb(rb(gs)) * rb(us));
            }
        }
    }
}

// Expert down GEMV: y[perm[i]] row, column n = rb(act[i] · down_e[n]), for the sorted
// pairs i of the active expert of block y. K (= expert width) must be a multiple of 8.
// The dot products of one weight row `w` with `mt` (<= MT) consecutive rows of `x`
// (row stride K), this warp's share: with S warps per row, warp `part` takes every
// S-th 256-element chunk of K. Adds per-lane partial sums to acc.
template <int MT, int S>
__device__ __forceinline__ void row_dots(const bf16* w, const bf16* x, int mt, int K, int part,
                                         int lane, float* acc) {
    const int step = 256 * S * 2 * GEMV_U;
    for (int k0 = part * 256 + lane * 8; k0 < K; k0 += step) {
        uint4 wv[2 * GEMV_U];
#pragma unroll
        for (int t = 0; t < 2 * GEMV_U; t++) {
            int kk = k0 + t * 256 * S;
            if (kk < K) wv[t] = ld_stream(w + kk);
        }
#pragma unroll
        for (int t = 0; t < 2 * GEMV_U; t++) {
            int kk = k0 + t * 256 * S;
            if (kk >= K) break;
            float wf[8];
            unpack8(wv[t], wf);
#pragma unroll
            for (int mm = 0; mm < MT; mm++) {
                if (mm >= mt) break;
                float xf[8];
                unpack8(*reinterpret_cast<const uint4*>(x + (size_t)mm * K + kk), xf);
#pragma unroll
                for (int i = 0; i < 8; i++) acc[mm] = fmaf(wf[i], xf[i], acc[mm]);
            }
        }
    }
}

// The full dot product of a row from its S warps' partials (every thread of the block
// must call it, S > 1 synchronises): valid in every lane of the row's warps.
template <int MT, int S>
__device__ __forceinline__ float row_total(float partial, int mm, int warp, int part,
                                           float (*red)[MT]) {
    float sum = warp_sum(partial);
    if (S > 1) {
        if ((threadIdx.x & 31) == 0) red[warp][mm] = sum;
        __syncthreads();
        sum = 0.f;
        for (int p = 0; p < S; p++) sum += red[warp - part + p][mm];
        __syncthreads();
    }
    return sum;
}

template <int MT, int S>
__device__ void moe_down_impl(const u64* down_ptrs, const bf16* act, const int* off, const int* perm,
                              const int* active, const int* meta, bf16* y, int hidden, int K) {
    // S warps share a row, each over every S-th 256-element chunk of K (a row count too
    // small to fill the GPU with one warp per row is split along K instead).
    __shared__ float red[8][MT];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = blockIdx.x * ((blockDim.x / 32) / S) + warp / S;
    const int part = warp % S;
    if ((int)blockIdx.y >= meta[0]) return;
    const bool valid = n < hidden;
    const int e = active[blockIdx.y];
    const bf16* w = reinterpret_cast<const bf16*>(down_ptrs[e]) + (size_t)(valid ? n : 0) * K;
    const int beg = off[e], end = off[e + 1];
    for (int m0 = beg; m0 < end; m0 += MT) {
        const int mt = min(MT, end - m0);
        float acc[MT];
#pragma unroll
        for (int mm = 0; mm < MT; mm++) acc[mm] = 0.f;
        if (valid) row_dots<MT, S>(w, act + (size_t)m0 * K, mt, K, part, lane, acc);
#pragma unroll
        for (int mm = 0; mm < MT; mm++) {
            if (mm >= mt) break;
            float sum = row_total<MT, S>(acc[mm], mm, warp, part, red);
            if (lane == 0 && part == 0 && valid) y[(size_t)perm[m0 + mm] * hidden + n] = st(sum);
        }
    }
}

// Entry points: 8 token rows per pass (batches), and 2 (batch-1 decode: fewer
// registers, more warps in flight; measured 86.8% -> 89.9% of HBM on the MoE block).
extern "C" __global__ void __launch_bounds__(256)
moe_gate_up(const u64* gate_ptrs, const u64* up_ptrs, const bf16* x, const int* off, const int* perm,
            const int* active, const int* meta, int topk, int n_routed, bf16* act, int width, int K) {
    moe_gate_up_impl<GEMV_MT>(gate_ptrs, up_ptrs, x, off, perm, active, meta, topk, n_routed, act,
                              width, K);
}

extern "C" __global__ void __launch_bounds__(256)
moe_gate_up_mt2(const u64* gate_ptrs, const u64* up_ptrs, const bf16* x, const int* off,
                const int* perm, const int* active, const int* meta, int topk, int n_routed,
                bf16* act, int width, int K) {
    moe_gate_up_impl<2>(gate_ptrs, up_ptrs, x, off, perm, active, meta, topk, n_routed, act, width,
                        K);
}

#define MOE_DOWN_ENTRY(NAME, MT, S)                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                          \
    NAME(const u64* down_ptrs, const bf16* act, const int* off, const int* perm,               \
         const int* active, const int* meta, bf16* y, int hidden, int K) {                     \
        moe_down_impl<MT, S>(down_ptrs, act, off, perm, active, meta, y, hidden, K);           \
    }
MOE_DOWN_ENTRY(moe_down, GEMV_MT, 1)
MOE_DOWN_ENTRY(moe_down_mt2, 2, 1)
MOE_DOWN_ENTRY(moe_down_s2, GEMV_MT, 2)
MOE_DOWN_ENTRY(moe_down_mt2_s2, 2, 2)

// Dense GEMV for a few rows: out[m, n] = x[m] · W[n] for m < M, bf16 or fp32 output.
// One warp per output column; K a multiple of 8.
template <int MT, int S>
__device__ void gemv_impl(const bf16* W, const bf16* x, bf16* out_bf16, float* out_f32, int N, int K,
                          int M) {
    // S warps share a row when there are too few rows to fill the GPU (as moe_down).
    __shared__ float red[8][MT];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = blockIdx.x * ((blockDim.x / 32) / S) + warp / S;
    const int part = warp % S;
    const bool valid = n < N;
    const bf16* w = W + (size_t)(valid ? n : 0) * K;
    for (int m0 = 0; m0 < M; m0 += MT) {
        const int mt = min(MT, M - m0);
        float acc[MT];
#pragma unroll
        for (int mm = 0; mm < MT; mm++) acc[mm] = 0.f;
        if (valid) row_dots<MT, S>(w, x + (size_t)m0 * K, mt, K, part, lane, acc);
#pragma unroll
        for (int mm = 0; mm < MT; mm++) {
            if (mm >= mt) break;
            float sum = row_total<MT, S>(acc[mm], mm, warp, part, red);
            if (lane == 0 && part == 0 && valid) {
                size_t o = (size_t)(m0 + mm) * N + n;
                if (out_f32 != nullptr) out_f32[o] = sum;
                else out_bf16[o] = st(sum);
            }
        }
    }
}

#define GEMV_ENTRY(NAME, MT, S)                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                          \
    NAME(const bf16* W, const bf16* x, bf16* out_bf16, float* out_f32, int N, int K, int M) {  \
        gemv_impl<MT, S>(W, x, out_bf16, out_f32, N, K, M);                                     \
    }
// 8 or 2 rows per pass (batches; batch 1-2), one or two warps per output column.
GEMV_ENTRY(gemv, GEMV_MT, 1)
GEMV_ENTRY(gemv_mt2, 2, 1)
GEMV_ENTRY(gemv_s2, GEMV_MT, 2)
GEMV_ENTRY(gemv_mt2_s2, 2, 2)

// Greedy sampling on the device: the arg-max of each logits row, as the host's
// `sampling::argmax` takes it: the lowest index of the largest value, NaNs never win
// (a row of NaNs: its last index), so a step that returns ids instead of rows emits
// the tokens a host draw from those rows would.
__device__ __forceinline__ float ld_any(const bf16* p) { return ld(p); }
__device__ __forceinline__ float ld_any(const float* p) { return *p; }

template <typename T>
__device__ void argmax_row(const T* logits, int cols, int* out) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    const T* row = logits + (size_t)blockIdx.x * cols;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = ld_any(row + c);
        // A NaN compares false both ways; the first value that is not one (-inf too) is
        // this thread's until a larger one comes.
        if (v > best || (v == best && idx == 0x7fffffff)) { best = v; idx = c; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    if (lane == 0) { bv[warp] = best; bi[warp] = idx; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); w++)
            if (bv[w] > best || (bv[w] == best && bi[w] < idx)) { best = bv[w]; idx = bi[w]; }
        out[blockIdx.x] = idx == 0x7fffffff ? (cols > 0 ? cols - 1 : 0) : idx;
    }
}

extern "C" __global__ void argmax_rows(const bf16* logits, int cols, int* out) {
    argmax_row(logits, cols, out);
}

extern "C" __global__ void argmax_rows_f32(const float* logits, int cols, int* out) {
    argmax_row(logits, cols, out);
}
