"""PyTorch model of the Hunyuan-Large architecture (HunYuanForCausalLM), for training our small
"hunyuan-tiny" / "hunyuan-tiny-draft" checkpoints and as the training framework's own reference
forward pass.

Why it exists: train.py trains it; check_logits.py and train.py's reference outputs compare it with
the Rust engine. Semantics follow ../shared/docs/hunyuan-large.md (the spec) and, rounding point
for rounding point, scripts/reference/numpy_ref.py:

  * pre-norm residual blocks, h += attn(input_layernorm(h)); h += moe(post_attention_layernorm(h));
    final norm; logits = h @ embed_tokens^T (tied), returned as float32;
  * RMSNorm: fp32 math, cast to the compute dtype, then times the weight;
  * attention: q [heads x head_dim], k/v [kv_heads x head_dim] only on even layers (CLA, share factor
    2: odd layers reuse the previous even layer's RoPE'd, pre-norm K and V); NeoX rotate-half RoPE
    with base = rope_theta * alpha^(d/(d-2)), fp32 tables cast to the compute dtype; per-head
    query_layernorm / key_layernorm AFTER RoPE (each layer its own key norm on the shared K);
    scores / sqrt(d), causal, fp32 softmax; o_proj;
  * MoE on every layer: shared expert always; router p = softmax(fp32(x @ wg^T)); top-1 argmax (ties
    to the lowest index); routed = p_top (in the compute dtype, not renormalised) * expert(x).

Precision modes of `HunyuanForCausalLM.forward`:
  * weights f32, no autocast            -> the f32 reference;
  * weights bf16 (model.to(bfloat16))   -> the bf16 reference (every op output rounded to bf16,
                                           norms / softmaxes / RoPE tables in fp32), with exact=True;
  * weights f32 under CUDA bf16 autocast -> training (fp32 master weights).
exact=True uses eager attention (the reference's rounding points); exact=False uses PyTorch's fused
scaled_dot_product_attention (training speed; same maths).

Training-only extras: a Switch-style load-balancing loss (returned by forward) and an efficient
expert dispatch (tokens sorted by expert, one grouped GEMM or one matmul per expert).

Also here: config.json construction (`make_config`) mirroring `preset_config` in model/src/init.rs,
and bf16 safetensors export/import with our checkpoint names (written by hand, no extra packages).

Library module, no CLI; quick self-test:  python3 scripts/train/hunyuan.py
"""

import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# 4305 tokenizer ids (4096 ranks + 209 specials) padded up to a multiple of 64.
VOCAB_SIZE = 4352

PRESETS = {
    # ~15.8M parameters (~32 MB in bf16).
    "tiny": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=8, intermediate_size=128, num_experts=16),
    # ~1.5M parameters: the speculative-decoding draft of the same family.
    "draft": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                  num_hidden_layers=2, intermediate_size=64, num_experts=16),
}

MODEL_NAMES = {"tiny": "hunyuan-tiny", "draft": "hunyuan-tiny-draft"}


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def read_special_ids(tokenizer_dir):
    """{token text: id} of the added (special) tokens in DIR/tokenizer_config.json."""
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    return {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}


def make_config(preset, special_ids, vocab_size=VOCAB_SIZE, training=None):
    """The config.json of a preset: the fields preset_config (model/src/init.rs) writes for
    Hunyuan-Large, with our dimensions, and "hyserve_training" in place of "hyserve_init"."""
    d = PRESETS[preset]
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return {
        "architectures": ["HunYuanForCausalLM"],
        "model_type": "hunyuan",
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
        "num_experts": d["num_experts"],
        "num_shared_expert": 1,
        "use_mixed_mlp_moe": True,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": special_ids["<|bos|>"],
        "eos_token_id": special_ids["<|eos|>"],
        "pad_token_id": special_ids["<|pad|>"],
        "initializer_range": 0.02,
        "moe_topk": 1,
        "use_cla": True,
        "cla_share_factor": 2,
        "hyserve_training": training if training is not None else {"preset": preset},
    }


