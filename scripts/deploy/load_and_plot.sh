#!/usr/bin/env bash
# A load run against `hyserve serve` (the embedded default model) scraped every second by a
# real Prometheus, then pictures of the main dashboard panels drawn from what it scraped
# (scripts/deploy/plot_dashboards.py -> docs/images/deploy/*.png).
#
#   scripts/deploy/load_and_plot.sh
#
# The load, through the official openai client, runs in phases of rising then falling
# concurrency (1 -> 4 -> 16 -> 4 clients, about 160 s in all) with mixed prompt lengths and
# max_tokens, chat and plain completions, some streamed; the prompts ask for held-out King
# James passages in modern English (model/assets/hunyuan-tiny/heldout.jsonl).
#
# Environment:
#   HYSERVE_BIN  the binary (default target/release/hyserve)
#   PROMETHEUS   the prometheus binary (default: prometheus on the PATH; Debian: apt-get
#                install prometheus)
#   OUT          where the pictures go (default docs/images/deploy)
#   LOAD_SCALE   multiplies the phases' durations (default 1; 0.2 for a quick check)
#   SERVE_ARGS   extra `hyserve serve` flags, e.g. "--kv-cache-mib 64 --max-running 8"
# Python needs openai and httpx (tests/python/requirements.txt) and matplotlib
# (scripts/deploy/requirements.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BIN=${HYSERVE_BIN:-$ROOT/target/release/hyserve}
PROMETHEUS=${PROMETHEUS:-prometheus}
OUT=${OUT:-$ROOT/docs/images/deploy}
LOAD_SCALE=${LOAD_SCALE:-1}
SERVE_ARGS=${SERVE_ARGS:-}

[ -x "$BIN" ] || { echo "no hyserve binary at $BIN: cargo build --release, or set HYSERVE_BIN" >&2; exit 1; }
command -v "$PROMETHEUS" >/dev/null || {
    echo "prometheus not found: apt-get install prometheus, or set PROMETHEUS" >&2; exit 1; }
python3 -c 'import openai, httpx, matplotlib' 2>/dev/null || {
    echo "missing Python packages: pip install -r tests/python/requirements.txt -r scripts/deploy/requirements.txt" >&2
    exit 1; }

WORK=$(mktemp -d -t hyserve-load-XXXXXX)
SERVE_PID=""
PROM_PID=""
cleanup() {
    status=$?
    for pid in $PROM_PID $SERVE_PID; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        echo "== failed ($status); logs kept in $WORK" >&2
        for log in "$WORK"/serve.log "$WORK"/prometheus.log; do
            [ -f "$log" ] && { echo "-- tail of $log" >&2; tail -n 20 "$log" >&2; }
        done
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL SECONDS WHAT PID: until URL answers 200, or fail.
wait_http() {
    python3 - "$@" <<'PY'
import os, sys, time
import httpx
url, seconds, what, pid = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
deadline = time.time() + seconds
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"{what} exited before it was ready")
    try:
        if httpx.get(url, timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.25)
sys.exit(f"{what} not ready at {url} after {seconds:.0f} s")
PY
}

HTTP_PORT=$(free_port)
GRPC_PORT=$(free_port)
PROM_PORT=$(free_port)
echo "== hyserve serve on 127.0.0.1:$HTTP_PORT ($BIN)"
# shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
"$BIN" serve --http-addr "127.0.0.1:$HTTP_PORT" --grpc-addr "127.0.0.1:$GRPC_PORT" $SERVE_ARGS \
    >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
wait_http "http://127.0.0.1:$HTTP_PORT/ready" 300 "hyserve serve" "$SERVE_PID"

echo "== prometheus on 127.0.0.1:$PROM_PORT, scraping every 1 s ($WORK)"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: hyserve
    static_configs:
      - targets: ["127.0.0.1:$HTTP_PORT"]
EOF
"$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 60 prometheus "$PROM_PID"
sleep 5 # a few idle scrapes before the load

