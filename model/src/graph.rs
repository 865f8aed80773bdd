//! The forward pass of the Hunyuan family over a [`Backend`].
//!
//! Per layer: `h += attn(input_layernorm(h)); h += moe(post_attention_layernorm(h))`.
//! Attention projects q (and k/v on layers that own a CLA cache slot), applies RoPE,
//! writes the RoPE'd pre-norm K and V to the paged cache, applies the per-head
//! query norm, and attends with each layer's own key norm applied as keys are read.
//! The MoE block is the shared MLP plus the router's top-k experts, combined with
//! their routing weights.

use hyserve_kernels::{AttnSeq, Backend, ScoreScale};

use crate::checkpoint::Checkpoint;
use crate::config::{Arch, ModelConfig};

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp<B: Backend> {
    pub gate: B::Weight,
    pub up: B::Weight,
    pub down: B::Weight,
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
        let mut tick = |name: &str, p: &mut LoadProgress| {
            p.tensors_done += 1;
            p.bytes_done += ck.get(name).map_or(0, |t| t.bytes.len() as u64);
            progress(*p);
        };
        let mut mat = |name: String| {
            let w = backend.load_matrix(&ck.matrix(&name));
            tick(&name, &mut p);
            w
        };
        let embed = mat("model.embed_tokens.weight".into());
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let vec = |name: String| backend.load_vector(&ck.vector(&name));
        for (l, spec) in cfg.layers.iter().enumerate() {
            let pre = format!("model.layers.{l}");
            let a = format!("{pre}.self_attn");
            let m = format!("{pre}.mlp");
            let mut mlp = |base: String| Mlp {
                gate: mat(format!("{base}.gate_proj.weight")),
                up: mat(format!("{base}.up_proj.weight")),
                down: mat(format!("{base}.down_proj.weight")),
            };
            let shared = (spec.shared_width > 0).then(|| mlp(format!("{m}.shared_mlp")));
            let experts = (0..spec.n_experts)
                .map(|x| mlp(format!("{m}.experts.{x}")))
                .collect();
            layers.push(Layer {
                input_norm: vec(format!("{pre}.input_layernorm.weight")),
                q: mat(format!("{a}.q_proj.weight")),
                kv: spec.has_kv.then(|| {
                    (
                        mat(format!("{a}.k_proj.weight")),
                        mat(format!("{a}.v_proj.weight")),
                    )
                }),
                o: mat(format!("{a}.o_proj.weight")),
                q_norm: cfg
                    .use_qk_norm
                    .then(|| vec(format!("{a}.query_layernorm.weight"))),
                k_norm: cfg
                    .use_qk_norm
                    .then(|| vec(format!("{a}.key_layernorm.weight"))),
                post_norm: vec(format!("{pre}.post_attention_layernorm.weight")),
                router: mat(format!("{m}.gate.wg.weight")),
                shared,
                experts,
            });
        }
        let lm_head = (!cfg.tie_word_embeddings).then(|| mat("lm_head.weight".into()));
        Self {
            inv_freq: cfg.inv_freq(),
            norm: vec("model.norm.weight".into()),
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
        let mut positions = Vec::new();
        let mut new_slots = Vec::new();
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
            positions.extend(c.first_pos..c.first_pos + c.tokens.len());
            new_slots.extend_from_slice(&c.slots[c.first_pos..]);
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
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        let mut x = b.embed(&self.embed, &tokens);
        for (l, layer) in self.layers.iter().enumerate() {
            let spec = &cfg.layers[l];
            // Attention.
            let h = b.rms_norm(&x, &layer.input_norm, eps);
            let mut q = b.matmul(&h, &layer.q);
            b.rope(&mut q, cfg.head_dim, &positions, &self.inv_freq);
            if let Some((wk, wv)) = &layer.kv {
                let mut k = b.matmul(&h, wk);
                b.rope(&mut k, cfg.head_dim, &positions, &self.inv_freq);
                let v = b.matmul(&h, wv);
                b.write_kv(kv, spec.cache_layer, &k, &v, &new_slots);
            }
            if let Some(w) = &layer.q_norm {
                q = b.rms_norm(&q, w, eps);
            }
            let key_norm = layer.k_norm.as_ref().map(|w| (w, eps));
            let scale = match cfg.arch {
                Arch::HunyuanLarge => ScoreScale::DivSqrt,
                Arch::HunyuanV1Moe => ScoreScale::MulInvSqrt,
            };
            let attn = b.attention(
                &q,
                kv,
                spec.cache_layer,
                cfg.n_heads,
                key_norm,
                scale,
                &seqs,
            );
            let o = b.matmul(&attn, &layer.o);
            b.add_assign(&mut x, &o);
            // MoE.
            let h = b.rms_norm(&x, &layer.post_norm, eps);
            let moe = self.moe(b, l, &h);
            b.add_assign(&mut x, &moe);
        }
        let last = b.gather_rows(&x, &logit_rows);
        let last = b.rms_norm(&last, &self.norm, eps);
        let logits = b.matmul(&last, self.lm_head.as_ref().unwrap_or(&self.embed));
        let flat = b.download(&logits);
        let vocab = cfg.vocab_size;
        let mut out = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for c in chunks {
            let n = if c.all_logits { c.tokens.len() } else { 1 };
            out.push(flat[row * vocab..(row + n) * vocab].to_vec());
            row += n;
        }
        out
    }

    fn mlp(&self, b: &B, m: &Mlp<B>, x: &B::Act) -> B::Act {
        let g = b.matmul(x, &m.gate);
        let u = b.matmul(x, &m.up);
        b.matmul(&b.swiglu(&g, &u), &m.down)
    }

    /// Shared MLP + routed experts, combined with the routing weights.
    fn moe(&self, b: &B, l: usize, h: &B::Act) -> B::Act {
        let layer = &self.layers[l];
        let spec = &self.cfg.layers[l];
        let (n_tokens, hidden) = b.shape(h);
        let mut out = match &layer.shared {
            Some(m) => self.mlp(b, m, h),
            None => b.zeros(n_tokens, hidden),
        };
        // Hunyuan-Large's router is a bf16 GEMM in its reference; the A13B reference
        // (transformers) keeps the router weight and its logits in fp32.
        let logits = match self.cfg.arch {
            Arch::HunyuanLarge => b.matmul(h, &layer.router),
            Arch::HunyuanV1Moe => b.matmul_fp32(h, &layer.router),
        };
        let k = spec.top_k;
        // Large rounds the routing weights to bf16; the A13B reference keeps them fp32.
        let round_weights = self.cfg.arch == Arch::HunyuanLarge;
        let (experts, weights) = b.route(&logits, k, self.cfg.renormalize(l), round_weights);
        // Group the (token, choice) pairs by expert; each expert runs once on its tokens.
        let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); spec.n_experts];
        for (i, &e) in experts.iter().enumerate() {
            by_expert[e as usize].push(i);
        }
        let mut routed = b.zeros(n_tokens * k, hidden);
        for (e, pairs) in by_expert.iter().enumerate() {
            if pairs.is_empty() {
                continue;
            }
            let token_rows: Vec<usize> = pairs.iter().map(|&i| i / k).collect();
            let xe = b.gather_rows(h, &token_rows);
            let ye = self.mlp(b, &layer.experts[e], &xe);
            b.scatter_rows(&mut routed, &ye, pairs);
        }
        b.combine(&mut out, &routed, &weights, k);
        out
    }
}
