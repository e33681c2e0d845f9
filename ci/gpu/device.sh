#!/usr/bin/env bash
# One entry point for the GPU runs on a lent GPU machine (ci/gpu/README.md):
#   bash ci/gpu/device.sh install                  # after the chunk runs: vLLM + trees
#   bash ci/gpu/device.sh soak OUT [soak.py opts]  # issue 10: stock / series-nofix / series
#   bash ci/gpu/device.sh reliability OUT [opts]   # issue 9: ci/gpu/reliability.py
#   bash ci/gpu/device.sh bench OUT [opts]         # issue 12: ci/gpu/bench_pd.py
#   bash ci/gpu/device.sh matrix OUT NAME [opts]   # ci/gpu/run_matrix.py -> OUT/NAME.md
#   bash ci/gpu/device.sh pytest OUT [args]        # the GPU pytest tier (test_pd_gpu.py)
# Every process started from here has NVLink multicast off and no NCCL_HOSTID
# (prefill on CUDA_VISIBLE_DEVICES=0, decode on 1: the scripts set those).
# The engines run vLLM's default execution mode (CUDA graphs); a variant is
# picked with the scripts' --mode (e.g. --mode eager) or, for pytest,
# GPU_TIER_MODE=eager (ci/gpu/README.md, "Execution modes").
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 GIT_CEILING_DIRECTORIES=/tmp
unset NCCL_HOSTID
# The scripts' own imports (aiohttp, transformers, tokenizers) come from the
# machine; vLLM only reaches the servers through their PYTHONPATH.
need_sites() {
  [ -d /tmp/site-series/vllm ] || { echo "no sites: run '$0 install' first" >&2; exit 2; }
}

case ${1:?usage: $0 install | soak OUT | reliability OUT | bench OUT | matrix OUT NAME | pytest OUT} in
install)
  nvidia-smi -L
  exec bash ci/gpu/soak_device.sh install
  ;;
soak)
  shift
  exec bash ci/gpu/soak_device.sh soak "$@"
  ;;
reliability)
  out=${2:?OUT_DIR}; shift 2
  need_sites
  mkdir -p "$out"
  # GPU_SITE=/tmp/site-addon: the series with the core add-on.
  exec python3 ci/gpu/reliability.py --site "${GPU_SITE:-/tmp/site-series}" --out "$out/reliability" \
    --logs-tar "$out/reliability-logs.tar.gz" --log-dir /tmp/reliability-logs "$@"
  ;;
bench)
  out=${2:?OUT_DIR}; shift 2
  need_sites
  mkdir -p "$out"
  rc=0
  python3 ci/gpu/bench_pd.py --stock-site /tmp/site --patched-site /tmp/site-series \
    --out "$out" "$@" || rc=$?
  tar czf "$out/bench-logs.tgz" -C /tmp/bench-pd logs 2>/dev/null || true
  exit $rc
  ;;
matrix)
  # Both trees; CUDA_VISIBLE_DEVICES=0 in the caller's environment gives the
  # one-GPU layout (NCCL_HOSTID per engine), two visible GPUs the two-GPU one.
  out=${2:?OUT_DIR}; name=${3:?NAME}; shift 3
  need_sites
  mkdir -p "$out"
  rc=0
  python3 ci/gpu/run_matrix.py --stock-site /tmp/site --patched-site /tmp/site-series \
    --out "$out/$name.md" --log-dir "/tmp/matrix-logs/$name" "$@" || rc=$?
  tar czf "$out/$name-logs.tar.gz" -C /tmp/matrix-logs "$name" 2>/dev/null || true
  exit $rc
  ;;
pytest)
  # pytest, pytest-timeout and pytest-xdist from .gpu/pytest-wheels (carried:
  # the machine has no package registry); the test process imports the
  # patched vLLM, and so do the servers it starts (GPU_TIER_SITE).
  out=${2:?OUT_DIR}; shift 2
  need_sites
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --target /tmp/pytest-site .gpu/pytest-wheels/*.whl
  rc=0
  site=${GPU_SITE:-/tmp/site-series}
  PYTHONPATH=/tmp/pytest-site:$site GPU_TIER_SITE=$site \
    GPU_TIER_LOG_DIR=/tmp/pytest-logs python3 -m pytest -p no:cacheprovider -rA \
    --junitxml="$out/pytest-gpu.xml" "${@:-tests/gpu/test_pd_gpu.py}" 2>&1 |
    tee "$out/pytest-gpu.log" || rc=$?
  tar czf "$out/pytest-logs.tar.gz" -C /tmp pytest-logs 2>/dev/null || true
  exit $rc
  ;;
*) echo "unknown step $1" >&2; exit 2 ;;
esac
