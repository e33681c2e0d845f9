#!/usr/bin/env bash
# One entry point for the GPU runs on a lent 2-GPU machine (/work/notes/device-plan.md):
#   bash ci/gpu/device.sh install                  # after the chunk runs: vLLM + trees
#   bash ci/gpu/device.sh soak OUT [soak.py opts]  # issue 10: stock / series-nofix / series
#   bash ci/gpu/device.sh reliability OUT [opts]   # issue 9: ci/gpu/reliability.py
#   bash ci/gpu/device.sh bench OUT [opts]         # issue 12: ci/gpu/bench_pd.py
# Every process started from here has NVLink multicast off and no NCCL_HOSTID
# (prefill on CUDA_VISIBLE_DEVICES=0, decode on 1: the scripts set those).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 GIT_CEILING_DIRECTORIES=/tmp
unset NCCL_HOSTID
# The scripts' own imports (aiohttp, transformers, tokenizers) come from the
# machine; vLLM only reaches the servers through their PYTHONPATH.

case ${1:?usage: $0 install | soak OUT | reliability OUT | bench OUT} in
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
  [ -d /tmp/site-series/vllm ] || { echo "no sites: run '$0 install' first" >&2; exit 2; }
  mkdir -p "$out"
  exec python3 ci/gpu/reliability.py --site /tmp/site-series --out "$out/reliability" \
    --logs-tar "$out/reliability-logs.tar.gz" --log-dir /tmp/reliability-logs "$@"
  ;;
bench)
  out=${2:?OUT_DIR}; shift 2
  [ -d /tmp/site-series/vllm ] || { echo "no sites: run '$0 install' first" >&2; exit 2; }
  mkdir -p "$out"
  rc=0
  python3 ci/gpu/bench_pd.py --stock-site /tmp/site --patched-site /tmp/site-series \
    --out "$out" "$@" || rc=$?
  tar czf "$out/bench-logs.tgz" -C /tmp/bench-pd logs 2>/dev/null || true
  exit $rc
  ;;
*) echo "unknown step $1" >&2; exit 2 ;;
esac
