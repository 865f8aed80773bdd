//! The [`Backend`] trait: the tensor operations the model is written against.
//!
//! Operations are at the granularity a GPU implementation fuses them (norm, RoPE +
//! QK-norm, paged attention, routing, SwiGLU), so the CPU backend and a device
//! backend can be swapped without touching the layer graph. Activations are logically
//! f32 `[rows, cols]` matrices; under [`Precision::Bf16`] every operation rounds its
//! output to bf16, reproducing a bf16 model's storage points.

use std::ops::Range;

use crate::numeric::DType;
use crate::weight::HostMatrix;

/// Arithmetic emulated by a backend: f32 throughout, or bf16 storage between ops
/// (with f32 accumulation inside GEMMs, norms and softmaxes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    /// The element type the KV cache and re-encoded weights use under this precision.
    pub const fn storage_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// Shape of a paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSpec {
    /// Number of cache slots per token (layers / CLA share factor).
    pub n_cache_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub n_blocks: usize,
    pub dtype: DType,
}

impl KvSpec {
    /// Bytes one token occupies in the cache (K and V, every cache layer).
    pub const fn bytes_per_token(&self) -> usize {
        2 * self.n_cache_layers * self.n_kv_heads * self.head_dim * self.dtype.size_bytes()
    }

    /// Tokens the cache can hold.
    pub const fn capacity_tokens(&self) -> usize {
        self.n_blocks * self.block_size
    }
}

/// How attention scores are scaled. The references differ in the last bit under
/// bf16: Hunyuan-Large's divides `q·k` by `sqrt(d)`, transformers multiplies by `d^-0.5`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScoreScale {
    DivSqrt,
    MulInvSqrt,
}

/// One sequence's part of an attention call.
#[derive(Clone, Debug)]
pub struct AttnSeq {
    /// Rows of the activation matrix that are this sequence's new tokens.
    pub rows: Range<usize>,
    /// Position of the first new token; new token `i` is at `first_pos + i`.
    pub first_pos: usize,
    /// Cache slot (block * block_size + offset) of every position `0..first_pos + rows.len()`.
    pub slots: Vec<usize>,
}

/// One SwiGLU MLP's weights: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct MlpRef<'a, W> {
    pub gate: &'a W,
    pub up: &'a W,
    pub down: &'a W,
}

impl<W> Clone for MlpRef<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for MlpRef<'_, W> {}

/// How one MoE block routes tokens (the references differ per architecture).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    pub top_k: usize,
    /// Renormalise the top-k weights to sum to one.
    pub renormalize: bool,
    /// Round the routing weights to the storage type (Hunyuan-Large's reference).
    pub round_weights: bool,
    /// Router logits kept in fp32 (the A13B reference) rather than rounded.
    pub fp32_logits: bool,
}

/// What a recorded forward pass depends on besides its inputs' contents: the batch's
/// rows, how they split into sequences, a bound on every sequence's context, and the
/// MoE's (token, choice) pairs per layer (which decide the kernels' shapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub rows: usize,
    /// The rows of each sequence, in order ([`RecordKey::layout`]): a decode step has
    /// one per sequence, a speculative verification `1 + proposals`.
    pub seq_rows: u64,
    pub ctx_bound: usize,
    pub moe_pairs: usize,
    /// The fewest routed experts of a MoE layer (with `moe_pairs`, whether the MoE
    /// runs on a path that stays on the device).
    pub moe_experts: usize,
    /// Which weights and KV cache the work touches ([`Backend::record_id`]): a
    /// recording replays the buffers it was recorded with.
    pub buffers: u64,
}

impl RecordKey {
    /// Most rows one sequence may have in a recorded step (a verification of up to 15
    /// proposed tokens).
    pub const MAX_SEQ_ROWS: usize = 16;

    /// A fingerprint of the rows per sequence (each at most [`Self::MAX_SEQ_ROWS`]).
    pub fn layout(rows_per_seq: impl IntoIterator<Item = usize>) -> u64 {
        rows_per_seq
            .into_iter()
            .fold(0xcbf2_9ce4_8422_2325, |h, n| {
                (h ^ n as u64).wrapping_mul(0x100_0000_01b3)
            })
    }
}

