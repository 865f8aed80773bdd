#!/usr/bin/env python3
"""llama.cpp peer (through llama-cpp-python) for `hyserve bench`.

Workload (mirrors src/commands/bench.rs):
  prompt  = [300 + (i * 7919) % 500 for i in range(prompt_tokens)]
  prefill = llm.eval(prompt) in one batch (n_batch=512 >= prompt), logits of the
            last position only, then argmax -> first token
  decode  = decode_tokens greedy single-token llm.eval([tok]) calls
  best of --repeat runs (KV cache cleared each run) for each of the two numbers.

Greedy argmax is taken over the raw logits (llama_get_logits_ith(ctx, -1)), no
sampler chain.

--check-ids 1,2,3 --check-tokens N instead prints the greedy continuation of
that prompt (and, with --logits-out, writes float32 next-token logits of every
consumed token, [n_prompt + N - 1, vocab], raw, no header;
`hyserve generate --logits-out` writes the same rows as .npy).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--flash-attn", action="store_true", help="llama-cpp-python defaults to flash attention off")
    ap.add_argument("--json-out")
    ap.add_argument("--check-ids", help="comma-separated prompt ids: print the greedy continuation instead of benchmarking")
    ap.add_argument("--check-tokens", type=int, default=8)
    ap.add_argument("--logits-out")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    check = args.check_ids is not None
    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.gguf,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.n_ctx,
        n_batch=args.n_batch,
        logits_all=check and args.logits_out is not None,
        flash_attn=args.flash_attn,
        verbose=args.verbose,
    )
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    ctx = llm._ctx.ctx

    def last_argmax() -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
        return int(row.argmax())

    if check:
        prompt = [int(x) for x in args.check_ids.split(",") if x.strip()]
        llm.reset()
        llm.eval(prompt)
        gen = [last_argmax()]
        for _ in range(args.check_tokens - 1):
            llm.eval([gen[-1]])
            gen.append(last_argmax())
        if args.logits_out:
            n = len(prompt) + args.check_tokens - 1
            np.asarray(llm.scores[:n], dtype=np.float32).tofile(args.logits_out)
        print(json.dumps({"prompt_ids": prompt, "generated_ids": gen}))
        return 0

    prompt = [300 + (i * 7919) % 500 for i in range(args.prompt_tokens)]
    assert args.prompt_tokens <= args.n_batch, "prefill must be one batch"
    assert args.prompt_tokens + args.decode_tokens + 1 <= args.n_ctx

    best_prefill = float("inf")
    best_decode = float("inf")
    runs = []
    tokens = None
    for r in range(max(1, args.repeat)):
        llm.reset()  # n_tokens = 0; eval() drops the KV cache from position 0
        t = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax()
        p = time.perf_counter() - t
        gen = [tok]
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            llm.eval([tok])
            tok = last_argmax()
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
        "engine": "llama.cpp",
        "engine_version": "llama-cpp-python " + llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "flash_attn": args.flash_attn,
        "dtype": "bf16 weights (GGUF BF16), f16 KV cache",
        "gguf": os.path.abspath(args.gguf),
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "n_batch": args.n_batch,
        "prefill_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeat": args.repeat,
        "prefill_tokens_per_s": args.prompt_tokens / best_prefill,
        "decode_tokens_per_s": 1.0 / best_decode,
        "runs": runs,
        "load_s": load_s,
        "greedy_tokens": tokens,
    }
    print(json.dumps(res, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
