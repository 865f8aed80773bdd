//! The forward pass of the Hunyuan family over a [`Backend`].
//!
//! Per layer: `h += attn(input_layernorm(h)); h += moe(post_attention_layernorm(h))`.
//! Attention projects q (and k/v on layers that own a CLA cache slot), applies RoPE,
//! writes the RoPE'd pre-norm K and V to the paged cache, applies the per-head
//! query norm, and attends with each layer's own key norm applied as keys are read.
//! The MoE block is the shared MLP plus the router's top-k experts, combined with
//! their routing weights.

use std::convert::Infallible;

use hyserve_kernels::{AttnSeq, Backend, MlpRef, RecordKey, Routing, ScoreScale};

use crate::checkpoint::Checkpoint;
use crate::config::{Arch, ModelConfig};
use crate::exchange::{Exchange, ExchangeError, Round, Rows};

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp<B: Backend> {
    pub gate: B::Weight,
    pub up: B::Weight,
    pub down: B::Weight,
}

impl<B: Backend> Mlp<B> {
    pub fn as_ref(&self) -> MlpRef<'_, B::Weight> {
        MlpRef {
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }
}

/// One decoder layer's weights.
pub struct Layer<B: Backend> {
    pub input_norm: B::Vector,
    pub q: B::Weight,
    /// `k_proj`, `v_proj` on layers that own their cache slot.
    pub kv: Option<(B::Weight, B::Weight)>,
    pub o: B::Weight,
    pub q_norm: Option<B::Vector>,
    pub k_norm: Option<B::Vector>,
    pub post_norm: B::Vector,
    pub router: B::Weight,
    pub shared: Option<Mlp<B>>,
    /// Routed experts by index; `None` where another worker holds it (expert parallelism).
    pub experts: Vec<Option<Mlp<B>>>,
}

/// The model's weights on one backend.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub embed: B::Weight,
    /// Untied output head; `None` means logits use `embed` (tied).
    pub lm_head: Option<B::Weight>,
    pub norm: B::Vector,
    pub layers: Vec<Layer<B>>,
    /// This model's share of the tensor-parallel dense layers (whole when size 1).
    pub tp: TpShard,
    inv_freq: Vec<f32>,
}

/// A shard of the dense layers under tensor parallelism: of `size` workers, this one
/// holds the `index`-th slice of the attention heads (q, k, v rows), of the output
/// projection's rows, and of the shared expert's intermediate (gate, up rows) and
/// output (down rows). Embeddings, norms, routers and the output head stay whole.
///
/// Partial results are joined by gathering columns, never by summing partial
/// products: every value is computed exactly as one whole model computes it, so a
/// tensor-parallel group's logits are bitwise those of one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpShard {
    pub index: usize,
    pub size: usize,
}

impl TpShard {
    /// No tensor parallelism.
    pub const WHOLE: TpShard = TpShard { index: 0, size: 1 };

    /// Whether `cfg` splits into `size` shards: heads, KV heads, hidden and every
    /// shared-expert width divide evenly.
    pub fn check(cfg: &ModelConfig, size: usize) -> Result<(), String> {
        if size == 0 {
            return Err("a tensor-parallel group has at least one worker".into());
        }
        let mut dims = vec![
            ("attention heads", cfg.n_heads),
            ("KV heads", cfg.n_kv_heads),
            ("hidden size", cfg.hidden_size),
        ];
        dims.extend(
            cfg.layers
                .iter()
                .filter(|l| l.shared_width > 0)
                .map(|l| ("shared-expert width", l.shared_width)),
        );
        match dims.into_iter().find(|&(_, n)| !n.is_multiple_of(size)) {
            Some((what, n)) => Err(format!(
                "tensor parallelism over {size} workers needs the {what} ({n}) to divide by {size}"
            )),
            None => Ok(()),
        }
    }

    /// This shard's part of `n` rows.
    pub fn rows(self, n: usize) -> std::ops::Range<usize> {
        n / self.size * self.index..n / self.size * (self.index + 1)
    }

    /// This shard's part of `n` tokens when they are split unevenly (routing: each
    /// shard routes a slice of the group's tokens).
    pub fn tokens(self, n: usize) -> std::ops::Range<usize> {
        n * self.index / self.size..n * (self.index + 1) / self.size
    }

    /// Whether a checkpoint tensor is sliced by rows under tensor parallelism.
    pub fn slices(name: &str) -> bool {
        let attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .any(|p| name.ends_with(&format!("self_attn.{p}.weight")));
        let shared = ["gate_proj", "up_proj", "down_proj"]
            .iter()
            .any(|p| name.ends_with(&format!("mlp.shared_mlp.{p}.weight")));
        attn || shared
    }
}

/// Weight-loading progress: tensors and bytes moved to the backend so far.
#[derive(Clone, Copy, Debug)]
pub struct LoadProgress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// One sequence's part of a forward batch: a prefill chunk or a decode token.
#[derive(Clone, Debug)]
pub struct SeqChunk {
    /// The new tokens, at positions `first_pos..first_pos + tokens.len()`.
    pub tokens: Vec<u32>,
    pub first_pos: usize,
    /// KV cache slot of every position `0..first_pos + tokens.len()`.
    pub slots: Vec<usize>,
    /// Return logits for every new token (true) or only the last (false).
    pub all_logits: bool,
    /// Return only each of those rows' arg-max token (a greedy draw that needs nothing
    /// else of the row): [`Logits::argmax`] instead of [`Logits::rows`].
    pub argmax_only: bool,
}

/// A forward pass's output, per chunk in order: its logits rows (`[rows, vocab]`), or,
/// for a chunk that asked for [`SeqChunk::argmax_only`], each row's arg-max token
/// (and empty rows).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logits {
    pub rows: Vec<Vec<f32>>,
    pub argmax: Vec<Vec<u32>>,
}

