#!/usr/bin/env bash
# Device side of the P/D soak (ci/gpu/soak.py, issue 10), one device run each:
#   bash ci/gpu/soak_device.sh install       # after the chunk runs (shared/gpu/README.md):
#       /tmp/stage holds part00..part06 and bundle.md5
#   bash ci/gpu/soak_device.sh soak OUT_DIR [soak.py options]
# install: assemble and install vLLM into /tmp/site (stock), then make
#   /tmp/site-series (patches/series, ci/gpu/prepare_sites.sh) and
#   /tmp/site-series-nofix: the series without the stream-order patch
#   (patches/*order-KV-transf*.patch reverted in a copy of the series tree;
#   if that does not reverse cleanly, the series minus that patch applied to
#   a copy of stock); and /tmp/site-addon: the series, then the opt-in core
#   add-on (patches/core-addon/series).
# soak: the three trees side by side in one run, 3 P/D pairs each + the two
#   references: stock (randomization off), series-nofix and series
#   (randomization on). Writes OUT_DIR/soak.md, soak.json, soak-logs.tar.gz.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
stage=/tmp/stage
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export GIT_CEILING_DIRECTORIES=/tmp
unset NCCL_HOSTID
# The prefill budget of stock: 0.23.0's producer dies on a later prefill chunk.
STOCK_OPTS=rand=off,batched=65536
fix_patch() {  # the stream-order patch of the series (issue 10)
  local found=("$repo"/patches/*order-KV-transf*.patch)
  [ -f "${found[0]}" ] || { echo "no stream-order patch in patches/" >&2; return 1; }
  echo "${found[0]}"
}

make_nofix() {  # /tmp/site-series-nofix = the series without the fix
  local fix to=/tmp/site-series-nofix
  fix=$(fix_patch)
  rm -rf "$to" && cp -a /tmp/site-series "$to"
  if (cd "$to" && git apply --check -R --include='vllm/*' "$fix" && git apply -R --include='vllm/*' "$fix"); then
    echo "series-nofix: $(basename "$fix") reverted in a copy of the series tree"
    return
  fi
  echo "series-nofix: $(basename "$fix") does not reverse; applying the series without it" >&2
  rm -rf "$to" && cp -a /tmp/site "$to"
  local p
  grep -v -e '^#' -e '^[[:space:]]*$' "$repo/patches/series" | while read -r p; do
    [ "$repo/patches/$p" = "$fix" ] && continue
    (cd "$to" && git apply --check --include='vllm/*' "$repo/patches/$p" \
      && git apply --include='vllm/*' "$repo/patches/$p")
  done
}

case ${1:?usage: $0 install | soak OUT} in
install)
  cd "$stage"
  cat part0* > b.tar
  [ "$(md5sum < b.tar | cut -d' ' -f1)" = "$(cat bundle.md5)" ] || { echo "bundle md5 differs" >&2; exit 1; }
  tar xf b.tar
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl
  rm -f b.tar
  cd "$repo"
  bash ci/gpu/prepare_sites.sh /tmp/site /tmp/site-series
  bash ci/gpu/prepare_sites.sh /tmp/site-series /tmp/site-addon patches/core-addon/series
  make_nofix || { echo "WARNING: no series-nofix tree; the soak runs without it" >&2; rm -rf /tmp/site-series-nofix; }
  echo "sites ready: $(ls -d /tmp/site*)"
  ;;
soak)
  out=${2:?OUT_DIR}; shift 2
  [ -d /tmp/site-series/vllm ] || { echo "no sites: run '$0 install' first (machine went back?)" >&2; exit 2; }
  nofix=()
  [ -d /tmp/site-series-nofix/vllm ] && nofix=(--tree series-nofix=/tmp/site-series-nofix)
  nvidia-smi topo -m || true
  mkdir -p "$out"
  cd "$repo"
  exec python3 ci/gpu/soak.py --tree "stock=/tmp/site,$STOCK_OPTS" \
    "${nofix[@]}" --tree series=/tmp/site-series \
    --reference-site /tmp/site --fix-diff "$(fix_patch)" \
    --out "$out/soak.md" --logs-tar "$out/soak-logs.tar.gz" \
    --log-dir /tmp/soak-logs "$@"
  ;;
*) echo "unknown step $1" >&2; exit 2 ;;
esac
