#!/usr/bin/env python3
"""Carry the patch series between ``patches/`` and the ``vllm_fork/`` checkout.

Subcommands:
  init           populate vllm_fork/ from the submodule, or from the PyPI sdist
                 when GitHub cannot be reached (the release tree as base commit)
  apply          reset the fork to its base and ``git am`` the series, then
                 the core add-on, onto it
  export         regenerate patches/ from the fork's commits on top of the base:
                 the default series, then the opt-in core add-on (commits with
                 the trailer "Series: core-addon", last) into patches/core-addon/
  check          export into a temporary folder and fail if patches/ differs
  series-tree    check out the default series without the add-on into
                 .series-tree/ (a worktree of the fork; tests put it first on
                 PYTHONPATH to run vLLM as users get it by default)
  install        editable install of the fork into .venv (the vLLM way:
                 VLLM_USE_PRECOMPILED=1 with the PyPI wheel of the same version)
  install-stock  the unmodified PyPI wheel into .venv-stock, side by side
  install-lint   vLLM's mypy and typos pins into .venv-lint
  install-tools  uv (pinned) into .venv-tools, made with python3 -m venv; the
                 other install steps make it on first use
  check-sdist    download the sdist, extract it safely into a temporary folder
                 and check its _version.py (init's sdist path; writes nothing)
  fetch          download the release's sdist and wheel into the cache only

Git runs without personal config and with a fixed committer, so that
``apply`` then ``export`` of an unchanged series is byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = json.loads((ROOT / "patches" / "config.json").read_text())["vllm_fork"]
FORK = ROOT / "vllm_fork"
PATCHES = ROOT / CONFIG["patches"]
SERIES = PATCHES / "series"
# The opt-in core add-on: changes to vLLM core (and what depends on them),
# applied after the default series. Its commits carry this trailer.
ADDON = PATCHES / "core-addon"
ADDON_TRAILER = "Series: core-addon"
SERIES_TREE = ROOT / ".series-tree"
BASE_REF = "refs/patches/upstream-head"
CACHE = Path(os.environ.get("P2P_FIX_CACHE", Path.home() / ".cache" / "vllm-p2p-fix"))
PYPI_SIMPLE = os.environ.get("P2P_FIX_PYPI_SIMPLE", "https://pypi.org/simple")
VENV = ROOT / ".venv"
VENV_STOCK = ROOT / ".venv-stock"
VENV_LINT = ROOT / ".venv-lint"
# uv, pinned, in a venv of its own made with the standard library: setup and
# the tests use this one, never a uv that happens to be on PATH.
VENV_TOOLS = ROOT / ".venv-tools"
UV_VERSION = "0.13.9"
# Never let uv download a Python of its own: the venvs use the interpreter
# that runs this script. Trust the system's certificates, as git, pip and
# urllib do (uv's default is its own bundle, which a TLS proxy breaks).
UV_ENV = {"UV_PYTHON_DOWNLOADS": "never", "UV_SYSTEM_CERTS": "1"}
# vLLM's own pre-commit environment for mypy (v0.23.0 .pre-commit-config.yaml),
# and its typos version.
LINT_DEPS = [
    "mypy==1.20.2",
    "regex",
    "types-cachetools",
    "types-setuptools",
    "types-PyYAML",
    "types-requests",
    "types-torch",
    "pydantic",
    "typos==1.43.5",
]
# tblib: vLLM's tests/conftest.py imports it.
TEST_DEPS = ["msgpack", "quart", "pytest", "pytest-timeout", "ruff==0.14.0", "tblib"]
BUILD_DEPS = [
    "setuptools>=77,<81",
    "setuptools-scm>=8",
    "setuptools-rust",
    "cmake",
    "ninja",
    "jinja2",
    "wheel",
]
# Build artifacts of an editable install; never part of the series.
FORK_EXCLUDES = [
    "*.so",
    "*.egg-info/",
    "__pycache__/",
    "/build/",
    ".deps/",
    "/vllm/vllm_flash_attn/",
    "/vllm/third_party/triton_kernels/",
]
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_COMMITTER_NAME": "vllm-p2p-fix",
    "GIT_COMMITTER_EMAIL": "vllm-p2p-fix@localhost",
    "LC_ALL": "C",
    "TZ": "UTC",
}
FORMAT_PATCH = [
    "format-patch",
    "--zero-commit",
    "--no-signature",
    "--full-index",
    "--no-stat",
    "--keep-subject",
    "--no-renames",
    "--encoding=UTF-8",
]


def log(msg: str) -> None:
    print(f"[fork] {msg}", flush=True)


def die(msg: str) -> None:
    print(f"[fork] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd, cwd=ROOT, env=None, check=True, capture=False, timeout=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    res = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=full_env,
        text=True,
        capture_output=capture,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        if capture:
            sys.stderr.write(res.stdout + res.stderr)
        die(f"command failed ({res.returncode}): {' '.join(map(str, cmd))}")
    return res


def git(*args, cwd=FORK, check=True, capture=True, env=None):
    res = run(
        ["git", *args],
        cwd=cwd,
        env={**GIT_ENV, **(env or {})},
        check=check,
        capture=capture,
    )
    return res.stdout.strip() if capture else ""


def fork_ready() -> bool:
    if not (FORK / ".git").exists():
        return False
    res = run(
        ["git", "rev-parse", "-q", "--verify", BASE_REF],
        cwd=FORK,
        env=GIT_ENV,
        check=False,
        capture=True,
    )
    return res.returncode == 0


def series_files(folder: Path = PATCHES) -> list[Path]:
    """The patches of a series file, in order (default: the default series)."""
    series = folder / "series"
    if not series.exists():
        return []
    names = [
        line.strip()
        for line in series.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [folder / n for n in names]


def addon_files() -> list[Path]:
    return series_files(ADDON)


# ---------------------------------------------------------------- archives


class UnsafeArchive(ValueError):
    """A member of a downloaded archive would land outside its folder."""


def _check_members(members: list[tarfile.TarInfo]) -> None:
    """Refuse absolute paths, "..", links leading out, paths through a
    symlink of the archive, and devices: the same checks on every Python."""
    symlinks = set()
    for m in members:
        name = m.name.rstrip("/")
        if posixpath.isabs(m.name):
            raise UnsafeArchive(f"{m.name!r}: absolute path")
        parts = name.split("/")
        if ".." in parts:
            raise UnsafeArchive(f"{m.name!r}: '..' in the path")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in symlinks:
                raise UnsafeArchive(f"{m.name!r}: path goes through a symlink")
        if m.issym() or m.islnk():
            # A symlink's target is relative to its folder, a hard link's to
            # the archive's root.
            base = posixpath.dirname(name) if m.issym() else ""
            target = posixpath.normpath(posixpath.join(base, m.linkname))
            if posixpath.isabs(m.linkname) or target.split("/")[0] == "..":
                raise UnsafeArchive(
                    f"{m.name!r}: link to {m.linkname!r} points outside"
                )
            if m.issym():
                symlinks.add(name)
        elif m.isdev():
            raise UnsafeArchive(f"{m.name!r}: device or fifo")
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchive(f"{m.name!r}: unsupported member type {m.type!r}")


def extract_tar(archive: str | Path, dest: str | Path) -> None:
    """Extract a downloaded archive into dest, safely on every Python 3.10+.

    Every member is checked first (nothing is written when one is bad). Where
    tarfile has extraction filters (3.10.12+, 3.11.4+, 3.12+) the "tar"
    filter guards the extraction too; older versions rely on the checks.
    """
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        _check_members(members)
        Path(dest).mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(dest, members=members, filter="tar")
        else:
            tar.extractall(dest, members=members)  # checked above


# ---------------------------------------------------------------- downloads


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(version: str = CONFIG["version"], sha256: str | None = None) -> Path:
    """Download vllm-<version>.tar.gz from PyPI's simple index into the cache."""
    name = f"vllm-{version}.tar.gz"
    dest = CACHE / "sdist" / name
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    index = urllib.request.urlopen(f"{PYPI_SIMPLE}/vllm/", timeout=120).read()
    links = re.findall(r'href="([^"]+)"', index.decode())
    url = next((u for u in links if u.split("#")[0].endswith("/" + name)), None)
    if url is None:
        die(f"{name} is not on {PYPI_SIMPLE}/vllm/")
    expected = sha256 or (url.split("#sha256=")[1] if "#sha256=" in url else None)
    log(f"downloading {name}")
    tmp = dest.with_suffix(".part")
    with (
        urllib.request.urlopen(url.split("#")[0], timeout=600) as r,
        open(tmp, "wb") as f,
    ):
        shutil.copyfileobj(r, f)
    if expected and sha256_file(tmp) != expected:
        tmp.unlink()
        die(f"{name}: sha256 mismatch (expected {expected})")
    tmp.rename(dest)
    return dest