class Dims:
    """The subset of config.json the model needs (model_type "hunyuan" only)."""

    def __init__(self, cfg):
        if cfg.get("model_type") != "hunyuan":
            raise ValueError(f"model_type {cfg.get('model_type')!r}: only 'hunyuan' is supported")
        self.hidden = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = self.hidden // self.heads  # Hunyuan-Large: no head_dim field
        self.layers = int(cfg["num_hidden_layers"])
        self.inter = int(cfg["intermediate_size"])
        self.experts = int(cfg["num_experts"])
        self.vocab = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-5))
        self.rope_theta = float(cfg.get("rope_theta", 10000.0))
        rs = cfg.get("rope_scaling") or {}
        self.alpha = float(rs["alpha"]) if rs.get("type", rs.get("rope_type")) == "dynamic" and rs.get("alpha") else None
        self.cla = int(cfg.get("cla_share_factor", 1)) if cfg.get("use_cla") else 1
        if int(cfg.get("moe_topk", 1)) != 1 or int(cfg.get("num_shared_expert", 1)) != 1:
            raise ValueError("only top-1 routing with one shared expert is implemented")
        if not cfg.get("tie_word_embeddings", True) or not cfg.get("use_qk_norm", True):
            raise ValueError("only tied embeddings with QK-norm are implemented")
        if self.heads % self.kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    def rope_inv_freq(self):
        """inv_freq = 1 / base^(arange(0, d, 2)/d) in fp32, base = theta * alpha^(d/(d-2)) (fixed
        NTK alpha; not length dependent)."""
        d = self.head_dim
        base = self.rope_theta
        if self.alpha:
            base = self.rope_theta * self.alpha ** (d / (d - 2))  # python float64
        expo = torch.arange(0, d, 2, dtype=torch.float32) / d
        return 1.0 / torch.pow(torch.tensor(base, dtype=torch.float32), expo)


# ------------------------------------------------------------------------------------------------
# Modules (attribute names = checkpoint names)
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, cdt):
        """fp32 x * rsqrt(mean(x^2) + eps), cast to the compute dtype, then * weight."""
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(cdt)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """NeoX rotate-half RoPE; x [B, T, heads, d], cos/sin [T, d] in the compute dtype."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return x * c + rotate_half(x) * s


class Attention(nn.Module):
    def __init__(self, dims, has_kv):
        super().__init__()
        h, d = dims.hidden, dims.head_dim
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, d
        self.has_kv = has_kv
        self.q_proj = nn.Linear(h, dims.heads * d, bias=False)
        if has_kv:
            self.k_proj = nn.Linear(h, dims.kv_heads * d, bias=False)
            self.v_proj = nn.Linear(h, dims.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(dims.heads * d, h, bias=False)
        self.query_layernorm = RMSNorm(d, dims.eps)
        self.key_layernorm = RMSNorm(d, dims.eps)

    def forward(self, x, cos, sin, shared_kv, cdt, exact):
        """Returns (output, (k_roped, v)) where the pair is what an odd layer reuses."""
        B, T, _ = x.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        if self.has_kv:
            k = apply_rope(self.k_proj(x).view(B, T, KV, D), cos, sin)
            v = self.v_proj(x).view(B, T, KV, D)
            shared_kv = (k, v)
        else:
            k, v = shared_kv
        q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
        q = self.query_layernorm(q, cdt)
        kn = self.key_layernorm(k, cdt)
        rep = H // KV
        # [B, heads, T, D]; query head h reads kv head h // rep
        q = q.transpose(1, 2).to(cdt)
        kn = kn.transpose(1, 2).to(cdt).repeat_interleave(rep, dim=1)
        vv = v.transpose(1, 2).to(cdt).repeat_interleave(rep, dim=1)
        if exact:
            scores = torch.matmul(q, kn.transpose(-1, -2)) / math.sqrt(D)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(cdt)
            out = torch.matmul(probs, vv)
        else:
            out = F.scaled_dot_product_attention(q, kn, vv, is_causal=True)
        out = out.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(out), shared_kv


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)) (experts and the shared expert)."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, hidden, experts):
        super().__init__()
        self.wg = nn.Linear(hidden, experts, bias=False)


# Whether F.grouped_mm may be used for the experts on CUDA (decided by a self-test on first use).
_GROUPED_OK = {}


def _grouped_mm_matches(device):
    """One F.grouped_mm problem (bf16, uneven and empty groups) against plain matmuls, forward
    and backward."""
    g = torch.Generator(device="cpu").manual_seed(0)
    E, K, N = 4, 64, 32
    sizes = [5, 0, 17, 10]
    x = torch.randn(sum(sizes), K, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(E, N, K, generator=g).to(device, torch.bfloat16).requires_grad_()
    offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    y = F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    (y.float() ** 2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = torch.cat([c @ w[e].T for e, c in enumerate(x.split(sizes))])
    (ref.float() ** 2).sum().backward()

    def close(a, b):
        return bool((a.float() - b.float()).norm() <= 2e-2 * b.float().norm() + 1e-3)

    return close(y, ref) and close(gx, x.grad) and close(gw, w.grad)


def _grouped_supported(device):
    """Whether F.grouped_mm is usable on `device` (CUDA only), tested once per device; any error
    or mismatch disables it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _GROUPED_OK:
        ok = False
        if hasattr(F, "grouped_mm") and device.type == "cuda":
            try:
                with torch.enable_grad():
                    ok = _grouped_mm_matches(device)
            except Exception as e:  # noqa: BLE001 - any failure means "do not use it"
                print(f"[hunyuan] grouped_mm unavailable ({type(e).__name__}: {e}); using per-expert matmuls")
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


