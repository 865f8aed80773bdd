// Element-wise and row-wise kernels: embedding, residual add, RMSNorm (plain, per
// group, and fused with the residual add), SwiGLU, row gather/scatter, casts and
// random initialisation.

extern "C" __global__ void embed(const bf16* table, const int* ids, bf16* out, int cols) {
    const bf16* src = table + (size_t)ids[blockIdx.x] * cols;
    bf16* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void add_inplace(bf16* x, const bf16* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = st(ld(x + i) + ld(y + i));
}

// One warp per group of `g` elements: out = rb(w * rb(x * rsqrt(mean(x^2) + eps))).
extern "C" __global__ void rms_norm(const bf16* x, const float* w, bf16* out, long long n_groups,
                                    int g, float eps) {
    long long grp = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (grp >= n_groups) return;
    const bf16* xr = x + grp * g;
    bf16* o = out + grp * g;
    float ss = 0.f;
    for (int i = lane; i < g; i += 32) {
        float v = ld(xr + i);
        ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    float inv = 1.f / sqrtf(ss / (float)g + eps);
    for (int i = lane; i < g; i += 32) o[i] = st(w[i] * rb(ld(xr + i) * inv));
}

// x += y (rounded), then out = rms_norm(x): one block per row.
extern "C" __global__ void add_rms_norm(bf16* x, const bf16* y, const float* w, bf16* out, int cols,
                                        float eps) {
    __shared__ float red[32];
    bf16* xr = x + (size_t)blockIdx.x * cols;
    const bf16* yr = y + (size_t)blockIdx.x * cols;
    bf16* o = out + (size_t)blockIdx.x * cols;
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = rb(ld(xr + i) + ld(yr + i));
        xr[i] = st(v);
        ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x / 32) ? red[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) red[0] = t;
    }
    __syncthreads();
    float inv = 1.f / sqrtf(red[0] / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = st(w[i] * rb(ld(xr + i) * inv));
}

extern "C" __global__ void swiglu(const bf16* g, const bf16* u, bf16* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = st(silu_rb(ld(g + i)) * ld(u + i));
}

// dst[at[i]] = src[i]; one block per source row.
extern "C" __global__ void scatter_rows(bf16* dst, const bf16* src, const int* at, int cols) {
    const bf16* s = src + (size_t)blockIdx.x * cols;
    bf16* d = dst + (size_t)at[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}

// out[r] = rb(out[r] + rb(sum_j w[r*k+j] * src[r*k+j])); one block per output row.
extern "C" __global__ void combine(bf16* out, const bf16* src, const float* w, int k, int cols) {
    int r = blockIdx.x;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < k; j++) acc += w[r * k + j] * ld(src + ((size_t)r * k + j) * cols + c);
        bf16* o = out + (size_t)r * cols + c;
        *o = st(ld(o) + rb(acc));
    }
}

// As `combine`, with the expert outputs in expert-sorted order: pair p's row is
// src[inv[p]] (the routed MoE path of many tokens).
extern "C" __global__ void combine_perm(bf16* out, const bf16* src, const float* w, const int* inv,
                                        int k, int cols) {
    int r = blockIdx.x;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < k; j++) acc += w[r * k + j] * ld(src + (size_t)inv[r * k + j] * cols + c);
        bf16* o = out + (size_t)r * cols + c;
        *o = st(ld(o) + rb(acc));
    }
}

// Deterministic uniform values in [-scale, scale) from (seed, index): splitmix64.
extern "C" __global__ void fill_uniform(bf16* out, long long n, u64 seed, float scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u64 z = seed + (u64)i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    out[i] = st((2.f * u - 1.f) * scale);
}
