#!/usr/bin/env bash
# The test command: installs the Python test clients, then runs every test of the
# workspace (unit, e2e, fidelity, and the openai-client suite against a real server).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

# A real etcd server for the cluster tests (they start their own on free ports).
if ! command -v etcd >/dev/null && [ -z "${HYSERVE_ETCD_BIN:-}" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi

# Prometheus and promtool for the metrics tests (tests/python/test_metrics.py: the exposition
# linter, the alert rules' unit tests, and a real server the dashboards' queries run on; they
# start their own on free ports, so a packaged service that starts on :9090 is harmless).
if ! { command -v prometheus && command -v promtool; } >/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# kubectl for the deployment tests (tests/python/test_deploy.py renders deploy/k8s with
# `kubectl kustomize`; no cluster needed): Debian's kubernetes-client if there is none.
if ! command -v kubectl >/dev/null && [ -z "${KUBECTL:-}" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kubernetes-client >/dev/null
fi

# NVRTC and the CUDA headers from PyPI (no GPU needed): the kernel sources are compiled
# for sm_90 by the same compiler the GPU hosts use, so a .cu error fails here, not there.
NV=target/nvrtc
if [ ! -e "$NV/nvidia/cu13/include/cuda_bf16.h" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$NV" \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
fi
export LD_LIBRARY_PATH="$PWD/$NV/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export HYSERVE_CUDA_INCLUDE="$PWD/$NV/nvidia/cu13/include"

cargo test --workspace --locked --features hyserve-kernels/nvrtc-tests "$@"
