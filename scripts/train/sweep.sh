#!/usr/bin/env bash
# Runs several train.py configurations at once on one GPU host and keeps the best of each preset.
#
# Why it exists: a training step of these small models is bound by the host's kernel launches,
# not by the GPU, so several runs share one H200 almost for free; this is how the defaults of
# train.py (epochs, dropout) were chosen, and it can deliver the winning models directly.
#
#   scripts/train/sweep.sh < RUNS        # RUNS: one run per line, "NAME PRESET [train.py args]"
#
# e.g.  t-d1 tiny --dropout 0.1 --max-epochs 6
#       d-e4 draft --max-epochs 4
# Environment: DATA (.dev/train/data), SWEEP (.dev/train/sweep: one directory + log per run),
# MINUTES (8: each run's --minutes), OUT and MODELS as in run.sh. Prints a table per preset sorted
# by held-out plain perplexity, copies the best tiny / draft run to MODELS/hunyuan-tiny and
# MODELS/hunyuan-tiny-draft, and packs them into OUT with `run.sh pack`.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-.dev/train/data}
SWEEP=${SWEEP:-.dev/train/sweep}
MINUTES=${MINUTES:-8}
MODELS=${MODELS:-.dev/train/models}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$SWEEP"
pids=()
while read -r name preset rest; do
    [ -z "${name:-}" ] || [ "${name:0:1}" = "#" ] && continue
    rm -rf "${SWEEP:?}/$name"
    # shellcheck disable=SC2086
    "$PYTHON" scripts/train/train.py --data "$DATA" --preset "$preset" --out "$SWEEP/$name" \
        --minutes "$MINUTES" $rest > "$SWEEP/$name.log" 2>&1 &
    pids+=("$!")
    echo "started $name ($preset $rest): pid $!"
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || echo "sweep: some runs failed (see $SWEEP/*.log)" >&2

"$PYTHON" - "$SWEEP" "$MODELS" <<'PY'
import json, os, shutil, sys
sweep, models = sys.argv[1:]
runs = []
for name in sorted(os.listdir(sweep)):
    p = os.path.join(sweep, name, "training.json")
    if os.path.exists(p):
        with open(p) as f:
            runs.append((name, json.load(f)))
for preset, target in (("draft", "hunyuan-tiny-draft"), ("tiny", "hunyuan-tiny")):
    rs = sorted((r for r in runs if r[1]["preset"] == preset), key=lambda r: r[1]["heldout_ppl"]["plain"])
    if not rs:
        continue
    print(f"{preset}: {'run':<12} {'dropout':>7} {'epochs':>6} {'steps':>6} {'best':>5} {'plain':>7} {'edit':>6} {'answers':>7}")
    for name, t in rs:
        h, p = t["hyperparameters"], t["heldout_ppl"]
        print(f"{'':<{len(preset) + 2}}{name:<12} {h['dropout']:>7} {t['epochs']:>6.1f} {t['steps']:>6} {t['best_step']:>5} "
              f"{p['plain']:>7.2f} {p['edit']:>6.2f} {p['edit_answers']:>7.2f}")
    dst = os.path.join(models, target)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.join(sweep, rs[0][0]), dst)
    shutil.copyfile(os.path.join(sweep, rs[0][0] + ".log"), os.path.join(dst, "train.log"))
    print(f"best {preset}: {rs[0][0]} -> {dst}")
PY
MODELS="$MODELS" scripts/train/run.sh pack
