#!/usr/bin/env python3
"""Paired ratios of a `hyserve bench-spec` run, from its log (stderr) alone.

For each workload and batch size: the median over repetitions of each proposer's tokens
per second over the geometric mean of the same repetition's `off` and `off-again` runs
(the ratio `bench-spec` itself reports from 2026-12-05 on), the A/A median (`off-again`
over `off`), and the draft engine's speculative steps, probes, warm-ups and verdict
changes summed over the repetitions; where the run had `--own-plain`, each speculating
engine's ratio to its own opted-out run of the repetition too ("own"). Where the log has each repetition's time per step
(builds from the night of 2026-12-05 on), a second line per proposer: the median over repetitions of
its step's parts (scheduler, worker, of it the forward pass, the rest: messaging) minus
the plain runs' (their mean in the same repetition), in microseconds. Works on logs of
builds before the paired ratio too.

    python3 scripts/bench/spec_paired.py docs/bench/gpu/h100-spec-run15-long.log
"""
import math
import re
import sys
from statistics import median

HEAD = re.compile(r"bench-spec: (\w+) batch (\d+), ([\w-]+) .*repetition (\d+)/")
LINE = re.compile(
    r"\s+([\d.]+) tok/s: (\d+) steps, (\d+) speculative .*?(\d+) where the guard probed"
    r".*?(\d+) warming up(?:; the guard's verdict changed (\d+) times(?:, (\d+) of them vetoes)?)?"
    r"(?:; per step ([\d.]+) ms: ([\d.]+) scheduler, ([\d.]+) worker \(([\d.]+) forward\), (-?[\d.]+) the rest)?"
)
PARTS = ("step", "scheduler", "worker", "forward", "rest")


def parse(text):
    runs, head = {}, None
    for line in text.splitlines():
        m = HEAD.match(line)
        if m:
            head = (m[1], int(m[2]), m[3], int(m[4]))
            continue
        m = LINE.match(line)
        if m and head:
            runs[head] = {
                "tps": float(m[1]),
                "steps": int(m[2]),
                "spec": int(m[3]),
                "probes": int(m[4]),
                "warming": int(m[5]),
                "changes": int(m[6] or 0),
                "vetoes": int(m[7] or 0),
                "ms": [float(x) for x in m.groups()[7:12]] if m[8] else None,
            }
            head = None
    return runs


def main(path):
    runs = parse(re.sub(r"\x1b\[[0-9;]*m", "", open(path).read()))
    configs = sorted({(w, b) for w, b, _, _ in runs})
    for w, b in configs:
        labels = sorted({p for (w2, b2, p, _) in runs if (w2, b2) == (w, b)})
        # Only whole repetitions: a log cut short ends inside one.
        reps = sorted(
            r for r in {r for (w2, b2, _, r) in runs if (w2, b2) == (w, b)}
            if all((w, b, p, r) in runs for p in labels)
        )
        if "off" not in labels or "off-again" not in labels or not reps:
            print(f"{w} {b}: needs both off and off-again in a whole repetition")
            continue
        plain = {r: math.sqrt(runs[(w, b, "off", r)]["tps"] * runs[(w, b, "off-again", r)]["tps"]) for r in reps}
        aa = [runs[(w, b, "off-again", r)]["tps"] / runs[(w, b, "off", r)]["tps"] for r in reps]
        parts = [f"A/A {median(aa):.2f} ({min(aa):.2f}-{max(aa):.2f})"]
        for p in labels:
            if p in ("off", "off-again"):
                continue
            ratios = [runs[(w, b, p, r)]["tps"] / plain[r] for r in reps]
            total = lambda k: sum(runs[(w, b, p, r)][k] for r in reps)
            # With `--own-plain`: over the same engine's opted-out run of the repetition.
            twin = f"{p}-opted-out"
            own = ""
            if twin in labels:
                o = [runs[(w, b, p, r)]["tps"] / runs[(w, b, twin, r)]["tps"] for r in reps]
                own = f"; own {median(o):.2f} ({min(o):.2f}-{max(o):.2f})"
            parts.append(
                f"{p} {median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}{own}; "
                f"speculative {total('spec')}/{total('steps')}, probes {total('probes')}, "
                f"warm-ups {total('warming')}, verdict changes {total('changes')}, vetoes {total('vetoes')})"
            )
        print(f"{w} {b}: " + "; ".join(parts))
        for p in labels:
            if p == "off" or any(runs[(w, b, q, r)]["ms"] is None for q in ("off", "off-again", p) for r in reps):
                continue
            base = {r: [(x + y) / 2 for x, y in zip(runs[(w, b, "off", r)]["ms"], runs[(w, b, "off-again", r)]["ms"])] for r in reps}
            diffs = [median(runs[(w, b, p, r)]["ms"][i] - base[r][i] for r in reps) for i in range(len(PARTS))]
            step = median(runs[(w, b, p, r)]["ms"][0] for r in reps)
            print(
                f"  {p}: {1e3 * step:.0f} us a step; against plain "
                + ", ".join(f"{name} {1e3 * d:+.0f}" for name, d in zip(PARTS, diffs))
            )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
