#!/usr/bin/env bash
# Every check and test tier (the README's second command; .ci/run runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "patches/ is what vllm_fork/ exports (byte for byte)"
python3 ci/fork.py check

mapfile -t touched < <(git -C vllm_fork diff --name-only refs/patches/upstream-head HEAD -- '*.py')
step "vLLM's ruff (v0.14.0, vLLM's pyproject config) on ${touched[*]}"
(cd vllm_fork && ../.venv/bin/ruff check --no-cache "${touched[@]}" \
  && ../.venv/bin/ruff format --check "${touched[@]}")

step "vLLM's mypy (its tools/pre_commit/mypy.py, Python 3.10) and typos"
(cd vllm_fork && PATH="$PWD/../.venv-lint/bin:$PATH" \
  python tools/pre_commit/mypy.py 3.10 "${touched[@]}" \
  && ../.venv-lint/bin/typos --force-exclude "${touched[@]}")

step "the patch's own unit tests, in vLLM's tree (cpu_test)"
(cd vllm_fork && ../.venv/bin/python -m pytest -p no:cacheprovider -q -m cpu_test \
  tests/v1/kv_connector/unit/test_p2p_nccl_connector.py)

step "release matrix: every affected release's series (backports regenerate identically)"
python3 ci/release/backport.py --check
.venv/bin/python ci/release/check_matrix.py

step "repro matrix: CPU two-engine tier on stock and patched vLLM"
python3 ci/matrix.py --check

step "project tests on patched vLLM (CPU tier; GPU tier skips without a GPU)"
.venv/bin/python -m pytest -p no:cacheprovider tests
