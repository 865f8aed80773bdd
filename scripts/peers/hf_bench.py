#!/usr/bin/env python3
"""transformers peer for `hyserve bench`: same model dir, same workload.

Workload (mirrors src/commands/bench.rs):
  prompt  = [300 + (i * 7919) % 500 for i in range(prompt_tokens)]
  prefill = one forward over the whole prompt (KV cache filled, logits of the
            last position only), then argmax -> first token
  decode  = decode_tokens greedy single-token forwards with the KV cache
  best of --repeat runs (fresh cache each run) for each of the two numbers.

Model: AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16), i.e.
transformers' native hunyuan_v1_moe, CPU, eager attention.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--attn", default="eager", help="attn_implementation (eager|sdpa)")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation=args.attn
    )
    model.eval()
    load_s = time.perf_counter() - t0

    prompt = [300 + (i * 7919) % 500 for i in range(args.prompt_tokens)]
    ids = torch.tensor([prompt], dtype=torch.long)

    # transformers >= 5.2x renamed the forward kwarg past_key_values -> cache
    import inspect
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    best_prefill = float("inf")
    best_decode = float("inf")
    runs = []
    tokens = None
    with torch.inference_mode():
        for r in range(max(1, args.repeat)):
            # DynamicCache is updated in place by every forward.
            cache = DynamicCache(config=model.config)
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
            tok = int(out.logits[0, -1].argmax())
            p = time.perf_counter() - t
            gen = [tok]
            t = time.perf_counter()
            for _ in range(args.decode_tokens):
                out = model(
                    input_ids=torch.tensor([[tok]], dtype=torch.long),
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_kw: cache},
                )
                tok = int(out.logits[0, -1].argmax())
                gen.append(tok)
            d = (time.perf_counter() - t) / args.decode_tokens
            runs.append({"prefill_tokens_per_s": args.prompt_tokens / p, "decode_tokens_per_s": 1.0 / d})
            print(
                f"  run {r + 1}/{args.repeat}: prefill {args.prompt_tokens / p:.1f} tok/s, decode {1.0 / d:.2f} tok/s",
                file=sys.stderr,
            )
            best_prefill = min(best_prefill, p)
            best_decode = min(best_decode, d)
            if tokens is None:
                tokens = gen
            elif gen != tokens:
                print("warning: greedy tokens differ between runs", file=sys.stderr)

    res = {
        "engine": "transformers",
        "engine_version": transformers.__version__,
        "torch_version": torch.__version__,
        "attn_implementation": args.attn,
        "dtype": "bf16",
        "model": os.path.abspath(args.model),
        "threads": args.threads,
        "torch_num_threads": torch.get_num_threads(),
        "prefill_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeat": args.repeat,
        "prefill_tokens_per_s": args.prompt_tokens / best_prefill,
        "decode_tokens_per_s": 1.0 / best_decode,
        "runs": runs,
        "load_s": load_s,
        "greedy_tokens": tokens,
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(res, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
