#!/usr/bin/env bash
# Set up on a fresh machine (the README's first command):
#   vllm_fork/   v0.23.0 (submodule, or the PyPI sdist when GitHub is unreachable)
#                with patches/ applied as commits
#   .venv        the fork installed editable (VLLM_USE_PRECOMPILED=1) + test tools
#   .venv-stock  the unmodified vllm==0.23.0 wheel + test tools, for comparison
#   .venv-lint   vLLM's own mypy and typos pins
set -euo pipefail
cd "$(dirname "$0")/.."
python3 ci/fork.py init
python3 ci/fork.py apply
python3 ci/fork.py install
python3 ci/fork.py install-stock
python3 ci/fork.py install-lint
