#!/usr/bin/env bash
# Install the peer engines into a virtualenv (default /work/scratch/peers/venv).
#   VENV=path bash scripts/peers/setup.sh
# llama-cpp-python is built from its PyPI source distribution (vendored
# llama.cpp) with -DGGML_NATIVE=ON; on 2 cores this takes ~15-20 minutes.
set -euo pipefail
VENV=${VENV:-/work/scratch/peers/venv}
PY=${PYTHON:-python3}

if ! command -v cmake >/dev/null; then
  apt-get update -qq && apt-get install -y -qq cmake ninja-build
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.15.0 transformers==5.24.0 accelerate gguf==0.19.0 numpy safetensors
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
  "$VENV/bin/pip" install -v --no-binary llama-cpp-python llama-cpp-python==0.3.36
"$VENV/bin/python" -c "import torch, transformers, llama_cpp, gguf; print('torch', torch.__version__, 'transformers', transformers.__version__, 'llama_cpp', llama_cpp.__version__)"
