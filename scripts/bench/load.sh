#!/usr/bin/env bash
# The serving load benchmark: hyserve serve on the embedded default (small) model and on the
# ~0.5B A13B-style model, and llama.cpp's OpenAI server (llama-cpp-python) on the same 0.5B
# model as GGUF, each driven by scripts/bench/load.py at 1..64 concurrent streaming clients.
# Writes JSON per run and the scaling plot docs/images/load-scaling.png.
#
#   scripts/bench/load.sh OUT_DIR      # env: HYSERVE, PY (peers venv), GGUF, LEVELS, THREADS
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: scripts/bench/load.sh OUT_DIR}
BIN=${HYSERVE:-target/release/hyserve}
PY=${PY:-/work/scratch/peers/venv/bin/python}
THREADS=${THREADS:-2}
LEVELS=${LEVELS:-1,4,16,64}
mkdir -p "$OUT" docs/images
SMALL=$OUT/default-small
A13B=$OUT/a13b-medium
[ -f "$SMALL/config.json" ] || "$BIN" init-model --arch hunyuan-large --preset small --dtype bf16 --seed 0 --out "$SMALL"
[ -f "$A13B/config.json" ] || "$BIN" init-model --arch hunyuan-a13b --preset medium --dtype bf16 --seed 1 --out "$A13B"
GGUF=${GGUF:-$OUT/a13b-medium.gguf}
[ -f "$GGUF" ] || "$PY" scripts/peers/to_gguf.py --model "$A13B" --out "$GGUF"

wait_http() { for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "server at $1 did not start" >&2; return 1; }

run_hyserve() { # model label port
  HYSERVE_LOG=warn "$BIN" --threads "$THREADS" serve --model "$1" --model-name m --http-addr 127.0.0.1:$3 \
    --grpc-addr 127.0.0.1:$(( $3 + 1 )) --threads-per-worker "$THREADS" --max-running 64 > "$OUT/$2.log" 2>&1 &
  local pid=$!
  wait_http "http://127.0.0.1:$3/ready"
  python3 scripts/bench/load.py --url "http://127.0.0.1:$3" --model m --label "$2" --concurrency "$LEVELS" \
    --requests-per-client 2 --prompt-tokens 48 --max-tokens 32 --json-out "$OUT/$2.json"
  kill $pid; wait $pid 2>/dev/null || true
}

run_hyserve "$SMALL" hyserve-small 18100
run_hyserve "$A13B" hyserve-a13b-medium 18200

# llama.cpp's server (one sequence at a time: llama-cpp-python has no continuous batching).
# It has no ignore_eos: a logit bias on the stop tokens keeps its outputs as long as ours.
BIAS=$(python3 -c "
import json,sys
c=json.load(open('$A13B/tokenizer_config.json'))['added_tokens_decoder']
ids=[int(k) for k,v in c.items() if v['content'] in ('<|eos|>','<|extra_5|>','<|endoftext|>')]
print(json.dumps({'logit_bias': {str(i): -100 for i in ids}}))")
"$PY" -m llama_cpp.server --model "$GGUF" --model_alias m --host 127.0.0.1 --port 18300 \
  --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx 4096 --interrupt_requests False > "$OUT/llamacpp-server.log" 2>&1 &
LPID=$!
wait_http "http://127.0.0.1:18300/v1/models"
python3 scripts/bench/load.py --url "http://127.0.0.1:18300" --model m --label llama.cpp-a13b-medium \
  --concurrency "$LEVELS" --requests-per-client 2 --prompt-tokens 48 --max-tokens 32 \
  --extra-body "$BIAS" --json-out "$OUT/llamacpp-a13b-medium.json"
kill $LPID; wait $LPID 2>/dev/null || true

python3 scripts/bench/plot_load.py "$OUT/hyserve-small.json" "$OUT/hyserve-a13b-medium.json" \
  "$OUT/llamacpp-a13b-medium.json" --out docs/images/load-scaling.png \
  --title "Streaming load, 48-word prompts, 32 output tokens, $THREADS CPU threads"