def fetch_wheel() -> Path:
    """The x86_64 PyPI wheel of the pinned version (for precompiled binaries)."""
    dest = CACHE / "wheel"
    version = CONFIG["version"]
    found = sorted(dest.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    log(f"downloading the vllm {version} wheel")
    _uv()  # .venv-tools: a pip the system Python may lack
    run(
        [
            VENV_TOOLS / "bin" / "python",
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            f"vllm=={version}",
            "-d",
            dest,
        ]
    )
    found = sorted(dest.glob(f"vllm-{version}-*.whl"))
    if not found:
        die("pip download gave no wheel")
    return found[-1]


# ---------------------------------------------------------------- init


def _try_submodule() -> bool:
    log("trying the submodule (git submodule update --init)")
    try:
        res = run(
            [
                "git",
                "-c",
                "http.lowSpeedLimit=1000",
                "-c",
                "http.lowSpeedTime=30",
                "submodule",
                "update",
                "--init",
                "--depth",
                "1",
                "vllm_fork",
            ],
            env={"GIT_TERMINAL_PROMPT": "0"},
            check=False,
            capture=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        res = None
    if res is not None and res.returncode == 0:
        head = git("rev-parse", "HEAD")
        if head != CONFIG["commit"]:
            die(f"submodule is at {head}, expected {CONFIG['commit']}")
        git("tag", "-f", CONFIG["tag"], "HEAD")
        git("update-ref", BASE_REF, "HEAD")
        git("checkout", "-q", "-B", "main")
        return True
    log("submodule not reachable; falling back to the PyPI sdist")
    shutil.rmtree(ROOT / ".git" / "modules" / "vllm_fork", ignore_errors=True)
    if FORK.exists():
        for child in FORK.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    return False


def _unpack_sdist(dest: Path) -> tuple[Path, int]:
    """Download (cached, sha256-checked) and safely extract the pinned sdist
    into dest; check that its _version.py names the pinned commit. Returns the
    source folder and the sdist's PKG-INFO mtime."""
    sdist = fetch_sdist(sha256=CONFIG["sdist_sha256"])
    top = f"vllm-{CONFIG['version']}"
    try:
        extract_tar(sdist, dest)
        with tarfile.open(sdist) as tar:
            mtime = tar.getmember(f"{top}/PKG-INFO").mtime
    except (UnsafeArchive, tarfile.TarError, KeyError) as e:
        die(f"{sdist.name}: refusing to extract: {e}")
    src = dest / top
    version_py = (src / "vllm" / "_version.py").read_text()
    m = re.search(r"commit_id\s*=\s*'g([0-9a-f]+)'", version_py)
    if not m or not CONFIG["commit"].startswith(m.group(1)):
        die(f"sdist vllm/_version.py does not name commit {CONFIG['commit']}")
    log(
        f"sdist vllm/_version.py names commit g{m.group(1)} (pinned "
        f"{CONFIG['commit'][:12]}): ok"
    )
    return src, mtime


def _init_from_sdist() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, mtime = _unpack_sdist(Path(tmp))
        shutil.rmtree(src / "vllm.egg-info", ignore_errors=True)
        FORK.mkdir(exist_ok=True)
        if any(FORK.iterdir()):
            die("vllm_fork/ is not empty; remove it or run with --force")
        for child in src.iterdir():
            shutil.move(str(child), FORK / child.name)
    git("init", "-q", "-b", "main")
    date = f"@{mtime} +0000"
    git("add", "-A")
    git(
        "commit",
        "-q",
        "--no-verify",
        "-m",
        f"vLLM {CONFIG['version']} release tree (PyPI sdist)\n\n"
        f"Upstream-Commit: {CONFIG['commit']}\n"
        f"Sdist-SHA256: {CONFIG['sdist_sha256']}\n",
        env={
            "GIT_AUTHOR_NAME": "vLLM release",
            "GIT_AUTHOR_EMAIL": "noreply@vllm.ai",
            "GIT_AUTHOR_DATE": date,
            "GIT_COMMITTER_DATE": date,
        },
    )
    git("tag", "-f", CONFIG["tag"], "HEAD")
    git("update-ref", BASE_REF, "HEAD")


def cmd_init(args) -> None:
    if fork_ready() and not args.force:
        log(f"vllm_fork/ already initialized (base {git('rev-parse', BASE_REF)[:12]})")
        return
    if args.force and FORK.exists():
        shutil.rmtree(FORK)
        FORK.mkdir()
    if args.sdist or not _try_submodule():
        _init_from_sdist()
    exclude = FORK / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text("\n".join(FORK_EXCLUDES) + "\n")
    log(f"vllm_fork/ base {git('rev-parse', BASE_REF)[:12]} tagged {CONFIG['tag']}")


# ---------------------------------------------------------------- apply/export


def _series_head() -> str:
    """The fork's last commit of the default series (the add-on is on top)."""
    commits = git("rev-list", "--reverse", f"{BASE_REF}..HEAD").split()
    in_addon = [ADDON_TRAILER in git("log", "-1", "--format=%B", c) for c in commits]
    first = in_addon.index(True) if True in in_addon else len(commits)
    if not all(in_addon[first:]):
        die(f"commits with '{ADDON_TRAILER}' must come after the default series")
    return commits[first - 1] if first else git("rev-parse", BASE_REF)


def _format_patch(dest: Path, revs: str) -> list[str]:
    out = git(*FORMAT_PATCH, "-o", str(dest), revs)
    return [Path(line).name for line in out.splitlines() if line.strip()]


def _export_to(dest: Path) -> tuple[list[str], list[str]]:
    """Export the default series into dest, the add-on into dest/core-addon."""
    head = _series_head()
    names = _format_patch(dest, f"{BASE_REF}..{head}")
    addon = _format_patch(dest / ADDON.name, f"{head}..HEAD")
    return names, addon


def _diff_dirs(a: Path, a_names: list[str], b: Path, b_names: list[str]) -> bool:
    if a_names != b_names:
        return True
    return any(not filecmp.cmp(a / n, b / n, shallow=False) for n in a_names)


def cmd_apply(args) -> None:
    if not fork_ready():
        die("vllm_fork/ is not initialized; run: python3 ci/fork.py init")
    base = git("rev-parse", BASE_REF)
    head = git("rev-parse", "HEAD")
    patches = series_files() + addon_files()
    if head != base and not args.force:
        with tempfile.TemporaryDirectory() as tmp:
            names, addon = _export_to(Path(tmp))
            if _differs(Path(tmp), names, addon):
                die(
                    "the fork has commits that differ from patches/; run "
                    "'python3 ci/fork.py export' first, or 'apply --force' to drop them"
                )
    if (FORK / ".git" / "rebase-apply").exists():
        git("am", "--abort", check=False)
    git("checkout", "-q", "-B", "main", base)
    git("reset", "-q", "--hard", base)
    if not patches:
        log("no patches in series")
        return
    am = ["am", "-q", "--keep-non-patch", "--committer-date-is-author-date"]
    am.append("--3way" if args.three_way else "--no-3way")
    res = run(
        ["git", *am, *map(str, patches)],
        cwd=FORK,
        env=GIT_ENV,
        check=False,
        capture=True,
    )
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        die("git am failed; fix the patch in vllm_fork/ (git am --continue) and export")
    log(f"applied {len(patches)} patch(es); fork HEAD {git('rev-parse', 'HEAD')[:12]}")


def _differs(tmp: Path, names: list[str], addon: list[str]) -> bool:
    return _diff_dirs(tmp, names, PATCHES, [p.name for p in series_files()]) or (
        _diff_dirs(tmp / ADDON.name, addon, ADDON, [p.name for p in addon_files()])
    )


def _write_series(folder: Path, names: list[str]) -> None:
    (folder / "series").write_text(
        "# Order in which the patches apply (git am); one file name a line.\n"
        + "".join(f"{n}\n" for n in names)
    )


def cmd_export(args) -> None:
    if not fork_ready():
        die("vllm_fork/ is not initialized; run: python3 ci/fork.py init")
    with tempfile.TemporaryDirectory() as tmp:
        names, addon = _export_to(Path(tmp))
        for old in series_files() + addon_files():
            old.unlink(missing_ok=True)
        ADDON.mkdir(exist_ok=True)
        for n in names:
            shutil.copyfile(Path(tmp) / n, PATCHES / n)
        for n in addon:
            shutil.copyfile(Path(tmp) / ADDON.name / n, ADDON / n)
    _write_series(PATCHES, names)
    _write_series(ADDON, addon)
    log(
        f"exported {len(names)} patch(es) to {PATCHES.relative_to(ROOT)}/ and "
        f"{len(addon)} to {ADDON.relative_to(ROOT)}/"
    )


def cmd_series_tree(args) -> None:
    if not fork_ready():
        die("vllm_fork/ is not initialized; run: python3 ci/fork.py init")
    head = _series_head()
    git("worktree", "remove", "--force", str(SERIES_TREE), check=False)
    shutil.rmtree(SERIES_TREE, ignore_errors=True)
    git("worktree", "prune")
    git("worktree", "add", "-q", "--detach", str(SERIES_TREE), head)
    log(f"{SERIES_TREE.name}/ at {head[:12]}: the default series without the add-on")


def cmd_check(args) -> None:
    """Fail when patches/ is not what the fork's commits export to."""
    if not fork_ready():
        die("vllm_fork/ is not initialized; run: python3 ci/fork.py init")
    with tempfile.TemporaryDirectory() as tmp:
        names, addon = _export_to(Path(tmp))
        if _differs(Path(tmp), names, addon):
            run(
                [
                    "diff",
                    "-ruN",
                    "-x",
                    "series",
                    "-x",
                    "config.json",
                    "-x",
                    "*.md",
                    PATCHES,
                    tmp,
                ],
                check=False,
            )
            die(
                "patches/ is out of sync with vllm_fork/ (run: python3 ci/fork.py "
                "export, or apply to take patches/ into the fork)"
            )
    log(f"patches/ matches the fork ({len(names)} + {len(addon)} patch(es))")


# ---------------------------------------------------------------- install


def uv_bin() -> Path:
    """The uv that setup installs (.venv-tools/bin/uv)."""
    return VENV_TOOLS / "bin" / "uv"


def _uv() -> list[str]:
    """The project's uv, installed into .venv-tools on first use."""
    uv = uv_bin()
    if uv.exists():
        res = run([uv, "--version"], check=False, capture=True)
        if res.returncode == 0 and res.stdout.split()[1:2] == [UV_VERSION]:
            return [str(uv)]
    python = VENV_TOOLS / "bin" / "python"
    if not python.exists():
        log(f"creating {VENV_TOOLS.name} ({sys.executable} -m venv)")
        res = run([sys.executable, "-m", "venv", VENV_TOOLS], check=False, capture=True)
        if res.returncode != 0:
            shutil.rmtree(VENV_TOOLS, ignore_errors=True)
            sys.stderr.write(res.stdout + res.stderr)
            die(
                f"{sys.executable} -m venv failed; on Debian/Ubuntu install "
                "python3-venv (apt-get install python3-venv)"
            )
    log(f"installing uv=={UV_VERSION} into {VENV_TOOLS.name}")
    run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"uv=={UV_VERSION}",
        ]
    )
    return [str(uv)]


