#!/usr/bin/env python3
"""PyTorch eager peer: greedy generation with a truncated Hunyuan-Large, one GPU.

The model is the real architecture at real dimensions with --layers L decoder
layers (default 4, ~12.1 GB each; with the two vocab matrices ~52 GB in all):
hidden 6400, 80 query / 8 kv heads of 80, NeoX RoPE, per-head q/k RMSNorm after
RoPE, CLA with share factor 2 (even layers own k_proj/v_proj and a KV cache slot;
each odd layer reads the previous layer's cached RoPE'd pre-norm K/V and applies
its own key_layernorm to the keys as read), MoE with a shared SwiGLU expert plus
top-1 of 16 routed experts (width 18304), vocab 129024 with an untied lm_head.
Weights are random bf16 (normal * 0.02, norm weights 1); plain eager PyTorch,
no torch.compile, no CUDA graphs.

For each batch size B in --batch: random prompts of --prompt-len tokens are
prefilled in one batched forward into a preallocated static KV cache (the last
position's logits give each sequence's first token), then --gen greedy decode
steps of one token per sequence follow. One untimed warm-up pass (prefill + 2
steps) precedes the timed pass. Reported:
  model_prefill_b{B}  tok_s = B * prompt_len / prefill time (incl. lm_head + argmax)
  model_decode_b{B}   tok_s = B * gen / total decode time, step_ms = median step time,
                      mean_experts_hit = distinct routed experts per MoE call
Each forward is timed with perf_counter between device syncs.

On the GPU host it is run by scripts/gpu/run.sh, e.g.
    python3 scripts/peers/torch_model_bench.py --layers 4 --out torch_model.json
A CPU smoke test at tiny dimensions (hidden 256, 8/2 heads of 32, width 512,
vocab 1024; prompt 32 and gen 16 unless given):
    python3 scripts/peers/torch_model_bench.py --tiny --device cpu --out /tmp/y.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict

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

def log(msg: str) -> None:
    print(f"[torch_model_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model pieces


def ones(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=DT, device=device)


# ---------------------------------------------------------------- model


def new_model(d: Dims, n_layers: int, device: torch.device) -> dict:
    qd, kvd = d.heads * d.head_dim, d.kv_heads * d.head_dim
    layers = []
    for l in range(n_layers):
        log(f"allocating layer {l} ...")
        w = {
            "input_norm": ones(d.hidden, device),
            "q": randw(qd, d.hidden, device=device),
            "o": randw(d.hidden, qd, device=device),
            "q_norm": ones(d.head_dim, device),
            "k_norm": ones(d.head_dim, device),
            "post_norm": ones(d.hidden, device),
            "moe": new_moe(d, device),
        }
        if l % 2 == 0:  # CLA: even layers own the pair's K/V projections
            w["k"] = randw(kvd, d.hidden, device=device)
            w["v"] = randw(kvd, d.hidden, device=device)
        layers.append(w)
    return {
        "embed": randw(d.vocab, d.hidden, device=device),
        "lm_head": randw(d.vocab, d.hidden, device=device),
        "norm": ones(d.hidden, device),
        "layers": layers,
    }


def forward(model: dict, d: Dims, tokens: torch.Tensor, pos0: int, caches: list, cos, sin, hits=None) -> torch.Tensor:
    """Runs tokens [B, T] at positions pos0..pos0+T; returns the greedy next token [B].

    caches[l // 2] = (K, V), each [B, KV, S_max, D]: one static slot per CLA layer pair.
    """
    b, t = tokens.shape
    assert t == 1 or pos0 == 0, "multi-token forwards are whole-prompt prefills"
    end = pos0 + t
    c, s = cos[pos0:end], sin[pos0:end]
    h = F.embedding(tokens.reshape(-1), model["embed"])  # [B*T, hidden]
    for l, w in enumerate(model["layers"]):
        cache_k, cache_v = caches[l // 2]
        x = rms_norm(h, w["input_norm"])
        q = F.linear(x, w["q"]).view(b, t, d.heads, d.head_dim).transpose(1, 2)
        q = apply_rope(q, c, s)
        if "k" in w:
            k = F.linear(x, w["k"]).view(b, t, d.kv_heads, d.head_dim).transpose(1, 2)
            v = F.linear(x, w["v"]).view(b, t, d.kv_heads, d.head_dim).transpose(1, 2)
            cache_k[:, :, pos0:end] = apply_rope(k, c, s)
            cache_v[:, :, pos0:end] = v
        q = rms_norm(q, w["q_norm"])
        a = attention(q, cache_k[:, :, :end], cache_v[:, :, :end], w["k_norm"], causal=t > 1)
        h = h + F.linear(a.transpose(1, 2).reshape(b * t, d.heads * d.head_dim), w["o"])
        h = h + moe(rms_norm(h, w["post_norm"]), w["moe"], hits)
    last = h.view(b, t, d.hidden)[:, -1]
    logits = F.linear(rms_norm(last, model["norm"]), model["lm_head"]).float()
    return logits.argmax(dim=-1)


# ---------------------------------------------------------------- benchmark


def generate(model, d, prompt, gen, caches, cos, sin, device, hits=None):
    """Prefill + gen decode steps; returns (prefill seconds, per-step seconds, tokens [B, gen+1])."""
    p = prompt.shape[1]
    sync(device)
    t0 = time.perf_counter()
    tok = forward(model, d, prompt, 0, caches, cos, sin)
    sync(device)
    prefill_s = time.perf_counter() - t0
    out = [tok]
    steps = []
    for i in range(gen):
        t0 = time.perf_counter()
        tok = forward(model, d, tok[:, None], p + i, caches, cos, sin, hits)
        sync(device)
        steps.append(time.perf_counter() - t0)
        out.append(tok)
    return prefill_s, steps, torch.stack(out, dim=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions, for a CPU smoke test")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens per sequence (default 128; 32 with --tiny)")
    ap.add_argument("--gen", type=int, help="timed decode steps after the prefill (default 64; 16 with --tiny)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    torch.manual_seed(0)
    d = TINY if args.tiny else REAL
    batches = [int(b) for b in args.batch.split(",") if b]
    p = args.prompt_len if args.prompt_len is not None else (32 if args.tiny else 128)
    gen = args.gen if args.gen is not None else (16 if args.tiny else 64)
    log(f"device {device_name(device)}, torch {torch.__version__}, dims {d}, layers {args.layers}, "
        f"sdpa enable_gqa: {SDPA_GQA}")

    cases: list = []
    with torch.inference_mode():
        model = new_model(d, args.layers, device)
        n_params = sum(t.numel() for t in _tensors(model))
        log(f"{n_params / 1e9:.2f} B parameters ({n_params * 2 / 1e9:.1f} GB bf16)")
        cos, sin = rope_tables(p + gen, d.head_dim, device)
        n_slots = (args.layers + 1) // 2
        for b in batches:
            caches = [
                tuple(torch.zeros(b, d.kv_heads, p + gen, d.head_dim, dtype=DT, device=device) for _ in range(2))
                for _ in range(n_slots)
            ]
            prompt = torch.randint(0, d.vocab, (b, p), device=device)
            log(f"batch {b}: warm-up (prefill {p} + 2 steps) ...")
            generate(model, d, prompt, min(gen, 2), caches, cos, sin, device)
            log(f"batch {b}: timed (prefill {p} + {gen} steps) ...")
            hits: list = []
            prefill_s, steps, _ = generate(model, d, prompt, gen, caches, cos, sin, device, hits)
            decode_s = sum(steps)
            dec = {
                "name": f"model_decode_b{b}",
                "tok_s": b * gen / decode_s,
                "step_ms": statistics.median(steps) * 1e3,
                "mean_experts_hit": sum(sum(1 for c in h if c) for h in hits) / len(hits) if hits else None,
            }
            pre = {"name": f"model_prefill_b{b}", "tok_s": b * p / prefill_s, "ms": prefill_s * 1e3}
            cases += [dec, pre]
            log(f"batch {b}: prefill {pre['tok_s']:.1f} tok/s ({pre['ms']:.1f} ms), decode {dec['tok_s']:.1f} "
                f"tok/s, step {dec['step_ms']:.2f} ms, {dec['mean_experts_hit']} experts/MoE")
            del caches, prompt
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "layers": args.layers,
        "tiny": args.tiny,
        "dims": asdict(d),
        "prompt_len": p,
        "gen": gen,
        "sdpa_enable_gqa": SDPA_GQA,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")

    print(f"{report['device']}, torch {report['torch']}, {args.layers} layers, prompt {p}, gen {gen} (bf16, eager)")
    print(f"{'case':<22} {'tok/s':>10} {'step ms':>10}")
    for c in cases:
        step = f"{c['step_ms']:.2f}" if "step_ms" in c else ""
        print(f"{c['name']:<22} {c['tok_s']:>10.1f} {step:>10}")
    print(f"wrote {args.out}")
    return 0


def _tensors(obj):
    """All tensors in a nested dict/list of weights."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


if __name__ == "__main__":
    sys.exit(main())
