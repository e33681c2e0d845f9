#!/usr/bin/env bash
# Set up on a fresh machine (the README's first command). Needs only git and
# python3 (3.10 to 3.14, vLLM 0.23.0's range) with its venv module (Debian and
# Ubuntu: the python3-venv package); nothing else from PATH or HOME.
#   .venv-tools  uv (pinned), installed with python3 -m venv and pip
#   vllm_fork/   v0.23.0 (submodule, or the PyPI sdist when GitHub is unreachable)
#                with patches/ applied as commits
#   .venv        the fork installed editable (VLLM_USE_PRECOMPILED=1) + test tools
#   .venv-stock  the unmodified vllm==0.23.0 wheel + test tools, for comparison
#   .venv-lint   vLLM's own mypy and typos pins
# --python-check: only check git and python3, install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v git >/dev/null || { echo "setup: error: git is not on PATH" >&2; exit 1; }
command -v python3 >/dev/null || { echo "setup: error: python3 is not on PATH" >&2; exit 1; }
python3 - <<'PY' || exit 1
import sys
v = sys.version_info
if not (3, 10) <= v[:2] <= (3, 14):
    sys.exit("setup: error: python3 is %d.%d.%d (%s); vLLM 0.23.0 needs "
             "Python 3.10 to 3.14" % (v[0], v[1], v[2], sys.executable))
try:
    import ensurepip, venv  # noqa: F401
except ImportError:
    sys.exit("setup: error: %s has no venv/ensurepip; on Debian or Ubuntu: "
             "apt-get install python3-venv" % sys.executable)
print("setup: python3 %d.%d.%d (%s)" % (v[0], v[1], v[2], sys.executable))
PY
[[ "${1:-}" == --python-check ]] && exit 0
python3 ci/fork.py install-tools
python3 ci/fork.py init
python3 ci/fork.py apply
python3 ci/fork.py install
python3 ci/fork.py install-stock
python3 ci/fork.py install-lint