/// Tensor operations over one device.
///
/// `Weight` is a `[out, in]` matrix, `Vector` a 1-D parameter (norm weights), `Act` an
/// activation matrix and `Kv` a paged KV cache. Shape errors are programming errors
/// and panic; everything data-dependent is validated before it reaches a backend.
pub trait Backend: Send + Sync + 'static {
    type Weight: Send + Sync;
    type Vector: Send + Sync;
    type Act: Send;
    type Kv: Send;
    /// A forward batch's positions, cache slots and sequences, prepared once per
    /// forward pass (uploaded once, on a device).
    type Batch: Send;

    /// Short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;
    fn precision(&self) -> Precision;

    /// Moves a host matrix to the device (re-encoding it to bf16 under `Precision::Bf16`
    /// if it is stored wider).
    fn load_matrix(&self, host: &HostMatrix) -> Self::Weight;
    /// Moves a 1-D parameter to the device.
    fn load_vector(&self, values: &[f32]) -> Self::Vector;
    /// A random `[rows, cols]` weight, uniform in `[-scale, scale)`, from `seed`
    /// (benchmark models without checkpoints; a device makes it in place).
    fn random_matrix(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> Self::Weight {
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
            })
            .collect();
        self.load_matrix(&HostMatrix::from_f32(
            self.precision().storage_dtype(),
            rows,
            cols,
            &values,
        ))
    }
    /// Rows `rows` of a loaded weight as a weight of their own (a tensor-parallel
    /// shard of a weight made whole, as random weights are).
    fn slice_rows(&self, w: &Self::Weight, rows: std::ops::Range<usize>) -> Self::Weight;
    /// Called before weights are swapped out from under the model (a placement switch
    /// frees experts and installs staged ones): a backend that runs work
    /// asynchronously waits for it, and one that caches state per weight address
    /// forgets it (a freed expert's address may come back as another's). The default
    /// does nothing.
    fn before_weight_swap(&self) {}
    /// Bytes a loaded weight occupies on the device.
    fn weight_bytes(&self, w: &Self::Weight) -> usize;

    fn alloc_kv(&self, spec: KvSpec) -> Self::Kv;

    /// A zeroed activation matrix.
    fn zeros(&self, rows: usize, cols: usize) -> Self::Act;
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Self::Act;
    fn download(&self, a: &Self::Act) -> Vec<f32>;
    /// The first rows of `a` in consecutive groups of `groups[i]` rows each, one vector
    /// per group (how a step's logits come back, a group per sequence). The default
    /// downloads the whole matrix and copies the groups out of it; a backend with a
    /// cheaper route to host memory overrides it.
    fn download_rows(&self, a: &Self::Act, groups: &[usize]) -> Vec<Vec<f32>> {
        split_rows(&self.download(a), self.shape(a).1, groups)
    }
    /// The arg-max token of each of the first rows of `a` ([`crate::sampling::argmax`]:
    /// lowest index on ties, NaNs never win), in groups as [`Backend::download_rows`]
    /// returns them: how a greedy step's logits come back where only its tokens are
    /// wanted. The default downloads the rows and takes it on the host; a backend that
    /// can take it where the rows are overrides it and downloads only the ids.
    fn argmax_rows(&self, a: &Self::Act, groups: &[usize]) -> Vec<Vec<u32>> {
        let cols = self.shape(a).1;
        self.download_rows(a, groups)
            .iter()
            .map(|rows| argmax_each(rows, cols))
            .collect()
    }
    fn shape(&self, a: &Self::Act) -> (usize, usize);

    /// `x · Wᵀ` kept in fp32 whatever the precision (a router held in fp32).
    fn matmul_fp32(&self, x: &Self::Act, w: &Self::Weight) -> Self::Act;
    /// Rows `ids` of an embedding table.
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Self::Act;
    /// `x · Wᵀ`.
    fn matmul(&self, x: &Self::Act, w: &Self::Weight) -> Self::Act;
    /// Rows `rows` of `x` as a new matrix.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Self::Act;
    /// RMSNorm of every row of width `w.len()`: fp32 `x * rsqrt(mean(x²) + eps)`, rounded
    /// to the storage type, times `w`. A row of width `n * w.len()` is normed per group
    /// (per-head QK-norm).
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32) -> Self::Act;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Act, y: &Self::Act);
    /// `silu(gate) * up`, where `gate_up` holds gate in its first half columns and up
    /// in the second, or the two are given separately.
    fn swiglu(&self, gate: &Self::Act, up: &Self::Act) -> Self::Act;
    /// NeoX (rotate-half) RoPE on each `head_dim`-wide head of every row, row `i` at
    /// position `positions[i]`, with inverse frequencies `inv_freq` (`head_dim / 2`).
    fn rope(&self, x: &mut Self::Act, head_dim: usize, positions: &[usize], inv_freq: &[f32]);
    /// Writes rows of `k` and `v` (`[rows, n_kv_heads * head_dim]`) to `slots` of cache layer `layer`.
    fn write_kv(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        k: &Self::Act,
        v: &Self::Act,
        slots: &[usize],
    );
    /// Prepares a batch: `seqs` cover the activation rows in order, without gaps;
    /// `tokens` are the rows' token ids.
    fn batch(&self, seqs: Vec<AttnSeq>, tokens: &[u32]) -> Self::Batch;
    /// Rows of an embedding table for the batch's tokens.
    fn embed_batch(&self, table: &Self::Weight, batch: &Self::Batch) -> Self::Act;
    /// Identifies the buffers a recorded forward pass would touch (a KV cache and a
    /// model, named by one of its weights). The default, for backends that record
    /// nothing, is 0.
    fn record_id(&self, kv: &Self::Kv, weight: &Self::Weight) -> u64 {
        let _ = (kv, weight);
        0
    }
    /// Runs a forward pass's device work `f` on the batch of `seqs` and `tokens`.
    /// A backend that can record device work (CUDA graphs) records `f` once per `key`
    /// and replays the recording on later calls with new batch contents, so a decode
    /// step costs one launch instead of hundreds. The default runs `f` directly.
    fn forward_recorded(
        &self,
        key: RecordKey,
        seqs: Vec<AttnSeq>,
        tokens: &[u32],
        f: &mut dyn FnMut(&Self::Batch) -> Self::Act,
    ) -> Self::Act {
        let _ = key;
        let batch = self.batch(seqs, tokens);
        f(&batch)
    }
    /// How many step recordings this backend keeps at most (0: it records none, and
    /// [`Backend::forward_recorded`] runs every step as it comes).
    fn recording_capacity(&self) -> usize {
        0
    }
    /// How many sequences a recordable step of `n_seqs` sequences, `rows` rows each,
    /// should be padded to with dummy sequences (whose output is dropped), so that
    /// steps of nearby batch sizes replay one recording instead of each recording its
    /// own; `top_k` and `n_experts` describe the MoE layers, whose shape the padded
    /// step must keep on a recordable path. Backends that record nothing: `n_seqs`.
    fn padded_sequences(
        &self,
        n_seqs: usize,
        rows: usize,
        top_k: usize,
        n_experts: usize,
    ) -> usize {
        let _ = (rows, top_k, n_experts);
        n_seqs
    }
    /// Whether the kernels spread host work over rayon's threads (the executor then
    /// runs each forward pass inside a pool of its own). A backend whose host side only
    /// launches device work says no, and its passes run on the executor's thread: a
    /// pool would add two thread wake-ups to every pass for nothing.
    fn uses_thread_pool(&self) -> bool {
        true
    }
    /// How many recordable forward passes so far ran without a recording to replay
    /// (their shape was new, or being recorded): slower than the same shape will run
    /// once it is recorded. Timing a step that includes one measures a warm-up, not
    /// the steady state. Backends that record nothing never warm up: 0.
    fn warm_up_passes(&self) -> u64 {
        0
    }
    /// The attention block between the projections and the attention itself: RoPE on
    /// `q` then the per-head `q_norm`; on layers that own a cache slot, RoPE on `k` and
    /// the write of `k` and `v` to cache layer `layer` at the batch's new slots.
    #[allow(clippy::too_many_arguments)]
    fn attn_prep(
        &self,
        q: &mut Self::Act,
        new_kv: Option<(Self::Act, Self::Act)>,
        kv: &mut Self::Kv,
        layer: usize,
        head_dim: usize,
        inv_freq: &[f32],
        q_norm: Option<(&Self::Vector, f32)>,
        batch: &Self::Batch,
    );
    /// Causal GQA attention of `q` (`[rows, n_heads * head_dim]`) over cache layer `layer`,
    /// with `key_norm` (per-head RMSNorm weights) applied to keys as they are read.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Act,
        kv: &Self::Kv,
        layer: usize,
        n_heads: usize,
        key_norm: Option<(&Self::Vector, f32)>,
        scale: ScoreScale,
        batch: &Self::Batch,
    ) -> Self::Act;
    /// `x += y`, then the RMSNorm of the new `x` (the residual add fused with the next
    /// layer norm).
    fn add_rms_norm(
        &self,
        x: &mut Self::Act,
        y: &Self::Act,
        w: &Self::Vector,
        eps: f32,
    ) -> Self::Act {
        self.add_assign(x, y);
        self.rms_norm(x, w, eps)
    }
    /// A SwiGLU MLP on every row of `x`.
    fn mlp(&self, x: &Self::Act, m: MlpRef<'_, Self::Weight>) -> Self::Act {
        let g = self.matmul(x, m.gate);
        let u = self.matmul(x, m.up);
        self.matmul(&self.swiglu(&g, &u), m.down)
    }
    /// The MoE block: the shared MLP (if any) plus the router's top-k experts, combined
    /// with their routing weights. Each expert runs once on the tokens routed to it.
    fn moe(
        &self,
        h: &Self::Act,
        router: &Self::Weight,
        routing: Routing,
        shared: Option<MlpRef<'_, Self::Weight>>,
        experts: &[MlpRef<'_, Self::Weight>],
    ) -> Self::Act {
        moe_on_host(self, h, router, routing, shared, experts, None)
    }
    /// [`Backend::moe`] of MoE layer `load.layer` that also counts the (token, choice)
    /// pairs routed to each expert: into `load.counts` (one per expert) where the
    /// routing is on the host anyway, returning true; or, returning false, on the
    /// device, for [`Backend::take_expert_load`] to bring back (a host copy per layer
    /// would cost a synchronisation each). The default counts nothing.
    fn moe_counted(
        &self,
        h: &Self::Act,
        router: &Self::Weight,
        routing: Routing,
        shared: Option<MlpRef<'_, Self::Weight>>,
        experts: &[MlpRef<'_, Self::Weight>],
        load: LayerLoad<'_>,
    ) -> (Self::Act, bool) {
        let _ = load;
        (self.moe(h, router, routing, shared, experts), false)
    }
    /// The next forward pass's own tokens: the first `n` rows; rows past them pad a
    /// recorded shape and are not counted by [`Backend::moe_counted`].
    fn set_counted_tokens(&self, n: usize) {
        let _ = n;
    }
    /// Adds the expert load counted on the device since the last call to `load`
    /// (`[layer][expert]`) and resets it; false if this backend counts on the host.
    fn take_expert_load(&self, load: &mut [Vec<u64>]) -> bool {
        let _ = load;
        false
    }
    /// Router: fp32 softmax over each row of `logits`, top-`k` (ties to the lowest
    /// index), weights renormalised over the `k` when `renormalize`, and rounded to the
    /// storage type when `round_weights`. Returns `(experts, weights)`, `k` per row.
    fn route(
        &self,
        logits: &Self::Act,
        k: usize,
        renormalize: bool,
        round_weights: bool,
    ) -> (Vec<u32>, Vec<f32>);
    /// `out[r] += round(Σ_j weights[r*k + j] * src[r*k + j])`: the weighted combine of `k`
    /// expert outputs per token (src rows grouped per token), summed in fp32 in `j`
    /// order and rounded once, as one bf16 einsum or fused expert kernel does.
    fn combine(&self, out: &mut Self::Act, src: &Self::Act, weights: &[f32], k: usize);
    /// Copies `src` rows into `dst` at rows `at` (inverse of `gather_rows`).
    fn scatter_rows(&self, dst: &mut Self::Act, src: &Self::Act, at: &[usize]);
    /// Copies K/V of cache layer `layer` from slots `from` to slots `to` (prefix-cache
    /// copy-on-write and speculative rollback compaction).
    fn copy_kv(&self, kv: &mut Self::Kv, from: &[usize], to: &[usize]);
}

/// A MoE layer whose routed pairs are counted ([`Backend::moe_counted`]): its index and
/// its host counts, one per expert.
#[derive(Debug)]
pub struct LayerLoad<'a> {
    pub layer: usize,
    pub counts: &'a mut [u64],
}

