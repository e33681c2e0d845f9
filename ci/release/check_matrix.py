#!/usr/bin/env python3
"""Check the P2pNcclConnector patch series against every affected vLLM release.

patches/index.json maps each version to its series file (relative to
patches/; patch names in a series are relative to the series file's folder).
For each version: get the PyPI sdist (cache, else download; sha256 pinned
below), extract only the members the check needs into a temporary tree,
``git apply`` the series one patch after the other, then

  compile    ``python -m py_compile`` every .py file the series touches
  ruff       ``ruff check`` and ``ruff format --check`` on those files, run from
             the tree root so that the release's own pyproject.toml applies
  envs       every ``envs.NAME`` the touched files use is defined in that
             release's vllm/envs.py (``vllm.envs.__getattr__`` raises
             AttributeError for unknown names, which compile and ruff miss)
  attrs      every attribute and ``from vllm... import`` name the touched
             files use (and do not define themselves) that vLLM 0.23.0's
             vllm/ sources define is defined in this release's vllm/ sources
             too. Catches a port that uses what the release does not have
             (``request.async_tokens_to_discard`` before 0.22.0), which fails
             only at runtime with AttributeError. A heuristic: "defined" means
             assigned (``x.name =``, ``name =``, ``name:``), ``def`` or
             ``class`` somewhere under vllm/, not on the right class; names
             from torch, zmq or the standard library are not checked.
  fix alone  the same five checks on a fresh tree with only the fix: the
             series' first patch, plus the patches a ``# fix-alone:`` line of
             the series file names (a backport's release adaptations, as they
             apply right after the first patch)

Prints ``version | series | apply | compile | ruff | envs | attrs | fix alone
| result`` and exits 1 if any version failed.

Run from the project root:  .venv/bin/python ci/release/check_matrix.py
  [--versions 0.22.1 0.23.0] [--patches DIR] [--jobs N] [--keep] [--full]
  [--offline] [-q]
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci"))
from fork import sha256_file  # noqa: E402

PATCHES = ROOT / "patches"
CACHE = Path(os.environ.get("P2P_FIX_CACHE", Path.home() / ".cache" / "vllm-p2p-fix"))
SDIST_CACHE = CACHE / "sdist"
EXTRACT_CACHE = CACHE / "members"
PYPI_SIMPLE = os.environ.get("P2P_FIX_PYPI_SIMPLE", "https://pypi.org/simple")

# Affected releases with an sdist on PyPI (0.15.x has none), sdist sha256.
SDIST_SHA256 = {
    "0.14.0": "ed86c6a9d22fbfd059648794493cad88444c71688f3ff6efcb26c5ca353f0e5d",
    "0.14.1": "c7c6d0a729d29e70ac10baacbc7186930da24f8ae34f60451330527ff0be84ac",
    "0.16.0": "1f684bb31fbef59d862e2fe666e23a41f1d39d93f86215ce1ce1db89a8f5665b",
    "0.17.0": "b0b62e58ef4eb633ef371f2726976372cf6dfcb7ff2ea9ddf7194c1930d5629a",
    "0.17.1": "d26a95dcb92e2ff78ed4b48bff247d845b0c768edf6c0acf2401376a56c57b61",
    "0.18.0": "9a1bee091db8dbb4664a2a09cd9c61912e9912a44af1ce12b8593a231d05971c",
    "0.18.1": "8d18eff1c4ed21eb8cf7a45a1d1b34752d5ec287e79186e451d5c2f797cacdb7",
    "0.19.0": "81e59cf87175e7a62eb8d9acf5989484bbd17089d5eface353f89067bda282d9",
    "0.19.1": "9fb88ce6b50991eba41d183584f65f51d7f6015d86a42cdabf79c1c8bd5d66fa",
    "0.20.0": "a6d50152936ee292455af3ffbe359f7a284ac43bf3b68caccf29f368e196cc72",
    "0.20.1": "778df065237704d51e8b4cc95bcc6f6a0c2317f13feb38295de3ce76146bf140",
    "0.20.2": "58809377798c5335c6e2fe30092abda54d9200b5b8a717b3735a63f5daa0e383",
    "0.21.0": "05ff89c3e926b88b77d7878e317a659ffba678afc21c1d48952037aa5457f058",
    "0.22.0": "6d41581a9e5288cd69278518a550c6d7ce510ae27a506556a3427d01284be7fe",
    "0.22.1": "cd34902729f3767e3dfbb391956b2986bc638a54be9893e78bda9cc55669f15c",
    "0.23.0": "760269db3d9611e12e524681df1bca0977d5d2f5fcb4481cc34d33efc4ae7ff5",
}
VERSIONS = list(SDIST_SHA256)
# Extracted besides the touched files and the __init__.py of every folder
# above them (ruff's isort needs the package chain to classify first-party
# imports): ruff config and the envs registry.
EXTRA_MEMBERS = ["pyproject.toml", "ruff.toml", ".ruff.toml", "vllm/envs.py"]
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
}
ENVS_REF = re.compile(r"\benvs\.([A-Z][A-Z0-9_]*)\b")
# What "defines" a name for the attrs check: x.name = / name = / name: ... =,
# an annotated field (name: T), def name, class name.
DEFINES = re.compile(
    r"\.([A-Za-z_]\w*)\s*(?::[^=\n]*)?=(?!=)"
    r"|^\s*([A-Za-z_]\w*)\s*(?::[^=\n]*)?=(?!=)"
    r"|^\s*([A-Za-z_]\w*)\s*:\s*[^=\n]+$"
    r"|\bdef\s+([A-Za-z_]\w*)"
    r"|\bclass\s+([A-Za-z_]\w*)",
    re.M,
)
MAIN_VERSION = "0.23.0"
DEFINED_CACHE = CACHE / "defined"
FIX_ALONE = re.compile(r"^#\s*fix-alone:(.*)$", re.M)


def vkey(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.+-]", v))


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
    )


# ---------------------------------------------------------------- series


@dataclass
class Series:
    name: str  # relative to patches/
    patches: list[Path]
    fix_alone: list[Path]

    def touched(self) -> tuple[list[str], set[str]]:
        """(all paths in order, paths the series creates)."""
        paths: list[str] = []
        new: set[str] = set()
        for patch in self.patches:
            cur = None
            for line in patch.read_text(encoding="utf-8").splitlines():
                if m := re.match(r"^diff --git a/(\S+) b/(\S+)$", line):
                    cur = m.group(2)
                    if cur not in paths:
                        paths.append(cur)
                elif cur and line.startswith("new file mode"):
                    new.add(cur)
        return paths, new


def load_series(name: str, patches_dir: Path = PATCHES) -> Series:
    path = patches_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"series file patches/{name} does not exist")
    text = path.read_text()
    names = [ln.strip() for ln in text.splitlines() if ln.strip()[:1] not in ("", "#")]
    patches = [path.parent / n for n in names]
    missing = [str(p) for p in patches if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"patches/{name} lists missing files: {missing}")
    extra = [path.parent / n for m in FIX_ALONE.findall(text) for n in m.split()]
    missing = [str(p) for p in extra if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"patches/{name}: fix-alone names missing {missing}")
    return Series(name, patches, [*patches[:1], *extra])


def read_index(patches_dir: Path) -> dict[str, str]:
    index = patches_dir / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} does not exist (ci/release/backport.py)")
    return json.loads(index.read_text())


# ---------------------------------------------------------------- sdists


@functools.cache
def simple_index() -> dict[str, tuple[str, str | None]]:
    """sdist file name -> (url, sha256) from PyPI's simple index."""
    html = urllib.request.urlopen(f"{PYPI_SIMPLE}/vllm/", timeout=60).read().decode()
    out = {}
    for href in re.findall(r'href="([^"]+)"', html):
        url, _, frag = href.replace("&amp;", "&").partition("#")
        name = url.rsplit("/", 1)[-1]
        if name.endswith(".tar.gz"):
            out[name] = (
                url,
                frag.split("sha256=", 1)[1] if "sha256=" in frag else None,
            )
    return out


