#!/usr/bin/env python3
"""Run the CPU two-engine tier against an installed vLLM release, stock and patched.

    python3 ci/release/run_tier.py --version 0.14.0 [--check]
    python3 ci/release/run_tier.py --all --check --record   # the 8 releases

For each release, two cached virtual environments under .cache/release-venvs/
(git-ignored; P2P_FIX_RELEASE_VENVS overrides the folder):

  <version>/stock    ``vllm==<version>`` from PyPI, the torch it pins, pytest and
                     pytest-timeout (uv, with the shared uv cache: wheels are
                     downloaded once and hard-linked into every venv)
  <version>/patched  the same packages (``uv pip freeze`` of stock), then the
                     release's series applied to site-packages the way a user
                     does it: ``ci/apply_installed.py --python <venv python>``

Both are reused while their stamp matches (same packages; for patched the same
series bytes), so a rerun on a warm cache only runs the tier. Then the tier
(ci/matrix.py TIER: test_two_engine, test_reliability, test_load_failures) runs on each,
and the matrix of ci/matrix.py is printed; then, on the patched tree alone, the
tests on vLLM's real ZMQ control plane (``ci/matrix.py`` WIRE_TIER, the
connection layer). ``--check`` fails unless stock fails exactly where the bug
bites and the patched tree passes everywhere (both tiers), with the
expectations of ci/matrix.py; on a release without
VLLM_DISABLE_REQUEST_ID_RANDOMIZATION (before 0.17.0) randomization is always
on, so the "off" cases are expected to behave like "on".

``--record`` merges the outcome into results/release-tier.json and rewrites
results/release-tier.md from it. Releases run one after the other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci"))
import apply_installed  # noqa: E402
import matrix  # noqa: E402
from fork import _uv  # noqa: E402

VENVS = Path(os.environ.get("P2P_FIX_RELEASE_VENVS", ROOT / ".cache" / "release-venvs"))
# The oldest and newest release of every family of backports.
RELEASES = [
    "0.14.0",
    "0.14.1",
    "0.16.0",
    "0.17.0",
    "0.18.1",
    "0.19.0",
    "0.22.1",
    "0.23.0",
]
# msgpack: p2p_nccl_engine imports it, but vLLM does not depend on it from
# 0.18 on (P2pNcclConnector users install it, as ci/fork.py's TEST_DEPS do).
TEST_PACKAGES = ["pytest", "pytest-timeout", "msgpack"]
RESULTS_JSON = ROOT / "results" / "release-tier.json"
RESULTS_MD = ROOT / "results" / "release-tier.md"
STAMP = ".run_tier.json"
# Runs in a venv, from the project root, before the tier: what the tier
# depends on, and the two one-time caches a first import fills, which must not
# be filled inside a test's timeout. With a torch older than 2.10, tvm_ffi's
# first import JIT-builds a torch addon into ~/.cache/tvm-ffi (about a
# minute). ModelConfig inspects the model class in a subprocess (10 s and more
# on a busy machine) and caches that under VLLM_CACHE_ROOT, one file per
# model class keyed by the release's llama.py: each release gets its own
# VLLM_CACHE_ROOT, so releases (and the project's .venv) do not evict each
# other's.
PROBE = """
import json, sys, tempfile
from pathlib import Path
try:
    import tvm_ffi
except ImportError:
    pass