def _make_venv(path: Path, packages: list[str]) -> Path:
    uv = _uv()
    python = path / "bin" / "python"
    if not python.exists():
        run([*uv, "venv", "-q", "--python", sys.executable, path], env=UV_ENV)
    run([*uv, "pip", "install", "-q", "--python", python, *packages], env=UV_ENV)
    return python


def cmd_install(args) -> None:
    if not fork_ready():
        die("vllm_fork/ is not initialized; run: python3 ci/fork.py init")
    wheel = fetch_wheel()
    python = _make_venv(VENV, [str(wheel), *TEST_DEPS, *BUILD_DEPS])
    log("editable install of vllm_fork/ (VLLM_USE_PRECOMPILED=1)")
    run(
        [
            *_uv(),
            "pip",
            "install",
            "-q",
            "--python",
            python,
            "--no-build-isolation",
            "--no-deps",
            "-e",
            FORK,
        ],
        env={
            **UV_ENV,
            "VLLM_USE_PRECOMPILED": "1",
            "VLLM_PRECOMPILED_WHEEL_LOCATION": str(wheel),
            "SETUPTOOLS_SCM_PRETEND_VERSION": CONFIG["version"],
            "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_VLLM": CONFIG["version"],
        },
    )
    _report(python)


def cmd_install_stock(args) -> None:
    wheel = fetch_wheel()
    python = _make_venv(VENV_STOCK, [str(wheel), *TEST_DEPS])
    _report(python)


