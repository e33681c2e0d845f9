#!/usr/bin/env bash
# Device side of the P/D soak (ci/gpu/soak.py, issue 10), one device run each:
#   bash ci/gpu/soak_device.sh install          # after the chunk runs (shared/gpu/README.md):
#       /tmp/stage holds part00..part06, bundle.md5 and stream-order.diff
#   bash ci/gpu/soak_device.sh before|after OUT_DIR [soak.py options]
# install: assemble and install vLLM into /tmp/site (stock), then make
#   /tmp/site-series (patches/series), /tmp/site-stock-fix (+ the stream-order
#   diff) and /tmp/site-series-fix. If patches/series already holds the fix,
#   /tmp/site-series is the series without it.
# before: stock (randomization off) and the series, without the fix.
# after:  the same two trees with the fix.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
stage=/tmp/stage diff=/tmp/stage/stream-order.diff
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export GIT_CEILING_DIRECTORIES=/tmp
unset NCCL_HOSTID
# The prefill budget of stock: 0.23.0's producer dies on a later prefill chunk.
STOCK_OPTS=rand=off,batched=65536

copy_with() {  # copy_with FROM TO [git apply options]: TO = FROM with the diff
  local from=$1 to=$2; shift 2
  rm -rf "$to" && cp -a "$from" "$to"
  (cd "$to" && git apply --check "$@" "$diff" && git apply "$@" "$diff")
}

case ${1:?usage: $0 install | before OUT | after OUT} in
install)
  cd "$stage"
  cat part0* > b.tar
  [ "$(md5sum < b.tar | cut -d' ' -f1)" = "$(cat bundle.md5)" ] || { echo "bundle md5 differs" >&2; exit 1; }
  tar xf b.tar
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl
  cd "$repo"
  bash ci/gpu/prepare_sites.sh /tmp/site /tmp/site-series
  copy_with /tmp/site /tmp/site-stock-fix
  if (cd /tmp/site-series && git apply --check --reverse "$diff" 2>/dev/null); then
    mv /tmp/site-series /tmp/site-series-fix
    copy_with /tmp/site-series-fix /tmp/site-series --reverse
  else
    copy_with /tmp/site-series /tmp/site-series-fix
  fi
  echo "sites ready: $(ls -d /tmp/site*)"
  ;;
before | after)
  phase=$1 out=${2:?OUT_DIR}; shift 2
  [ -d /tmp/site-series-fix/vllm ] || { echo "no sites: run '$0 install' first (machine went back?)" >&2; exit 2; }
  if [ "$phase" = before ]; then
    trees=(--tree "stock=/tmp/site,$STOCK_OPTS" --tree "series=/tmp/site-series")
  else
    trees=(--tree "stock+fix=/tmp/site-stock-fix,$STOCK_OPTS" --tree "series+fix=/tmp/site-series-fix")
  fi
  nvidia-smi topo -m || true
  mkdir -p "$out"
  cd "$repo"
  exec python3 ci/gpu/soak.py "${trees[@]}" --reference-site /tmp/site --fix-diff "$diff" \
    --out "$out/soak-$phase.md" --logs-tar "$out/soak-$phase-logs.tar.gz" \
    --log-dir "/tmp/soak-logs-$phase" "$@"
  ;;
*) echo "unknown step $1" >&2; exit 2 ;;
esac
