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
        Self::load_shard(backend, cfg, ck, &|_, _| true, progress)
    }

    /// Like [`Model::load`], but of the routed experts only those `(layer, expert)` for
    /// which `holds` is true: one worker's shard under expert parallelism.
    pub fn load_shard(
        backend: &B,
        cfg: ModelConfig,
        ck: &Checkpoint,
        holds: &dyn Fn(usize, usize) -> bool,
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
        Self::random_shard(backend, cfg, seed, &|_, _| true, progress)
    }

    /// [`Model::random`] holding only the routed experts `holds` selects; every tensor's
    /// values depend on its name only, so shards of one seed make one model.
    pub fn random_shard(
        backend: &B,
        cfg: ModelConfig,
        seed: u64,
        holds: &dyn Fn(usize, usize) -> bool,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Self {
        let all = crate::names::expected(&cfg);
        let index: std::collections::HashMap<String, u64> = all
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i as u64 + 1))
            .collect();
        let expected: Vec<_> = all
            .into_iter()
            .filter(|e| expert_of(&e.name).is_none_or(|(l, x)| holds(l, x)))
            .collect();
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
        Self::assemble(
            cfg.clone(),
            holds,
            &mut |name| {
                let shape = shapes[name];
                let (rows, cols) = (shape[0], shape[1]);
                let n = index[name];
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
        holds: &dyn Fn(usize, usize) -> bool,
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
            cfg,
        }
    }

    /// Loads the routed experts `which` from `ck`, off to the side: the staging half of
    /// a placement change, done while the model keeps serving.
    pub fn load_experts(
        backend: &B,
        ck: &Checkpoint,
        which: &[(usize, usize)],
    ) -> Vec<((usize, usize), Mlp<B>)> {
        which
            .iter()
            .map(|&(l, x)| {
                let base = format!("model.layers.{l}.mlp.experts.{x}");
                let m = |p: &str| backend.load_matrix(&ck.matrix(&format!("{base}.{p}.weight")));
                (
                    (l, x),
                    Mlp {
                        gate: m("gate_proj"),
                        up: m("up_proj"),
                        down: m("down_proj"),
                    },
                )
            })
            .collect()
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

    /// Runs a batch of sequence chunks; returns, per chunk, its logits rows
    /// (`[rows, vocab]`, every new token's or only the last one's).
    pub fn forward(&self, b: &B, kv: &mut B::Kv, chunks: &[SeqChunk]) -> Vec<Vec<f32>> {
        let (tokens, seqs, logit_rows) = flatten(chunks);
        let mut moe = |l: usize, h: &B::Act| Ok::<_, Infallible>(self.moe(b, l, h));
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
                let Ok(x) = self.device_forward(b, kv, batch, None, &mut moe);
                x
            })
        } else {
            let batch = b.batch(seqs, &tokens);
            let Ok(x) = self.device_forward(b, kv, &batch, Some(&logit_rows), &mut moe);
            x
        };
        self.split_logits(&b.download(&logits), chunks)
    }

    /// [`Model::forward`] with the routed experts spread over the workers of `ep`: this
    /// worker's tokens go to the workers holding their experts and come back combined,
    /// bitwise as if every expert were local. Every worker of the group must call it
    /// for every step, with no chunks when it has no sequences of its own.
    pub fn forward_ep(
        &self,
        b: &B,
        kv: &mut B::Kv,
        chunks: &[SeqChunk],
        ep: &mut ExpertParallel<'_>,
    ) -> Result<Vec<Vec<f32>>, ExchangeError> {
        if chunks.is_empty() {
            for l in 0..self.layers.len() {
                self.moe_ep(b, l, None, ep)?;
            }
            return Ok(Vec::new());
        }
        let (tokens, seqs, logit_rows) = flatten(chunks);
        let batch = b.batch(seqs, &tokens);
        let logits = self.device_forward(b, kv, &batch, Some(&logit_rows), &mut |l, h| {
            Ok(self.moe_ep(b, l, Some(h), ep)?.expect("rows given"))
        })?;
        Ok(self.split_logits(&b.download(&logits), chunks))
    }

    fn split_logits(&self, flat: &[f32], chunks: &[SeqChunk]) -> Vec<Vec<f32>> {
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
    /// rows when `None`), with the MoE block of layer `l` computed by `moe(l, h)`.
    fn device_forward<E>(
        &self,
        b: &B,
        kv: &mut B::Kv,
        batch: &B::Batch,
        logit_rows: Option<&[usize]>,
        moe: &mut MoeFn<'_, B, E>,
    ) -> Result<B::Act, E> {
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
            pending = Some(moe(l, &h)?);
        }
        if let Some(y) = pending {
            b.add_assign(&mut x, &y);
        }
        let last = match logit_rows {
            Some(rows) => b.gather_rows(&x, rows),
            None => x,
        };
        let last = b.rms_norm(&last, &self.norm, eps);
        Ok(b.matmul(&last, self.lm_head.as_ref().unwrap_or(&self.embed)))
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
        let experts: Vec<MlpRef<'_, B::Weight>> = layer
            .experts
            .iter()
            .map(|m| {
                m.as_ref()
                    .expect("Model::forward needs every expert; use forward_ep for a shard")
                    .as_ref()
            })
            .collect();
        b.moe(
            h,
            &layer.router,
            self.routing(l),
            layer.shared.as_ref().map(Mlp::as_ref),
            &experts,
        )
    }

    /// The MoE block under expert parallelism. `h` is this worker's rows (`None`: it
    /// has no tokens this step and only serves its peers). Computes exactly what
    /// [`Backend::moe`]'s default does: the same routing, each expert's rows through
    /// the same MLP (a row's result does not depend on the rows beside it), the same
    /// combine; only where the expert rows are computed differs.
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
        // Route this worker's tokens; decide where each expert's rows are computed.
        let mut t0 = std::time::Instant::now();
        let mut outgoing = vec![Rows::default(); world];
        // Per peer, the (token, choice) pairs of every block sent, in send order.
        let mut sent: Vec<Vec<Vec<usize>>> = vec![Vec::new(); world];
        let mut local: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut weights = Vec::new();
        if let Some(h) = h {
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
        ep.exchange.send(round(0), outgoing)?;
        lap(ep, &mut t0, |t| &mut t.dispatch_s);
        // While the rows travel: the shared expert and the local experts.
        let mut done = None;
        if let Some(h) = h {
            let (n, _) = b.shape(h);
            let out = match &layer.shared {
                Some(m) => b.mlp(h, m.as_ref()),
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
        let incoming = ep.exchange.recv(round(0))?;
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
        ep.exchange.send(round(1), replies)?;
        // Combine the results in the tokens' order.
        let results = ep.exchange.recv(round(1))?;
        let Some((mut out, mut routed)) = done else {
            lap(ep, &mut t0, |t| &mut t.combine_s);
            return Ok(None);
        };
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
        lap(ep, &mut t0, |t| &mut t.combine_s);
        Ok(Some(out))
    }
}

/// Computes layer `l`'s MoE block of `h`.
type MoeFn<'a, B, E> =
    dyn FnMut(usize, &<B as Backend>::Act) -> Result<<B as Backend>::Act, E> + 'a;

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
