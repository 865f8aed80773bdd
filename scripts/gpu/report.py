#!/usr/bin/env python3
"""Joins the GPU run's JSON results into one Markdown table (printed to stdout).

  python3 scripts/gpu/report.py OUT_DIR

Reads OUT_DIR/layer_hyserve.json and layer_torch.json (scripts/gpu/run.sh layer stage),
OUT_DIR/e2e_hyserve.json and e2e_torch.json (e2e stage) where present.
"""

import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    out = sys.argv[1]
    gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else "?"
    print(f"GPU: {gpu}\n")
    ours = load(os.path.join(out, "layer_hyserve.json"))
    peer = load(os.path.join(out, "layer_torch.json"))
    if ours:
        print(f"Ceilings measured in the run: device copy {ours['hbm_copy_gbs']:.0f} GB/s (read+write), "
              f"cuBLAS bf16 8192^3 {ours['gemm_bf16_tflops']:.0f} TFLOP/s.\n")
        peer_ms = {c["name"]: c.get("ms") for c in (peer or {}).get("cases", [])}
        print("| case | hyserve ms | work | achieved | ceiling ratio | PyTorch eager ms | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for c in ours["cases"]:
            if c["bound"] == "none":
                # graph_churn: replays compared with the same replays before churn.
                print(f"| {c['name']} | {c['ms']:.3f} | - | {c.get('vs_before', 1.0):.2f}x before churn "
                      f"({c.get('device_ms', 0.0):.3f} ms on the device) | - | n/a | n/a |")
                continue
            if c["bound"] == "compute":
                work = f"{c['flops'] / 1e12:.2f} TFLOP"
                achieved = f"{c['flops'] / (c['ms'] * 1e-3) / 1e12:.0f} TFLOP/s"
            else:
                work = f"{c['bytes'] / 1e9:.3f} GB"
                achieved = f"{c['bytes'] / (c['ms'] * 1e-3) / 1e9:.0f} GB/s"
            extra = ""
            if "experts_hit" in c:
                extra = f" ({c['experts_hit']} experts hit)"
            if "roofline_ms" in c:
                extra = f" (roofline {c['roofline_ms']:.3f} ms: {c['ms'] / c['roofline_ms']:.2f}x)"
            p = peer_ms.get(c["name"])
            ps = f"{p:.3f}" if p else "n/a"
            sp = f"{p / c['ms']:.2f}x" if p else "n/a"
            print(f"| {c['name']}{extra} | {c['ms']:.3f} | {work} | {achieved} | {100 * c['ratio']:.1f}% of {c['bound']} | {ps} | {sp} |")
        print()
    e2e = load(os.path.join(out, "e2e_hyserve.json"))
    nog = load(os.path.join(out, "e2e_hyserve_nographs.json"))
    nog_levels = {l["concurrency"]: l for l in (nog or {}).get("levels", [])}
    tpeer = load(os.path.join(out, "e2e_torch.json"))
    if e2e or tpeer:
        tc = {c["name"]: c for c in (tpeer or {}).get("cases", [])}
        gen = (tpeer or {}).get("gen", 64)
        print("| concurrency / batch | hyserve serve: output tok/s (HTTP, incl. prefill) | ITL p50 ms | TTFT p50 ms "
              "| same without CUDA graphs: tok/s, ITL p50 ms "
              "| PyTorch eager: decode tok/s | PyTorch: prefill+decode tok/s | ratio (hyserve / PyTorch prefill+decode) |")
        print("|---|---|---|---|---|---|---|---|")
        levels = {l["concurrency"]: l for l in (e2e or {}).get("levels", [])}
        for b in sorted(set(levels) | {int(n.split("_b")[1]) for n in tc if "_b" in n}):
            l = levels.get(b)
            d = tc.get(f"model_decode_b{b}")
            p = tc.get(f"model_prefill_b{b}")
            total = None
            if d and p and d.get("step_ms") and p.get("ms"):
                total = b * gen / (p["ms"] / 1e3 + gen * d["step_ms"] / 1e3)
            ours_tps = l["output_tokens_per_s"] if l else None
            n = nog_levels.get(b)
            cells = [
                f"{ours_tps:.1f}" if ours_tps else "n/a",
                f"{l['itl_p50_ms']:.2f}" if l else "n/a",
                f"{l['ttft_p50_ms']:.1f}" if l else "n/a",
                f"{n['output_tokens_per_s']:.1f}, {n['itl_p50_ms']:.2f}" if n else "n/a",
                f"{d['tok_s']:.1f}" if d and d.get("tok_s") else "n/a",
                f"{total:.1f}" if total else "n/a",
                f"{ours_tps / total:.2f}x" if ours_tps and total else "n/a",
            ]
            print(f"| {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