_index_lock = threading.Lock()


def fetch_sdist(version: str, offline: bool = False) -> tuple[Path, str]:
    """The cached sdist (downloaded if missing or corrupt) and its sha256.

    The sha256 is the pinned one, or for an unpinned version the one in PyPI's
    simple index.
    """
    name = f"vllm-{version}.tar.gz"
    dest = SDIST_CACHE / name
    want = SDIST_SHA256.get(version)
    if dest.exists():
        have = sha256_file(dest)
        if have == want or (want is None and offline):
            return dest, have
    if offline:
        raise RuntimeError(f"{name} is not cached (or corrupt) and --offline was given")
    with _index_lock:
        url, index_sha = simple_index().get(name, (None, None))
    if url is None:
        raise RuntimeError(f"{name} is not on {PYPI_SIMPLE}/vllm/")
    want = want or index_sha
    if dest.exists() and sha256_file(dest) == want:
        return dest, want
    print(f"[sdist] downloading {name}", file=sys.stderr, flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        have = sha256_file(tmp)
        if want and have != want:
            raise RuntimeError(f"{name}: sha256 {have}, expected {want}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest, have


def extract(sdist: Path, version: str, members: list[str], dest: Path, full: bool):
    """Extract ``members`` (paths in the release tree; all with ``full``).

    Members missing from the sdist are skipped (optional config files); a
    touched file that is missing makes ``git apply`` fail with its own message.
    """
    cmd = ["tar", "-xzf", sdist, "--strip-components=1", "-C", dest]
    if not full:
        cmd += ["--", *(f"vllm-{version}/{m}" for m in members)]
    res = run(cmd, cwd=dest)
    errors = [
        ln
        for ln in res.stderr.splitlines()
        if ln.strip()
        and "Not found in archive" not in ln
        and "Exiting with failure status" not in ln
    ]
    if errors:
        raise RuntimeError("tar -x failed:\n" + "\n".join(errors))


def prepare_tree(
    sdist: Path, sha: str, version: str, members: list[str], dest: Path, full=False
) -> None:
    """Fill ``dest`` with ``members`` of the sdist, through an extraction cache.

    Decompressing a 20-37 MB sdist is most of the run time, so the extracted
    members are kept under <cache>/members/vllm-<version>-<sha12>/ (with a
    manifest of the members asked for) and copied from there when a later run
    asks for no new member. ``full`` bypasses the cache.
    """
    if full:
        return extract(sdist, version, members, dest, full=True)
    cached = EXTRACT_CACHE / f"vllm-{version}-{sha[:12]}"
    manifest = cached / ".members.json"
    try:
        have = set(json.loads(manifest.read_text()))
    except (OSError, ValueError):
        have = set()
    if not set(members) <= have:
        EXTRACT_CACHE.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".vllm-{version}-", dir=EXTRACT_CACHE))
        try:
            want = sorted(have | set(members))
            extract(sdist, version, want, fresh, full=False)
            (fresh / ".members.json").write_text(json.dumps(want))
            old = cached.with_name(f"{cached.name}.old.{os.getpid()}")
            if cached.exists():
                cached.rename(old)
            fresh.rename(cached)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another run raced us: extract straight into dest
            return extract(sdist, version, members, dest, full=False)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(
        cached, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".members.json")
    )


