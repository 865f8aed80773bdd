#!/usr/bin/env bash
# The test command: installs the Python test clients, then runs every test of the
# workspace (unit, e2e, fidelity, and the openai-client suite against a real server).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo test --workspace --locked "$@"
