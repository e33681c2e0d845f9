#!/usr/bin/env python3
"""Regenerate patches/backport/ and patches/index.json from patches/series.

The main series is made against vLLM 0.23.0. For the older affected releases
this script ports it, deterministically, in a scratch git repository:

  1. commit the 0.23.0 versions (from the sdist) of the vllm/ files the series
     touches, and ``git am`` the series onto them, vllm/ paths only: the unit
     tests in tests/ use 0.23.0's test helpers, so backports carry no tests;
  2. per group of releases (GROUPS): a root commit with the files of the
     group's first release, then each main patch in order: left out if the
     group says so (a reason goes into the series file), else taken from
     patches/backport/<group>/port/<main patch name> if there is one (a
     hand-made port of a patch whose cherry-pick conflicts, with the main
     patch's message), else cherry-picked (3-way); then the group's
     hand-written release adaptations (patches/backport/<extra>/extra/*.patch,
     ``git am -3``; extra/fix-alone/<same name> is the text of an adaptation
     that applies right after the first patch alone, where the text after
     the whole series does not);
  3. ``git format-patch`` (the options of ci/fork.py) into
     patches/backport/<group>/ with a ``series`` file, and patches/index.json
     (version -> series file, relative to patches/). A patch keeps the number
     of the main patch it ports (a gap is a patch left out); adaptations are
     numbered after the main series. The adaptations are also exported as
     they apply right after the first patch alone, into fix-alone/: the
     series' ``# fix-alone:`` line names them (ci/release/check_matrix.py).

A port names the main patch it was made from (``Main-Patch-Id:``, ``git
patch-id --stable`` of its vllm/ part): when the main patch's code changes,
the script stops until the port is redone. Message-only changes of the main
series need nothing but a re-run.

Commit messages, authors and dates are the original ones; git runs without
personal config and with a fixed committer, so a re-run is byte-identical.
A cherry-pick conflict stops the script: add a port or an extra patch, or
split the group. ``--check`` regenerates into a temporary folder and exits 1
when patches/ differs (CI).

Run from the project root:  .venv/bin/python ci/release/backport.py [--check]
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Group:
    """Releases that share one series text.

    The series is ported onto the first release's files; the folder is named
    "<first>-<last>" (or "<first>"). ``extra``: the group folder whose extra/
    holds the adaptations to these releases. ``leave_out``: main patch number
    -> why this group does not take it.
    """

    first: str
    last: str
    extra: str | None = None
    leave_out: dict[str, str] = field(default_factory=dict)


# 0.14.x and 0.16.0 need two texts: 0.14.x imports typing.Optional, a context
# line of 0002's import hunk, and their connectors differ. The core add-on
# (patches/core-addon/) is made for 0.23.0 only and is not ported.
GROUPS = [
    Group("0.14.0", "0.14.1", "0.14.0-0.14.1"),
    Group("0.16.0", "0.16.0", "0.14.0-0.14.1"),
    Group("0.17.0", "0.17.1"),
    # 0.18.0 enters the GPU as 0.23.0 does (torch.accelerator.device_index)
    Group("0.18.0", "0.18.1"),
    Group("0.19.0", "0.21.0"),
    Group("0.22.0", "0.22.1"),
]
BACKPORT = "backport"
FIX_ALONE_DIR = "fix-alone"
PORT_DIR = "port"
PATCH_ID = re.compile(r"^Main-Patch-Id: ([0-9a-f]{40})$", re.M)
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


def series_text(
    name: str, patches: list[str], extras: list[str], left_out: list[str]
) -> str:
    head = [
        f"# vLLM {name}: patches/series ported by ci/release/backport.py; do not",
        "# edit, change the main series or extra/ and re-run it. vllm/ code only:",
        f"# the unit tests in tests/ need vLLM {MAIN_VERSION}'s test helpers.",
    ]
    for line in left_out:
        head += textwrap.wrap(
            line, 78, initial_indent="# Left out: ", subsequent_indent="#   "
        )
    if extras:
        head.append("# Release adaptations: the last patches. The minimal fix is the")
        head.append("# first patch and these, as they apply right after it:")
        head.append(f"# fix-alone: {' '.join(f'{FIX_ALONE_DIR}/{e}' for e in extras)}")
    return "\n".join(head + patches) + "\n"


def patch_id(repo: Path, commit: str) -> str:
    """``git patch-id --stable`` of the commit's vllm/ changes."""
    diff = git(repo, "show", "--format=", "--full-index", commit, "--", "vllm/")
    res = subprocess.run(
        ["git", "patch-id", "--stable"],
        cwd=repo,
        env=SCRATCH_ENV,
        input=diff,
        text=True,
        capture_output=True,
        check=True,
    )
    return res.stdout.split()[0]


def port_patch(repo: Path, group: str, commit: str, main_name: str) -> bool:
    """Apply the group's port of a main patch, with the main patch's message.

    Returns False when the group has no port of it.
    """
    port = PATCHES / BACKPORT / group / PORT_DIR / main_name
    if not port.is_file():
        return False
    m = PATCH_ID.search(port.read_text())
    want = patch_id(repo, commit)
    if not m or m.group(1) != want:
        raise SystemExit(
            f"[backport] {port.relative_to(ROOT)}: made from another version of "
            f"{main_name} (Main-Patch-Id: {m.group(1) if m else 'missing'}, "
            f"now {want}); redo the port"
        )
    git(repo, "apply", "--index", port)
    git(repo, "commit", "-q", "--no-verify", "-C", commit)
    return True