# ---------------------------------------------------------------- checks


def defined_names(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in DEFINES.finditer(text)}


_defined_lock = threading.Lock()


@functools.cache
def release_defined(version: str, offline: bool) -> frozenset[str]:
    """The names the release's vllm/**/*.py define (DEFINES), cached on disk."""
    sdist, sha = fetch_sdist(version, offline)
    cached = DEFINED_CACHE / f"vllm-{version}-{sha[:12]}.json"
    with _defined_lock:
        try:
            return frozenset(json.loads(cached.read_text()))
        except (OSError, ValueError):
            pass
    names: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(
            [
                "tar",
                "-xzf",
                sdist,
                "--strip-components=1",
                "-C",
                tmp,
                "--wildcards",
                f"vllm-{version}/vllm/*.py",
            ],
            cwd=Path(tmp),
        )
        if res.returncode:
            raise RuntimeError(f"tar -x of {sdist.name} failed:\n{res.stderr}")
        for f in sorted(Path(tmp).rglob("*.py")):
            names |= defined_names(f.read_text(encoding="utf-8", errors="replace"))
    DEFINED_CACHE.mkdir(parents=True, exist_ok=True)
    part = cached.with_name(f"{cached.name}.{os.getpid()}.{threading.get_ident()}")
    part.write_text(json.dumps(sorted(names)))
    part.replace(cached)
    return frozenset(names)


def used_names(text: str) -> set[str]:
    """Attributes read (``x.a``, ``x.a += 1``), and names imported from vllm."""
    used: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            used.add(node.attr)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute):
            used.add(node.target.attr)
        elif (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module or "").split(".")[0] == "vllm"
        ):
            used.update(a.name for a in node.names if a.name != "*")
    return used


