// Attention: RoPE + per-head QK-norm fused with the KV-cache write, and one paged
// attention kernel for prefill and decode.
//
// KV cache layout: per cache layer (one per CLA pair) a `[slots, n_kv * d]` bf16 K and V
// region; slot = block * block_size + offset. K is stored after RoPE and before the
// key norm, because the two layers of a CLA pair apply their own key norms to it.

// One warp per (row, head); d <= 128 (up to two rotate-half pairs per lane).
// Heads 0..n_q are query heads: RoPE, then (if qnorm) the per-head RMSNorm, in place.
// Heads n_q..n_q+n_kv are key heads: RoPE, written to the cache slot of the row.
// Heads n_q+n_kv.. are value heads: copied to the cache slot.
extern "C" __global__ void rope_qk_write(bf16* q, const bf16* k, const bf16* v, bf16* kc, bf16* vc,
                                         const int* pos, const int* slots, const float* inv_freq,
                                         const float* qnorm, float eps, int n_q, int n_kv, int d) {
    int row = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
    int half = d / 2;
    if (head >= n_q + n_kv) {
        int h = head - n_q - n_kv;
        const bf16* src = v + ((size_t)row * n_kv + h) * d;
        bf16* dst = vc + ((size_t)slots[row] * n_kv + h) * d;
        for (int i = lane; i < d; i += 32) dst[i] = src[i];
        return;
    }
    bool is_q = head < n_q;
    const bf16* src = is_q ? q + ((size_t)row * n_q + head) * d
                           : k + ((size_t)row * n_kv + (head - n_q)) * d;
    float a[2], b[2];
    float p = (float)pos[row];
#pragma unroll
    for (int t = 0; t < 2; t++) {
        int i = lane + 32 * t;
        a[t] = 0.f;
        b[t] = 0.f;
        if (i < half) {
            float x1 = ld(src + i), x2 = ld(src + i + half);
            float ang = p * inv_freq[i];
            float c = rb(cosf(ang)), s = rb(sinf(ang));
            a[t] = rb(rb(x1 * c) + rb(-x2 * s));
            b[t] = rb(rb(x2 * c) + rb(x1 * s));
        }
    }
    if (is_q && qnorm != nullptr) {
        float ss = warp_sum(a[0] * a[0] + b[0] * b[0] + a[1] * a[1] + b[1] * b[1]);
        float inv = 1.f / sqrtf(ss / (float)d + eps);
#pragma unroll
        for (int t = 0; t < 2; t++) {
            int i = lane + 32 * t;
            if (i < half) {
                a[t] = rb(qnorm[i] * rb(a[t] * inv));
                b[t] = rb(qnorm[i + half] * rb(b[t] * inv));
            }
        }
    }
    bf16* dst = is_q ? q + ((size_t)row * n_q + head) * d
                     : kc + ((size_t)slots[row] * n_kv + (head - n_q)) * d;
#pragma unroll
    for (int t = 0; t < 2; t++) {
        int i = lane + 32 * t;
        if (i < half) {
            dst[i] = st(a[t]);
            dst[i + half] = st(b[t]);
        }
    }
}

// K/V rows to cache slots (the unfused write): one block per row.
extern "C" __global__ void write_kv(const bf16* k, const bf16* v, const int* slots, bf16* kc, bf16* vc,
                                   int width) {
    const bf16* ks = k + (size_t)blockIdx.x * width;
    const bf16* vs = v + (size_t)blockIdx.x * width;
    size_t at = (size_t)slots[blockIdx.x] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        kc[at + c] = ks[c];
        vc[at + c] = vs[c];
    }
}

// Copies slot from[i] to slot to[i] in every cache layer: grid (pairs, layers).
extern "C" __global__ void copy_kv(bf16* kc, bf16* vc, const int* from, const int* to, int width,
                                   long long layer_elems) {
    size_t base = (size_t)blockIdx.y * layer_elems;
    size_t a = base + (size_t)from[blockIdx.x] * width, b = base + (size_t)to[blockIdx.x] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        kc[b + c] = kc[a + c];
        vc[b + c] = vc[a + c];
    }
}

#define ATT_TILE 32
#define ATT_MAX_WARPS 8

