#!/usr/bin/env python3
"""Draws the load benchmark's scaling curves (throughput, TTFT, inter-token latency
against concurrency) for one or more result files of scripts/bench/load.py.

  python3 scripts/bench/plot_load.py hyserve.json llamacpp.json --out docs/images/load-scaling.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    runs = [json.load(open(p)) for p in a.results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        c = [l["concurrency"] for l in run["levels"]]
        lab = run["label"]
        axes[0].plot(c, [l["output_tokens_per_s"] for l in run["levels"]], "o-", label=lab)
        axes[1].plot(c, [l["ttft_p50_ms"] for l in run["levels"]], "o-", label=f"{lab} p50")
        axes[1].plot(c, [l["ttft_p99_ms"] for l in run["levels"]], "x--", label=f"{lab} p99")
        axes[2].plot(c, [l["itl_p50_ms"] for l in run["levels"]], "o-", label=f"{lab} p50")
        axes[2].plot(c, [l["itl_p99_ms"] for l in run["levels"]], "x--", label=f"{lab} p99")
    for ax, t, y in zip(axes, ["Throughput", "Time to first token", "Inter-token latency"],
                        ["output tokens/s", "ms", "ms"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(y)
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
