#!/usr/bin/env bash
# Create .venv and install moe-mesh into it. `--test` adds what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]" || extras=""
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# torch first, pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned "torch" would make
# pip download a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
# the gRPC stubs are built from protos/ (also done on first import when missing or stale)
.venv/bin/python -m router_service.protos