class MoE(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.n_experts = dims.experts
        self.gate = Router(dims.hidden, dims.experts)
        self.shared_mlp = MLP(dims.hidden, dims.inter)
        self.experts = nn.ModuleList(MLP(dims.hidden, dims.inter) for _ in range(dims.experts))

    def forward(self, x, cdt):
        """x [N, hidden] -> (output [N, hidden], load-balancing loss scalar)."""
        N = x.shape[0]
        E = self.n_experts
        shared = self.shared_mlp(x)
        logits = self.gate.wg(x)
        probs = torch.softmax(logits.float(), dim=-1)
        top = probs.argmax(dim=-1)  # first maximum: ties go to the lowest expert index
        p_top = probs.gather(1, top[:, None]).squeeze(1)

        order = torch.argsort(top, stable=True)
        # expert histogram without a host sync (torch.bincount syncs on CUDA)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, top, torch.ones_like(top))
        xs = x[order]
        if x.is_cuda and cdt == torch.bfloat16 and _grouped_supported(x.device):
            offs = counts.cumsum(0).to(torch.int32)
            xs = xs.to(cdt)

            def gmm(a, name):
                w = torch.stack([getattr(e, name).weight for e in self.experts]).to(cdt)
                return F.grouped_mm(a, w.transpose(-2, -1), offs=offs)

            a = F.silu(gmm(xs, "gate_proj")) * gmm(xs, "up_proj")
            ys = gmm(a, "down_proj")
        else:
            chunks = xs.split(counts.tolist())
            ys = torch.cat([self.experts[e](c) for e, c in enumerate(chunks)])
        routed_sorted = p_top[order].to(ys.dtype)[:, None] * ys
        inv = torch.empty_like(order)
        inv[order] = torch.arange(N, device=x.device)
        routed = routed_sorted[inv]
        # Switch load balancing: E * sum_e (fraction routed to e) * (mean router prob of e)
        aux = E * torch.sum(counts.float() / N * probs.mean(0))
        return shared + routed, aux


class DecoderLayer(nn.Module):
    def __init__(self, dims, has_kv):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.self_attn = Attention(dims, has_kv)
        self.post_attention_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.mlp = MoE(dims)


class HunyuanModel(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden)
        self.layers = nn.ModuleList(DecoderLayer(dims, l % dims.cla == 0) for l in range(dims.layers))
        self.norm = RMSNorm(dims.hidden, dims.eps)


class HunyuanForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.dims = Dims(config)
        self.model = HunyuanModel(self.dims)
        # Residual dropout on the embeddings and on each attention / MoE output: a training-only
        # regulariser (train.py sets it; eval mode and every reference pass ignore it).
        self.dropout = 0.0
        # fp32 RoPE frequencies, kept out of the module's buffers so that model.to(bfloat16)
        # cannot round them.
        self._inv_freq = self.dims.rope_inv_freq()

    # -- init ----------------------------------------------------------------------------------
    def init_weights(self, seed, std=0.02):
        """N(0, std) matrices (o_proj / down_proj scaled by 1/sqrt(2 * layers)), unit norms."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        out_std = std / math.sqrt(2 * self.dims.layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=g) * s)

    # -- forward -------------------------------------------------------------------------------
    def compute_dtype(self, device):
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.model.embed_tokens.weight.dtype

    def forward(self, ids, exact=False):
        """ids [B, T] (positions 0..T-1) -> (float32 logits [B, T, vocab], mean aux loss)."""
        B, T = ids.shape
        cdt = self.compute_dtype(ids.device)
        h = self.model.embed_tokens(ids)
        p_drop = self.dropout if self.training else 0.0

        def drop(t):
            return F.dropout(t, p_drop, training=True) if p_drop > 0 else t

        h = drop(h)
        t = torch.arange(T, dtype=torch.float32, device=ids.device)
        freqs = torch.outer(t, self._inv_freq.to(ids.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(cdt), emb.sin().to(cdt)
        shared_kv = None
        aux_total = h.new_zeros((), dtype=torch.float32)
        for layer in self.model.layers:
            a, shared_kv = layer.self_attn(layer.input_layernorm(h, cdt), cos, sin, shared_kv, cdt, exact)
            h = h + drop(a)
            x = layer.post_attention_layernorm(h, cdt)
            m, aux = layer.mlp(x.reshape(B * T, -1), cdt)
            h = h + drop(m.view(B, T, -1))
            aux_total = aux_total + aux
        h = self.model.norm(h, cdt)
        logits = F.linear(h, self.model.embed_tokens.weight).float()
        return logits, aux_total / len(self.model.layers)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------------
# Checkpoint I/O: bf16 safetensors with our names
# ------------------------------------------------------------------------------------------------


def checkpoint_order(config):
    """Tensor names in the engine's order (model/src/names.rs `expected`)."""
    d = Dims(config)
    names = ["model.embed_tokens.weight"]
    for l in range(d.layers):
        p = f"model.layers.{l}"
        names.append(f"{p}.input_layernorm.weight")
        names.append(f"{p}.self_attn.q_proj.weight")
        if l % d.cla == 0:
            names += [f"{p}.self_attn.k_proj.weight", f"{p}.self_attn.v_proj.weight"]
        names += [f"{p}.self_attn.o_proj.weight", f"{p}.self_attn.query_layernorm.weight",
                  f"{p}.self_attn.key_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  f"{p}.mlp.gate.wg.weight"]
        names += [f"{p}.mlp.shared_mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        for e in range(d.experts):
            names += [f"{p}.mlp.experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    names.append("model.norm.weight")
    return names


def _write_safetensors(path, tensors):
    """tensors: list of (name, bf16 torch tensor). Header keys sorted, data 8-byte aligned."""
    header, blobs, offset = {}, [], 0
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        raw = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    return offset


def export_checkpoint(state, config, out_dir, max_file_bytes=15 * 2**20):
    """Writes config.json and the weights in bf16: model.safetensors when the whole checkpoint
    fits in max_file_bytes, else model-0000i-of-0000n.safetensors shards (each under the limit,
    cut in the engine's tensor order) plus model.safetensors.index.json. Returns the file names."""
    os.makedirs(out_dir, exist_ok=True)
    names = checkpoint_order(config)
    extra = set(state) - set(names)
    missing = set(names) - set(state)
    if extra or missing:
        raise KeyError(f"state/checkpoint name mismatch: extra {sorted(extra)[:5]}, missing {sorted(missing)[:5]}")
    # headroom for each file's JSON header (~120 bytes per tensor)
    budget = max_file_bytes - 120 * len(names) - 4096
    sizes = {n: state[n].numel() * 2 for n in names}
    total = sum(sizes.values())
    shards = [[]]
    if total > budget:
        acc = 0
        for n in names:
            if acc and acc + sizes[n] > budget:
                shards.append([])
                acc = 0
            shards[-1].append(n)
            acc += sizes[n]
    else:
        shards = [names]
    files = []
    weight_map = {}
    for i, members in enumerate(shards):
        fn = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(out_dir, fn), [(n, state[n]) for n in members])
        if os.path.getsize(os.path.join(out_dir, fn)) > max_file_bytes:
            raise RuntimeError(f"{fn} exceeds {max_file_bytes} bytes")
        weight_map.update({n: fn for n in members})
        files.append(fn)
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
        files.append("model.safetensors.index.json")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    files.append("config.json")
    return files


def read_safetensors(path):
    """{name: torch tensor} of one safetensors file (BF16, F16 and F32 only)."""
    dtypes = {"BF16": (np.int16, torch.bfloat16), "F16": (np.float16, None), "F32": (np.float32, None)}
    out = {}
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        data = f.read()
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        npdt, view = dtypes[meta["dtype"]]
        a, b = meta["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=np.dtype(npdt).newbyteorder("<")).reshape(meta["shape"])
        t = torch.from_numpy(arr.astype(npdt))
        out[name] = t.view(view) if view is not None else t
    return out


def load_checkpoint(model_dir):
    """(config dict, {name: tensor}) of a model directory written by export_checkpoint."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for fn in files:
        state.update(read_safetensors(os.path.join(model_dir, fn)))
    return config, state


def load_model(model_dir, dtype=torch.float32, device="cpu"):
    """A HunyuanForCausalLM holding a checkpoint's (bf16) weights widened/cast to dtype."""
    config, state = load_checkpoint(model_dir)
    model = HunyuanForCausalLM(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _selftest():
    """CPU checks: parameter names/counts, the two MoE dispatch paths agree, export round trip."""
    import tempfile

    specials = {"<|bos|>": 4098, "<|eos|>": 4099, "<|pad|>": 4100}
    for preset in ("draft", "tiny"):
        cfg = make_config(preset, specials)
        m = HunyuanForCausalLM(cfg)
        m.init_weights(0)
        names = [n for n, _ in m.named_parameters()]
        assert sorted(names) == sorted(checkpoint_order(cfg)), "parameter names differ from checkpoint names"
        print(f"{preset}: {m.num_parameters():,} parameters")
    ids = torch.randint(0, 4305, (2, 24), generator=torch.Generator().manual_seed(1))
    m.eval()
    with torch.no_grad():
        a, _ = m(ids, exact=True)
        b, _ = m(ids, exact=False)
        one, _ = m(ids[:1], exact=True)
    print("eager vs sdpa max |diff|:", (a - b).abs().max().item(), " batch-1 vs batch:", (a[:1] - one).abs().max().item())
    with tempfile.TemporaryDirectory() as d:
        state = {k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()}
        files = export_checkpoint(state, cfg, d)
        m2 = load_model(d)
        diff = max((m2.state_dict()[k].float() - state[k].float()).abs().max().item() for k in state)
        print("export files:", files, "round-trip max diff:", diff)


if __name__ == "__main__":
    _selftest()