impl Logits {
    /// Keeps the first `n` chunks' outputs (drops a recorded step's padding).
    pub fn truncate(&mut self, n: usize) {
        self.rows.truncate(n);
        self.argmax.truncate(n);
    }
}

impl SeqChunk {
    /// A decode row (one token, its logits) or a verification (a few tokens, logits for
    /// each): a shape a backend may record and replay.
    pub fn recordable(&self) -> bool {
        (self.tokens.len() == 1 && !self.all_logits)
            || (self.all_logits && self.tokens.len() <= RecordKey::MAX_SEQ_ROWS)
    }
}

impl<B: Backend> Model<B> {
    /// Moves the validated checkpoint's tensors onto `backend`.
    pub fn load(
        backend: &B,
        cfg: ModelConfig,
        ck: &Checkpoint,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Self {
        Self::load_shard(backend, cfg, ck, &|_, _| true, TpShard::WHOLE, progress)
    }

    /// Like [`Model::load`], but of the routed experts only those `(layer, expert)` for
    /// which `holds` is true (one worker's shard under expert parallelism), and of the
    /// dense layers the slices of `tp`. `tp` must pass [`TpShard::check`].
    pub fn load_shard(
        backend: &B,
        cfg: ModelConfig,
        ck: &Checkpoint,
        holds: &dyn Fn(usize, usize) -> bool,
        tp: TpShard,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Self {
        let expected: Vec<_> = crate::names::expected(&cfg)
            .into_iter()
            .filter(|e| expert_of(&e.name).is_none_or(|(l, x)| holds(l, x)))
            .collect();
        let bytes_total: u64 = expected
            .iter()
            .map(|e| ck.get(&e.name).map_or(0, |t| t.bytes.len() as u64))
            .sum();
        let mut p = LoadProgress {
            tensors_done: 0,
            tensors_total: expected.len(),
            bytes_done: 0,
            bytes_total,
        };
        Self::assemble(
            cfg,
            holds,
            tp,
            &mut |name| {
                let m = ck.matrix(name);
                let m = if tp.size > 1 && TpShard::slices(name) {
                    m.row_range(tp.rows(m.rows)).expect("checked shard")
                } else {
                    m
                };
                let w = backend.load_matrix(&m);
                p.tensors_done += 1;
                p.bytes_done += ck.get(name).map_or(0, |t| t.bytes.len() as u64);
                progress(p);
                w
            },
            &mut |name| backend.load_vector(&ck.vector(name)),
        )
    }

    /// A model of `cfg` with random weights made by the backend (uniform, scaled by
    /// fan-in; norms one): throughput benchmarks at real dimensions without a
    /// checkpoint on disk.
    pub fn random(
        backend: &B,
        cfg: ModelConfig,
        seed: u64,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Self {
        Self::random_shard(backend, cfg, seed, &|_, _| true, TpShard::WHOLE, progress)
    }

    /// [`Model::random`] holding only the routed experts `holds` selects and the
    /// slices of `tp`; every tensor's values depend on its name only, so shards of one
    /// seed make one model.
    pub fn random_shard(
        backend: &B,
        cfg: ModelConfig,
        seed: u64,
        holds: &dyn Fn(usize, usize) -> bool,
        tp: TpShard,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Self {
        let streams = random_streams(&cfg);
        let held = |name: &str| expert_of(name).is_none_or(|(l, x)| holds(l, x));
        let expected: Vec<&[usize]> = streams
            .iter()
            .filter(|(name, _)| held(name))
            .map(|(_, (_, shape))| shape.as_slice())
            .collect();
        let bytes_total: u64 = expected
            .iter()
            .map(|shape| 2 * shape.iter().product::<usize>() as u64)
            .sum();
        let mut p = LoadProgress {
            tensors_done: 0,
            tensors_total: expected.len(),
            bytes_done: 0,
            bytes_total,
        };
        Self::assemble(
            cfg.clone(),
            holds,
            tp,
            &mut |name| {
                let (n, shape) = &streams[name];
                let (rows, cols) = (shape[0], shape[1]);
                let w = random_weight(backend, seed, *n, name, rows, cols);
                // Made whole, then cut: a shard's values are the whole model's.
                let w = if tp.size > 1 && TpShard::slices(name) {
                    backend.slice_rows(&w, tp.rows(rows))
                } else {
                    w
                };
                p.tensors_done += 1;
                p.bytes_done += 2 * (rows * cols) as u64;
                progress(p);
                w
            },
            &mut |name| backend.load_vector(&vec![1.0; streams[name].1[0]]),
        )
    }

    fn assemble(
        cfg: ModelConfig,
        holds: &dyn Fn(usize, usize) -> bool,
        tp: TpShard,
        mat: &mut dyn FnMut(&str) -> B::Weight,
        vec: &mut dyn FnMut(&str) -> B::Vector,
    ) -> Self {
        let embed = mat("model.embed_tokens.weight");
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for (l, spec) in cfg.layers.iter().enumerate() {
            let pre = format!("model.layers.{l}");
            let a = format!("{pre}.self_attn");
            let m = format!("{pre}.mlp");
            let mut mlp = |base: String| Mlp {
                gate: mat(&format!("{base}.gate_proj.weight")),
                up: mat(&format!("{base}.up_proj.weight")),
                down: mat(&format!("{base}.down_proj.weight")),
            };
            let shared = (spec.shared_width > 0).then(|| mlp(format!("{m}.shared_mlp")));
            let experts = (0..spec.n_experts)
                .map(|x| holds(l, x).then(|| mlp(format!("{m}.experts.{x}"))))
                .collect();
            layers.push(Layer {
                input_norm: vec(&format!("{pre}.input_layernorm.weight")),
                q: mat(&format!("{a}.q_proj.weight")),
                kv: spec.has_kv.then(|| {
                    (
                        mat(&format!("{a}.k_proj.weight")),
                        mat(&format!("{a}.v_proj.weight")),
                    )
                }),
                o: mat(&format!("{a}.o_proj.weight")),
                q_norm: cfg
                    .use_qk_norm
                    .then(|| vec(&format!("{a}.query_layernorm.weight"))),
                k_norm: cfg
                    .use_qk_norm
                    .then(|| vec(&format!("{a}.key_layernorm.weight"))),
                post_norm: vec(&format!("{pre}.post_attention_layernorm.weight")),
                router: mat(&format!("{m}.gate.wg.weight")),
                shared,
                experts,
            });
        }
        let lm_head = (!cfg.tie_word_embeddings).then(|| mat("lm_head.weight"));
        Self {
            inv_freq: cfg.inv_freq(),
            norm: vec("model.norm.weight"),
            embed,
            lm_head,
            layers,
            tp,
            cfg,
        }
    }

    /// Query and KV heads this model computes (its shard's under tensor parallelism).
    pub fn local_heads(&self) -> (usize, usize) {
        (
            self.cfg.n_heads / self.tp.size,
            self.cfg.n_kv_heads / self.tp.size,
        )
    }

    /// Loads the routed experts `which` from `ck`, off to the side: the staging half of
    /// a placement change, done while the model keeps serving.
    pub fn load_experts(
        backend: &B,
        ck: &Checkpoint,
        which: &[(usize, usize)],
    ) -> Vec<((usize, usize), Mlp<B>)> {
        experts_from(which, &mut |name| backend.load_matrix(&ck.matrix(name)))
    }

    /// [`Model::load_experts`] for a model of random weights (`Model::random_shard`'s
    /// seed): the same values the whole random model has for those experts.
    pub fn random_experts(
        backend: &B,
        cfg: &ModelConfig,
        seed: u64,
        which: &[(usize, usize)],
    ) -> Vec<((usize, usize), Mlp<B>)> {
        let streams = random_streams(cfg);
        experts_from(which, &mut |name| {
            let (n, shape) = &streams[name];
            random_weight(backend, seed, *n, name, shape[0], shape[1])
        })
    }

    /// The switching half: installs `staged` experts and frees every routed expert
    /// `keep` says this worker no longer holds.
    pub fn set_experts(
        &mut self,
        staged: Vec<((usize, usize), Mlp<B>)>,
        keep: &dyn Fn(usize, usize) -> bool,
    ) {
        for ((l, x), m) in staged {
            self.layers[l].experts[x] = Some(m);
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (x, e) in layer.experts.iter_mut().enumerate() {
                if !keep(l, x) {
                    *e = None;
                }
            }
        }
    }

    /// Whether routed expert `(layer, expert)` is held here.
    pub fn holds_expert(&self, layer: usize, expert: usize) -> bool {
        self.layers
            .get(layer)
            .and_then(|l| l.experts.get(expert))
            .is_some_and(Option::is_some)
    }

    /// Bytes of weights held on the backend.
    pub fn weight_bytes(&self, b: &B) -> usize {
        let mlp =
            |m: &Mlp<B>| b.weight_bytes(&m.gate) + b.weight_bytes(&m.up) + b.weight_bytes(&m.down);
        let mut n =
            b.weight_bytes(&self.embed) + self.lm_head.as_ref().map_or(0, |w| b.weight_bytes(w));
        for l in &self.layers {
            n += b.weight_bytes(&l.q) + b.weight_bytes(&l.o) + b.weight_bytes(&l.router);
            if let Some((k, v)) = &l.kv {
                n += b.weight_bytes(k) + b.weight_bytes(v);
            }
            n += l.shared.as_ref().map_or(0, mlp);
            n += l.experts.iter().flatten().map(mlp).sum::<usize>();
        }
        n
    }

    /// What a recorded step's MoE shape depends on: the most experts a token picks in
    /// any layer, and the fewest routed experts of a layer.
    pub fn moe_shape(&self) -> (usize, usize) {
        let layers = &self.cfg.layers;
        let top_k = layers.iter().map(|l| l.top_k).max().unwrap_or(1);
        let n_experts = layers.iter().map(|l| l.n_experts).min().unwrap_or(1);
        (top_k, n_experts)
    }

    /// Runs a batch of sequence chunks; returns, per chunk, its logits rows
    /// (`[rows, vocab]`, every new token's or only the last one's; empty for a chunk
    /// that asked for [`SeqChunk::argmax_only`]: [`Model::forward_counted`] returns its
    /// tokens).
    pub fn forward(&self, b: &B, kv: &mut B::Kv, chunks: &[SeqChunk]) -> Vec<Vec<f32>> {
        self.forward_counted(b, kv, chunks, None).0.rows
    }

    /// [`Model::forward`], adding the rows routed to each expert to `load`
    /// (`[layer][expert]`, sized by [`Model::expert_load_shape`]) where the backend
    /// routes on the host. Returns the logits and whether the load was counted.
    pub fn forward_counted(
        &self,
        b: &B,
        kv: &mut B::Kv,
        chunks: &[SeqChunk],
        mut load: Option<&mut [Vec<u64>]>,
    ) -> (Logits, bool) {
        assert_eq!(
            self.tp.size, 1,
            "a tensor-parallel shard runs with its group: use forward_ep"
        );
        let (tokens, seqs, logit_rows) = flatten(chunks);
        let mut counted = false;
        let mut hook = |l: usize, h: Hook<'_, B::Act>| match h {
            Hook::Moe(h) => {
                Ok::<_, Infallible>(match load.as_deref_mut().and_then(|ld| ld.get_mut(l)) {
                    Some(ld) => {
                        let (out, c) = self.moe_counted(b, l, h, ld);
                        counted |= c;
                        out
                    }
                    None => self.moe(b, l, h),
                })
            }
            Hook::Gather(..) => unreachable!("no tensor parallelism"),
        };
        // A decode step (one token per sequence) or a verification step (a few tokens
        // per sequence, logits for each) has shapes that depend only on how many rows
        // each sequence has: a backend may record and replay it.
        let recordable = chunks.iter().all(SeqChunk::recordable);
        let logits = if recordable && !chunks.is_empty() {
            let rows = tokens.len();
            let max_ctx = chunks
                .iter()
                .map(|c| c.first_pos + c.tokens.len())
                .max()
                .unwrap_or(1);
            let (top_k, moe_experts) = self.moe_shape();
            let key = RecordKey {
                rows,
                seq_rows: RecordKey::layout(chunks.iter().map(|c| c.tokens.len())),
                ctx_bound: max_ctx.next_power_of_two().max(256),
                moe_pairs: rows * top_k,
                moe_experts,
                buffers: b.record_id(kv, &self.embed),
            };
            b.forward_recorded(key, seqs, &tokens, &mut |batch| {
                let Ok(x) = self.device_forward(b, kv, batch, None, &mut hook);
                x.expect("logits wanted")
            })
        } else {
            let batch = b.batch(seqs, &tokens);
            let Ok(x) = self.device_forward(b, kv, &batch, Some(&logit_rows), &mut hook);
            x.expect("logits wanted")
        };
        (self.split_logits(b, &logits, chunks), counted)
    }

    /// The shape of an expert-load count: per layer, its routed experts (0 for a dense
    /// layer).
    pub fn expert_load_shape(&self) -> Vec<Vec<u64>> {
        self.cfg
            .layers
            .iter()
            .map(|l| vec![0; l.n_experts])
            .collect()
    }

    /// [`Model::forward`] with the routed experts spread over the workers of `ep`: this
    /// worker's tokens go to the workers holding their experts and come back combined,
    /// bitwise as if every expert were local. Every worker of the group must call it
    /// for every step, with no chunks when it has no sequences of its own.
    ///
    /// Under tensor parallelism (`self.tp.size > 1`) the ranks `rank - tp.index ..`
    /// form a group that runs the same chunks: each computes its heads and shared
    /// expert slice and routes its slice of the tokens, and the group gathers the
    /// pieces after each. Only the group's first rank computes logits; the others
    /// return an empty row set per chunk.
    pub fn forward_ep(
        &self,
        b: &B,
        kv: &mut B::Kv,
        chunks: &[SeqChunk],
        ep: &mut ExpertParallel<'_>,
    ) -> Result<Logits, ExchangeError> {
        let rank = ep.exchange.rank();
        let base = rank.checked_sub(self.tp.index);
        if self.tp.size > 1 && (base.is_none_or(|b| b + self.tp.size > ep.exchange.world())) {
            return Err(ExchangeError::Malformed {
                peer: rank,
                reason: format!(
                    "tensor-parallel shard {} of {} does not fit rank {rank} of {}",
                    self.tp.index,
                    self.tp.size,
                    ep.exchange.world()
                ),
            });
        }
        if chunks.is_empty() {
            for l in 0..self.layers.len() {
                self.moe_ep(b, l, None, ep)?;
            }
            return Ok(Logits::default());
        }
        let (tokens, seqs, logit_rows) = flatten(chunks);
        let batch = b.batch(seqs, &tokens);
        // Only a group's first shard computes logits (`Some(&[])`: none).
        let rows: &[usize] = if self.tp.index == 0 { &logit_rows } else { &[] };
        let logits = self.device_forward(b, kv, &batch, Some(rows), &mut |l, h| match h {
            Hook::Moe(h) => Ok(self.moe_ep(b, l, Some(h), ep)?.expect("rows given")),
            Hook::Gather(phase, a) => self.gather_cols(b, l, phase, a, ep),
        })?;
        Ok(match logits {
            Some(x) => self.split_logits(b, &x, chunks),
            None => Logits {
                rows: vec![Vec::new(); chunks.len()],
                argmax: vec![Vec::new(); chunks.len()],
            },
        })
    }

    /// The logits of `x` per chunk: every token's row for a chunk that wants all of
    /// them, its last row otherwise; or those rows' arg-max tokens for a chunk that
    /// wants only them. Where every chunk does, the backend takes them where the rows
    /// are ([`Backend::argmax_rows`]: on a GPU only the ids are downloaded); in a mixed
    /// step every row comes down and the arg-max is taken here.
    fn split_logits(&self, b: &B, x: &B::Act, chunks: &[SeqChunk]) -> Logits {
        let groups: Vec<usize> = chunks
            .iter()
            .map(|c| if c.all_logits { c.tokens.len() } else { 1 })
            .collect();
        if chunks.iter().all(|c| c.argmax_only) {
            return Logits {
                rows: vec![Vec::new(); chunks.len()],
                argmax: b.argmax_rows(x, &groups),
            };
        }
        let vocab = b.shape(x).1;
        let mut rows = b.download_rows(x, &groups);
        let argmax = chunks
            .iter()
            .zip(&mut rows)
            .map(|(c, r)| {
                if c.argmax_only {
                    hyserve_kernels::backend::argmax_each(&std::mem::take(r), vocab)
                } else {
                    Vec::new()
                }
            })
            .collect();
        Logits { rows, argmax }
    }

    /// The device part of a forward pass: embeddings to logits of `logit_rows` (all
    /// rows when `None`; `Some(&[])` asks for none and returns `None`), with the MoE
    /// block of layer `l` and the tensor-parallel gathers computed by `hook`.
    fn device_forward<E>(
        &self,
        b: &B,
        kv: &mut B::Kv,
        batch: &B::Batch,
        logit_rows: Option<&[usize]>,
        hook: &mut HookFn<'_, B, E>,
    ) -> Result<Option<B::Act>, E> {
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        let scale = match cfg.arch {
            Arch::HunyuanLarge => ScoreScale::DivSqrt,
            Arch::HunyuanV1Moe => ScoreScale::MulInvSqrt,
        };
        let tp = self.tp.size > 1;
        let (n_heads, _) = self.local_heads();
        let mut x = b.embed_batch(&self.embed, batch);
        // The MoE output of the previous layer, added to `x` fused with the next norm.
        let mut pending: Option<B::Act> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let spec = &cfg.layers[l];
            // Attention.
            let h = match pending.take() {
                Some(y) => b.add_rms_norm(&mut x, &y, &layer.input_norm, eps),
                None => b.rms_norm(&x, &layer.input_norm, eps),
            };
            let mut q = b.matmul(&h, &layer.q);
            let new_kv = layer
                .kv
                .as_ref()
                .map(|(wk, wv)| (b.matmul(&h, wk), b.matmul(&h, wv)));
            let q_norm = layer.q_norm.as_ref().map(|w| (w, eps));
            b.attn_prep(
                &mut q,
                new_kv,
                kv,
                spec.cache_layer,
                cfg.head_dim,
                &self.inv_freq,
                q_norm,
                batch,
            );
            let key_norm = layer.k_norm.as_ref().map(|w| (w, eps));
            let mut attn = b.attention(&q, kv, spec.cache_layer, n_heads, key_norm, scale, batch);
            if tp {
                attn = hook(l, Hook::Gather(PHASE_HEADS, &attn))?;
            }
            let mut o = b.matmul(&attn, &layer.o);
            if tp {
                o = hook(l, Hook::Gather(PHASE_ATTN_OUT, &o))?;
            }
            // MoE.
            let h = b.add_rms_norm(&mut x, &o, &layer.post_norm, eps);
            pending = Some(hook(l, Hook::Moe(&h))?);
        }
        if let Some(y) = pending {
            b.add_assign(&mut x, &y);
        }
        let last = match logit_rows {
            Some([]) => return Ok(None),
            Some(rows) => b.gather_rows(&x, rows),
            None => x,
        };
        let last = b.rms_norm(&last, &self.norm, eps);
        Ok(Some(b.matmul(
            &last,
            self.lm_head.as_ref().unwrap_or(&self.embed),
        )))
    }

    /// The tensor-parallel group's ranks, in shard order.
    fn tp_group(&self, rank: usize) -> Vec<usize> {
        let base = rank - self.tp.index;
        (base..base + self.tp.size).collect()
    }

    /// Gathers this shard's columns `a` (`[n, c]`) with the group's into `[n, c * size]`,
    /// shard by shard.
    fn gather_cols(
        &self,
        b: &B,
        l: usize,
        phase: u8,
        a: &B::Act,
        ep: &mut ExpertParallel<'_>,
    ) -> Result<B::Act, ExchangeError> {
        let (n, c) = b.shape(a);
        let mine = b.download(a);
        let parts = self.tp_exchange(l, phase, n, mine, ep)?;
        let size = self.tp.size;
        for (j, p) in parts.iter().enumerate() {
            if p.len() != n * c {
                return Err(ExchangeError::Malformed {
                    peer: self.tp_group(ep.exchange.rank())[j],
                    reason: format!("{} values for {n} rows of {c} columns", p.len()),
                });
            }
        }
        let mut out = Vec::with_capacity(n * c * size);
        for t in 0..n {
            for p in &parts {
                out.extend_from_slice(&p[t * c..(t + 1) * c]);
            }
        }
        Ok(b.upload(n, c * size, &out))
    }

    /// One gather round of the tensor-parallel group: sends `mine` (`rows` rows) to
    /// the group and returns every shard's values in shard order (this one's included).
    fn tp_exchange(
        &self,
        l: usize,
        phase: u8,
        rows: usize,
        mine: Vec<f32>,
        ep: &mut ExpertParallel<'_>,
    ) -> Result<Vec<Vec<f32>>, ExchangeError> {
        let mut t0 = std::time::Instant::now();
        let rank = ep.exchange.rank();
        let group = self.tp_group(rank);
        let round = Round {
            step: ep.step,
            layer: l as u32,
            phase,
        };
        let msg = Rows {
            blocks: vec![(0, rows as u32)],
            data: mine,
        };
        let mut out = vec![Rows::default(); ep.exchange.world()];
        for &r in &group {
            if r != rank {
                out[r] = msg.clone();
            }
        }
        if let Some(t) = ep.timing.as_deref_mut() {
            t.bytes_sent += 4 * (msg.data.len() * (group.len() - 1)) as u64;
        }
        ep.exchange.send_to(round, &group, out)?;
        let mut got = ep.exchange.recv_from(round, &group)?;
        got[rank] = msg;
        lap(ep, &mut t0, |t| &mut t.gather_s);
        Ok(group
            .iter()
            .map(|&r| std::mem::take(&mut got[r].data))
            .collect())
    }

    fn routing(&self, l: usize) -> Routing {
        Routing {
            top_k: self.cfg.layers[l].top_k,
            renormalize: self.cfg.renormalize(l),
            // Large's router is a bf16 GEMM with bf16-rounded weights; the A13B reference
            // (transformers) keeps the router logits and weights in fp32.
            round_weights: self.cfg.arch == Arch::HunyuanLarge,
            fp32_logits: self.cfg.arch == Arch::HunyuanV1Moe,
        }
    }

    /// Shared MLP + routed experts, combined with the routing weights (every expert local).
    fn moe(&self, b: &B, l: usize, h: &B::Act) -> B::Act {
        let layer = &self.layers[l];
        b.moe(
            h,
            &layer.router,
            self.routing(l),
            layer.shared.as_ref().map(Mlp::as_ref),
            &self.all_experts(l),
        )
    }

    /// [`Model::moe`], counting the rows routed to each expert into `load`.
    fn moe_counted(&self, b: &B, l: usize, h: &B::Act, load: &mut [u64]) -> (B::Act, bool) {
        let layer = &self.layers[l];
        b.moe_counted(
            h,
            &layer.router,
            self.routing(l),
            layer.shared.as_ref().map(Mlp::as_ref),
            &self.all_experts(l),
            hyserve_kernels::LayerLoad {
                layer: l,
                counts: load,
            },
        )
    }

    fn all_experts(&self, l: usize) -> Vec<MlpRef<'_, B::Weight>> {
        self.layers[l]
            .experts
            .iter()
            .map(|m| {
                m.as_ref()
                    .expect("Model::forward needs every expert; use forward_ep for a shard")
                    .as_ref()
            })
            .collect()
    }

    /// The MoE block under expert parallelism. `h` is this worker's rows (`None`: it
    /// has no tokens this step and only serves its peers). Computes exactly what
    /// [`Backend::moe`]'s default does: the same routing, each expert's rows through
    /// the same MLP (a row's result does not depend on the rows beside it), the same
    /// combine; only where the expert rows are computed differs.
    ///
    /// Under tensor parallelism `h` is the group's rows, the same on every shard: the
    /// shared expert is computed in slices and gathered, each shard routes and
    /// combines its slice of the tokens ([`TpShard::tokens`]), and the group gathers
    /// the combined rows.
    fn moe_ep(
        &self,
        b: &B,
        l: usize,
        h: Option<&B::Act>,
        ep: &mut ExpertParallel<'_>,
    ) -> Result<Option<B::Act>, ExchangeError> {
        let layer = &self.layers[l];
        let spec = &self.cfg.layers[l];
        let hidden = self.cfg.hidden_size;
        let (rank, world) = (ep.exchange.rank(), ep.exchange.world());
        let k = spec.top_k;
        let routing = self.routing(l);
        let step = ep.step;
        let round = |phase| Round {
            step,
            layer: l as u32,
            phase,
        };
        let tp = self.tp.size > 1;
        // The rows this worker routes: all of `h`, or its shard's slice of them.
        let n_all = h.map_or(0, |h| b.shape(h).0);
        let mine = if tp { self.tp.tokens(n_all) } else { 0..n_all };
        let mine_rows: Vec<usize> = if tp {
            mine.clone().collect()
        } else {
            Vec::new()
        };
        let sliced;
        let hr = match h {
            Some(h) if tp && !mine.is_empty() => {
                sliced = b.gather_rows(h, &mine_rows);
                Some(&sliced)
            }
            Some(_) if tp => None,
            h => h,
        };
        // Route this worker's tokens; decide where each expert's rows are computed.
        let mut t0 = std::time::Instant::now();
        let mut outgoing = vec![Rows::default(); world];
        // Per peer, the (token, choice) pairs of every block sent, in send order.
        let mut sent: Vec<Vec<Vec<usize>>> = vec![Vec::new(); world];
        let mut local: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut weights = Vec::new();
        if let Some(h) = hr {
            let logits = if routing.fp32_logits {
                b.matmul_fp32(h, &layer.router)
            } else {
                b.matmul(h, &layer.router)
            };
            let (chosen, w) = b.route(&logits, k, routing.renormalize, routing.round_weights);
            weights = w;
            let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); spec.n_experts];
            for (i, &e) in chosen.iter().enumerate() {
                by_expert[e as usize].push(i);
            }
            let mut host: Option<Vec<f32>> = None;
            for (e, pairs) in by_expert.into_iter().enumerate() {
                if pairs.is_empty() {
                    continue;
                }
                ep.load[l][e] += pairs.len() as u64;
                let holders = &ep.holders[l][e];
                if holders.contains(&(rank as u32)) || holders.is_empty() {
                    local.push((e, pairs));
                    continue;
                }
                // Spread the rows evenly over the replicas, each sender starting at a
                // different one, so a hot expert's replicas share its load.
                let host = host.get_or_insert_with(|| b.download(h));
                let n_h = holders.len();
                let per = pairs.len().div_ceil(n_h);
                for (j, part) in pairs.chunks(per).enumerate() {
                    let dest = holders[(rank + j) % n_h] as usize;
                    let msg = &mut outgoing[dest];
                    msg.blocks.push((e as u32, part.len() as u32));
                    for &p in part {
                        let t = p / k;
                        msg.data
                            .extend_from_slice(&host[t * hidden..(t + 1) * hidden]);
                    }
                    sent[dest].push(part.to_vec());
                }
            }
        }
        lap(ep, &mut t0, |t| &mut t.route_s);
        if let Some(t) = ep.timing.as_deref_mut() {
            t.bytes_sent += outgoing
                .iter()
                .map(|r| 4 * r.data.len() as u64)
                .sum::<u64>();
        }
        ep.exchange.send(round(PHASE_DISPATCH), outgoing)?;
        lap(ep, &mut t0, |t| &mut t.dispatch_s);
        // While the rows travel: the shared expert and the local experts.
        let shared = match (h, &layer.shared) {
            (Some(h), Some(m)) if tp => {
                // The gathers time themselves (`gather_s`); the matmuls are expert time.
                let a = b.swiglu(&b.matmul(h, &m.gate), &b.matmul(h, &m.up));
                lap(ep, &mut t0, |t| &mut t.expert_s);
                let a = self.gather_cols(b, l, PHASE_SHARED_ACT, &a, ep)?;
                t0 = std::time::Instant::now();
                let y = b.matmul(&a, &m.down);
                lap(ep, &mut t0, |t| &mut t.expert_s);
                let y = self.gather_cols(b, l, PHASE_SHARED_OUT, &y, ep)?;
                t0 = std::time::Instant::now();
                Some(y)
            }
            (Some(h), Some(m)) => Some(b.mlp(h, m.as_ref())),
            _ => None,
        };
        let mut done = None;
        if let Some(h) = hr {
            let (n, _) = b.shape(h);
            let out = match shared {
                Some(y) if tp => b.gather_rows(&y, &mine_rows),
                Some(y) => y,
                None => b.zeros(n, hidden),
            };
            let mut routed = b.zeros(n * k, hidden);
            for (e, pairs) in &local {
                let Some(m) = &layer.experts[*e] else {
                    return Err(ExchangeError::NotHeld {
                        layer: l,
                        expert: *e,
                    });
                };
                let token_rows: Vec<usize> = pairs.iter().map(|&p| p / k).collect();
                let y = b.mlp(&b.gather_rows(h, &token_rows), m.as_ref());
                b.scatter_rows(&mut routed, &y, pairs);
            }
            done = Some((out, routed));
        }
        lap(ep, &mut t0, |t| &mut t.expert_s);
        // Serve the peers' rows.
        let incoming = ep.exchange.recv(round(PHASE_DISPATCH))?;
        lap(ep, &mut t0, |t| &mut t.dispatch_s);
        let mut replies = vec![Rows::default(); world];
        for (src, msg) in incoming.into_iter().enumerate() {
            let malformed = |reason: String| ExchangeError::Malformed { peer: src, reason };
            if msg.n_rows().checked_mul(hidden) != Some(msg.data.len()) {
                return Err(malformed(format!(
                    "{} values for {} rows of {hidden}",
                    msg.data.len(),
                    msg.n_rows()
                )));
            }
            let mut at = 0;
            for &(e, n) in &msg.blocks {
                let (e, n) = (e as usize, n as usize);
                if e >= spec.n_experts {
                    return Err(malformed(format!("layer {l} has no expert {e}")));
                }
                let Some(m) = &layer.experts[e] else {
                    return Err(ExchangeError::NotHeld {
                        layer: l,
                        expert: e,
                    });
                };
                let x = b.upload(n, hidden, &msg.data[at..at + n * hidden]);
                at += n * hidden;
                let reply = &mut replies[src];
                reply.blocks.push((e as u32, n as u32));
                reply.data.extend(b.download(&b.mlp(&x, m.as_ref())));
            }
        }
        lap(ep, &mut t0, |t| &mut t.expert_s);
        if let Some(t) = ep.timing.as_deref_mut() {
            t.bytes_sent += replies.iter().map(|r| 4 * r.data.len() as u64).sum::<u64>();
        }
        ep.exchange.send(round(PHASE_COMBINE), replies)?;
        // Combine the results in the tokens' order.
        let results = ep.exchange.recv(round(PHASE_COMBINE))?;
        let combined = match done {
            None => None,
            Some((mut out, mut routed)) => {
                for (dest, msg) in results.into_iter().enumerate() {
                    let expect: Vec<u32> = sent[dest].iter().map(|p| p.len() as u32).collect();
                    let lens: Vec<u32> = msg.blocks.iter().map(|&(_, n)| n).collect();
                    if lens != expect || msg.n_rows().checked_mul(hidden) != Some(msg.data.len()) {
                        return Err(ExchangeError::Malformed {
                            peer: dest,
                            reason: "the results do not match the rows sent".into(),
                        });
                    }
                    let mut at = 0;
                    for pairs in &sent[dest] {
                        let n = pairs.len();
                        let y = b.upload(n, hidden, &msg.data[at..at + n * hidden]);
                        at += n * hidden;
                        b.scatter_rows(&mut routed, &y, pairs);
                    }
                }
                b.combine(&mut out, &routed, &weights, k);
                Some(out)
            }
        };
        lap(ep, &mut t0, |t| &mut t.combine_s);
        if !tp || h.is_none() {
            return Ok(combined);
        }
        // The group's slices, back into every shard's copy of all rows.
        let parts = self.tp_exchange(
            l,
            PHASE_ROWS,
            mine.len(),
            combined.map(|c| b.download(&c)).unwrap_or_default(),
            ep,
        )?;
        let mut all = Vec::with_capacity(n_all * hidden);
        for (j, p) in parts.into_iter().enumerate() {
            let want = TpShard {
                index: j,
                size: self.tp.size,
            }
            .tokens(n_all)
            .len();
            if p.len() != want * hidden {
                return Err(ExchangeError::Malformed {
                    peer: self.tp_group(rank)[j],
                    reason: format!("{} values for {want} rows of {hidden}", p.len()),
                });
            }
            all.extend(p);
        }
        Ok(Some(b.upload(n_all, hidden, &all)))
    }
}

