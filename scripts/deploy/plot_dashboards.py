#!/usr/bin/env python3
"""Pictures of hyserve's main dashboard panels, drawn from what a real Prometheus scraped
during a run (scripts/deploy/load_and_plot.sh makes the run): latency, throughput, KV cache
use, running and waiting sequences, and a heat map of the tokens routed to each expert.

    plot_dashboards.py --prometheus http://127.0.0.1:9090 --run RUN.json [--out DIR]
    plot_dashboards.py --prometheus URL --start UNIX --end UNIX [--out DIR]

RUN.json (written by the load driver) gives the run's start and end and its phases, which
are shaded on every panel. Writes one PNG per panel and overview.png into --out
(default docs/images/deploy). Every panel's title names its PromQL. A query that returns
no data is an error: a missing metric must not become an empty picture.

Needs matplotlib (scripts/deploy/requirements.txt) and httpx.
"""

import argparse
import json
import math
import os

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Rate window: a few scrapes at the 1 s interval the load run uses.
W = "10s"


def quantile(q, metric):
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{W}])))"


# Panel name -> (title, [(legend, PromQL, axis)]); axis "right" goes on a twin y axis.
PANELS = {
    "latency": ("Latency (log scale)", [
        ("TTFT p50", quantile(0.5, "hyserve_time_to_first_token_seconds"), "left"),
        ("TTFT p95", quantile(0.95, "hyserve_time_to_first_token_seconds"), "left"),
        ("inter-token p50", quantile(0.5, "hyserve_inter_token_latency_seconds"), "left"),
        ("inter-token p95", quantile(0.95, "hyserve_inter_token_latency_seconds"), "left"),
    ]),
    "throughput": ("Throughput", [
        ("generated tokens/s", f"sum(rate(hyserve_generated_tokens_total[{W}]))", "left"),
        ("requests/s (ok)", f'sum(rate(hyserve_requests_total{{outcome="ok"}}[{W}]))', "right"),
    ]),
    "kv_cache": ("KV cache", [
        ("blocks used", "sum(hyserve_kv_blocks_used)", "left"),
        ("blocks in the pool", "sum(hyserve_kv_blocks_capacity)", "left"),
        ("% used", "100 * sum(hyserve_kv_blocks_used) / sum(hyserve_kv_blocks_capacity)", "right"),
    ]),
    "sequences": ("Sequences", [
        ("running", "sum(hyserve_requests_running)", "left"),
        ("waiting", "sum(hyserve_requests_waiting)", "left"),
        ("preempted, waiting to resume", "sum(hyserve_requests_preempted)", "left"),
    ]),
}
EXPERTS = ("Tokens routed to each expert (summed over layers)",
           f"sum by (expert) (rate(hyserve_expert_routed_tokens_total[{W}]))")

UNITS = {"latency": ("seconds", None), "throughput": ("tokens/s", "requests/s"),
         "kv_cache": ("blocks", "% of the pool"), "sequences": ("sequences", None)}


class Prom:
    def __init__(self, url, start, end, step):
        self.url, self.start, self.end, self.step = url.rstrip("/"), start, end, step
        self.times = np.arange(start, end + step / 2, step)

    def range(self, query):
        """`query_range` over the run: a list of (labels, values on self.times, NaN where absent)."""
        r = httpx.get(self.url + "/api/v1/query_range", timeout=60,
                      params={"query": query, "start": self.start, "end": self.end, "step": self.step})
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise SystemExit(f"Prometheus refused {query!r}: HTTP {r.status_code} "
                             f"{body.get('errorType')}: {body.get('error')}")
        out = []
        for series in body["data"]["result"]:
            values = np.full(len(self.times), np.nan)
            for t, v in series["values"]:
                i = int(round((float(t) - self.start) / self.step))
                if 0 <= i < len(values):
                    values[i] = float(v)
            out.append((series["metric"], values))
        if not out or all(np.all(np.isnan(v)) for _, v in out):
            raise SystemExit(f"no data for {query!r} between {self.start} and {self.end}: is the metric "
                         f"exported, and did Prometheus scrape the server during the run?")
        return out

    def one(self, query):
        series = self.range(query)
        if len(series) != 1:
            raise SystemExit(f"{query!r}: expected one series, got {len(series)}")
        return series[0][1]


