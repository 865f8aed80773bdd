#!/usr/bin/env bash
# Speculation through the whole served path on one GPU: `hyserve serve --device cuda` on
# the trained default model with prompt lookup, held-out edit prompts over the OpenAI
# chat API, greedy, each sent with speculation on (the default) and off (per request);
# the two answers must be the same text, and the speculation counters on /metrics move
# (the whole page is kept: spec_serve_metrics_full.txt).
#   scripts/gpu/spec_serve.sh BIN_DIR OUT_DIR [N_PROMPTS]      (DEVICE=cpu to try it here)
set -uo pipefail
BIN=$1; OUT=$2; N=${3:-16}
PORT=18100
MODEL=model/assets/hunyuan-tiny
"$BIN/hyserve" serve --model "$MODEL" --model-name hunyuan-tiny --speculation ngram --device "${DEVICE:-cuda}" \
    --http-addr 127.0.0.1:$PORT --grpc-addr 127.0.0.1:18151 > "$OUT/spec_serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
    kill -0 $SERVE 2>/dev/null || break
    sleep 0.5
done
python3 - "$PORT" "$MODEL/heldout.jsonl" "$N" > "$OUT/spec_serve.txt" <<'EOF'
import json, sys, urllib.request

port, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def chat(prompt, speculation):
    body = {"model": "hunyuan-tiny", "temperature": 0, "max_tokens": 128,
            "messages": [{"role": "user", "content": prompt}]}
    if speculation:
        body["speculation"] = speculation
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["message"]["content"]

prompts = [json.loads(l)["prompt_edit"] for l in open(path)][:n]
same = 0
for p in prompts:
    on, off = chat(p, None), chat(p, "off")
    same += on == off
    print(json.dumps({"same": on == off, "speculated": on[:80]}))
print(f"same text with and without speculation: {same}/{len(prompts)}")
EOF
echo "client rc=$?"
tail -1 "$OUT/spec_serve.txt"
curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/spec_serve_metrics_full.txt"
grep -E '^hyserve_(spec_|steps_)' "$OUT/spec_serve_metrics_full.txt" | tee "$OUT/spec_serve_metrics.txt"
kill $SERVE; wait $SERVE 2>/dev/null
