#!/usr/bin/env python3
"""Regenerate patches/backport/ and patches/index.json from patches/series.

The main series is made against vLLM 0.23.0. For the older affected releases
this script ports it, deterministically, in a scratch git repository:

  1. commit the 0.23.0 versions (from the sdist) of the vllm/ files the series
     touches, and ``git am`` the series onto them, vllm/ paths only: the unit
     tests in tests/ use 0.23.0's test helpers, so backports carry no tests;
  2. per group of releases (GROUPS): a root commit with the files of the
     group's first release, the series commits cherry-picked onto it
     (3-way), then the group's hand-written release adaptations
     (patches/backport/<extra>/extra/*.patch, ``git am -3``);
  3. ``git format-patch`` (the options of ci/fork.py) into
     patches/backport/<group>/ with a ``series`` file, and patches/index.json
     (version -> series file, relative to patches/).

Commit messages, authors and dates are the original ones; git runs without
personal config and with a fixed committer, so a re-run is byte-identical.
A cherry-pick conflict stops the script: add or fix an extra patch, or split
the group. ``--check`` regenerates into a temporary folder and exits 1 when
patches/ differs (CI).

Run from the project root:  .venv/bin/python ci/release/backport.py [--check]
"""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from check_matrix import (  # also puts ci/ on sys.path
    GIT_ENV,
    PATCHES,
    ROOT,
    VERSIONS,
    fetch_sdist,
    load_series,
    prepare_tree,
    vkey,
)
from fork import FORMAT_PATCH  # the same stable export as the main series

MAIN_VERSION = "0.23.0"
# Groups of releases that share one series text: (first, last, group folder
# whose extra/ holds the adaptations to these releases or None). The series
# is cherry-picked onto the first release's files; the folder is named
# "<first>-<last>". 0.14.x and 0.16.0 need two texts: 0.14.x imports
# typing.Optional, a context line of 0002's import hunk.
GROUPS = [
    ("0.14.0", "0.14.1", "0.14.0-0.14.1"),
    ("0.16.0", "0.16.0", "0.14.0-0.14.1"),
    ("0.17.0", "0.18.1", None),
    ("0.19.0", "0.22.1", None),
]
BACKPORT = "backport"
AM = ["am", "-q", "--keep-non-patch", "--committer-date-is-author-date"]
FIXED_DATE = "@946684800 +0000"
SCRATCH_ENV = {
    **GIT_ENV,
    "GIT_COMMITTER_NAME": "vllm-p2p-fix",
    "GIT_COMMITTER_EMAIL": "vllm-p2p-fix@localhost",
    "GIT_COMMITTER_DATE": FIXED_DATE,
    "TZ": "UTC",
}


def group_versions(first: str, last: str) -> tuple[str, list[str]]:
    """The group's folder name and its releases."""
    name = first if first == last else f"{first}-{last}"
    return name, [v for v in VERSIONS if vkey(first) <= vkey(v) <= vkey(last)]


def git(repo: Path, *args, env: dict | None = None) -> str:
    res = subprocess.run(
        ["git", *map(str, args)],
        cwd=repo,
        env={**SCRATCH_ENV, **(env or {})},
        text=True,
        capture_output=True,
    )
    if res.returncode:
        raise SystemExit(
            f"[backport] git {' '.join(map(str, args))} failed:\n{res.stdout}"
            f"{res.stderr}{git_state(repo)}"
        )
    return res.stdout


def git_state(repo: Path) -> str:
    res = subprocess.run(
        ["git", "diff"], cwd=repo, env=SCRATCH_ENV, text=True, capture_output=True
    )
    return (
        f"\n-- git diff in the scratch repository:\n{res.stdout}" if res.stdout else ""
    )


def commit_release(repo: Path, version: str, files: list[str]) -> None:
    """Replace the work tree by ``files`` of the release and commit them."""
    git(repo, "rm", "-rfq", "--ignore-unmatch", ".")
    with tempfile.TemporaryDirectory() as tmp:
        prepare_tree(*fetch_sdist(version), version, files, Path(tmp))
        for f in files:
            if (Path(tmp) / f).is_file():
                (repo / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / f, repo / f)
    git(repo, "add", "-A")
    env = {"GIT_AUTHOR_NAME": "vLLM release", "GIT_AUTHOR_EMAIL": "noreply@vllm.ai"}
    env["GIT_AUTHOR_DATE"] = FIXED_DATE
    git(repo, "commit", "-q", "--no-verify", "-m", f"vLLM {version}", env=env)