/// The MoE block with the routing on the host: [`Backend::moe`]'s reference path, which
/// also counts each expert's routed pairs into `load` when given.
pub fn moe_on_host<B: Backend + ?Sized>(
    b: &B,
    h: &B::Act,
    router: &B::Weight,
    routing: Routing,
    shared: Option<MlpRef<'_, B::Weight>>,
    experts: &[MlpRef<'_, B::Weight>],
    load: Option<&mut [u64]>,
) -> B::Act {
    let (n_tokens, hidden) = b.shape(h);
    let k = routing.top_k;
    let mut out = match shared {
        Some(m) => b.mlp(h, m),
        None => b.zeros(n_tokens, hidden),
    };
    let logits = if routing.fp32_logits {
        b.matmul_fp32(h, router)
    } else {
        b.matmul(h, router)
    };
    let (chosen, weights) = b.route(&logits, k, routing.renormalize, routing.round_weights);
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); experts.len()];
    for (i, &e) in chosen.iter().enumerate() {
        by_expert[e as usize].push(i);
    }
    if let Some(load) = load {
        for (n, pairs) in load.iter_mut().zip(&by_expert) {
            *n += pairs.len() as u64;
        }
    }
    let mut routed = b.zeros(n_tokens * k, hidden);
    for (e, pairs) in by_expert.iter().enumerate() {
        if pairs.is_empty() {
            continue;
        }
        let token_rows: Vec<usize> = pairs.iter().map(|&i| i / k).collect();
        let xe = b.gather_rows(h, &token_rows);
        let ye = b.mlp(&xe, experts[e]);
        b.scatter_rows(&mut routed, &ye, pairs);
    }
    b.combine(&mut out, &routed, &weights, k);
    out
}