@functools.cache
def foreign_names() -> frozenset[str]:
    """Attributes of builtin types and of the libraries the connector uses.

    vLLM defines some of these names too (a ``def join``, a ``def discard``),
    so that they differ between releases says nothing about ``s.join()``.
    """
    import importlib

    objs: list = [str, bytes, list, dict, set, frozenset, tuple, int, float, object]
    objs += [type, BaseException]
    for mod, attrs in {
        "collections": ["deque", "OrderedDict", "defaultdict"],
        "threading": ["Thread", "Condition", "Lock", "Event"],
        "socket": ["socket"],
        "time": [],
        "os": [],
        "torch": ["Tensor", "cuda.Stream", "cuda.Event", "dtype", "device"],
        "zmq": ["Socket", "Context", "Poller"],
        "msgpack": [],
    }.items():
        try:  # only what this interpreter has
            module = importlib.import_module(mod)
        except ImportError:
            continue
        objs.append(module)
        for a in attrs:
            obj = module
            for part in a.split("."):
                obj = getattr(obj, part, None)
            if obj is not None:
                objs.append(obj)
    return frozenset(n for o in objs for n in dir(o))


def missing_names(tree: Path, py_files: list[str], version: str, opts) -> list[str]:
    """Names the files use that vLLM 0.23.0 defines and this release does not."""
    if version == MAIN_VERSION:
        return []
    main = release_defined(MAIN_VERSION, opts.offline) - foreign_names()
    release = release_defined(version, opts.offline)
    missing = []
    for p in py_files:
        text = (tree / p).read_text()
        try:
            used = used_names(text)
        except SyntaxError:  # reported by compile
            continue
        # x.a += 1 reads x.a: it defines nothing.
        own = defined_names(re.sub(r"\.\w+\s*[-+*/|&^%@]+=", "", text))
        gone = (used - own) & main - release
        missing += [f"{n} ({p})" for n in sorted(gone)]
    return missing


def ruff_cmd() -> list[str]:
    local = Path(sys.executable).parent / "ruff"
    if local.exists():
        return [str(local)]
    return ["ruff"] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]


def add_imported_modules(tree: Path, py_files: list[str], sdist, version: str):
    """Extract the release's modules that the files import from their packages.

    ruff's isort counts ``from vllm.x.y import z`` as first-party only when
    vllm/x/y(.py) exists, so a partial tree would give false I001 reports.
    """
    packages = {Path(p).parts[0] for p in py_files}
    want = []
    for p in py_files:
        try:
            nodes = ast.walk(ast.parse((tree / p).read_text()))
        except SyntaxError:  # reported by compile
            continue
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for n in names:
                if n.split(".")[0] in packages:
                    base = n.replace(".", "/")
                    want += [f"{base}.py", f"{base}/__init__.py"]
    want = [m for m in dict.fromkeys(want) if not (tree / m).exists()]
    if want:
        with tempfile.TemporaryDirectory() as aux:
            prepare_tree(*sdist, version, want, Path(aux))
            for m in want:
                if (Path(aux) / m).is_file():
                    (tree / m).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(aux) / m, tree / m)


