#!/usr/bin/env bash
# A GPU cluster on one host: one `hyserve worker --device cuda` process per GPU (expert
# shards, activations over NCCL, the NCCL id handed out by the coordinator) and a
# `hyserve coordinator` in front, serving four real-dimension Hunyuan-Large layers (random
# bf16 weights from one seed, so every process makes the same model). Driven over HTTP by
# scripts/bench/load.py at 1, 16 and 64 streams, after `hyserve serve` on one GPU with
# the same model and load. Greedy answers of both are saved side by side.
#   [CLUSTER_TP="1 2"] scripts/gpu/cluster.sh BIN_DIR OUT_DIR PYTHON N_GPUS
set -uo pipefail
BIN=$1; OUT=$2; PY=$3; N=${4:-2}
MODEL=$(mktemp -d)/large-4l
"$BIN/hyserve" init-model --arch hunyuan-large --preset large-4l --config-only --out "$MODEL" > /dev/null 2>&1
PORT=18100
COMMON=(--model "$MODEL" --model-name large-4l --http-addr 127.0.0.1:$PORT --grpc-addr 127.0.0.1:18151
    --kv-cache-mib 8192 --max-running 64 --max-batch-tokens 2048 --step-timeout-secs 600)

wait_ready() {  # PID
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null 2>&1 && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

greedy() {  # LABEL
    for p in "The quick brown fox" "Once upon a time" "In the beginning"; do
        curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
            -d "{\"model\":\"large-4l\",\"prompt\":\"$p\",\"max_tokens\":16,\"temperature\":0}" \
            | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"].encode("unicode_escape").decode())'
    done > "$OUT/cluster_greedy_$1.txt"
}

load() {  # LABEL
    "$PY" scripts/bench/load.py --url "http://127.0.0.1:$PORT" --model large-4l --concurrency "${CONC:-1,16,64}" \
        --requests-per-client 2 --prompt-tokens 128 --max-tokens 64 --label "$1" \
        --json-out "$OUT/cluster_$1.json" > "$OUT/cluster_load_$1.log" 2>&1
    echo "$1 load rc=$?: $(grep -o '"concurrency": [0-9]*\|"output_tokens_per_s": [0-9.]*' "$OUT/cluster_load_$1.log" | paste -sd' ')"
}

# One GPU, every expert local (CLUSTER_ONLY=1 skips it).
if [ -z "${CLUSTER_ONLY:-}" ]; then
    "$BIN/hyserve" serve "${COMMON[@]}" --device cuda --random-weights 1 > "$OUT/cluster_serve1.log" 2>&1 &
    S=$!
    if wait_ready $S; then greedy 1gpu; load 1gpu; else echo "serve did not start"; tail -5 "$OUT/cluster_serve1.log"; fi
    kill $S; wait $S 2>/dev/null
fi

# N worker processes, one per GPU, and a coordinator; once per tensor-parallel group
# size in CLUSTER_TP (default "1": experts spread, attention data-parallel; "2":
# pairs of GPUs also shard attention and the shared expert).
cluster() {  # TP
    local TP=$1 LABEL="${N}gpu"
    [ "$TP" -gt 1 ] && LABEL="${N}gpu-tp$TP"
    WPIDS=()
    PEERS=""
    for i in $(seq 0 $((N - 1))); do
        "$BIN/hyserve" worker --model "$MODEL" --device cuda --gpu "$i" --random-weights 1 \
            --listen 127.0.0.1:$((18200 + i)) --name "gpu$i" > "$OUT/cluster_worker${i}_$LABEL.log" 2>&1 &
        WPIDS+=($!)
        PEERS="$PEERS${PEERS:+,}127.0.0.1:$((18200 + i))"
    done
    # The port must be free again (a stale server would answer for the cluster).
    for _ in $(seq 1 30); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 || break; sleep 1; done
    # Rebalancing from the load seen every CLUSTER_REBALANCE_SECS; the greedy answers are
    # taken again after the load run, under the placement it left.
    "$BIN/hyserve" coordinator "${COMMON[@]}" --peers "$PEERS" --join-timeout-secs 120 \
        --tensor-parallel "$TP" --rebalance-secs "${CLUSTER_REBALANCE_SECS:-10}" \
        > "$OUT/cluster_coordinator_$LABEL.log" 2>&1 &
    C=$!
    if wait_ready $C; then
        greedy "$LABEL"; load "$LABEL"; greedy "$LABEL-after"
        echo "$LABEL: $(grep -c 'rebalanced: new placement staged' "$OUT/cluster_coordinator_$LABEL.log") rebalances; $(grep -c 'switched to a new expert placement' "$OUT/cluster_worker0_$LABEL.log") switches on worker 0; $(grep -c 'rebalance failed' "$OUT/cluster_coordinator_$LABEL.log") failed"
    else
        echo "the cluster ($LABEL) did not start"; tail -5 "$OUT/cluster_coordinator_$LABEL.log" "$OUT"/cluster_worker*_$LABEL.log
    fi
    kill $C "${WPIDS[@]}"; wait 2>/dev/null
    echo "greedy, 1 GPU vs $LABEL vs $LABEL after the load and its rebalances:"
    paste -d'|' "$OUT/cluster_greedy_1gpu.txt" "$OUT/cluster_greedy_$LABEL.txt" "$OUT/cluster_greedy_$LABEL-after.txt" 2>/dev/null
    # Ports are reused by the next variant.
    sleep 2
}
for TP in ${CLUSTER_TP:-1}; do cluster "$TP"; done
