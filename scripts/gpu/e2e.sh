#!/usr/bin/env bash
# End to end on one GPU: `hyserve serve --device cuda` with a model of the real
# architecture at real dimensions (4 layers, ~24B parameters, random bf16 weights made
# on the GPU), driven over HTTP by scripts/bench/load.py at 1, 8 and 64 concurrent
# streams; then the same model in PyTorch eager (scripts/peers/torch_model_bench.py).
#   scripts/gpu/e2e.sh BIN_DIR OUT_DIR PYTHON
set -uo pipefail
BIN=$1; OUT=$2; PY=$3
MODEL=$(mktemp -d)/large-4l
"$BIN/hyserve" init-model --arch hunyuan-large --preset large-4l --config-only --out "$MODEL"
PORT=18000
# Twice: with decode steps replayed from CUDA graphs (the default), and without.
for graphs in 1 0; do
    suffix=$([ $graphs = 1 ] && echo "" || echo "_nographs")
    HYSERVE_CUDA_GRAPHS=$graphs "$BIN/hyserve" serve --model "$MODEL" --model-name large-4l --device cuda \
        --random-weights 1 --http-addr 127.0.0.1:$PORT --grpc-addr 127.0.0.1:18051 --kv-cache-mib 16384 \
        --max-running 64 --max-batch-tokens 2048 --step-timeout-secs 600 > "$OUT/e2e_serve$suffix.log" 2>&1 &
    SERVE=$!
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
        kill -0 $SERVE 2>/dev/null || break
        sleep 1
    done
    curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
        -d '{"model":"large-4l","prompt":"The quick brown fox","max_tokens":8}' > "$OUT/e2e_smoke$suffix.json"
    echo "smoke (graphs=$graphs): $(head -c 300 "$OUT/e2e_smoke$suffix.json")"
    "$PY" scripts/bench/load.py --url "http://127.0.0.1:$PORT" --model large-4l --concurrency 1,8,64 \
        --requests-per-client 2 --prompt-tokens 128 --max-tokens 64 --label "hyserve-cuda$suffix" \
        --json-out "$OUT/e2e_hyserve$suffix.json" > "$OUT/e2e_load$suffix.log" 2>&1
    echo "load rc=$?"; grep -o '"concurrency": [0-9]*\|"output_tokens_per_s": [0-9.]*\|"itl_p50_ms": [0-9.]*' "$OUT/e2e_load$suffix.log" | paste -sd' '
    kill $SERVE; wait $SERVE 2>/dev/null
done
"$PY" scripts/peers/torch_model_bench.py --layers 4 --batch 1,8,64 --prompt-len 128 --gen 64 \
    --out "$OUT/e2e_torch.json" > "$OUT/e2e_torch.log" 2>&1
echo "torch rc=$?"; tail -8 "$OUT/e2e_torch.log"