def export(repo: Path, commits: list[tuple[str, int]], dest: Path) -> list[str]:
    """format-patch each (commit, number) into dest; the file names."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for commit, number in commits:
        out = git(
            repo, *FORMAT_PATCH, f"--start-number={number}", "-o", dest, "-1", commit
        )
        names.append(Path(out.strip()).name)
    return names


def generate(out: Path, scratch: Path | None = None) -> None:
    """Write backport/<group>/{series,*.patch,fix-alone/} and index.json.

    ``scratch``: an empty folder for the scratch repository, kept (to make a
    port from a conflict); default a temporary one.
    """
    main = load_series("series")
    paths, new = main.touched()
    files = [p for p in paths if p.startswith("vllm/") and p not in new]
    touches_vllm = [p for p in main.patches if "diff --git a/vllm/" in p.read_text()]
    index = dict.fromkeys(VERSIONS, "series")

    with tempfile.TemporaryDirectory() as tmp:
        repo = scratch or Path(tmp)
        git(repo, "init", "-q", "--template=", "-b", "main")
        commit_release(repo, MAIN_VERSION, files)
        git(repo, "tag", "base")
        git(repo, *AM, "--include=vllm/*", *touches_vllm)
        main_commits = git(repo, "rev-list", "--reverse", "base..main").split()
        # (commit, main patch file name, its number in the main series)
        numbered = [
            (c, p.name, main.patches.index(p) + 1)
            for c, p in zip(main_commits, touches_vllm, strict=True)
        ]
        for group in GROUPS:
            name, versions = group_versions(group.first, group.last)
            unknown = set(group.leave_out) - {f"{n:04d}" for _, _, n in numbered}
            if unknown:
                raise SystemExit(f"[backport] {name}: leave_out {sorted(unknown)}?")
            extras = []
            if group.extra:
                extras = sorted(
                    (PATCHES / BACKPORT / group.extra / "extra").glob("*.patch")
                )
                if not extras:
                    raise SystemExit(
                        f"[backport] {name}: no extra/*.patch in {group.extra}"
                    )
            git(repo, "checkout", "-q", "--orphan", f"backport/{name}")
            commit_release(repo, group.first, files)
            git(repo, "tag", f"root/{name}")
            commits, left_out = [], []
            for commit, main_name, number in numbered:
                if f"{number:04d}" in group.leave_out:
                    left_out.append(f"{main_name}: {group.leave_out[f'{number:04d}']}")
                    continue
                if not port_patch(repo, name, commit, main_name):
                    git(repo, "cherry-pick", commit)
                commits.append((git(repo, "rev-parse", "HEAD").strip(), number))
            first_number = len(main.patches) + 1
            if extras:
                git(repo, *AM, "-3", "--include=vllm/*", *extras)
                extra_commits = git(
                    repo, "rev-list", "--reverse", f"{commits[-1][0]}..HEAD"
                ).split()
                commits += [(c, first_number + i) for i, c in enumerate(extra_commits)]
            dest = out / BACKPORT / name
            names = export(repo, commits, dest)
            extra_names = names[len(names) - len(extras) :] if extras else []
            if extras:
                # The minimal fix: the first patch, then the adaptations.
                git(repo, "checkout", "-q", "-b", f"fix-alone/{name}", commits[0][0])
                alone_extras = [
                    e.parent / FIX_ALONE_DIR / e.name
                    if (e.parent / FIX_ALONE_DIR / e.name).is_file()
                    else e
                    for e in extras
                ]
                git(repo, *AM, "-3", "--include=vllm/*", *alone_extras)
                alone = git(
                    repo, "rev-list", "--reverse", f"{commits[0][0]}..HEAD"
                ).split()
                alone_names = export(
                    repo,
                    [(c, first_number + i) for i, c in enumerate(alone)],
                    dest / FIX_ALONE_DIR,
                )
                assert alone_names == extra_names, (alone_names, extra_names)
            series = dest / "series"
            series.write_text(series_text(name, names, extra_names, left_out))
            for v in versions:
                index[v] = series.relative_to(out).as_posix()
    index = {v: index[v] for v in sorted(index, key=vkey)}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")


def generated(patches: Path) -> dict[str, bytes]:
    """The files under ``patches`` that this script writes (not extra/)."""
    out = {}
    if (patches / "index.json").is_file():
        out["index.json"] = (patches / "index.json").read_bytes()
    for f in sorted(
        [
            *(patches / BACKPORT).glob("*/*"),
            *(patches / BACKPORT).glob(f"*/{FIX_ALONE_DIR}/*"),
        ]
    ):
        if f.is_file() and (f.name == "series" or f.suffix == ".patch"):
            out[f.relative_to(patches).as_posix()] = f.read_bytes()
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="fail if patches/ differs")
    p.add_argument(
        "--scratch",
        type=Path,
        metavar="DIR",
        help="an empty folder for the scratch repository, kept afterwards",
    )
    args = p.parse_args()
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
        if any(args.scratch.iterdir()):
            p.error(f"--scratch {args.scratch} is not empty")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), args.scratch and args.scratch.resolve())
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
        for d in [
            *(PATCHES / BACKPORT).glob(f"*/{FIX_ALONE_DIR}"),
            *(PATCHES / BACKPORT).iterdir(),
        ]:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    print(f"[backport] wrote {len(want)} files under {PATCHES.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
