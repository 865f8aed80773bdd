//! The forward pass of the Hunyuan family over a [`Backend`].
//!
//! Per layer: `h += attn(input_layernorm(h)); h += moe(post_attention_layernorm(h))`.
//! Attention projects q (and k/v on layers that own a CLA cache slot), applies RoPE,
//! writes the RoPE'd pre-norm K and V to the paged cache, applies the per-head
//! query norm, and attends with each layer's own key norm applied as keys are read.
//! The MoE block is the shared MLP plus the router's top-k experts, combined with
//! their routing weights.

use hyserve_kernels::{AttnSeq, Backend, MlpRef, RecordKey, Routing, ScoreScale};

use crate::checkpoint::Checkpoint;
use crate::config::{Arch, ModelConfig};

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
    pub experts: Vec<Mlp<B>>,
}

/// The model's weights on one backend.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub embed: B::Weight,
    /// Untied output head; `None` means logits use `embed` (tied).
    pub lm_head: Option<B::Weight>,
    pub norm: B::Vector,
    pub layers: Vec<Layer<B>>,
    inv_freq: Vec<f32>,
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
}

impl<B: Backend> Model<B> {
    /// Moves the validated checkpoint's tensors onto `backend`.
    pub fn load(
        backend: &B,
        cfg: ModelConfig,
        ck: &Checkpoint,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Self {
        let expected = crate::names::expected(&cfg);
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
            &mut |name| {
                let w = backend.load_matrix(&ck.matrix(name));
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
        let expected = crate::names::expected(&cfg);
        let shapes: std::collections::HashMap<&str, &[usize]> = expected
            .iter()
            .map(|e| (e.name.as_str(), e.shape.as_slice()))
            .collect();
        let bytes_total: u64 = expected
            .iter()
            .map(|e| 2 * e.shape.iter().product::<usize>() as u64)
            .sum();
        let mut p = LoadProgress {
            tensors_done: 0,
            tensors_total: expected.len(),
            bytes_done: 0,
            bytes_total,
        };
        let mut n = 0u64;
        Self::assemble(
            cfg.clone(),
            &mut |name| {
                let shape = shapes[name];
                let (rows, cols) = (shape[0], shape[1]);
                n += 1;
                let scale = if name.ends_with("gate.wg.weight") {
                    4.0 * (3.0 / cols as f32).sqrt()
                } else if name.contains("embed_tokens") {
                    1.0
                } else {
                    (3.0 / cols as f32).sqrt()
                };
                let w = backend.random_matrix(
                    rows,
                    cols,
                    seed.wrapping_mul(1000).wrapping_add(n),
                    scale,
                );
                p.tensors_done += 1;
                p.bytes_done += 2 * (rows * cols) as u64;
                progress(p);
                w
            },
            &mut |name| backend.load_vector(&vec![1.0; shapes[name][0]]),
        )
    }

    fn assemble(
        cfg: ModelConfig,
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
                .map(|x| mlp(format!("{m}.experts.{x}")))
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
            cfg,
        }
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
            n += l.experts.iter().map(mlp).sum::<usize>();
        }
        n
    }

    /// Runs a batch of sequence chunks; returns, per chunk, its logits rows
    /// (`[rows, vocab]`, every new token's or only the last one's).
    pub fn forward(&self, b: &B, kv: &mut B::Kv, chunks: &[SeqChunk]) -> Vec<Vec<f32>> {
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
        // A decode step (one token per sequence, last logits only) has shapes that
        // depend only on the batch size: a backend may record and replay it.
        let decode = chunks.iter().all(|c| c.tokens.len() == 1 && !c.all_logits);
        let logits = if decode {
            let max_ctx = chunks.iter().map(|c| c.first_pos + 1).max().unwrap_or(1);
            let top_k = self.cfg.layers.iter().map(|l| l.top_k).max().unwrap_or(1);
            let key = RecordKey {
                rows: chunks.len(),
                ctx_bound: max_ctx.next_power_of_two().max(256),
                moe_pairs: chunks.len() * top_k,
                buffers: b.record_id(kv, &self.embed),
            };
            b.forward_recorded(key, seqs, &tokens, &mut |batch| {
                self.device_forward(b, kv, batch, None)
            })
        } else {
            let batch = b.batch(seqs, &tokens);
            self.device_forward(b, kv, &batch, Some(&logit_rows))
        };
        let flat = b.download(&logits);
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for c in chunks {
            let n = if c.all_logits { c.tokens.len() } else { 1 };
            out.push(flat[row * vocab..(row + n) * vocab].to_vec());
            row += n;
        }
        out
    }

    /// The device part of a forward pass: embeddings to logits of `logit_rows` (all
    /// rows when `None`).
    fn device_forward(
        &self,
        b: &B,
        kv: &mut B::Kv,
        batch: &B::Batch,
        logit_rows: Option<&[usize]>,
    ) -> B::Act {
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        let scale = match cfg.arch {
            Arch::HunyuanLarge => ScoreScale::DivSqrt,
            Arch::HunyuanV1Moe => ScoreScale::MulInvSqrt,
        };
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
            let attn = b.attention(
                &q,
                kv,
                spec.cache_layer,
                cfg.n_heads,
                key_norm,
                scale,
                batch,
            );
            let o = b.matmul(&attn, &layer.o);
            // MoE.
            let h = b.add_rms_norm(&mut x, &o, &layer.post_norm, eps);
            pending = Some(self.moe(b, l, &h));
        }
        if let Some(y) = pending {
            b.add_assign(&mut x, &y);
        }
        let last = match logit_rows {
            Some(rows) => b.gather_rows(&x, rows),
            None => x,
        };
        let last = b.rms_norm(&last, &self.norm, eps);
        b.matmul(&last, self.lm_head.as_ref().unwrap_or(&self.embed))
    }

    /// Shared MLP + routed experts, combined with the routing weights.
    fn moe(&self, b: &B, l: usize, h: &B::Act) -> B::Act {
        let layer = &self.layers[l];
        let routing = Routing {
            top_k: self.cfg.layers[l].top_k,
            renormalize: self.cfg.renormalize(l),
            // Large's router is a bf16 GEMM with bf16-rounded weights; the A13B reference
            // (transformers) keeps the router logits and weights in fp32.
            round_weights: self.cfg.arch == Arch::HunyuanLarge,
            fp32_logits: self.cfg.arch == Arch::HunyuanV1Moe,
        };
        let experts: Vec<MlpRef<'_, B::Weight>> = layer.experts.iter().map(Mlp::as_ref).collect();
        b.moe(
            h,
            &layer.router,
            routing,
            layer.shared.as_ref().map(Mlp::as_ref),
            &experts,
        )
    }
}