/// The exchange rounds of a layer, in the order a rank awaits them.
const PHASE_HEADS: u8 = 0;
const PHASE_ATTN_OUT: u8 = 1;
const PHASE_SHARED_ACT: u8 = 2;
const PHASE_SHARED_OUT: u8 = 3;
const PHASE_DISPATCH: u8 = 4;
const PHASE_COMBINE: u8 = 5;
const PHASE_ROWS: u8 = 6;
// The transports accept exactly these phases.
const _: () = assert!(PHASE_ROWS + 1 == crate::exchange::PHASES);

/// What a forward pass asks of its caller between device operations.
enum Hook<'x, A> {
    /// The layer's MoE block of these rows.
    Moe(&'x A),
    /// Tensor parallelism: this shard's columns, to be gathered with the group's
    /// (the round's phase).
    Gather(u8, &'x A),
}

/// Answers a forward pass's [`Hook`] for layer `l`.
type HookFn<'a, B, E> =
    dyn FnMut(usize, Hook<'_, <B as Backend>::Act>) -> Result<<B as Backend>::Act, E> + 'a;

/// A forward pass's place in an expert-parallel group.
pub struct ExpertParallel<'a> {
    pub exchange: &'a mut dyn Exchange,
    /// `[layer][expert]`: the ranks holding that expert (replicas included).
    pub holders: &'a [Vec<Vec<u32>>],
    /// The cluster-wide step number (orders the exchange's rounds).
    pub step: u64,
    /// Rows this worker routed, `[layer][expert]`, accumulated.
    pub load: &'a mut [Vec<u64>],
    /// When set, the MoE phases' wall time is added here, each phase ended by
    /// `fence` (a device synchronisation, so the split is real; benchmarks only).
    pub timing: Option<&'a mut EpTiming>,
    pub fence: Option<&'a (dyn Fn() + Sync)>,
}

/// Where an expert-parallel MoE block's time goes, summed over layers and steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EpTiming {
    /// Router, top-k, and packing rows for their workers.
    pub route_s: f64,
    /// The dispatch round (sending rows, waiting for the peers').
    pub dispatch_s: f64,
    /// The shared expert and the routed experts, local rows and peers'.
    pub expert_s: f64,
    /// The combine round and the weighted sum.
    pub combine_s: f64,
    /// Tensor-parallel gathers (heads, attention output, shared expert, rows).
    pub gather_s: f64,
    /// Activation bytes this worker sent.
    pub bytes_sent: u64,
}

