#!/usr/bin/env bash
# The CPU engine benchmark: hyserve's decode and prefill throughput beside the machine's
# memory bandwidth (measured in the same run), on a ~0.5B-parameter bf16 model of each
# architecture, then the peers (transformers, llama.cpp) on the same A13B-style model with
# the same threads. Writes JSON per engine and a Markdown table to OUT_DIR.
#
#   cargo build --release && bash scripts/peers/setup.sh   # once: build hyserve and the peers
#   scripts/bench/cpu.sh OUT_DIR                            # env: THREADS (2), HYSERVE, PEERS
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: scripts/bench/cpu.sh OUT_DIR}
THREADS=${THREADS:-2}
BIN=${HYSERVE:-target/release/hyserve}
mkdir -p "$OUT"
A13B=$OUT/a13b-medium
LARGE=$OUT/large-medium
[ -f "$A13B/config.json" ] || "$BIN" init-model --arch hunyuan-a13b --preset medium --dtype bf16 --seed 1 --out "$A13B"
[ -f "$LARGE/config.json" ] || "$BIN" init-model --arch hunyuan-large --preset medium --dtype bf16 --seed 1 --out "$LARGE"
for m in a13b large; do
  echo "== hyserve bench ($m, threads=$THREADS)"
  HYSERVE_LOG=warn "$BIN" --threads "$THREADS" bench --model "$OUT/$m-medium" --decode-tokens 128 --repeat 5 \
    --json-out "$OUT/hyserve-$m.json" > /dev/null
done
if [ "${PEERS:-hf llamacpp}" != "none" ]; then
  HYSERVE=$BIN THREADS=$THREADS DECODE=128 REPEAT=5 bash scripts/peers/run_all.sh "$A13B" "$OUT"
fi
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    return json.load(open(p)) if os.path.exists(p) else None
rows = []
for n, label in [("hyserve-a13b.json", "hyserve, A13B-style"), ("hyserve-large.json", "hyserve, Hunyuan-Large (CLA)"),
                 ("hf.json", "transformers (eager), A13B-style"), ("llamacpp.json", "llama.cpp, A13B-style")]:
    d = load(n)
    if d:
        rows.append((label, d))
ref = load("hyserve-a13b.json")
print("| engine | prefill tok/s | decode tok/s | decode weight stream GB/s | / memory read ceiling |")
print("|---|---|---|---|---|")
for label, d in rows:
    bw = d.get("decode_weight_stream_gb_s")
    ratio = d.get("decode_bandwidth_ratio")
    if bw is None and ref:
        bw = ref["decode_weight_bytes_per_token"] * d["decode_tokens_per_s"] / 1e9
        ratio = bw / ref["memory_read_gb_s"]
    print(f"| {label} | {d['prefill_tokens_per_s']:.0f} | {d['decode_tokens_per_s']:.1f} | {bw:.1f} | {ratio:.2f} |")
if ref:
    print(f"\nmemory read ceiling (same run): {ref['memory_read_gb_s']:.1f} GB/s; "
          f"weights read per A13B decode token: {ref['decode_weight_bytes_per_token']/1e6:.0f} MB; threads: {ref['threads']}")
PY
