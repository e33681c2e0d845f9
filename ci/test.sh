#!/usr/bin/env bash
# Every check and test tier (the README's second command; .ci/run runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
# Wall time of each step and of the whole command, printed at the end (also
# when a step fails). Target on a 2-core machine without a GPU: under 4 min.
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
# CPU time of the finished child processes, in ms (clock ticks of 10 ms).
cpu_ms() { local f; read -ra f </proc/$$/stat; echo $(((f[15] + f[16]) * 10)); }
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }
t_start=$(now_ms)
step_names=() step_ms=() step_cpu=() step_t0= step_c0=
end_step() {
  if [[ -n $step_t0 ]]; then
    step_ms+=($(($(now_ms) - step_t0)))
    step_cpu+=($(($(cpu_ms) - step_c0)))
  fi
  step_t0=
}
step() {
  end_step
  printf '\n== %s\n' "$*"
  step_names+=("$*")
  step_t0=$(now_ms) step_c0=$(cpu_ms)
}
report() {
  local rc=$? i
  end_step
  printf '\n== time per step (wall, CPU)\n'
  for i in "${!step_ms[@]}"; do
    printf '%6s s %6s s  %s\n' "$(secs "${step_ms[i]}")" "$(secs "${step_cpu[i]}")" \
      "${step_names[i]}"
  done
  printf 'test command wall time: %s s, CPU %s s (exit %d; target: wall under 240 s on 2 cores)\n' \
    "$(secs $(($(now_ms) - t_start)))" "$(secs "$(cpu_ms)")" "$rc"
}
trap report EXIT
# Run the commands side by side (the machine has 2 cores); print the output of
# each once all ended, in order; fail if any failed.
side_by_side() {
  local dir i r rc=0 pids=()
  dir=$(mktemp -d)
  for i in $(seq 0 $(($# - 1))); do
    (eval "${@:i+1:1}") >"$dir/$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    r=0
    wait "${pids[i]}" || r=$?
    printf -- '\n-- %s (exit %d)\n' "${@:i+1:1}" "$r"
    cat "$dir/$i.log"
    ((r == 0)) || rc=$r
  done
  rm -rf "$dir"
  return "$rc"
}

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

step "release matrix: every affected release's series (backports regenerate identically)"
python3 ci/release/backport.py --check
.venv/bin/python ci/release/check_matrix.py

step "the default series alone: .series-tree/, vllm_fork/ without the core add-on"
python3 ci/fork.py series-tree

step "repro matrix: CPU two-engine tier on stock and patched vLLM (side by side)"
python3 ci/matrix.py --check

# The matrix ran the two-engine tier's files on patched vLLM (.series-tree)
# already and required every case to pass: the project tests do not run them
# again. Patched vLLM is the default series (.series-tree first on PYTHONPATH);
# the core add-on's tests run on vllm_fork/, which has it on top.
step "the patches' own unit tests, in vLLM's tree (cpu_test): the series, then" \
  "with the core add-on; the project tests on patched vLLM (GPU tier skips" \
  "without a GPU): side by side"
side_by_side \
  "cd .series-tree && PYTHONPATH=\$PWD ../.venv/bin/python -m pytest -p no:cacheprovider \
    -q -m cpu_test tests/v1/kv_connector/unit/test_p2p_nccl_connector.py" \
  "cd vllm_fork && ../.venv/bin/python -m pytest -p no:cacheprovider -q -m cpu_test \
    tests/v1/kv_connector/unit/test_p2p_nccl_connector.py \
    tests/v1/kv_connector/unit/test_invalid_blocks_correctness.py \
    -k 'recompute_only or async_scheduling or v2_runner'" \
  "PYTHONPATH=$PWD/.series-tree .venv/bin/python -m pytest -p no:cacheprovider tests/cpu \
    --ignore=tests/cpu/test_two_engine.py --ignore=tests/cpu/test_reliability.py \
    --ignore=tests/cpu/test_load_failures.py" \
  ".venv/bin/python -m pytest -p no:cacheprovider tests --ignore=tests/cpu"
