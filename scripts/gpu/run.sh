#!/usr/bin/env bash
# On a GPU host: the CUDA parity tests, then the benchmarks (ours and the PyTorch eager
# peer, in the same run), writing logs, JSON and a Markdown results table to $OUT.
#
#   scripts/gpu/package.sh                 # on a development machine: builds .dev/gpu/
#   scripts/gpu/run.sh [stage ...]         # on the GPU host; stages: tests layer tune e2e ep cluster spec
#                                          # specserve
#                                          # (default: tests layer e2e; ep needs 2+ GPUs)
#
# Environment: BIN (default .dev/gpu), OUT (default gpu-results), PY (a python with torch).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.dev/gpu}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
STAGES=${*:-tests layer e2e}

# Carried compressed (.dev/gpuxz, from package.sh): unpack with Python's lzma, which
# every host with PyTorch has.
for f in hyserve gpu-tests; do
    # A warm host keeps the last unpacked binaries: unpack again when the carried
    # archive is newer.
    if [ -f ".dev/gpuxz/$f.xz" ] && { [ ! -x "$BIN/$f" ] || [ ".dev/gpuxz/$f.xz" -nt "$BIN/$f" ]; }; then
        mkdir -p "$BIN"
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            ".dev/gpuxz/$f.xz" "$BIN/$f" && chmod +x "$BIN/$f"
    fi
done

# Libraries: NCCL is only shipped inside the torch wheel on the project's hosts.
LIBDIR=$(mktemp -d)
for n in /opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2; do
    [ -e "$n" ] && ln -sf "$n" "$LIBDIR/libnccl.so"
done
export LD_LIBRARY_PATH="$LIBDIR:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
export HYSERVE_KERNEL_CACHE="${HYSERVE_KERNEL_CACHE:-/tmp/hyserve-kernels}"
if [ -z "${PY:-}" ]; then
    for p in python3 /opt/torch/.venv/bin/python; do
        if "$p" -c "import torch" 2>/dev/null; then PY=$p; break; fi
    done
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
echo "GPU: $(cat "$OUT/gpu.txt")"

stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
step() { echo "== $1 ($(date +%T))"; }

if stage tests; then
    step "CUDA parity tests"
    "$BIN/gpu-tests" --test-threads=1 --nocapture > "$OUT/tests.log" 2>&1
    echo "tests rc=$?" | tee -a "$OUT/tests.log"
    grep -E "relative error|agree|test result|panicked" "$OUT/tests.log" | head -80
fi

if stage layer; then
    step "layer benchmark: hyserve"
    "$BIN/hyserve" bench-gpu --json-out "$OUT/layer_hyserve.json" > /dev/null 2> "$OUT/layer_hyserve.log"
    echo "rc=$?"; tail -25 "$OUT/layer_hyserve.log"
    step "layer benchmark: PyTorch eager"
    "$PY" scripts/peers/torch_layer_bench.py --out "$OUT/layer_torch.json" > "$OUT/layer_torch.log" 2>&1
    echo "rc=$?"; tail -5 "$OUT/layer_torch.log"
fi

if stage tune; then
    # Decode GEMV variants (loads in flight per lane, token rows per pass), compiled in
    # through NVRTC -D options.
    for defs in ${TUNE_DEFINES:-GEMV_U=1 GEMV_U=4 GEMV_MT=4 GEMV_MT=2 GEMV_MT=4,GEMV_U=4}; do
        step "tuning: $defs"
        tag=$(echo "$defs" | tr ',=' '__')
        HYSERVE_NVRTC_DEFINES=$defs "$BIN/hyserve" bench-gpu --only gemv,moe_t1,moe_t8,layer \
            --json-out "$OUT/tune_$tag.json" > /dev/null 2> "$OUT/tune_$tag.log"
        grep -E "gemv|moe_t|layer" "$OUT/tune_$tag.log" | grep ms
    done
fi

if stage ep; then
    # Four real-dimension layers over 1 (fused baseline), 2 and 4 GPUs with NCCL.
    step "expert parallelism over NCCL"
    EP_MODEL=$(mktemp -d)/large-4l
    "$BIN/hyserve" init-model --arch hunyuan-large --preset large-4l --config-only --out "$EP_MODEL" > /dev/null 2>&1
    nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
    "$BIN/hyserve" bench-ep --model "$EP_MODEL" --gpus "${EP_GPUS:-1,2,4}" \
        --tp "${EP_TP:-1}" --batches "${EP_BATCHES:-1,16,64}" --json-out "$OUT/ep.json" > /dev/null 2> "$OUT/ep.log"
    echo "rc=$?"; grep -E "GPU|error|Error" "$OUT/ep.log" | tail -20
fi

if stage cluster; then
    step "GPU cluster: hyserve worker --device cuda x N + hyserve coordinator"
    scripts/gpu/cluster.sh "$BIN" "$OUT" "$PY" "${EP_CLUSTER_GPUS:-2}"
fi

if stage spec; then
    # Speculative decoding on one GPU: plain, prompt lookup and the draft model, at
    # batch 1, 8 and 32, on the held-out edit and free-generation workloads.
    step "speculative decoding: hyserve bench-spec --device cuda"
    SPEC_MODEL=${SPEC_MODEL:-model/assets/hunyuan-tiny}
    "$BIN/hyserve" bench-spec --device cuda --model "$SPEC_MODEL" \
        --draft-model "${SPEC_DRAFT:-model/assets/hunyuan-tiny-draft}" \
        --workload "${SPEC_WORKLOAD:-$SPEC_MODEL/heldout.jsonl}" --batches "${SPEC_BATCHES:-1,8,32}" \
        --rounds "${SPEC_ROUNDS:-2}" --max-tokens "${SPEC_MAX_TOKENS:-128}" ${SPEC_ARGS:-} \
        --json-out "$OUT/spec.json" > "$OUT/spec.md" 2> "$OUT/spec.log"
    echo "rc=$?"; cat "$OUT/spec.md"; grep -iE "error|panic" "$OUT/spec.log" | head
fi

if stage specserve; then
    step "speculation served: hyserve serve --device cuda, speculation on and off per request"
    scripts/gpu/spec_serve.sh "$BIN" "$OUT"
fi

if stage e2e; then
    step "end to end: hyserve serve --device cuda"
    scripts/gpu/e2e.sh "$BIN" "$OUT" "$PY"
fi

"$PY" scripts/gpu/report.py "$OUT" > "$OUT/results.md" 2> "$OUT/report.log"
cat "$OUT/results.md"
# One archive of everything (the device runner brings back only a few files).
tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