/// Ends a timed phase: fences, adds the time since `t0` to the phase `pick` selects.
fn lap(
    ep: &mut ExpertParallel<'_>,
    t0: &mut std::time::Instant,
    pick: fn(&mut EpTiming) -> &mut f64,
) {
    if let Some(t) = ep.timing.as_deref_mut() {
        if let Some(f) = ep.fence {
            f();
        }
        let now = std::time::Instant::now();
        *pick(t) += (now - *t0).as_secs_f64();
        *t0 = now;
    }
}

/// The routed experts `which`, each matrix made by `mat` from its checkpoint name.
fn experts_from<B: Backend>(
    which: &[(usize, usize)],
    mat: &mut dyn FnMut(&str) -> B::Weight,
) -> Vec<((usize, usize), Mlp<B>)> {
    which
        .iter()
        .map(|&(l, x)| {
            let base = format!("model.layers.{l}.mlp.experts.{x}");
            let mut m = |p: &str| mat(&format!("{base}.{p}.weight"));
            let mlp = Mlp {
                gate: m("gate_proj"),
                up: m("up_proj"),
                down: m("down_proj"),
            };
            ((l, x), mlp)
        })
        .collect()
}

/// Every expected tensor's random-weight stream (its index among the expected names,
/// from 1) and shape, by name.
fn random_streams(cfg: &ModelConfig) -> std::collections::HashMap<String, (u64, Vec<usize>)> {
    crate::names::expected(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, e)| (e.name, (i as u64 + 1, e.shape)))
        .collect()
}

