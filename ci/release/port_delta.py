#!/usr/bin/env python3
"""Carry a change of a main patch over to its hand-made ports.

ci/release/backport.py stops with "redo the port" when a main patch that has
ports (patches/backport/<group>/port/<name>) changed. When the change is small
and the port's adaptation is elsewhere, the new port is the old one plus the
same change. This script makes it, per group with a port of the patch:

  1. on vLLM 0.23.0's files: the main series before the patch, then the old
     patch (from git, ``--old-rev``) and the new one (patches/); their
     difference is the change;
  2. on the group's first release: the group's exported series before the
     patch (patches/backport/<group>/, still the old run's), then the old
     port, then the change with ``git apply -3``;
  3. writes the port: its old text before ``Main-Patch-Id:``, the new patch's
     id, and the diff of steps 2's result against the tree before the port.

A change that does not apply stops the script: make that port by hand. Then
run backport.py, check_matrix.py and the release tier (run_tier.py), which
test every port on its releases.

    .venv/bin/python ci/release/port_delta.py PATCH_NAME [--old-rev HEAD]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from backport import (  # also puts ci/ on sys.path
    AM,
    BACKPORT,
    GROUPS,
    MAIN_VERSION,
    PATCH_ID,
    PORT_DIR,
    commit_release,
    git,
    group_versions,
    patch_id,
)
from check_matrix import PATCHES, ROOT, load_series


def old_text(rev: str, name: str) -> str:
    rel = (PATCHES / name).relative_to(ROOT).as_posix()
    return subprocess.run(
        ["git", "show", f"{rev}:{rel}"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        check=True,
    ).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="file name of the main patch in patches/")
    ap.add_argument("--old-rev", default="HEAD", help="git revision of the old patch")
    args = ap.parse_args()

    main_series = load_series("series")
    names = [p.name for p in main_series.patches]
    index = names.index(args.name)
    before = [
        p for p in main_series.patches[:index] if "diff --git a/vllm/" in p.read_text()
    ]
    paths, new = main_series.touched()
    files = [p for p in paths if p.startswith("vllm/") and p not in new]

    with tempfile.TemporaryDirectory() as tmp:
        repo, old = Path(tmp) / "repo", Path(tmp) / "old.patch"
        repo.mkdir()
        old.write_text(old_text(args.old_rev, args.name))
        git(repo, "init", "-q", "--template=", "-b", "main")
        commit_release(repo, MAIN_VERSION, files)
        if before:
            git(repo, *AM, "--include=vllm/*", *before)
        git(repo, "tag", "pre")
        git(repo, *AM, "--include=vllm/*", old)
        git(repo, "tag", "old")
        git(repo, "checkout", "-q", "-b", "new", "pre")
        git(repo, *AM, "--include=vllm/*", PATCHES / args.name)
        change = Path(tmp) / "change.diff"
        change.write_text(
            git(repo, "diff", "--full-index", "old", "new", "--", "vllm/")
        )
        new_id = patch_id(repo, "new")

        for group in GROUPS:
            name, _ = group_versions(group.first, group.last)
            port = PATCHES / BACKPORT / name / PORT_DIR / args.name
            if not port.is_file():
                continue
            series = load_series(f"{BACKPORT}/{name}/series")
            number = f"{index + 1:04d}-"
            earlier = [p for p in series.patches if p.name < number]
            git(repo, "checkout", "-q", "--orphan", f"g/{name}")
            commit_release(repo, group.first, files)
            for p in earlier:
                git(repo, *AM, "-3", "--include=vllm/*", p)
            base = git(repo, "rev-parse", "HEAD").strip()
            git(repo, "apply", "--index", port)
            git(repo, "apply", "-3", "--index", change)
            text = port.read_text()
            head = text[: PATCH_ID.search(text).start()]
            diff = git(repo, "diff", "--cached", "--full-index", base, "--", "vllm/")
            port.write_text(f"{head}Main-Patch-Id: {new_id}\n\n{diff}")
            print(f"[port_delta] {port.relative_to(ROOT)}: carried over")


if __name__ == "__main__":
    main()
