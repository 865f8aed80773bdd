#!/usr/bin/env bash
# Run the peer benchmarks (transformers, llama.cpp) on one hyserve-format model
# dir, in sequence, and write their JSON to an output dir.  The hyserve bench
# itself is run separately by the caller.
#
#   HYSERVE=target/release/hyserve bash scripts/peers/run_all.sh MODEL_DIR OUT_DIR
#
# Env: HYSERVE   hyserve binary (used to create MODEL_DIR if it is missing, and
#                for the greedy-token cross-check against llama.cpp)
#      PY        python with the peers installed (default /work/scratch/peers/venv/bin/python)
#      THREADS   default 2;  PROMPT default 256;  DECODE default 64;  REPEAT default 3
#      PEERS     default "hf llamacpp"
#      GGUF      GGUF path (default OUT_DIR/model.gguf; converted if missing)
#      WAIT_IDLE before each timed run, wait up to this many seconds for the machine
#                to be idle (<15% CPU for 20 s); default 600, 0 disables
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${1:?usage: run_all.sh MODEL_DIR OUT_DIR}
OUT=${2:?usage: run_all.sh MODEL_DIR OUT_DIR}
HYSERVE=${HYSERVE:?set HYSERVE=path-to-hyserve-binary}
PY=${PY:-/work/scratch/peers/venv/bin/python}
THREADS=${THREADS:-2}
PROMPT=${PROMPT:-256}
DECODE=${DECODE:-64}
REPEAT=${REPEAT:-3}
PEERS=${PEERS:-"hf llamacpp"}
WAIT_IDLE=${WAIT_IDLE:-600}
mkdir -p "$OUT"
idle() {
  [ "$WAIT_IDLE" -gt 0 ] || return 0
  bash "$HERE/wait_idle.sh" "$WAIT_IDLE" >/dev/null || echo "warning: machine still busy after ${WAIT_IDLE}s; timing anyway" >&2
}
GGUF=${GGUF:-$OUT/model.gguf}

if [ ! -f "$MODEL/config.json" ]; then
  echo "== creating $MODEL (hunyuan-a13b medium bf16 seed 1)"
  "$HYSERVE" init-model --arch hunyuan-a13b --preset medium --dtype bf16 --seed 1 --out "$MODEL"
fi

for peer in $PEERS; do
  case $peer in
    hf)
      idle
      echo "== transformers (threads=$THREADS)"
      "$PY" "$HERE/hf_bench.py" --model "$MODEL" --threads "$THREADS" \
        --prompt-tokens "$PROMPT" --decode-tokens "$DECODE" --repeat "$REPEAT" \
        --json-out "$OUT/hf.json" > "$OUT/hf.log" 2>&1 || { tail -20 "$OUT/hf.log"; exit 1; }
      grep -E '^  run ' "$OUT/hf.log" || true
      ;;
    llamacpp)
      if [ ! -f "$GGUF" ]; then
        echo "== converting to GGUF: $GGUF"
        "$PY" "$HERE/to_gguf.py" --model "$MODEL" --out "$GGUF"
      fi
      echo "== llama.cpp greedy cross-check vs hyserve (8 tokens)"
      IDS=$("$PY" -c "print(','.join(str(300 + (i * 7919) % 500) for i in range(32)))")
      "$PY" "$HERE/llamacpp_bench.py" --gguf "$GGUF" --threads "$THREADS" \
        --check-ids "$IDS" --check-tokens 8 --logits-out "$OUT/llamacpp_check_logits.f32" > "$OUT/llamacpp_check.json"
      "$HYSERVE" --threads "$THREADS" generate --model "$MODEL" --prompt-ids "$IDS" --max-tokens 8 --json --ignore-eos \
        --logits-out "$OUT/hyserve_check_logits.npy" 2>/dev/null | tail -1 > "$OUT/hyserve_check.json"
      "$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
a = json.load(open(f"{out}/llamacpp_check.json"))["generated_ids"]
b = json.load(open(f"{out}/hyserve_check.json"))["generated_ids"]
print("llama.cpp:", a); print("hyserve:  ", b); print("greedy match:", a == b)
json.dump({"llamacpp": a, "hyserve": b, "match": a == b}, open(f"{out}/greedy_check.json", "w"))
EOF
      VOCAB=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$MODEL/config.json")
      "$PY" "$HERE/compare_logits.py" "$OUT/hyserve_check_logits.npy" "$OUT/llamacpp_check_logits.f32" --vocab "$VOCAB" \
        | tee "$OUT/logits_check.txt"
      idle
      echo "== llama.cpp (threads=$THREADS)"
      "$PY" "$HERE/llamacpp_bench.py" --gguf "$GGUF" --threads "$THREADS" \
        --prompt-tokens "$PROMPT" --decode-tokens "$DECODE" --repeat "$REPEAT" \
        --json-out "$OUT/llamacpp.json" > "$OUT/llamacpp.log" 2>&1 || { tail -20 "$OUT/llamacpp.log"; exit 1; }
      grep -E '^  run ' "$OUT/llamacpp.log" || true
      ;;
    *) echo "unknown peer $peer" >&2; exit 2 ;;
  esac
done

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("hf", "llamacpp"):
    p = os.path.join(out, name + ".json")
    if os.path.exists(p):
        r = json.load(open(p))
        print(f"{r['engine']:>12}: prefill {r['prefill_tokens_per_s']:8.1f} tok/s   decode {r['decode_tokens_per_s']:7.2f} tok/s   (threads={r['threads']})")
EOF
