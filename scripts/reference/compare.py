#!/usr/bin/env python3
"""Compare two logits files: python3 compare.py A.npy B.npy [--tol 2e-2] [--rows]

Prints rel = ||a - b|| / ||b|| over all rows, the worst per-row relative error, and
per-row argmax agreement. B is the reference (denominator). If the files have a
different number of rows, only the common leading rows are compared (reported).

Rows after the first generated token where the two runs chose differently are
conditioned on different inputs; pass --json-a/--json-b (the generation json files)
to have the comparison stop there.

Exit status: 0, or 1 when --tol is given and the overall or worst-row relative error
exceeds it (or argmax disagrees on a compared row and --require-argmax is set).
"""

import argparse
import json
import sys

import numpy as np


def first_divergence(ja, jb):
    """Index of the first generated token that differs, or None."""
    with open(ja) as f:
        a = json.load(f)
    with open(jb) as f:
        b = json.load(f)
    if a["prompt_ids"] != b["prompt_ids"]:
        sys.exit("prompt_ids differ between the two json files")
    ga, gb = a["generated_ids"], b["generated_ids"]
    for i, (x, y) in enumerate(zip(ga, gb)):
        if x != y:
            return len(a["prompt_ids"]), i
    return len(a["prompt_ids"]), None


def main(argv=None):
    ap = argparse.ArgumentParser(description="relative error and argmax agreement of two logits files")
    ap.add_argument("a")
    ap.add_argument("b", help="reference (denominator)")
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--require-argmax", action="store_true")
    ap.add_argument("--rows", action="store_true", help="print every row")
    ap.add_argument("--json-a")
    ap.add_argument("--json-b")
    args = ap.parse_args(argv)

    a = np.load(args.a).astype(np.float64)
    b = np.load(args.b).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        sys.exit(f"shape mismatch: {a.shape} vs {b.shape}")
    n = min(a.shape[0], b.shape[0])
    if a.shape[0] != b.shape[0]:
        print(f"note: row counts differ ({a.shape[0]} vs {b.shape[0]}); comparing first {n}")
    if args.json_a and args.json_b:
        n_prompt, div = first_divergence(args.json_a, args.json_b)
        if div is not None:
            # row n_prompt-1+div chose the differing token (still comparable); later rows are not
            last = n_prompt + div
            print(f"generated ids diverge at generated token {div}; comparing rows 0..{last - 1}")
            n = min(n, last)
        else:
            print("generated ids identical")
    a, b = a[:n], b[:n]

    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        print("non-finite values present: A %d, B %d" % (np.sum(~np.isfinite(a)), np.sum(~np.isfinite(b))))

    overall = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    row_err = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)
    max_abs = np.abs(a - b).max(axis=1)
    am_a, am_b = a.argmax(axis=1), b.argmax(axis=1)
    agree = am_a == am_b
    worst = int(row_err.argmax())

    if args.rows:
        print(" row   rel_err     max_abs   argmax_a argmax_b")
        for i in range(n):
            flag = "" if agree[i] else "  <-- argmax differs"
            print(f"{i:4d}  {row_err[i]:.3e}  {max_abs[i]:.3e}  {am_a[i]:8d} {am_b[i]:8d}{flag}")
    print(f"rows compared: {n}")
    print(f"overall rel err ||a-b||/||b||: {overall:.3e}")
    print(f"max per-row rel err: {row_err[worst]:.3e} (row {worst}); max abs diff {max_abs.max():.3e}")
    print(f"argmax agrees on {int(agree.sum())}/{n} rows" +
          ("" if agree.all() else f"; differs at rows {np.nonzero(~agree)[0].tolist()}"))

    ok = True
    if args.tol is not None:
        ok = overall <= args.tol and row_err.max() <= args.tol
        if args.require_argmax:
            ok = ok and bool(agree.all())
        print("PASS" if ok else f"FAIL (tol {args.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