echo "== load (LOAD_SCALE=$LOAD_SCALE)"
python3 - "http://127.0.0.1:$HTTP_PORT/v1" "$WORK/run.json" "$LOAD_SCALE" <<'PY'
import json, random, sys, threading, time
import openai

base_url, run_file, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
# (name, concurrent clients, seconds)
PHASES = [("warm-up", 1, 30), ("ramp", 4, 40), ("peak", 16, 60), ("cool-down", 4, 30)]

with open("model/assets/hunyuan-tiny/heldout.jsonl") as f:
    passages = [json.loads(line)["passage"] for line in f]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
model = client.models.list().data[0].id

lock = threading.Lock()
stats = {"ok": 0, "failed": 0, "tokens": 0, "in_flight": 0}
errors = []


def one(rng):
    # Mixed prompt lengths: one to three consecutive passages.
    k = rng.randrange(len(passages))
    text = "\n".join(passages[k:k + rng.choice([1, 1, 2, 3])])
    prompt = "Put this into modern English:\n" + text
    max_tokens = rng.choice([16, 32, 64, 96, 160])
    stream = rng.random() < 0.35
    temperature = rng.choice([0.0, 0.0, 0.7])
    extra = dict(stream_options={"include_usage": True}) if stream else {}
    if rng.random() < 0.7:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=temperature, stream=stream, **extra)
    else:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                      temperature=temperature, stream=stream, **extra)
    if stream:
        usage = None
        for chunk in r:
            usage = chunk.usage or usage
    else:
        usage = r.usage
    return usage.completion_tokens if usage else 0


def client_loop(seed, deadline):
    rng = random.Random(seed)
    while time.time() < deadline:
        with lock:
            stats["in_flight"] += 1
        try:
            tokens = one(rng)
            with lock:
                stats["ok"] += 1
                stats["tokens"] += tokens
        except Exception as e:  # noqa: BLE001 (counted and reported)
            with lock:
                stats["failed"] += 1
                if len(errors) < 5:
                    errors.append(repr(e))
        finally:
            with lock:
                stats["in_flight"] -= 1


run = {"model": model, "start": time.time(), "phases": []}
current = {"phase": "", "t0": run["start"]}
done = threading.Event()


def progress():
    while not done.wait(5):
        with lock:
            s = dict(stats)
        print(f"  [{current['phase']}] t={time.time() - run['start']:5.0f}s  requests ok={s['ok']} "
              f"failed={s['failed']}  in flight={s['in_flight']}  generated tokens={s['tokens']}", flush=True)


threading.Thread(target=progress, daemon=True).start()
for i, (name, concurrency, seconds) in enumerate(PHASES):
    seconds = max(5.0, seconds * scale)
    start = time.time()
    current["phase"] = f"{name}, {concurrency} clients"
    print(f"== phase {i + 1}/{len(PHASES)}: {name}, {concurrency} concurrent clients, {seconds:.0f} s", flush=True)
    threads = [threading.Thread(target=client_loop, args=(1000 * i + c, start + seconds)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run["phases"].append({"name": name, "concurrency": concurrency, "start": start, "end": time.time()})
done.set()
run["end"] = time.time()
run["requests"] = stats["ok"]
run["failed"] = stats["failed"]
run["generated_tokens"] = stats["tokens"]
with open(run_file, "w") as f:
    json.dump(run, f, indent=1)
print(f"== load done: {stats['ok']} requests ok, {stats['failed']} failed, {stats['tokens']} tokens generated "
      f"in {run['end'] - run['start']:.0f} s", flush=True)
for e in errors:
    print(f"  error: {e}", flush=True)
if stats["ok"] == 0 or stats["failed"] > 0.05 * (stats["ok"] + stats["failed"]):
    sys.exit("too many failed requests")
PY

sleep 3 # the last scrapes
echo "== plotting into $OUT"
python3 scripts/deploy/plot_dashboards.py --prometheus "http://127.0.0.1:$PROM_PORT" --run "$WORK/run.json" \
    --out "$OUT"
echo "== done"