def series_text(name: str, patches: list[str], extras: list[str]) -> str:
    head = [
        f"# vLLM {name}: patches/series ported by ci/release/backport.py; do not",
        "# edit, change the main series or extra/ and re-run it. vllm/ code only:",
        f"# the unit tests in tests/ need vLLM {MAIN_VERSION}'s test helpers.",
    ]
    if extras:
        head.append("# Release adaptations, part of the minimal fix (without 0002):")
        head.append(f"# fix-alone: {' '.join(extras)}")
    return "\n".join(head + patches) + "\n"


def generate(out: Path) -> None:
    """Write backport/<group>/{series,*.patch} and index.json under ``out``."""
    main = load_series("series")
    paths, new = main.touched()
    files = [p for p in paths if p.startswith("vllm/") and p not in new]
    touches_vllm = [p for p in main.patches if "diff --git a/vllm/" in p.read_text()]
    index = dict.fromkeys(VERSIONS, "series")

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        git(repo, "init", "-q", "--template=", "-b", "main")
        commit_release(repo, MAIN_VERSION, files)
        git(repo, "tag", "base")
        git(repo, *AM, "--include=vllm/*", *touches_vllm)
        for first, last, extra_group in GROUPS:
            name, versions = group_versions(first, last)
            git(repo, "checkout", "-q", "--orphan", f"backport/{name}")
            commit_release(repo, first, files)
            git(repo, "tag", f"root/{name}")
            git(repo, "cherry-pick", "base..main")
            extras = []
            if extra_group:
                extras = sorted(
                    (PATCHES / BACKPORT / extra_group / "extra").glob("*.patch")
                )
                if not extras:
                    raise SystemExit(
                        f"[backport] {name}: no extra/*.patch in {extra_group}"
                    )
                git(repo, *AM, "-3", "--include=vllm/*", *extras)
            dest = out / BACKPORT / name
            dest.mkdir(parents=True)
            exported = git(repo, *FORMAT_PATCH, "-o", dest, f"root/{name}..HEAD")
            names = [Path(line).name for line in exported.splitlines()]
            series = dest / "series"
            series.write_text(series_text(name, names, names[len(touches_vllm) :]))
            for v in versions:
                index[v] = series.relative_to(out).as_posix()
    index = {v: index[v] for v in sorted(index, key=vkey)}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")


def generated(patches: Path) -> dict[str, bytes]:
    """The files under ``patches`` that this script writes (not extra/)."""
    out = {}
    if (patches / "index.json").is_file():
        out["index.json"] = (patches / "index.json").read_bytes()
    for f in sorted((patches / BACKPORT).glob("*/*")):
        if f.is_file() and (f.name == "series" or f.suffix == ".patch"):
            out[f.relative_to(patches).as_posix()] = f.read_bytes()
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="fail if patches/ differs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        want, have = generated(Path(tmp)), generated(PATCHES)
        if args.check:
            diff = [
                f"only in patches/: {f}\n" for f in sorted(have.keys() - want.keys())
            ]
            diff += [
                f"missing in patches/: {f}\n" for f in sorted(want.keys() - have.keys())
            ]
            for f in sorted(want.keys() & have.keys()):
                if want[f] != have[f]:
                    a = have[f].decode().splitlines(keepends=True)
                    b = want[f].decode().splitlines(keepends=True)
                    diff += difflib.unified_diff(a, b, f"patches/{f}", f"generated/{f}")
            if diff:
                sys.stdout.writelines(diff)
                print("[backport] patches/ is stale: run ci/release/backport.py")
                return 1
            print(f"[backport] patches/ is up to date ({len(want)} files)")
            return 0
        for f in have.keys() - want.keys():
            (PATCHES / f).unlink()
        for f, data in want.items():
            (PATCHES / f).parent.mkdir(parents=True, exist_ok=True)
            (PATCHES / f).write_bytes(data)
        for d in (PATCHES / BACKPORT).iterdir():
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    print(f"[backport] wrote {len(want)} files under {PATCHES.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