def check_tree(
    version: str, patches: list[Path], sdist: tuple[Path, str], opts, tag: str
) -> tuple[dict[str, str], list[str]]:
    """Apply ``patches`` in order to a fresh tree of the release and check it.

    Returns ({apply, compile, ruff, envs: "ok" | "failed" | "-"}, details).
    """
    steps = dict.fromkeys(("apply", "compile", "ruff", "envs", "attrs"), "-")
    details: list[str] = []

    def fail(step: str, text: str) -> None:
        steps[step] = "failed"
        details.append(f"[{tag}{step}]\n{text.rstrip()}")

    paths, new = Series("", patches, []).touched()
    py_files = [p for p in paths if p.endswith(".py")]
    members = [p for p in paths if p not in new] + [
        f"{parent.as_posix()}/__init__.py"
        for p in py_files
        for parent in Path(p).parents
        if parent != Path(".")
    ]
    tmp = Path(tempfile.mkdtemp(prefix=f"vllm-{version}-"))
    try:
        prepare_tree(
            *sdist,
            version,
            list(dict.fromkeys(members + EXTRA_MEMBERS)),
            tmp,
            opts.full,
        )
        # Never let git pick up an enclosing repository around the temp dir.
        env = {**GIT_ENV, "GIT_CEILING_DIRECTORIES": str(tmp.parent)}
        for patch in patches:
            r = run(["git", "apply", "--whitespace=nowarn", patch], cwd=tmp, env=env)
            if r.returncode != 0:
                fail("apply", f"{patch.name}:\n{r.stdout}{r.stderr}")
                return steps, details
        steps["apply"] = "ok"
        if not opts.full:
            add_imported_modules(tmp, py_files, sdist, version)

        r = run(
            [sys.executable, "-m", "py_compile", *py_files],
            cwd=tmp,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
        )
        if r.returncode:
            fail("compile", r.stdout + r.stderr)
        else:
            steps["compile"] = "ok"

        out = []
        for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
            r = run([*ruff_cmd(), *args, *py_files], cwd=tmp)
            if r.returncode:
                out.append(f"$ ruff {' '.join(args)}\n{r.stdout}{r.stderr}")
        if out:
            fail("ruff", "\n".join(out))
        else:
            steps["ruff"] = "ok"

        envs_py = tmp / "vllm" / "envs.py"
        known = set(
            re.findall(r'^\s*"([A-Z][A-Z0-9_]*)"\s*:', envs_py.read_text(), re.M)
        )
        missing = sorted(
            f"envs.{n} ({p})"
            for p in py_files
            for n in set(ENVS_REF.findall((tmp / p).read_text()))
            if n not in known
        )
        if missing:
            fail("envs", "not in this release's vllm/envs.py: " + ", ".join(missing))
        else:
            steps["envs"] = "ok"

        missing = missing_names(tmp, py_files, version, opts)
        if missing:
            fail(
                "attrs",
                f"used, defined in vLLM {MAIN_VERSION}'s vllm/ but nowhere in this "
                "release's: " + ", ".join(missing),
            )
        else:
            steps["attrs"] = "ok"
        return steps, details
    finally:
        if opts.keep:
            details.append(f"[{tag}tree kept] {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Result:
    version: str
    series: str
    steps: dict[str, str] = field(default_factory=dict)
    fix_alone: str = "-"
    result: str = "failed"
    details: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        keys = ("apply", "compile", "ruff", "envs", "attrs")
        s = [self.steps.get(k, "-") for k in keys]
        return [self.version, self.series, *s, self.fix_alone, self.result]


def check_version(version: str, series_name: str | None, opts) -> Result:
    res = Result(version, series_name or "-")
    try:
        if series_name is None:
            raise LookupError("not in patches/index.json")
        series = load_series(series_name, opts.patches)
        sdist = fetch_sdist(version, opts.offline)
        res.steps, details = check_tree(version, series.patches, sdist, opts, "")
        res.details += details
        fix, details = check_tree(version, series.fix_alone, sdist, opts, "fix alone: ")
        res.details += details
        bad = [k for k, v in fix.items() if v == "failed"]
        res.fix_alone = f"{bad[0]} failed" if bad else "ok"
        ok = all(v == "ok" for v in [*res.steps.values(), *fix.values()])
        res.result = "ok" if ok else "failed"
    except Exception as e:  # noqa: BLE001 - report, do not abort the matrix
        res.details.append(f"[error] {type(e).__name__}: {e}")
    return res


def print_table(results: list[Result]) -> None:
    cols = ["version", "series", "apply", "compile", "ruff", "envs", "attrs"]
    cols.append("fix alone")
    cols.append("result")
    rows = [r.row() for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*cols).rstrip())
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row).rstrip())


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--versions", nargs="+", metavar="V", help="default: all")
    p.add_argument("--jobs", type=int, default=min(16, (os.cpu_count() or 4) * 2))
    p.add_argument("--keep", action="store_true", help="keep the extracted trees")
    p.add_argument("--full", action="store_true", help="extract whole sdists")
    p.add_argument("--offline", action="store_true", help="cached sdists only")
    p.add_argument(
        "--patches",
        type=Path,
        default=PATCHES,
        metavar="DIR",
        help="folder holding index.json (default: patches/)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="table only")
    opts = p.parse_args()
    opts.patches = opts.patches.resolve()

    t0 = time.monotonic()
    index = read_index(opts.patches)
    versions = opts.versions or sorted(set(VERSIONS) | set(index), key=vkey)
    with ThreadPoolExecutor(opts.jobs) as pool:
        results = list(
            pool.map(lambda v: check_version(v, index.get(v), opts), versions)
        )

    if not opts.quiet:
        ruff = run([*ruff_cmd(), "--version"], cwd=ROOT).stdout.strip()
        print(f"[matrix] {len(versions)} version(s); {ruff}")
    print_table(results)
    failed = [r for r in results if r.result != "ok"]
    if not opts.quiet:
        for r in results:
            if r.details and (r.result != "ok" or opts.keep):
                print(f"\n== {r.version} ({r.series})\n" + "\n".join(r.details))
        print(
            f"\n[matrix] {len(results) - len(failed)}/{len(results)} ok, "
            f"{len(failed)} failed in {time.monotonic() - t0:.1f}s"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
