#!/usr/bin/env bash
# Builds what scripts/gpu/run.sh needs on a GPU host into .dev/gpu/ (git-ignored):
# the release `hyserve` binary (without the embedded default model: the GPU host gets the
# repository's model/assets/ with the working tree) and the CUDA parity test binary,
# stripped, and xz-compressed copies in .dev/gpuxz/ (what fits the trip: carry that).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .dev/gpu
# Its own target directory: the build without the embedded model must not replace the
# development build's target/release/hyserve.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/gpu-package}"
cargo build --release --locked --no-default-features
cp "$CARGO_TARGET_DIR/release/hyserve" .dev/gpu/hyserve
test_bin=$(cargo test --release --locked -p hyserve-worker --features gpu-tests --test gpu --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu" and m.get("executable"):
        print(m["executable"])')
cp "$test_bin" .dev/gpu/gpu-tests
strip .dev/gpu/hyserve .dev/gpu/gpu-tests
mkdir -p .dev/gpuxz
for f in hyserve gpu-tests; do xz -6 -T2 -c ".dev/gpu/$f" > ".dev/gpuxz/$f.xz"; done
du -sh .dev/gpu/* .dev/gpuxz/*