/// `flat`, a row-major matrix `cols` wide, cut into consecutive groups of `groups[i]`
/// rows. Panics if the groups ask for more rows than `flat` holds.
pub fn split_rows(flat: &[f32], cols: usize, groups: &[usize]) -> Vec<Vec<f32>> {
    split_rows_as(flat, cols, groups, |x| x)
}

/// The arg-max of each `cols`-wide row of `rows`.
pub fn argmax_each(rows: &[f32], cols: usize) -> Vec<u32> {
    rows.chunks_exact(cols.max(1))
        .map(|r| crate::sampling::argmax(r) as u32)
        .collect()
}

/// [`split_rows`] of a matrix stored as `T`, each value converted by `to` (widened to
/// f32, or a device's index type to `u32`).
pub fn split_rows_as<T: Copy, U>(
    flat: &[T],
    cols: usize,
    groups: &[usize],
    to: impl Fn(T) -> U,
) -> Vec<Vec<U>> {
    let mut at = 0;
    groups
        .iter()
        .map(|&n| {
            let part = &flat[at..at + n * cols];
            at += n * cols;
            part.iter().map(|&x| to(x)).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rows_cuts_consecutive_groups() {
        let flat: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let got = split_rows(&flat, 2, &[1, 0, 3]);
        assert_eq!(
            got,
            vec![vec![0.0, 1.0], vec![], vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]
        );
        // The CPU backend's override gives the same groups.
        let b = crate::cpu::CpuBackend::new(Precision::F32);
        let a = b.upload(6, 2, &flat);
        assert_eq!(b.download_rows(&a, &[1, 0, 3]), got);
        assert_eq!(b.download_rows(&a, &[6]), vec![flat]);
    }
}