// Paged causal GQA attention, flash style: scores are never stored beyond one 32-key
// tile, and softmax is computed online. Grid (kv head, row tile, key split), four to
// eight warps (each warp stages at most 8 keys of a tile). A row tile is `n` consecutive new rows of one sequence; the query
// vectors of those rows for the kv head's `group` query heads share each K/V tile
// read, VPW of them per warp. Splits divide the key range (flash-decoding), and
// `attn_merge` joins them. The next tile's K/V loads are in flight while the current
// tile is computed.
//
// tiles[3 * t]   = sequence index, tiles[3 * t + 1] = first new row of the tile
// (relative to the sequence), tiles[3 * t + 2] = rows in the tile.
// seq_row[s] = row of the sequence's first new token, seq_pos[s] = its position,
// seq_slot[s] = offset of its slot list in `slots` (one slot per position).
//
// Keys are RMS-normed with `knorm` as they are read (nullptr: none). Scores are
// rounded as the bf16 reference rounds them: rb(q.k), then rb(/scale) (mode 0) or
// rb(*scale) (mode 1). Output: per (row, query head, split) the running max, sum and
// unnormalised output. Needs d <= 128 and d % 4 == 0.
template <int VPW>
__device__ void attn_tile_loop(const bf16* q, const bf16* kc, const bf16* vc, const int* tiles,
                               const int* seq_row, const int* seq_pos, const int* seq_slot,
                               const int* slots, const float* knorm, float eps, int scale_mode,
                               float scale, int n_q, int n_kv, int d, int chunk, int n_splits,
                               float* part_m, float* part_l, float* part_acc) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    const int h = blockIdx.x, tile = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, nw = blockDim.x / 32;
    const int group = n_q / n_kv;
    const int s = tiles[3 * tile], r0 = tiles[3 * tile + 1], nr = tiles[3 * tile + 2];
    const int first_row = seq_row[s] + r0, first_pos = seq_pos[s] + r0;
    const int* sl = slots + seq_slot[s];
    const int nvec = nr * group;
    // Padded K rows, 16-byte aligned: lane j reads key j's float4s (for d = 80 the
    // stride is 20 banks apart, so eight lanes of a phase hit distinct banks).
    const int kd = d + 4;
    const int half = d / 2;
    float* qs = smem;                       // [nvec][d]
    float* ks = qs + nvec * d;              // [ATT_TILE][d + 4]
    float* vs = ks + ATT_TILE * kd;         // [ATT_TILE][d]

    for (int i = threadIdx.x; i < nvec * d; i += blockDim.x) {
        int vec = i / d, c = i % d;
        int row = first_row + vec / group, qh = h * group + vec % group;
        qs[i] = ld(q + ((size_t)row * n_q + qh) * d + c);
    }
    const int last_pos = first_pos + nr - 1;
    const int k0 = split * chunk;
    const int k1 = min(k0 + chunk, last_pos + 1);

    float m[VPW], l[VPW], acc[VPW][4];
#pragma unroll
    for (int t = 0; t < VPW; t++) {
        m[t] = -INFINITY;
        l[t] = 0.f;
#pragma unroll
        for (int c = 0; c < 4; c++) acc[t][c] = 0.f;
    }
    // Warp w loads keys w, w + nw, ...: per key, lane p holds element pairs p, p + 32.
    const int KPW = ATT_TILE;  // upper bound; the loops stop at the warp's own count
    const int my_keys = (ATT_TILE - warp + nw - 1) / nw;
    __nv_bfloat162 kr[8][2], vr[8][2];
    auto fetch = [&](int t0) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (j >= my_keys) break;
            int key = t0 + warp + nw * j;
            size_t base = key < k1 ? ((size_t)sl[key] * n_kv + h) * d : 0;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                int p = lane + 32 * c;
                bool ok = key < k1 && p < half;
                __nv_bfloat162 z = __floats2bfloat162_rn(0.f, 0.f);
                kr[j][c] = ok ? *reinterpret_cast<const __nv_bfloat162*>(kc + base + 2 * p) : z;
                vr[j][c] = ok ? *reinterpret_cast<const __nv_bfloat162*>(vc + base + 2 * p) : z;
            }
        }
    };
    (void)KPW;
    if (k0 < k1) fetch(k0);
    __syncthreads();

    for (int t0 = k0; t0 < k1; t0 += ATT_TILE) {
        // Store the fetched tile (key-normed) to shared memory.
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (j >= my_keys) break;
            int jj = warp + nw * j;
            float2 kf[2], vf[2];
            float ss = 0.f;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                kf[c] = __bfloat1622float2(kr[j][c]);
                vf[c] = __bfloat1622float2(vr[j][c]);
                ss = fmaf(kf[c].x, kf[c].x, fmaf(kf[c].y, kf[c].y, ss));
            }
            if (knorm != nullptr) {
                ss = warp_sum(ss);
                float inv = 1.f / sqrtf(ss / (float)d + eps);
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    int p = lane + 32 * c;
                    if (p < half) {
                        kf[c].x = rb(knorm[2 * p] * rb(kf[c].x * inv));
                        kf[c].y = rb(knorm[2 * p + 1] * rb(kf[c].y * inv));
                    }
                }
            }
#pragma unroll
            for (int c = 0; c < 2; c++) {
                int p = lane + 32 * c;
                if (p < half) {
                    *reinterpret_cast<float2*>(ks + jj * kd + 2 * p) = kf[c];
                    *reinterpret_cast<float2*>(vs + jj * d + 2 * p) = vf[c];
                }
            }
        }
        __syncthreads();
        // Loads of the next tile fly while this one is computed.
        if (t0 + ATT_TILE < k1) fetch(t0 + ATT_TILE);
        const int key = t0 + lane;
        // Scores: lane j owns key j; each K float4 is read once for all the warp's vectors.
        float a0[VPW], a1[VPW];