def shade_phases(ax, run, t0, shade=True):
    """The load phases: alternate shading, boundaries, and each phase's name and concurrency
    along the bottom of the axes."""
    for i, p in enumerate(run.get("phases", [])):
        a, b = p["start"] - t0, p["end"] - t0
        if shade and i % 2:
            ax.axvspan(a, b, color="0.92", zorder=0)
        if i:
            ax.axvline(a, color="0.6" if shade else "white", linewidth=0.8, linestyle=":")
        ax.text((a + b) / 2, 0.02, f"{p['name']}, {p['concurrency']} clients", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=7, color="0.3",
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", alpha=0.7, linewidth=0))


def titled(ax, title, queries):
    lines = "\n".join(queries)
    ax.set_title(f"{title}\n{lines}", fontsize=7.5, loc="left", family="monospace")


def draw_lines(ax, name, prom, data):
    title, queries = PANELS[name]
    x = prom.times - prom.start
    right = None
    handles = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((legend, query, axis), values) in enumerate(zip(queries, data[name])):
        if axis == "right":
            right = right or ax.twinx()
            target, style = right, "--"
        else:
            target, style = ax, "-"
        (h,) = target.plot(x, values, style, color=colours[i % len(colours)], label=legend, linewidth=1.4)
        handles.append(h)
    left_unit, right_unit = UNITS[name]
    ax.set_ylabel(left_unit)
    if right is not None:
        right.set_ylabel(right_unit)
        right.set_ylim(bottom=0)
    if name == "latency":
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the start of the run")
    ax.set_xlim(0, x[-1])
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    titled(ax, title, [q for _, q, _ in queries])


def draw_experts(ax, prom, data, fig):
    series = sorted(data["experts"], key=lambda s: int(s[0].get("expert", "0")))
    grid = np.array([np.nan_to_num(v) for _, v in series])
    x_end = prom.times[-1] - prom.start
    im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="inferno",
                   extent=(0, x_end, -0.5, len(series) - 0.5))
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([s[0].get("expert", "?") for s in series], fontsize=6)
    ax.set_ylabel("expert")
    ax.set_xlabel("seconds since the start of the run")
    fig.colorbar(im, ax=ax, label="routed tokens/s", pad=0.01)
    titled(ax, EXPERTS[0], [EXPERTS[1]])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", required=True, help="Prometheus base URL")
    ap.add_argument("--run", help="the load run's JSON (start, end, phases)")
    ap.add_argument("--start", type=float, help="unix time (default: the run's start)")
    ap.add_argument("--end", type=float, help="unix time (default: the run's end)")
    ap.add_argument("--step", type=float, default=1.0, help="seconds between points")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "images", "deploy"))
    args = ap.parse_args()
    run = {}
    if args.run:
        with open(args.run) as f:
            run = json.load(f)
    start = args.start or run.get("start")
    end = args.end or run.get("end")
    if not start or not end:
        ap.error("give --run, or --start and --end")
    prom = Prom(args.prometheus, math.floor(start), math.ceil(end), args.step)

    data = {}
    for name, (_, queries) in PANELS.items():
        print(f"querying {name}: {len(queries)} queries", flush=True)
        data[name] = [prom.one(q) for _, q, _ in queries]
    print("querying experts", flush=True)
    data["experts"] = prom.range(EXPERTS[1])
    if len(data["experts"]) < 2:
        raise SystemExit(f"{EXPERTS[1]!r}: only {len(data['experts'])} expert series")

    os.makedirs(args.out, exist_ok=True)
    subtitle = (f"hyserve serve, model {run.get('model', '?')}: {run.get('requests', '?')} requests "
                f"in {end - start:.0f} s, Prometheus scraping every 1 s")
    written = []
    for name in PANELS:
        fig, ax = plt.subplots(figsize=(10, 4.2), layout="constrained")
        draw_lines(ax, name, prom, data)
        shade_phases(ax, run, prom.start)
        fig.suptitle(subtitle, fontsize=8, color="0.4")
        path = os.path.join(args.out, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(10, 4.2), layout="constrained")
    draw_experts(ax, prom, data, fig)
    shade_phases(ax, run, prom.start, shade=False)
    fig.suptitle(subtitle, fontsize=8, color="0.4")
    path = os.path.join(args.out, "experts.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig = plt.figure(figsize=(16, 13), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 1.1])
    for (r, c), name in zip([(0, 0), (0, 1), (1, 0), (1, 1)], PANELS):
        ax = fig.add_subplot(grid[r, c])
        draw_lines(ax, name, prom, data)
        shade_phases(ax, run, prom.start)
    ax = fig.add_subplot(grid[2, :])
    draw_experts(ax, prom, data, fig)
    shade_phases(ax, run, prom.start, shade=False)
    fig.suptitle(f"hyserve under load: {subtitle}", fontsize=11)
    path = os.path.join(args.out, "overview.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    for p in written:
        print(f"wrote {os.path.relpath(p, ROOT)}", flush=True)


if __name__ == "__main__":
    main()
