#!/usr/bin/env python3
"""PyTorch eager peer: Hunyuan-Large building blocks at real dimensions, one GPU.

Measures, in plain eager PyTorch (no torch.compile, no CUDA graphs), bf16 random
weights (normal * 0.02, norm weights 1) and bf16 activations:

  moe_t{N}                  the MoE block on N random token rows (N = 1, 8, 64, 256,
                            2048, 8192): router GEMM, fp32 softmax, top-1 (weight
                            rounded to bf16), shared SwiGLU expert on every row, then
                            the usual eager loop over the routed experts that got
                            rows (index_select, SwiGLU, scale, index_add into the
                            shared output). Also records experts_hit / expert_counts.
  attn_decode_b{B}_ctx{C}   one decode step of the attention core (B = 1, 16, 64;
                            C = 2048, 32768): per-head RMSNorm (key_layernorm) of the
                            whole cached K as read, then SDPA of 80 query heads over
                            8 kv heads (GQA). The cache holds C tokens; no projections.
  layer_decode_b1_ctx2048   one whole decoder layer decode step at batch 1 with 2048
                            cached tokens (the new token is the 2049th key): input
                            norm, q/k/v, RoPE, q/k norms, cache append, attention,
                            o_proj, residual, post norm, MoE, residual.

Each case: --warmup untimed calls, then --iters timed calls, each bracketed by a
device sync and timed with CUDA events (perf_counter on CPU); the median is
reported in ms. Writes JSON to --out and prints a table to stdout; progress goes
to stderr.

On the GPU host it is run by scripts/gpu/run.sh, e.g.
    python3 scripts/peers/torch_layer_bench.py --out torch_layer.json
A CPU smoke test at tiny dimensions (hidden 256, 8/2 heads of 32, width 512;
case names then carry the tiny sizes actually used):
    python3 scripts/peers/torch_layer_bench.py --tiny --device cpu --out /tmp/x.json
Peak GPU memory is about 12 GB for the layer weights plus ~22 GB for the largest
attention case (B=64, C=32768: 5.4 GB of K/V plus the key-norm temporaries).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from torch_hunyuan import (
    DT,
    SDPA_GQA,
    REAL,
    TINY,
    Dims,
    apply_rope,
    attention,
    device_name,
    moe,
    new_moe,
    randw,
    rms_norm,
    rope_tables,
    sync,
)

# (moe token counts, attention batches, attention contexts, layer-decode context)
REAL_SIZES = ((1, 8, 64, 256, 2048, 8192), (1, 16, 64), (2048, 32768), 2048)
TINY_SIZES = ((1, 8, 64, 256, 2048), (1, 16, 64), (64, 512), 64)


def log(msg: str) -> None:
    print(f"[torch_layer_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model pieces


def new_layer(d: Dims, device: torch.device) -> dict:
    qd, kvd = d.heads * d.head_dim, d.kv_heads * d.head_dim
    ones = lambda n: torch.ones(n, dtype=DT, device=device)  # noqa: E731
    return {
        "input_norm": ones(d.hidden),
        "q": randw(qd, d.hidden, device=device),
        "k": randw(kvd, d.hidden, device=device),
        "v": randw(kvd, d.hidden, device=device),
        "o": randw(d.hidden, qd, device=device),
        "q_norm": ones(d.head_dim),
        "k_norm": ones(d.head_dim),
        "post_norm": ones(d.hidden),
        "moe": new_moe(d, device),
    }


def layer_decode(h, w, d: Dims, cache_k, cache_v, pos: int, cos, sin):
    """One decode token per sequence. h [B, hidden]; cache_* [B, KV, S, D] with S > pos."""
    b = h.shape[0]
    x = rms_norm(h, w["input_norm"])
    q = F.linear(x, w["q"]).view(b, d.heads, 1, d.head_dim)
    k = F.linear(x, w["k"]).view(b, d.kv_heads, 1, d.head_dim)
    v = F.linear(x, w["v"]).view(b, d.kv_heads, 1, d.head_dim)
    c, s = cos[pos : pos + 1], sin[pos : pos + 1]
    q = apply_rope(q, c, s)
    k = apply_rope(k, c, s)
    cache_k[:, :, pos : pos + 1] = k
    cache_v[:, :, pos : pos + 1] = v
    q = rms_norm(q, w["q_norm"])
    a = attention(q, cache_k[:, :, : pos + 1], cache_v[:, :, : pos + 1], w["k_norm"], causal=False)
    h = h + F.linear(a.reshape(b, d.heads * d.head_dim), w["o"])
    return h + moe(rms_norm(h, w["post_norm"]), w["moe"])


# ---------------------------------------------------------------- timing


def time_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of fn() in ms; each call starts on an idle device."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- cases


def run_moe_cases(cases, layer, d, device, token_counts, args):
    for n in token_counts:
        name = f"moe_t{n}"
        log(f"{name} ...")
        x = torch.randn(n, d.hidden, dtype=DT, device=device)
        hits: list = []
        moe(x, layer["moe"], hits)
        counts = hits[0]
        ms = time_ms(lambda: moe(x, layer["moe"]), device, args.iters, args.warmup)
        hit = sum(1 for c in counts if c > 0)
        cases.append({"name": name, "ms": ms, "experts_hit": hit, "expert_counts": counts})
        log(f"{name}: {ms:.3f} ms, {hit} experts hit")
        del x
        free(device)


def run_attn_cases(cases, d, device, batches, contexts, args):
    k_norm = torch.ones(d.head_dim, dtype=DT, device=device)
    for b in batches:
        for c in contexts:
            name = f"attn_decode_b{b}_ctx{c}"
            log(f"{name} ...")
            try:
                q = torch.randn(b, d.heads, 1, d.head_dim, dtype=DT, device=device)
                kc = torch.randn(b, d.kv_heads, c, d.head_dim, dtype=DT, device=device)
                vc = torch.randn(b, d.kv_heads, c, d.head_dim, dtype=DT, device=device)
                ms = time_ms(lambda: attention(q, kc, vc, k_norm, causal=False), device, args.iters, args.warmup)
                cases.append({"name": name, "ms": ms})
                log(f"{name}: {ms:.3f} ms")
            except torch.cuda.OutOfMemoryError:
                cases.append({"name": name, "ms": None, "skipped": "out of memory"})
                log(f"{name}: skipped, out of memory")
            q = kc = vc = None
            free(device)


def run_layer_case(cases, layer, d, device, ctx, args):
    name = f"layer_decode_b1_ctx{ctx}"
    log(f"{name} ...")
    cache_k = torch.randn(1, d.kv_heads, ctx + 1, d.head_dim, dtype=DT, device=device)
    cache_v = torch.randn(1, d.kv_heads, ctx + 1, d.head_dim, dtype=DT, device=device)
    cos, sin = rope_tables(ctx + 1, d.head_dim, device)
    h = torch.randn(1, d.hidden, dtype=DT, device=device)
    # Every call writes position ctx (overwriting the previous call's entry) and
    # attends over ctx + 1 keys, so all timed calls do identical work.
    ms = time_ms(lambda: layer_decode(h, layer, d, cache_k, cache_v, ctx, cos, sin), device, args.iters, args.warmup)
    cases.append({"name": name, "ms": ms})
    log(f"{name}: {ms:.3f} ms")
    del cache_k, cache_v, h
    free(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions, for a CPU smoke test")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    torch.manual_seed(0)
    d = TINY if args.tiny else REAL
    moe_tokens, attn_batches, attn_contexts, layer_ctx = TINY_SIZES if args.tiny else REAL_SIZES
    log(f"device {device_name(device)}, torch {torch.__version__}, dims {d}, sdpa enable_gqa: {SDPA_GQA}")

    cases: list = []
    with torch.inference_mode():
        # Attention cases first, while nothing else is resident.
        run_attn_cases(cases, d, device, attn_batches, attn_contexts, args)
        log("allocating one layer's weights ...")
        layer = new_layer(d, device)
        run_moe_cases(cases, layer, d, device, moe_tokens, args)
        run_layer_case(cases, layer, d, device, layer_ctx, args)
        del layer
        free(device)

    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "dims": vars(d),
        "iters": args.iters,
        "warmup": args.warmup,
        "sdpa_enable_gqa": SDPA_GQA,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")

    print(f"{report['device']}, torch {report['torch']}, median of {args.iters} (bf16, eager)")
    print(f"{'case':<28} {'ms':>10}  experts_hit")
    for c in cases:
        ms = "skipped" if c["ms"] is None else f"{c['ms']:.3f}"
        print(f"{c['name']:<28} {ms:>10}  {c.get('experts_hit', '')}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