#pragma unroll
        for (int t = 0; t < VPW; t++) a0[t] = a1[t] = 0.f;
        const float* krow = ks + lane * kd;
        for (int i = 0; i < d; i += 4) {
            float4 kv = *reinterpret_cast<const float4*>(krow + i);
#pragma unroll
            for (int t = 0; t < VPW; t++) {
                int vec = warp + nw * t;
                if (vec < nvec) {
                    float4 qv = *reinterpret_cast<const float4*>(qs + vec * d + i);
                    a0[t] = fmaf(qv.x, kv.x, fmaf(qv.z, kv.z, a0[t]));
                    a1[t] = fmaf(qv.y, kv.y, fmaf(qv.w, kv.w, a1[t]));
                }
            }
        }
        float p[VPW];
#pragma unroll
        for (int t = 0; t < VPW; t++) {
            p[t] = 0.f;
            int vec = warp + nw * t;
            if (vec >= nvec) continue;
            int pos = first_pos + vec / group;
            float sc = rb(a0[t] + a1[t]);
            sc = scale_mode == 0 ? rb(sc / scale) : rb(sc * scale);
            if (key > pos || key >= k1) sc = -INFINITY;
            float mt = warp_max(sc);
            if (mt == -INFINITY) continue;  // the whole tile is in this row's future
            float mn = fmaxf(m[t], mt);
            float corr = expf(m[t] - mn);
            p[t] = expf(sc - mn);
            l[t] = l[t] * corr + warp_sum(p[t]);
#pragma unroll
            for (int c = 0; c < 4; c++) acc[t][c] *= corr;
            m[t] = mn;
        }
        // Weighted values: each V element is read once for all the warp's vectors.
#pragma unroll 4
        for (int j = 0; j < ATT_TILE; j++) {
            const float* vrow = vs + j * d;
            float v[4];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int ii = lane + 32 * c;
                v[c] = ii < d ? vrow[ii] : 0.f;
            }
#pragma unroll
            for (int t = 0; t < VPW; t++) {
                float pj = __shfl_sync(0xffffffffu, p[t], j);
#pragma unroll
                for (int c = 0; c < 4; c++) acc[t][c] = fmaf(pj, v[c], acc[t][c]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int t = 0; t < VPW; t++) {
        int vec = warp + nw * t;
        if (vec >= nvec) break;
        int row = first_row + vec / group, qh = h * group + vec % group;
        size_t idx = ((size_t)row * n_q + qh) * n_splits + split;
        if (lane == 0) {
            part_m[idx] = m[t];
            part_l[idx] = l[t];
        }
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int i = lane + 32 * c;
            if (i < d) part_acc[idx * d + i] = acc[t][c];
        }
    }
}

// Eight query vectors per warp, up to 64 per block (prefill row tiles).
extern "C" __global__ void __launch_bounds__(256)
attn_fwd(const bf16* q, const bf16* kc, const bf16* vc, const int* tiles, const int* seq_row,
         const int* seq_pos, const int* seq_slot, const int* slots, const float* knorm, float eps,
         int scale_mode, float scale, int n_q, int n_kv, int d, int chunk, int n_splits,
         float* part_m, float* part_l, float* part_acc) {
    attn_tile_loop<8>(q, kc, vc, tiles, seq_row, seq_pos, seq_slot, slots, knorm, eps, scale_mode,
                      scale, n_q, n_kv, d, chunk, n_splits, part_m, part_l, part_acc);
}

// Two query vectors per warp (decode: one row of up to 16 query heads per kv head);
// fewer registers, so more blocks per SM.
extern "C" __global__ void __launch_bounds__(256)
attn_fwd_small(const bf16* q, const bf16* kc, const bf16* vc, const int* tiles, const int* seq_row,
               const int* seq_pos, const int* seq_slot, const int* slots, const float* knorm,
               float eps, int scale_mode, float scale, int n_q, int n_kv, int d, int chunk,
               int n_splits, float* part_m, float* part_l, float* part_acc) {
    attn_tile_loop<2>(q, kc, vc, tiles, seq_row, seq_pos, seq_slot, slots, knorm, eps, scale_mode,
                      scale, n_q, n_kv, d, chunk, n_splits, part_m, part_l, part_acc);
}

// Joins the key splits of `attn_fwd`: one block per (row, query head), d threads.
extern "C" __global__ void attn_merge(const float* part_m, const float* part_l, const float* part_acc,
                                     bf16* out, int n_splits, int d) {
    size_t rh = blockIdx.x;
    int i = threadIdx.x;
    if (i >= d) return;
    float mx = -INFINITY;
    for (int s = 0; s < n_splits; s++) mx = fmaxf(mx, part_m[rh * n_splits + s]);
    float l = 0.f, a = 0.f;
    for (int s = 0; s < n_splits; s++) {
        float ms = part_m[rh * n_splits + s];
        if (ms == -INFINITY) continue;
        float w = expf(ms - mx);
        l += part_l[rh * n_splits + s] * w;
        a += part_acc[(rh * n_splits + s) * d + i] * w;
    }
    out[rh * d + i] = st(a / l);
}
