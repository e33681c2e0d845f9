#!/usr/bin/env python3
"""Apply the patch series to an installed vLLM (a pip wheel in site-packages).

Finds the vLLM of a Python interpreter (without importing it), picks the series
for its version from patches/index.json, and applies only the vllm/ part of
each patch; with --core-addon also the opt-in core add-on after it
(patches/core-addon/, its own index.json). The whole series is applied (or
reversed) first on a copy of the files it touches; site-packages is written
only when every patch succeeded, and restored from the saved originals if a
write fails. Exit status 2 on errors.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PATCHES = Path(__file__).resolve().parent.parent / "patches"
# Until patches/index.json (version -> series file) exists.
DEFAULT_INDEX = {"0.23.0": "series"}
# Runs in the target interpreter: version and location, without importing vllm.
PROBE = """
import importlib.metadata as md, importlib.util as iu, json, sys
sys.path = [p for p in sys.path if p]  # not the current directory
try:
    dist = md.distribution("vllm")
    version = dist.version
    editable = json.loads(dist.read_text("direct_url.json") or "{}").get(
        "dir_info", {}).get("editable", False)
except md.PackageNotFoundError:
    version, editable = None, False
spec = iu.find_spec("vllm")
dirs = list(spec.submodule_search_locations or []) if spec else []
print(json.dumps({"version": version, "dirs": dirs, "editable": editable}))
"""
# Git without the user's config or repository: a plain `patch` on the copy.
GIT_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "LC_ALL": "C",
}
INCLUDE = "--include=vllm/*"


class Error(Exception):
    """One line for the user: what went wrong and what to do."""


def find_vllm(python: str) -> tuple[str, Path]:
    try:
        res = subprocess.run(
            [python, "-c", PROBE], capture_output=True, text=True, timeout=120
        )
    except OSError as e:
        raise Error(f"cannot run {python}: {e.strerror}; pass --python PATH") from e
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise Error(f"{python} failed to look up vllm ({tail}); pass --python PATH")
    info = json.loads(res.stdout)
    pkg = next(
        (Path(d) for d in info["dirs"] if (Path(d) / "__init__.py").exists()), None
    )
    if info["version"] is None or pkg is None:
        raise Error(
            f"vLLM is not installed for {python}; install it (pip install "
            "vllm==<a supported version>) or pass --python of the env that has it"
        )
    if info["editable"]:
        raise Error(
            f"vLLM at {pkg.parent} is an editable install of a source tree; "
            "apply the series there with git am instead"
        )
    return info["version"], pkg.parent


def read_series(patches_dir: Path, version: str) -> tuple[Path, list[Path]]:
    index_file = patches_dir / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else DEFAULT_INDEX
    # A local build label (0.23.0+cu129) ships the same Python sources.
    rel = index.get(version) or index.get(version.split("+")[0])
    if rel is None:
        key = lambda v: [int(p) if p.isdigit() else -1 for p in v.split(".")]  # noqa: E731
        supported = ", ".join(sorted(index, key=key))
        raise Error(
            f"vLLM {version} is not supported (supported: {supported}); "
            f"install one (pip install vllm=={sorted(index, key=key)[-1]})"
        )
    series = patches_dir / rel
    if not series.is_file():
        raise Error(f"{series} (for vLLM {version}) is missing; restore patches/")
    names = [s.strip() for s in series.read_text().splitlines()]
    patches = [series.parent / n for n in names if n and not n.startswith("#")]
    missing = [str(p) for p in patches if not p.is_file()]
    if not patches or missing:
        raise Error(f"{series}: missing patches {missing}; restore patches/")
    return series, patches


def git_apply(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["git", "apply", INCLUDE, *map(str, args)],
            cwd=cwd,
            env={**GIT_ENV, "GIT_CEILING_DIRECTORIES": str(cwd.parent)},
            capture_output=True,
            timeout=120,
        )
    except FileNotFoundError as e:
        raise Error("git is not on PATH; install git") from e


def touched_files(patches: list[Path], scratch: Path) -> list[str]:
    """The vllm/ paths the series touches, as git parses them."""
    files: list[str] = []
    for patch in patches:
        res = git_apply(scratch, "--numstat", "-z", patch)
        if res.returncode != 0:
            raise Error(f"{patch} is not a valid patch; restore patches/")
        # "added\tdeleted\tpath\0", or for a rename "added\tdeleted\t\0old\0new\0"
        for field in res.stdout.decode().split("\0"):
            path = field.split("\t")[-1]
            if path and path not in files:
                files.append(path)
    if not files or any(".." in Path(f).parts or f.startswith("/") for f in files):
        raise Error(f"the series touches no vllm/ file or an unsafe path: {files}")
    return files


def copy_files(src: Path, dst: Path, files: list[str]) -> None:
    for rel in files:
        if (src / rel).exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def trial(
    site: Path, files: list[str], patches: list[Path], work: Path, reverse: bool
) -> str:
    """Apply (or reverse) the series on a copy of FILES in WORK: '' or why not."""
    copy_files(site, work, files)
    for patch in patches[::-1] if reverse else patches:
        res = git_apply(work, *(["-R"] if reverse else []), patch)
        if res.returncode != 0:
            err = [ln for ln in res.stderr.decode().splitlines() if ln.strip()]
            return f"{patch.name}: {(err or ['failed'])[0].removeprefix('error: ')}"
    return ""


def put(src: Path, dst: Path) -> None:
    """Replace DST by SRC (or remove DST where SRC does not exist)."""
    if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.apply_installed")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    elif dst.exists():
        dst.unlink()


def restore(orig: Path, dst: Path) -> bool:
    """Put ORIG back at DST where it differs; False if that failed."""
    dst.with_name(f".{dst.name}.apply_installed").unlink(missing_ok=True)
    if orig.exists() == dst.exists() and (
        not orig.exists() or filecmp.cmp(orig, dst, shallow=False)
    ):
        return True
    try:
        put(orig, dst)
    except OSError:
        return False
    return True


def write_back(site: Path, work: Path, orig: Path, files: list[str]) -> None:
    done: list[str] = []
    try:
        for rel in files:
            done.append(rel)
            put(work / rel, site / rel)
    except BaseException as e:
        lost = [rel for rel in done if not restore(orig / rel, site / rel)]
        state = f"could not restore {lost}, reinstall vLLM" if lost else "unchanged"
        raise Error(
            f"writing {site / done[-1]} failed ({e}); the installed files are "
            f"{state}. Rerun as a user who can write there"
        ) from e
    # Python would recompile on the new mtime anyway; drop the stale caches.
    for rel in files:
        for pyc in (site / rel).parent.glob(f"__pycache__/{Path(rel).stem}.*.pyc"):
            pyc.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Apply the P2pNcclConnector fix to an installed vLLM "
        "(vllm/ files only; all or nothing).",
    )
    ap.add_argument(
        "--python",
        default=sys.executable,
        metavar="PY",
        help="interpreter whose vLLM to patch (default: this one)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="dry run: say what would happen, write nothing",
    )
    ap.add_argument(
        "--revert",
        action="store_true",
        help="undo the series (with --check: dry run of that)",
    )
    ap.add_argument(
        "--core-addon",
        action="store_true",
        help="also the opt-in core add-on (vLLM core changes that kv_load_failure"
        "_policy 'recompute' needs; applied and reverted with the series)",
    )
    ap.add_argument(
        "--patches-dir",
        type=Path,
        default=PATCHES,
        metavar="DIR",
        help="folder with index.json and the series (default: %(default)s)",
    )
    args = ap.parse_args(argv)

    version, site = find_vllm(args.python)
    series, patches = read_series(args.patches_dir.resolve(), version)
    if args.core_addon:
        try:
            _, addon = read_series(args.patches_dir.resolve() / "core-addon", version)
        except Error as e:
            raise Error(f"the core add-on: {e}") from None
        patches += addon
    where = f"vLLM {version} in {site}"
    release = version.split("+")[0]
    with tempfile.TemporaryDirectory(prefix="apply_installed.") as tmp:
        tmp = Path(tmp)
        files = touched_files(patches, tmp)
        names = ", ".join(files)
        # stock: the series applies; patched: it reverses; else local changes.
        forward = trial(site, files, patches, tmp / "forward", reverse=False)
        backward = forward and trial(site, files, patches, tmp / "reverse", True)
        if forward and backward:
            raise Error(
                f"{names} in {site} matches neither stock nor patched vLLM {version} "
                f"({backward if args.revert else forward}); undo local changes or "
                f"reinstall: pip install --force-reinstall --no-deps vllm=={release}"
            )
        if forward and not args.revert:
            raise Error(f"the fix is already applied to {where}; --revert undoes it")
        if not forward and args.revert:
            raise Error(f"the fix is not applied to {where}; nothing to revert")
        action = "reverting" if args.revert else "applying"
        if args.check:
            state = "patched" if args.revert else "stock"
            print(
                f"{where} is {state}: {action} {series} ({len(patches)} patches) "
                f"would change {names}. Nothing written (--check)."
            )
            return 0
        copy_files(site, tmp / "orig", files)
        work = tmp / ("reverse" if args.revert else "forward")
        write_back(site, work, tmp / "orig", files)
    done = "reverted the fix in" if args.revert else "applied the fix to"
    print(f"{done} {where}: {names}. Restart the vLLM servers.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Error as e:
        print(f"apply_installed: error: {e}", file=sys.stderr)
        sys.exit(2)
