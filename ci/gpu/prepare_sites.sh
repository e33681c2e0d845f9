#!/usr/bin/env bash
# Make the patched tree for ci/gpu/run_matrix.py and bench.py: copy a stock
# site-packages folder (one holding vllm/) and apply patches/ inside the copy,
# the way a user patches an installed vLLM.
#   usage: ci/gpu/prepare_sites.sh STOCK_SITE [PATCHED_SITE [SERIES]]
#   (default: STOCK_SITE-patched and patches/series; SERIES names its patches
#   relative to its folder, as patches/core-addon/series does)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
stock=$(cd "${1:?usage: $0 STOCK_SITE [PATCHED_SITE [SERIES]]}" && pwd)
patched=${2:-$stock-patched}
series=${3:-$repo/patches/series}
[ -d "$stock/vllm" ] || { echo "$stock has no vllm/" >&2; exit 1; }

folder=$(cd "$(dirname "$series")" && pwd)
mapfile -t patches < <(grep -v -e '^#' -e '^[[:space:]]*$' "$series" | sed "s|^|$folder/|")
rm -rf "$patched"
cp -a "$stock" "$patched"
cd "$patched"
# Never let git take an enclosing repository's root as the base of the paths.
GIT_CEILING_DIRECTORIES=$(dirname "$(pwd)")
export GIT_CEILING_DIRECTORIES
# In series order: --check takes each patch against the tree as it is now.
for patch in "${patches[@]}"; do
  git apply --check --include='vllm/*' "$patch"
  git apply --include='vllm/*' "$patch"
done
echo "patched tree: $(pwd) (${#patches[@]} patch(es) from $series)"
