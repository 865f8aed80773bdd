"""Hunyuan-Large pieces in plain PyTorch eager, shared by the GPU peer benchmarks
(`torch_layer_bench.py`, `torch_model_bench.py`): RMSNorm, NeoX RoPE with the NTK-alpha
base, GQA attention with the key norm applied as keys are read (the CLA cache holds pre-norm
K), SwiGLU experts and the top-1 MoE block, random bf16 weights.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DT = torch.bfloat16
EPS = 1e-5
ROPE_THETA, ROPE_ALPHA = 10000.0, 1000.0


@dataclass
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    width: int  # intermediate size of the shared and of every routed expert
    experts: int
    vocab: int


REAL = Dims(hidden=6400, heads=80, kv_heads=8, head_dim=80, width=18304, experts=16, vocab=129024)
TINY = Dims(hidden=256, heads=8, kv_heads=2, head_dim=32, width=512, experts=16, vocab=1024)


def randw(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=DT, device=device).normal_(0.0, 0.02)


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Hunyuan RMSNorm: fp32 math, round to bf16, then times the bf16 weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return xf.to(x.dtype) * w


def rope_tables(max_pos: int, head_dim: int, device: torch.device):
    """NeoX RoPE cos/sin [max_pos, head_dim], fp32 math rounded to bf16 (fixed NTK-alpha base)."""
    base = ROPE_THETA * ROPE_ALPHA ** (head_dim / (head_dim - 2))
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    ang = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(DT), ang.sin().to(DT)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [..., T, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _probe_sdpa_gqa() -> bool:
    q = torch.zeros(1, 2, 1, 8)
    kv = torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


SDPA_GQA = _probe_sdpa_gqa()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, KV, S, D] as cached (RoPE'd, pre-norm K).

    Applies this layer's key norm to every key as read, then softmax(q k^T / sqrt(D)) v.
    """
    k = rms_norm(k, k_norm)
    if SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def new_mlp(d: Dims, device: torch.device) -> dict:
    return {
        "gate": randw(d.width, d.hidden, device=device),
        "up": randw(d.width, d.hidden, device=device),
        "down": randw(d.hidden, d.width, device=device),
    }


def swiglu(x: torch.Tensor, m: dict) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, m["gate"])) * F.linear(x, m["up"]), m["down"])


def new_moe(d: Dims, device: torch.device) -> dict:
    return {
        "router": randw(d.experts, d.hidden, device=device),
        "shared": new_mlp(d, device),
        "experts": [new_mlp(d, device) for _ in range(d.experts)],
    }


def moe(x: torch.Tensor, w: dict, hits: list | None = None) -> torch.Tensor:
    """Shared expert + top-1 routed expert on x [N, hidden] (already post-attention-normed).

    Appends the per-expert row counts to `hits` when given.
    """
    out = swiglu(x, w["shared"])
    probs = torch.softmax(F.linear(x, w["router"]).float(), dim=-1)
    top_p, top_e = probs.max(dim=-1)
    top_p = top_p.to(x.dtype)
    # Rows sorted by expert; one host sync for the per-expert counts.
    order = torch.argsort(top_e)
    counts = torch.bincount(top_e, minlength=len(w["experts"])).tolist()
    if hits is not None:
        hits.append(counts)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        y = swiglu(x.index_select(0, rows), w["experts"][e])
        out.index_add_(0, rows, y * top_p.index_select(0, rows)[:, None])
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index or 0)
    return f"cpu ({platform.processor() or platform.machine()})"