def cmd_install_lint(args) -> None:
    _make_venv(VENV_LINT, LINT_DEPS)
    log(f"{VENV_LINT.name}: {', '.join(LINT_DEPS)}")


def _report(python: Path) -> None:
    code = (
        "import importlib.metadata as m, vllm.distributed.kv_transfer.kv_connector"
        ".v1.p2p.p2p_nccl_connector as c; print(m.version('vllm'), c.__file__)"
    )
    out = run([python, "-c", code], capture=True).stdout.strip().splitlines()[-1]
    log(f"{python.parent.parent.name}: vllm {out}")


def cmd_install_tools(args) -> None:
    log(f"{VENV_TOOLS.name}: {' '.join(_uv())}")


def cmd_check_sdist(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _unpack_sdist(Path(tmp))


def cmd_fetch(args) -> None:
    log(f"sdist: {fetch_sdist(sha256=CONFIG['sdist_sha256'])}")
    log(f"wheel: {fetch_wheel()}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init", help="populate vllm_fork/")
    s.add_argument("--sdist", action="store_true", help="skip the submodule")
    s.add_argument("--force", action="store_true", help="recreate vllm_fork/")
    s.set_defaults(func=cmd_init)
    s = sub.add_parser("apply", help="git am patches/ onto the fork's base")
    s.add_argument("--force", action="store_true", help="drop unexported commits")
    s.add_argument("--3way", dest="three_way", action="store_true")
    s.set_defaults(func=cmd_apply)
    sub.add_parser("export", help="regenerate patches/").set_defaults(func=cmd_export)
    sub.add_parser("check", help="fail if patches/ is stale").set_defaults(
        func=cmd_check
    )
    sub.add_parser(
        "series-tree", help="the default series alone, in .series-tree/"
    ).set_defaults(func=cmd_series_tree)
    sub.add_parser(
        "install-tools", help=f"uv=={UV_VERSION} into .venv-tools"
    ).set_defaults(func=cmd_install_tools)
    sub.add_parser("install", help="editable fork into .venv").set_defaults(
        func=cmd_install
    )
    sub.add_parser("install-stock", help="stock wheel into .venv-stock").set_defaults(
        func=cmd_install_stock
    )
    sub.add_parser(
        "install-lint", help="vLLM's mypy/typos into .venv-lint"
    ).set_defaults(func=cmd_install_lint)
    sub.add_parser(
        "check-sdist", help="download, extract and check the sdist only"
    ).set_defaults(func=cmd_check_sdist)
    sub.add_parser("fetch", help="download sdist and wheel").set_defaults(
        func=cmd_fetch
    )
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
