#!/usr/bin/env python3
"""Compare two float32 logits dumps ([rows, vocab], as written by
`hyserve generate --logits-out` (.npy) and `llamacpp_bench.py --check-ids ... --logits-out`).

The random-init test models mostly echo the last input token, so argmax agreement
alone is a weak check; this also reports how well the rest of the distribution
agrees (top-k overlap, relative error, correlation after removing each row's mean).
"""
import argparse
import sys

import numpy as np


def load(path: str, vocab: int) -> np.ndarray:
    # hyserve writes .npy (whatever the extension); llamacpp_bench.py writes raw float32
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        return np.load(path).astype(np.float32).reshape(-1, vocab)
    return np.fromfile(path, dtype=np.float32).reshape(-1, vocab)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--topk", type=int, default=10)
    args = ap.parse_args()
    a, b = load(args.a, args.vocab), load(args.b, args.vocab)
    n = min(len(a), len(b))
    if len(a) != len(b):
        print(f"note: row counts differ ({len(a)} vs {len(b)}); comparing the first {n}")
    a, b = a[:n], b[:n]
    argmax_eq = (a.argmax(1) == b.argmax(1)).mean()
    k = args.topk
    ta = np.argsort(-a, axis=1)[:, :k]
    tb = np.argsort(-b, axis=1)[:, :k]
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])
    ac = a - a.mean(1, keepdims=True)
    bc = b - b.mean(1, keepdims=True)
    corr = (ac * bc).sum(1) / np.sqrt((ac * ac).sum(1) * (bc * bc).sum(1))
    rel = np.abs(a - b).max(1) / np.abs(a).max(1)
    print(f"rows={n} argmax_agree={argmax_eq:.3f} top{k}_overlap={overlap:.3f} "
          f"corr_min={corr.min():.5f} corr_mean={corr.mean():.5f} "
          f"max|a-b|/max|a| per row: max={rel.max():.4f} mean={rel.mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
