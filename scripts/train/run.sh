#!/usr/bin/env bash
# The GPU host's training run: trains hunyuan-tiny-draft, then hunyuan-tiny, on the data that
# scripts/train/prepare.py wrote, and packs both model directories for the trip back.
#
# Why it exists: the GPU host has no network and only torch/numpy/safetensors/tiktoken, and what
# comes back from it is limited to 8 files of at most 16 MiB each; this script is the one command
# to run there.
#
#   TINY_MINUTES=5 DRAFT_MINUTES=1.5 DATA=.dev/train/data OUT=/some/dir scripts/train/run.sh
#   MODELS=DIR OUT=DIR scripts/train/run.sh pack      # only pack MODELS/hunyuan-tiny{,-draft}
#
# Environment (defaults): TINY_MINUTES (5), DRAFT_MINUTES (1.5), DATA (.dev/train/data),
# OUT (.dev/train/out: what is brought back), MODELS (.dev/train/models: the model directories),
# PYTHON (python3), TRAIN_ARGS (extra train.py arguments for both runs, e.g. "--seed 1").
# The minutes are upper bounds: train.py also caps each run at a few epochs of the small corpus
# (tiny 6, draft 8; --max-epochs), so on one H200 the draft takes ~0.8 and tiny ~1.7 minutes.
#
# Writes to OUT: models.tar.part-aa, -ab, ... (one tar of MODELS/hunyuan-tiny-draft and
# MODELS/hunyuan-tiny, split into 15 MiB pieces), models.tar.sha256, train.log (both runs' output
# and a summary table). Reassemble elsewhere with scripts/train/unpack.sh OUT DEST.
set -euo pipefail
cd "$(dirname "$0")/../.."
TINY_MINUTES=${TINY_MINUTES:-5}
DRAFT_MINUTES=${DRAFT_MINUTES:-1.5}
DATA=${DATA:-.dev/train/data}
OUT=${OUT:-.dev/train/out}
MODELS=${MODELS:-.dev/train/models}
PYTHON=${PYTHON:-python3}
TRAIN_ARGS=${TRAIN_ARGS:-}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$MODELS"
LOG="$OUT/train.log"

train() {  # preset name minutes
    local preset=$1 name=$2 minutes=$3
    echo "== $name ($preset, $minutes min)" | tee -a "$LOG"
    rm -rf "${MODELS:?}/$name"
    # shellcheck disable=SC2086
    "$PYTHON" scripts/train/train.py --data "$DATA" --preset "$preset" --out "$MODELS/$name" \
        --minutes "$minutes" $TRAIN_ARGS 2>&1 | tee -a "$LOG"
    # the run's own log travels inside the model directory
    sed -n "/^== $name (/,\$p" "$LOG" > "$MODELS/$name/train.log"
}

pack() {
    rm -f "$OUT"/models.tar.part-* "$OUT/models.tar.sha256"
    tar -cf - -C "$MODELS" hunyuan-tiny-draft hunyuan-tiny | split -b 15M -a 2 - "$OUT/models.tar.part-"
    (cd "$OUT" && cat models.tar.part-* | sha256sum | sed 's/-$/models.tar/' > models.tar.sha256)
    "$PYTHON" - "$MODELS" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
models = sys.argv[1]
print(f"{'model':<20} {'preset':<6} {'params':>11} {'steps':>6} {'tokens':>8} {'ppl plain':>9} {'ppl edit':>8} {'answers':>8} {'minutes':>7}")
for name in ("hunyuan-tiny-draft", "hunyuan-tiny"):
    with open(os.path.join(models, name, "training.json")) as f:
        t = json.load(f)
    p = t["heldout_ppl"]
    print(f"{name:<20} {t['preset']:<6} {t['parameters']:>11,} {t['steps']:>6} {t['tokens_seen'] / 1e6:>7.1f}M "
          f"{p['plain']:>9.2f} {p['edit']:>8.2f} {p['edit_answers']:>8.2f} {t['wall_time_s'] / 60:>7.2f}")
PY
    ls -l "$OUT" | tee -a "$LOG"
}

if [ "${1:-}" = "pack" ]; then
    pack
    exit 0
fi

for f in train.bin valid_plain.bin valid_edit.bin meta.json tokenizer/hy.tiktoken tokenizer/tokenizer_config.json; do
    [ -f "$DATA/$f" ] || { echo "run.sh: $DATA/$f is missing: run scripts/train/prepare.py first" >&2; exit 1; }
done
: > "$LOG"
{
    echo "== hyserve training run, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    echo "draft ${DRAFT_MINUTES} min, tiny ${TINY_MINUTES} min, data $DATA"
} 2>&1 | tee -a "$LOG"
train draft hunyuan-tiny-draft "$DRAFT_MINUTES"
train tiny hunyuan-tiny "$TINY_MINUTES"
pack
