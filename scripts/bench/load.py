#!/usr/bin/env python3
"""Load benchmark for an OpenAI-compatible server: C concurrent streaming clients, each
sending requests back to back for a fixed number of requests, at several concurrency levels.

Reports per level: output tokens/s, requests/s, time to first token (TTFT) and inter-token
latency (ITL) p50/p99 as the client sees them, and, for hyserve (its /metrics), the
scheduler's own time per step next to the model's time per step.

  python3 scripts/bench/load.py --url http://127.0.0.1:8000 --model tiny \
      --concurrency 1,2,4,8,16,32,64 --requests-per-client 4 --prompt-tokens 64 \
      --max-tokens 64 --json-out results.json [--label hyserve]

Prompts are text made of random common words (the same texts for every server; a server's
tokenizer decides their token count, reported as prompt_tokens); `ignore_eos` keeps every
response at max_tokens, and output tokens are counted from each stream's final `usage`.
"""

import argparse
import asyncio
import json
import random
import time

import httpx


WORDS = ("the of and to in is was that for on with as by at from this be are or an it not "
         "which have one had but all were when there can been has more if no out so said what up "
         "its about into than them only other new some could time these two may then do first "
         "any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people "
         "how too little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old year off").split()


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


EXTRA_BODY = {}


async def one_request(client, url, model, prompt, max_tokens):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}, **EXTRA_BODY}
    t0 = time.perf_counter()
    stamps = []
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                usage = chunk["usage"]
    return t0, stamps, usage


async def level(url, model, concurrency, n_per_client, prompt_tokens, max_tokens, seed):
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(prompt_tokens))
               for _ in range(concurrency * n_per_client)]
    ttft, itl, tokens, ptokens = [], [], 0, []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(c):
            nonlocal tokens
            for i in range(n_per_client):
                t0, stamps, usage = await one_request(client, url, model, prompts[c * n_per_client + i], max_tokens)
                if stamps:
                    ttft.append(stamps[0] - t0)
                    itl.extend(b - a for a, b in zip(stamps, stamps[1:]))
                if usage:
                    tokens += usage["completion_tokens"]
                    ptokens.append(usage["prompt_tokens"])
                else:
                    tokens += len(stamps)

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": concurrency * n_per_client,
        "wall_s": wall,
        "output_tokens": tokens,
        "mean_prompt_tokens": sum(ptokens) / len(ptokens) if ptokens else None,
        "output_tokens_per_s": tokens / wall,
        "requests_per_s": concurrency * n_per_client / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p99_ms": 1e3 * percentile(itl, 99),
    }


def scrape(url):
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except Exception:
        return None
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", default="server")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="words per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out")
    ap.add_argument("--extra-body", default="{}",
                    help="JSON merged into every request (e.g. a logit_bias for servers without ignore_eos)")
    a = ap.parse_args()
    EXTRA_BODY.update(json.loads(a.extra_body))
    results = []
    # Warm-up: one request so lazy initialisation is not measured.
    asyncio.run(level(a.url, a.model, 1, 1, a.prompt_tokens, 4, 12345))
    for c in map(int, a.concurrency.split(",")):
        before = scrape(a.url)
        r = asyncio.run(level(a.url, a.model, c, a.requests_per_client, a.prompt_tokens, a.max_tokens, a.seed + c))
        after = scrape(a.url)
        if before and after and "hyserve_steps_total" in after:
            steps = after["hyserve_steps_total"] - before["hyserve_steps_total"]
            if steps > 0:
                r["steps"] = int(steps)
                r["scheduler_ms_per_step"] = 1e3 * (after["hyserve_scheduler_seconds_total"] - before["hyserve_scheduler_seconds_total"]) / steps
                r["model_ms_per_step"] = 1e3 * (after["hyserve_model_seconds_total"] - before["hyserve_model_seconds_total"]) / steps
        print(json.dumps(r), flush=True)
        results.append(r)
    out = {"label": a.label, "url": a.url, "model": a.model, "prompt_tokens": a.prompt_tokens,
           "max_tokens": a.max_tokens, "levels": results}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