/// A random weight of a model made from `seed`: uniform, scaled by fan-in (the router
/// wider, so routing is decisive), its stream picked by the tensor's index `n` among
/// the expected names, so any shard of the model makes the same values.
fn random_weight<B: Backend>(
    backend: &B,
    seed: u64,
    n: u64,
    name: &str,
    rows: usize,
    cols: usize,
) -> B::Weight {
    let scale = if name.ends_with("gate.wg.weight") {
        4.0 * (3.0 / cols as f32).sqrt()
    } else if name.contains("embed_tokens") {
        1.0
    } else {
        (3.0 / cols as f32).sqrt()
    };
    backend.random_matrix(rows, cols, seed.wrapping_mul(1000).wrapping_add(n), scale)
}

/// The `(layer, expert)` a checkpoint tensor belongs to, if it is a routed expert's.
pub fn expert_of(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, _) = rest.split_once('.')?;
    Some((layer.parse().ok()?, expert.parse().ok()?))
}

/// The flat token list, the attention sequences and the rows whose logits are wanted.
fn flatten(chunks: &[SeqChunk]) -> (Vec<u32>, Vec<AttnSeq>, Vec<usize>) {
    let mut tokens = Vec::new();
    let mut seqs = Vec::with_capacity(chunks.len());
    let mut logit_rows = Vec::new();
    for c in chunks {
        let start = tokens.len();
        assert_eq!(
            c.slots.len(),
            c.first_pos + c.tokens.len(),
            "slots must cover the context"
        );
        assert!(!c.tokens.is_empty(), "a chunk has at least one token");
        tokens.extend_from_slice(&c.tokens);
        seqs.push(AttnSeq {
            rows: start..tokens.len(),
            first_pos: c.first_pos,
            slots: c.slots.clone(),
        });
        if c.all_logits {
            logit_rows.extend(start..tokens.len());
        } else {
            logit_rows.push(tokens.len() - 1);
        }
    }
    (tokens, seqs, logit_rows)
}
