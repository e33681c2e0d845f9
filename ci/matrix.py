#!/usr/bin/env python3
"""Run the CPU two-engine tier on stock and patched vLLM; print the matrix.

    python3 ci/matrix.py            # both trees, print send type x randomization
    python3 ci/matrix.py --check    # and fail unless stock fails where the bug
                                    # bites and the patched tree passes everywhere

Trees: "stock" is .venv-stock (the PyPI wheel, unmodified), "patched" is .venv
with .series-tree/ first on PYTHONPATH (vllm_fork/ at the default series,
without the core add-on: python3 ci/fork.py series-tree); they run at the
same time, one pytest process each. Each case of the tier ends as
  pass   - decode got the prefill's KV, text equals a plain engine's, nothing leaked
  hang   - decode waited for KV that never came: the transport's detector saw
           that nothing could send it anymore (KVTransferHang), or, for what
           the detector cannot see, pytest-timeout ended the test
  wrong  - decode computed on KV it never received (text differs)
  leak   - received KV still held after its request finished
  crash  - an exception inside vLLM (the engine core would die)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = {"stock": ROOT / ".venv-stock", "patched": ROOT / ".venv"}
SERIES_TREE = ROOT / ".series-tree"
TIER = [
    "tests/cpu/test_two_engine.py",
    "tests/cpu/test_reliability.py",
    "tests/cpu/test_load_failures.py",
]
# The tests on vLLM's real ZMQ control plane with an in-process NCCL
# (tests/cpu/zmq_wire.py): the connection layer. The release tier runs them
# on each patched release (stock has no bounds to test).
WIRE_TIER = [
    "tests/cpu/test_connection_bounds.py",
    "tests/cpu/test_peer_lifecycle.py",
    "tests/cpu/test_dead_consumer.py",
    "tests/cpu/test_late_answers.py",
    "tests/cpu/test_received_kv_lifetime.py",
    "tests/cpu/test_engine_state.py",
]
# The KV transfer cases; the other tests get a line each.
TRANSFER_TESTS = ("test_pd_transfer", "test_decode_preempted_and_resumed")
# tests/cpu/test_load_failures.py: each way decode can miss a request's KV.
LOAD_FAILURE_TESTS = (
    "test_get_kv_not_in_send_store",
    "test_prefill_engine_dies",
    "test_receiver_out_of_memory",
    "test_kv_that_comes_after_its_request_gave_up",
    "test_received_kv_counts_against_buffer_until_loaded",
    "test_async_scheduling_fails_what_core_cannot_recompute",
    "test_failed_load_leaves_a_shared_prefix_alone",
)
SEND_TYPES = ("PUT", "PUT_ASYNC", "GET")
# tests/cpu/test_two_engine.py: the transfer under each CUDA graph path of the
# model runner ([send type-randomization-mode-workload]).
GRAPH_TEST = "test_pd_transfer_under_cuda_graphs"


def parse(name: str) -> tuple[str, str | None, str | None]:
    """test_x[PUT-on-one] -> ("test_x", "PUT", "on")."""
    test, _, params = name.partition("[")
    parts = params.rstrip("]").split("-")
    send = next((p for p in parts if p in SEND_TYPES), None)
    rand = next((p for p in parts if p in ("on", "off")), None)
    return test, send, rand


def graph_params(name: str) -> tuple[str, str]:
    """test_pd_transfer_under_cuda_graphs[PUT-on-v2_full-one] -> ("v2_full", "one")."""
    mode, workload = name.rstrip("]").split("-")[-2:]
    return mode, workload


def classify(case: ET.Element) -> str:
    problem = case.find("failure")
    if problem is None:
        problem = case.find("error")
    if problem is None:
        return "skip" if case.find("skipped") is not None else "pass"
    text = (problem.get("message") or "") + (problem.text or "")
    if "KVTransferHang" in text or "Timeout" in text:
        return "hang"
    if "wrong text" in text or "differs from a plain engine" in text:
        return "wrong"
    if "leaked" in text:
        return "leak"
    return "crash"


def hang_source(case: ET.Element) -> str | None:
    """Who reported a hang: "detector" or "timeout"; None if no hang."""
    problem = case.find("failure")
    if problem is None:
        problem = case.find("error")
    if problem is None:
        return None
    text = (problem.get("message") or "") + (problem.text or "")
    if "KVTransferHang" in text:
        return "detector"
    return "timeout" if "Timeout" in text else None


class TreeRun:
    """The tier on one tree, in a pytest process of its own."""

    def __init__(
        self,
        tree: str,
        log_dir: Path,
        python: Path | None = None,
        files: list[str] = TIER,
    ):
        self.tree = tree
        self.python = python or TREES[tree] / "bin" / "python"
        if not self.python.exists():
            sys.exit(f"{self.python} missing: run bash ci/setup.sh first")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if tree == "patched" and python is None:
            if not (SERIES_TREE / "vllm").is_dir():
                sys.exit(f"{SERIES_TREE} missing: run python3 ci/fork.py series-tree")
            env["PYTHONPATH"] = str(SERIES_TREE)
        self.junit = log_dir / f"cpu-tier-{tree}.xml"
        self.log_path = log_dir / f"cpu-tier-{tree}.log"
        self.junit.unlink(missing_ok=True)
        cmd = [
            str(self.python),
            "-m",
            "pytest",
            *files,
            "-p",
            "no:cacheprovider",
            "-q",
            "--no-header",
            "-rN",
            f"--junitxml={self.junit}",
        ]
        where = (
            f"{self.python}, PYTHONPATH={env['PYTHONPATH']}"
            if "PYTHONPATH" in env
            else self.python
        )
        print(f"== CPU two-engine tier on {tree} vLLM ({where})", flush=True)
        self.start = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.end: float | None = None
        self.hangs: dict[str, int] = defaultdict(int)

    def done(self) -> bool:
        if self.end is None and self.proc.poll() is not None:
            self.end = time.monotonic()
        return self.end is not None

    def results(self) -> dict[str, str]:
        self.proc.wait()
        self.done()
        if not self.junit.exists():
            sys.exit(f"{self.tree}: the tier wrote no report; see {self.log_path}")
        results = {}
        for case in ET.parse(self.junit).getroot().iter("testcase"):
            results[case.get("name")] = classify(case)
            if source := hang_source(case):
                self.hangs[source] += 1
        if not results:
            sys.exit(f"{self.tree}: the tier ran no test; see {self.log_path}")
        return results


def run_tree(tree: str, log_dir: Path, python: Path | None = None) -> dict[str, str]:
    """The tier on one tree (python: another venv's interpreter for it)."""
    return TreeRun(tree, log_dir, python).results()


def expected(tree: str, name: str) -> str:
    """What each case must give on each tree."""
    if tree == "patched":
        return "pass"
    test, send, rand = parse(name)
    if test == "test_prefill_chunk_within_allocated_blocks":
        return "crash"  # stock asserts on new_block_ids=None, whatever the ids
    if test == "test_request_without_p2p_address_is_served_plainly":
        return "crash"  # stock raises "does not contain hostname and port"
    if test == GRAPH_TEST:
        # Stock moves KV only where attention runs in Python: eager, and on the
        # V1 runner a batch that is not all one-token requests (a FULL graph).
        mode, workload = graph_params(name)
        eager_path = mode == "eager" or (
            mode == "v1_default" and workload == "concurrent8"
        )
        return "pass" if rand == "off" and eager_path else "fail"
    if test == "test_decode_preempted_and_resumed" and "with-others" in name:
        # Stock loads nothing for a request resumed next to running ones.
        return "fail"
    if test.startswith(LOAD_FAILURE_TESTS):
        # KV that does not arrive: stock hangs, computes on it, or does not
        # fail the request, with randomization on or off.
        return "fail"
    if rand == "off":
        return "pass"
    return "wrong" if send == "GET" else "hang"


def matches(got: str, want: str) -> bool:
    """Whether an outcome is the expected one ("fail": anything but pass)."""
    return got != "pass" if want == "fail" else got == want


def cell(outcomes: list[str]) -> str:
    counts = defaultdict(int)
    for o in outcomes:
        counts[o] += 1
    return ", ".join(f"{k} {v}/{len(outcomes)}" for k, v in sorted(counts.items()))


def print_table(results: dict[str, dict[str, str]], columns: list[str], rows) -> None:
    """One markdown table: ``rows`` are (first cells, which case names count)."""
    trees = list(results)
    print("| " + " | ".join(columns + trees) + " |")
    print("|" + "---|" * (len(columns) + len(trees)))
    for labels, counts in rows:
        outs = [
            cell([o for n, o in sorted(results[tree].items()) if counts(n)])
            for tree in trees
        ]
        print("| " + " | ".join(labels + outs) + " |")


def print_matrix(results: dict[str, dict[str, str]]) -> None:
    trees = list(results)
    print(
        "\nCPU two-engine tier: send type x randomization x tree (cases per cell:"
        " one request, 8 concurrent with a chunked prefill, n=2, decode preemption)"
    )

    def transfer_case(send: str, rand: str):
        return lambda n: parse(n)[0] in TRANSFER_TESTS and parse(n)[1:] == (send, rand)

    print_table(
        results,
        ["send type", "randomization"],
        [
            ([send, rand.upper()], transfer_case(send, rand))
            for send in SEND_TYPES
            for rand in ("on", "off")
        ],
    )
    print(
        f"\n{GRAPH_TEST}: CUDA graph path x randomization x tree (cases per cell:"
        " 3 send types x 8 concurrent, a last prefill chunk of one token, a prompt"
        " in prefill's prefix cache)"
    )
    graph_cases = {n for r in results.values() for n in r if parse(n)[0] == GRAPH_TEST}

    def graph_case(mode: str, rand: str):
        def counts(name: str) -> bool:
            if name not in graph_cases:
                return False
            return graph_params(name)[0] == mode and parse(name)[2] == rand

        return counts

    print_table(
        results,
        ["mode", "randomization"],
        [
            ([mode, rand.upper()], graph_case(mode, rand))
            for mode in sorted({graph_params(n)[0] for n in graph_cases})
            for rand in ("on", "off")
        ],
    )
    tables = (*TRANSFER_TESTS, GRAPH_TEST)
    others = sorted(
        {n for r in results.values() for n in r if parse(n)[0] not in tables}
    )
    if others:
        print("\n| other case | " + " | ".join(trees) + " |")
        print("|---|" + "---|" * len(trees))
        for name in others:
            outs = [results[t].get(name, "-") for t in trees]
            print(f"| {name} | " + " | ".join(outs) + " |")
    print()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
    p.add_argument(
        "--check",
        action="store_true",
        help="fail unless every case gives its expected outcome",
    )
    p.add_argument("--log-dir", default=str(ROOT / "test-logs"))
    args = p.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    # The trees are independent (own venv, own process, in-process transport):
    # run them side by side.
    runs = [TreeRun(tree, log_dir) for tree in args.trees]
    while not all([run.done() for run in runs]):
        time.sleep(0.1)
    results = {run.tree: run.results() for run in runs}
    wall_s = time.monotonic() - start
    print_matrix(results)
    for run in runs:
        hangs = ", ".join(f"{n} by {src}" for src, n in sorted(run.hangs.items()))
        print(
            f"{run.tree}: {len(results[run.tree])} cases in"
            f" {run.end - run.start:.1f} s"
            + (f"; hangs reported: {hangs}" if hangs else "")
        )
    print(f"matrix wall time: {wall_s:.1f} s")
    if not args.check:
        return 0
    bad = [
        f"{tree}: {name}: got {got}, expected {expected(tree, name)}"
        for tree, res in results.items()
        for name, got in sorted(res.items())
        if not matches(got, expected(tree, name))
    ]
    for line in bad:
        print(f"UNEXPECTED {line}")
    if bad:
        print(f"matrix check FAILED ({len(bad)} unexpected); logs in {log_dir}")
        return 1
    n = sum(len(r) for r in results.values())
    print(
        f"matrix check ok: {n} cases as expected (stock fails where the bug bites,"
        " patched passes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
