#!/usr/bin/env python3
"""Plain-NumPy reference forward pass for Tencent Hunyuan MoE checkpoints.

Written from docs/hunyuan-large.md (the spec), not from any torch code, so it is an
independent oracle for the Rust engine. "Spec" below refers to that document.

Supported `config.json` model types:

  * "hunyuan"         Hunyuan-Large (HunYuanForCausalLM): CLA with cla_share_factor,
                      top-1 routing with p NOT renormalised (top-k > 1 renormalised),
                      shared expert, QK-norm after RoPE, NTK-alpha RoPE, tied embeddings.
  * "hunyuan_v1_moe"  Hunyuan-A13B (HunYuanMoEV1ForCausalLM) as implemented natively in
                      HF transformers: no CLA, head_dim from config, per-layer moe_topk
                      allowed, routing weights ALWAYS renormalised over the top-k (HF does
                      this even for k = 1, giving weight 1.0), shared MLP always present.

Expert and shared-MLP widths are taken from the tensor shapes (the config fields
intermediate_size / moe_intermediate_size / num_shared_expert are only cross-checked),
so per-layer widths work automatically.

Precision: by default everything is float32 (weights widened from bf16 exactly).
With --bf16 the bf16 rounding points of the torch bf16 reference are emulated
(spec "Precision of the reference"): every GEMM output, norm output, elementwise
product/add, RoPE output, attention probabilities and the logits are rounded to bf16
(round-to-nearest-even); reductions inside GEMMs, norms and softmaxes stay fp32.
Attention follows the eager path (scores rounded, then scaled and rounded again).
Router: "hunyuan" per spec (bf16 GEMM, p_top rounded to bf16); "hunyuan_v1_moe" as
transformers does it (fp32 wg, fp32 logits and weights). Validated against
transformers 5.17 on an H200 with a tiny hunyuan_v1_moe model: f32 logits agree to
~1e-6, and --bf16 prefill logits are bit-identical to transformers' bf16 (eager).

CLI (greedy generation, full causal recompute, no KV cache):

  python3 numpy_ref.py --model DIR --prompt-ids 1,2,3 --max-tokens N \
      --out-logits L.npy --out-json G.json [--bf16]

L.npy is float32 [n_prompt + N - 1, vocab]: row i holds the next-token logits after
consuming token i of prompt+generated (rows 0..n_prompt-1 come from the prefill pass
over the prompt, row n_prompt-1+j from the pass that consumed generated token j).
With N = 0 it holds the n_prompt prefill rows. G.json = {"prompt_ids", "generated_ids"}.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

F32 = np.float32

# ----------------------------------------------------------------------------------------
# bf16 helpers
# ----------------------------------------------------------------------------------------


def bf16_bits_to_f32(u16):
    """bf16 -> f32: a bf16 is the top half of an f32, so shift the 16 bits left by 16."""
    return (np.asarray(u16, dtype=np.uint32) << 16).view(F32)


def f32_to_bf16_bits(x):
    """f32 -> bf16 bits with round-to-nearest-even (what torch's .to(bfloat16) does). NaN kept NaN."""
    x = np.ascontiguousarray(x, dtype=F32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def round_bf16(x):
    """Round an f32 array to the nearest bf16 value, returned as f32 (emulated bf16 storage)."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x)).reshape(np.shape(x))


# ----------------------------------------------------------------------------------------
# safetensors I/O (own parser: safetensors.numpy cannot represent bf16)
# ----------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path, names=None):
    """Parse one .safetensors file: u64-LE header length, JSON header
    {name: {dtype, shape, data_offsets}}, then raw little-endian data.
    Returns {name: float32 ndarray} (bf16 widened exactly; integer tensors kept as is)."""
    out = {}
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        base = 8 + hlen
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for name, meta in header.items():
            if name == "__metadata__" or (names is not None and name not in names):
                continue
            start, end = meta["data_offsets"]
            raw = data[base + start: base + end]
            shape = tuple(meta["shape"])
            dt = meta["dtype"]
            if dt == "BF16":
                arr = bf16_bits_to_f32(raw.view("<u2")).reshape(shape)
            elif dt in _ST_DTYPES:
                arr = np.frombuffer(raw.tobytes(), dtype=np.dtype(_ST_DTYPES[dt]).newbyteorder("<"))
                arr = arr.reshape(shape)
                if arr.dtype.kind == "f":
                    arr = arr.astype(F32)
            else:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {dt}")
            out[name] = np.array(arr)  # own the memory, detach from the memmap
    return out


def write_safetensors(path, tensors, dtype="bf16", metadata=None):
    """Write {name: ndarray} as safetensors. Float tensors are stored as `dtype`
    ("bf16" with RNE rounding, or "f32"); names are sorted like HF does."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype.kind == "f":
            if dtype == "bf16":
                raw, st = f32_to_bf16_bits(a).astype("<u2").tobytes(), "BF16"
            elif dtype == "f32":
                raw, st = a.astype("<f4").tobytes(), "F32"
            else:
                raise ValueError(dtype)
        elif a.dtype == np.int64:
            raw, st = a.astype("<i8").tobytes(), "I64"
        else:
            raise ValueError(f"unsupported array dtype {a.dtype} for {name}")
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)  # align data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def load_checkpoint(model_dir):
    """Load all tensors of an HF model directory: shards listed in
    model.safetensors.index.json, else model.safetensors, else every *.safetensors."""
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        files = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    weights = {}
    for fn in files:
        weights.update(read_safetensors(os.path.join(model_dir, fn)))
    return weights


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


def _per_layer(value, n_layers, name):
    """Config fields that may be an int or a per-layer list (hunyuan_v1_moe)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_layers:
            raise ValueError(f"{name} has {len(value)} entries for {n_layers} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layers


class Config:
    """The subset of config.json the forward pass needs, normalised over both model types."""

    def __init__(self, cfg):
        self.raw = cfg
        mt = cfg.get("model_type")
        if mt not in ("hunyuan", "hunyuan_v1_moe"):
            raise ValueError(f"unsupported model_type {mt!r}")
        self.model_type = mt
        self.hidden = int(cfg["hidden_size"])
        self.n_layers = int(cfg["num_hidden_layers"])
        self.n_heads = int(cfg["num_attention_heads"])
        self.n_kv = int(cfg.get("num_key_value_heads") or self.n_heads)
        # Spec: Hunyuan-Large has no head_dim field -> hidden / heads. The Tencent code
        # ignores a head_dim field for "hunyuan"; hunyuan_v1_moe reads it from the config.
        if mt == "hunyuan":
            self.head_dim = self.hidden // self.n_heads
        else:
            self.head_dim = int(cfg.get("head_dim") or self.hidden // self.n_heads)
        self.vocab = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-5))
        self.act = cfg.get("hidden_act", "silu")
        if self.act != "silu":
            raise ValueError(f"hidden_act {self.act} not supported")
        self.tie = bool(cfg.get("tie_word_embeddings", mt == "hunyuan"))
        # Spec CLA: only "hunyuan" uses it; HF hunyuan_v1_moe has no CLA at all.
        self.use_cla = bool(cfg.get("use_cla", False)) and mt == "hunyuan"
        self.cla_share_factor = int(cfg.get("cla_share_factor", 1) or 1) if self.use_cla else 1
        # hunyuan: QK-norm gated by use_qk_norm; HF hunyuan_v1_moe always applies it.
        self.use_qk_norm = bool(cfg.get("use_qk_norm", True)) if mt == "hunyuan" else True
        self.num_experts = _per_layer(cfg.get("num_experts", 1), self.n_layers, "num_experts")
        self.topk = _per_layer(cfg.get("moe_topk", 1), self.n_layers, "moe_topk")
        # Routing-weight rule. Spec (hunyuan): top-1 p NOT renormalised, top-k>1 renormalised.
        # HF hunyuan_v1_moe: always p_i / sum_topk p (so top-1 weight == 1).
        self.renorm_top1 = mt == "hunyuan_v1_moe"
        self.rope_theta = float(cfg.get("rope_theta", 10000.0))
        self.rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        self.max_pos = int(cfg.get("max_position_embeddings", 4096))

    def kv_source_layer(self, layer):
        """Spec CLA: layer l reuses the raw K/V of layer l - (l % cla_share_factor)
        (even layers own k_proj/v_proj when the factor is 2)."""
        return layer - (layer % self.cla_share_factor)

    def rope_inv_freq(self):
        """Spec RoPE: fixed NTK-alpha base = rope_theta * alpha^(d/(d-2)) (NOT length dependent),
        inv_freq = 1 / base^(arange(0, d, 2)/d) in fp32. Without alpha: plain rope_theta
        (a "dynamic" factor only matters beyond max_position_embeddings, unsupported here)."""
        d = self.head_dim
        base = self.rope_theta
        rs = self.rope_scaling or {}
        rtype = rs.get("rope_type", rs.get("type"))
        alpha = rs.get("alpha")
        if rtype == "dynamic" and alpha:
            base = self.rope_theta * float(alpha) ** (d / (d - 2))  # python float64, like torch
        expo = np.arange(0, d, 2, dtype=F32) / F32(d)
        return (F32(1.0) / np.power(F32(base), expo)).astype(F32)

    def rope_position_scale(self):
        """Linear RoPE scaling divides positions by factor; every other type leaves them."""
        rs = self.rope_scaling or {}
        if rs.get("rope_type", rs.get("type")) == "linear":
            return float(rs.get("factor", 1.0))
        return 1.0


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


class Model:
    def __init__(self, config, weights, bf16=False):
        self.c = config
        self.bf16 = bf16
        # In bf16 mode every weight is a bf16 value (a no-op for bf16 checkpoints). The spec
        # treats the Hunyuan-Large router GEMM as bf16 too; transformers' hunyuan_v1_moe
        # keeps mlp.gate.wg in fp32 (created with dtype=float32) and runs the router in fp32.
        self.fp32_router = bf16 and config.model_type == "hunyuan_v1_moe"

        def cast(k, v):
            if not bf16 or v.dtype != F32 or (self.fp32_router and k.endswith("mlp.gate.wg.weight")):
                return v
            return round_bf16(v)

        self.w = {k: cast(k, v) for k, v in weights.items()}
        self._check_weights()

    # -- precision ---------------------------------------------------------------------
    def r(self, x):
        """A bf16 rounding point of the torch bf16 reference (identity in f32 mode)."""
        return round_bf16(x) if self.bf16 else x.astype(F32, copy=False)

    # -- weights -----------------------------------------------------------------------
    def _lw(self, layer, name):
        return self.w[f"model.layers.{layer}.{name}"]

    def _check_weights(self):
        c = self.c
        need = ["model.embed_tokens.weight", "model.norm.weight"]
        for l in range(c.n_layers):
            p = f"model.layers.{l}."
            need += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                     p + "self_attn.q_proj.weight", p + "self_attn.o_proj.weight",
                     p + "mlp.gate.wg.weight"]
            if c.kv_source_layer(l) == l:
                need += [p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"]
            if c.use_qk_norm:
                need += [p + "self_attn.query_layernorm.weight", p + "self_attn.key_layernorm.weight"]
            for e in range(c.num_experts[l]):
                need += [f"{p}mlp.experts.{e}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
            if p + "self_attn.kv_proj.weight" in self.w:
                raise ValueError("packed kv_proj checkpoints (use_pack_kv) are not supported")
            wg = self.w[p + "mlp.gate.wg.weight"] if p + "mlp.gate.wg.weight" in self.w else None
            if wg is not None and wg.shape[0] != c.num_experts[l]:
                raise ValueError(f"layer {l}: wg has {wg.shape[0]} rows, config says {c.num_experts[l]} experts")
        if not c.tie:
            need.append("lm_head.weight")
        missing = [n for n in need if n not in self.w]
        if missing:
            raise KeyError(f"missing tensors ({len(missing)}), e.g. {missing[:5]}")

    def linear(self, x, name):
        """y = x @ W^T (+ b): one bf16 GEMM with fp32 accumulation -> rounded once."""
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        if b is not None:
            y = y + b
        return self.r(y)

    # -- building blocks ---------------------------------------------------------------
    def rmsnorm(self, x, weight):
        """Spec RMSNorm: fp32 x * rsqrt(mean(x^2) + eps), round to bf16, then * bf16 weight
        (the product rounded again). Works on the last axis (hidden or per-head)."""
        x = x.astype(F32, copy=False)
        var = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
        y = self.r(x * (F32(1.0) / np.sqrt(var + F32(self.c.eps))))
        return self.r(weight * y)

    def rope_tables(self, n):
        """Spec RoPE tables for positions 0..n-1 (position ids start at 0): NeoX layout,
        emb = cat(freqs, freqs); cos/sin in fp32, then rounded to bf16 in bf16 mode."""
        t = np.arange(n, dtype=F32) / F32(self.c.rope_position_scale())
        freqs = np.outer(t, self.c.rope_inv_freq()).astype(F32)
        emb = np.concatenate([freqs, freqs], axis=-1)
        return self.r(np.cos(emb)), self.r(np.sin(emb))

    def apply_rope(self, x, cos, sin):
        """Spec RoPE, rotate-half (pairs i and i + d/2), x: [T, heads, d].
        torch: (x*cos) + (rotate_half(x)*sin), each op rounded in bf16."""
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return self.r(self.r(x * c) + self.r(rot * s))

    def silu_mlp(self, x, prefix):
        """SwiGLU FFN used by experts and the shared expert: down(silu(gate(x)) * up(x))."""
        g = self.linear(x, prefix + ".gate_proj")
        u = self.linear(x, prefix + ".up_proj")
        a = self.r(g / (F32(1.0) + np.exp(-g)))  # silu, computed in fp32, stored bf16
        return self.linear(self.r(a * u), prefix + ".down_proj")

    # -- attention ---------------------------------------------------------------------
    def attention(self, l, x, cos, sin, kv_raw, collect=None):
        """Spec Attention: project -> RoPE(q, k) -> per-head RMSNorm AFTER RoPE ->
        scores / sqrt(d) + causal mask -> fp32 softmax -> x V -> o_proj.
        GQA: query head h uses kv head h // (heads / kv_heads).
        CLA: K/V come from kv_raw[src] (raw, pre-RoPE, pre-norm projections of the source
        layer's normed input); this layer applies RoPE and ITS OWN key_layernorm."""
        c = self.c
        T, H, KV, D = x.shape[0], c.n_heads, c.n_kv, c.head_dim
        p = f"model.layers.{l}.self_attn."
        src = c.kv_source_layer(l)
        if src == l:  # this layer owns k_proj / v_proj
            kv_raw[l] = (self.linear(x, p + "k_proj"), self.linear(x, p + "v_proj"))
        k_raw, v_raw = kv_raw[src]
        q = self.linear(x, p + "q_proj").reshape(T, H, D)
        k = k_raw.reshape(T, KV, D)
        v = v_raw.reshape(T, KV, D)
        q = self.apply_rope(q, cos, sin)
        k = self.apply_rope(k, cos, sin)
        if c.use_qk_norm:
            q = self.rmsnorm(q, self.w[p + "query_layernorm.weight"])
            k = self.rmsnorm(k, self.w[p + "key_layernorm.weight"])
        rep = H // KV
        qh = q.transpose(1, 0, 2)                          # [H, T, D]
        kh = np.repeat(k.transpose(1, 0, 2), rep, axis=0)  # [H, T, D], head h -> kv h // rep
        vh = np.repeat(v.transpose(1, 0, 2), rep, axis=0)
        scores = self.r(qh @ kh.transpose(0, 2, 1))
        if c.model_type == "hunyuan":   # Tencent eager: matmul(q, k^T) / math.sqrt(d)
            scores = self.r(scores / F32(math.sqrt(D)))
        else:                           # HF eager: matmul(q, k^T) * d**-0.5
            scores = self.r(scores * F32(D ** -0.5))
        mask = np.triu(np.ones((T, T), dtype=bool), k=1)
        scores = np.where(mask[None], -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = self.r(probs / probs.sum(axis=-1, keepdims=True))  # fp32 softmax, stored bf16
        out = self.r(probs @ vh)                                   # [H, T, D]
        out = out.transpose(1, 0, 2).reshape(T, H * D)
        if collect is not None:
            collect[f"q.{l}"], collect[f"k.{l}"], collect[f"v.{l}"] = q, k, v
        return self.linear(out, p + "o_proj")

    # -- MoE ---------------------------------------------------------------------------
    def moe(self, l, x, collect=None):
        """Spec MoE: shared expert always; router logits = x @ wg^T, p = softmax in fp32,
        top-k with ties -> lowest index; routed = sum_k w_k * expert_k(x) with
        w = p_top (top-1, hunyuan: NOT renormalised) or p / sum_topk(p) (top-k > 1, and
        always for hunyuan_v1_moe); w rounded to bf16 (hunyuan; HF v1 keeps the fp32 router
        and fp32 weights); no token dropping.
        Output = shared + routed (bf16 add)."""
        c = self.c
        p = f"model.layers.{l}.mlp."
        T = x.shape[0]
        k = c.topk[l]
        if self.fp32_router:  # HF: fp32 wg, x.float() @ wg^T, no rounding
            logits = x @ self.w[p + "gate.wg.weight"].T
        else:                 # spec: bf16 GEMM (fp32 accumulation), rounded
            logits = self.linear(x, p + "gate.wg")
        z = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(z)
        probs = probs / probs.sum(axis=-1, keepdims=True)
        # stable sort on -p: equal probabilities keep ascending expert order (lowest wins)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]       # [T, k]
        wtop = np.take_along_axis(probs, top, axis=-1)                # [T, k] fp32
        if k > 1 or c.renorm_top1:
            wtop = wtop / wtop.sum(axis=-1, keepdims=True)
        if not self.fp32_router:
            wtop = self.r(wtop)  # combine_weights.type_as(hidden_states) (HF v1: stays fp32)
        # run each expert once on the tokens routed to it; raw[t, j] = w_tj * expert_tj(x_t)
        # (fp32 product of two bf16 values: exact, rounding happens where torch rounds)
        raw = np.zeros((T, k, x.shape[1]), dtype=F32)
        for e in np.unique(top):
            tok, slot = np.nonzero(top == e)
            y = self.silu_mlp(x[tok], f"{p}experts.{e}")
            raw[tok, slot] = y * wtop[tok, slot][:, None]
        # Tencent combine: one bf16 einsum over (expert, slot) = fp32 sum, rounded once
        # (top-1: r(r(p) * y)). transformers 5.x hunyuan_v1_moe on GPU was measured to give
        # the same r(sum_k w_k * y_k) with fp32 w_k (bit-exact against its bf16 outputs).
        routed = self.r(raw.sum(axis=1))
        if p + "shared_mlp.gate_proj.weight" in self.w:
            out = self.r(self.silu_mlp(x, p + "shared_mlp") + routed)
        else:
            out = routed
        if collect is not None:
            collect[f"moe_in.{l}"], collect[f"router_probs.{l}"], collect[f"experts.{l}"] = x, probs, top
            collect[f"routing_weights.{l}"] = wtop
        return out

    # -- full model --------------------------------------------------------------------
    def forward(self, ids, collect=None):
        """Spec Forward pass: pre-norm residual blocks
        h += attn(input_layernorm(h)); h += moe(post_attention_layernorm(h));
        then norm, logits = h @ embed_tokens^T (tied; lm_head ignored) cast to fp32.
        Returns float32 logits [T, vocab] for every position."""
        c = self.c
        ids = np.asarray(ids, dtype=np.int64)
        h = self.w["model.embed_tokens.weight"][ids].astype(F32)
        cos, sin = self.rope_tables(len(ids))
        kv_raw = {}
        for l in range(c.n_layers):
            x = self.rmsnorm(h, self._lw(l, "input_layernorm.weight"))
            a = self.attention(l, x, cos, sin, kv_raw, collect)
            h = self.r(h + a)
            x = self.rmsnorm(h, self._lw(l, "post_attention_layernorm.weight"))
            m = self.moe(l, x, collect)
            h = self.r(h + m)
            if collect is not None:
                collect[f"attn_out.{l}"], collect[f"moe_out.{l}"], collect[f"h.{l}"] = a, m, h
        h = self.rmsnorm(h, self.w["model.norm.weight"])
        head = self.w["model.embed_tokens.weight"] if c.tie else self.w["lm_head.weight"]
        return self.r(h @ head.T).astype(F32)


def load_model(model_dir, bf16=False, weights=None):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = Config(json.load(f))
    if weights is None:
        weights = load_checkpoint(model_dir)
    return Model(cfg, weights, bf16=bf16)


def greedy_generate(model, prompt_ids, max_tokens):
    """Greedy decoding by full causal recompute. Returns (logits [P + N - 1, V], generated ids).
    Argmax ties -> lowest token id (np.argmax)."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    seq = list(prompt_ids)
    rows = [model.forward(seq)]  # prefill rows 0..P-1
    gen = []
    for step in range(max_tokens):
        nxt = int(np.argmax(rows[-1][-1]))
        gen.append(nxt)
        seq.append(nxt)
        if step + 1 < max_tokens:
            rows.append(model.forward(seq)[-1:])
    return np.concatenate(rows, axis=0).astype(F32), gen


def parse_ids(s):
    return [int(t) for t in s.replace(" ", "").split(",") if t != ""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF-style model directory")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out-logits", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--bf16", action="store_true", help="emulate the bf16 reference's rounding points")
    args = ap.parse_args(argv)

    model = load_model(args.model, bf16=args.bf16)
    prompt = parse_ids(args.prompt_ids)
    bad = [t for t in prompt if not 0 <= t < model.c.vocab]
    if bad:
        sys.exit(f"prompt ids out of range: {bad}")
    logits, gen = greedy_generate(model, prompt, args.max_tokens)
    if not np.isfinite(logits).all():
        print("warning: non-finite logits", file=sys.stderr)
    np.save(args.out_logits, logits)
    with open(args.out_json, "w") as f:
        json.dump({"prompt_ids": prompt, "generated_ids": gen}, f)
    print(f"prompt {len(prompt)} tokens, generated {gen}, logits {logits.shape}")


if __name__ == "__main__":
    main()