import torch, vllm, vllm.envs as envs
from vllm.config import ModelConfig
sys.path.insert(0, ".")
from tests.cpu.conftest import TINY_LLAMA_CONFIG
with tempfile.TemporaryDirectory() as model:
    (Path(model) / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    ModelConfig(model=model, dtype="float16", seed=42, skip_tokenizer_init=True)
print(json.dumps({
    "vllm": vllm.__version__,
    "torch": torch.__version__,
    "randomization_switch":
        "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION" in envs.environment_variables,
}))
"""


def log(msg: str) -> None:
    print(f"[run_tier] {msg}", flush=True)


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kw)
    if res.returncode:
        sys.exit(
            f"[run_tier] failed ({res.returncode}): {' '.join(map(str, cmd))}\n"
            f"{res.stdout}{res.stderr}"
        )
    return res


def read_stamp(venv: Path) -> dict:
    try:
        return json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def write_stamp(venv: Path, stamp: dict) -> None:
    (venv / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


def series_digest(version: str) -> tuple[str, str]:
    """(series file relative to patches/, sha256 of its text and patches)."""
    series, patches = apply_installed.read_series(apply_installed.PATCHES, version)
    h = hashlib.sha256()
    for f in (series, *patches):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return series.relative_to(apply_installed.PATCHES).as_posix(), h.hexdigest()


def make_stock(version: str, python_spec: str) -> Path:
    venv = VENVS / version / "stock"
    python = venv / "bin" / "python"
    want = {"vllm": version, "packages": TEST_PACKAGES, "python": python_spec}
    if python.exists() and read_stamp(venv).get("want") == want:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    log(f"{version}: stock venv: vllm=={version} + its torch (uv)")
    uv = _uv()
    sh([*uv, "venv", "-q", "--python", python_spec, venv])
    sh(
        [*uv, "pip", "install", "-q", "--python", python, f"vllm=={version}"]
        + TEST_PACKAGES
    )
    freeze = sh([*uv, "pip", "freeze", "--python", python]).stdout
    write_stamp(venv, {"want": want, "freeze": freeze})
    return python


def make_patched(version: str, stock: Path) -> tuple[Path, str]:
    """Stock's packages in a second venv, the series applied: (python, series)."""
    venv = VENVS / version / "patched"
    python = venv / "bin" / "python"
    freeze = read_stamp(stock.parent.parent)["freeze"]
    series, digest = series_digest(version)
    have = read_stamp(venv)
    if (
        python.exists()
        and have.get("freeze") == freeze
        and have.get("series") == digest
    ):
        return python, series
    uv = _uv()
    if not python.exists() or have.get("freeze") != freeze:
        shutil.rmtree(venv, ignore_errors=True)
        log(f"{version}: patched venv: the stock venv's packages")
        sh([*uv, "venv", "-q", "--python", stock.resolve(), venv])
        reqs = venv / "requirements.txt"
        reqs.write_text(freeze)
        sh([*uv, "pip", "install", "-q", "--no-deps", "--python", python, "-r", reqs])
    else:
        # The series changed since: back to the stock vLLM files first.
        log(f"{version}: patched venv: series changed, reinstalling vllm=={version}")
        sh(
            [*uv, "pip", "install", "-q", "--no-deps", "--reinstall-package", "vllm"]
            + ["--python", python, f"vllm=={version}"]
        )
    write_stamp(venv, {"freeze": freeze})  # patched state unknown until applied
    res = sh([sys.executable, ROOT / "ci" / "apply_installed.py", "--python", python])
    log(f"{version}: {res.stdout.strip()}")
    write_stamp(venv, {"freeze": freeze, "series": digest})
    return python, series


def probe(python: Path) -> dict:
    res = sh([python, "-c", PROBE], cwd=ROOT, env=os.environ)
    return json.loads(res.stdout.strip().splitlines()[-1])


def expected(name: str, tree: str, randomization_switch: bool) -> str:
    """ci/matrix.py's expectation; "off" is "on" where it cannot be switched off."""
    if not randomization_switch:
        test, _, params = name.partition("[")
        parts = ["on" if p == "off" else p for p in params.rstrip("]").split("-")]
        name = f"{test}[{'-'.join(parts)}]"
    return matrix.expected(tree, name)


def summary(results: dict[str, str]) -> str:
    counts = Counter(results.values())
    return (
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" /{len(results)}"
    )


def run_release(version: str, args) -> dict:
    t0 = time.monotonic()
    # Inherited by the probe and both trees' pytest processes.
    os.environ["VLLM_CACHE_ROOT"] = str(VENVS / version / "vllm-cache")
    stock = make_stock(version, args.python)
    patched, series = make_patched(version, stock)
    # The probe's caches persist: probe once per stock venv.
    stamp = read_stamp(stock.parent.parent)
    info = stamp.get("probe")
    if not info or not any((VENVS / version / "vllm-cache").rglob("*.json")):
        info = stamp["probe"] = probe(stock)
        write_stamp(stock.parent.parent, stamp)
    if info["vllm"].split("+")[0] != version:
        sys.exit(f"[run_tier] {stock} has vllm {info['vllm']}, not {version}")
    setup_s = time.monotonic() - t0
    log(
        f"{version}: vllm {info['vllm']}, torch {info['torch']}, series {series}, "
        f"randomization switch: {info['randomization_switch']} "
        f"(venvs ready in {setup_s:.0f}s)"
    )
    log_dir = Path(args.log_dir) / version
    log_dir.mkdir(parents=True, exist_ok=True)
    # Side by side, as ci/matrix.py runs its two trees.
    t1 = time.monotonic()
    runs = [matrix.TreeRun("stock", log_dir, stock)]
    runs.append(matrix.TreeRun("patched", log_dir, patched))
    while not all([run.done() for run in runs]):
        time.sleep(0.1)
    tier_wall_s = time.monotonic() - t1
    results = {run.tree: run.results() for run in runs}
    # Then, alone (its bounds are timed), the connection layer on the
    # patched release: every case must pass.
    (log_dir / "wire").mkdir(exist_ok=True)
    wire = matrix.TreeRun("patched", log_dir / "wire", patched, matrix.WIRE_TIER)
    wire_results = wire.results()
    wire_bad = [
        f"patched (real ZMQ): {n}: got {got}, expected pass"
        for n, got in sorted(wire_results.items())
        if got != "pass"
    ]
    tier_s = {run.tree: round(run.end - run.start, 1) for run in runs}
    print(f"\nvLLM {version} (series patches/{series})")
    matrix.print_matrix(results)
    hangs = {run.tree: dict(sorted(run.hangs.items())) for run in runs}
    for run in runs:
        by = ", ".join(f"{n} by {src}" for src, n in hangs[run.tree].items())
        print(
            f"{run.tree}: {tier_s[run.tree]:.1f} s" + (f"; hangs: {by}" if by else "")
        )
    bad = [
        f"{tree}: {name}: got {got}, expected {want}"
        for tree, res in results.items()
        for name, got in sorted(res.items())
        if not matrix.matches(
            got, want := expected(name, tree, info["randomization_switch"])
        )
    ]
    return {
        "version": version,
        "series": series,
        "series_sha256": series_digest(version)[1],
        "vllm": info["vllm"],
        "torch": info["torch"],
        "randomization_switch": info["randomization_switch"],
        "stock": summary(results["stock"]),
        "patched": summary(results["patched"]),
        "patched_wire": summary(wire_results),
        "check": "ok"
        if not bad + wire_bad
        else f"FAILED ({len(bad + wire_bad)} unexpected)",
        "unexpected": bad + wire_bad,
        "setup_s": round(setup_s, 1),
        "tier_s": tier_s,
        "hangs_reported_by": hangs,
        "tier_wall_s": round(tier_wall_s, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "cases": {**results, "patched_wire": wire_results},
        "logs": str(
            log_dir.relative_to(ROOT) if log_dir.is_relative_to(ROOT) else log_dir
        ),
    }


def record(rows: list[dict]) -> None:
    data = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    data.setdefault("releases", {})
    for row in rows:
        data["releases"][row["version"]] = row
    data["releases"] = dict(
        sorted(data["releases"].items(), key=lambda kv: matrix_key(kv[0]))
    )
    RESULTS_JSON.write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "# CPU two-engine tier on installed vLLM releases",
        "",
        "Made by `python3 ci/release/run_tier.py --all --check --record`: each",
        "release's PyPI wheel (and the torch it pins) in a venv, stock and with its",
        "series applied by `ci/apply_installed.py`; the tier is",
        "ci/matrix.py TIER (test_two_engine, test_reliability, test_load_failures"
        " in tests/cpu/). Expected:",
        "stock fails where the bug bites (randomization on; before 0.17.0 it cannot be",
        "switched off), patched passes every case. Then, on the patched tree alone,",
        "the tests on vLLM's real ZMQ control plane (ci/matrix.py WIRE_TIER: the",
        "connection layer), every case to pass. Per-case outcomes are in",
        "release-tier.json. Time: the release's wall time on the 2-core dev machine",
        "shared with other jobs (venv setup from a warm uv cache, then both trees",
        "side by side); the tier's part in parentheses.",
        "",
        "| release | series | torch | stock | patched | patched, real ZMQ | check "
        "| time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["releases"].values():
        lines.append(
            f"| {r['version']} | {r['series']} | {r['torch']} | {r['stock']} | "
            f"{r['patched']} | {r.get('patched_wire', 'not run')} | {r['check']} | "
            f"{r['total_s']:.0f} s "
            f"({r['tier_wall_s']:.0f} s) |"
        )
    bad = [
        (r["version"], u) for r in data["releases"].values() for u in r["unexpected"]
    ]
    if bad:
        lines += ["", "Unexpected outcomes:", ""]
        lines += [f"- {v}: {u}" for v, u in bad]
    RESULTS_MD.write_text("\n".join(lines) + "\n")
    log(f"recorded in {RESULTS_JSON.relative_to(ROOT)}, {RESULTS_MD.relative_to(ROOT)}")


def matrix_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in v.split("."))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", nargs="+", metavar="V", help="release(s) to run")
    which.add_argument("--all", action="store_true", help=" ".join(RELEASES))
    p.add_argument("--check", action="store_true", help="fail on any unexpected case")
    p.add_argument(
        "--record", action="store_true", help="update results/release-tier.*"
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter (or uv version request) for the venvs (default: this one)",
    )
    p.add_argument("--log-dir", default=str(ROOT / "test-logs" / "release"))
    p.add_argument(
        "--drop-venvs",
        action="store_true",
        help="delete a release's venvs after its run",
    )
    args = p.parse_args()
    versions = RELEASES if args.all else args.version
    rows = []
    for version in versions:
        rows.append(run_release(version, args))
        if args.drop_venvs:
            shutil.rmtree(VENVS / version, ignore_errors=True)
    if args.record:
        record(rows)
    print("| release | series | stock | patched | check | time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        total = r["total_s"]
        print(
            f"| {r['version']} | {r['series']} | {r['stock']} | {r['patched']} | "
            f"{r['check']} | {total:.0f} s |"
        )
    bad = [f"{r['version']}: {u}" for r in rows for u in r["unexpected"]]
    if args.check:
        for line in bad:
            print(f"UNEXPECTED {line}")
    if args.check and bad:
        print(
            f"release tier check FAILED ({len(bad)} unexpected); logs in {args.log_dir}"
        )
        return 1
    n = sum(len(c) for r in rows for c in r["cases"].values())
    verdict = "as expected" if not bad else f"{len(bad)} unexpected"
    print(
        f"release tier {'check ok' if args.check else 'done'}: "
        f"{', '.join(versions)}: {n} cases, {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
