"""ci/apply_installed.py on a real vLLM wheel install (a fresh venv in tmp)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "ci" / "apply_installed.py"
sys.path.insert(0, str(ROOT / "ci"))
import apply_installed  # noqa: E402
import fork  # noqa: E402

CONNECTOR = "vllm/distributed/kv_transfer/kv_connector/v1/p2p/p2p_nccl_connector.py"


def touched(patches: list[Path]) -> set[str]:
    """Every vllm/ file the patches change."""
    return {
        line.split()[2][2:]
        for patch in patches
        for line in patch.read_text().splitlines()
        if line.startswith("diff --git a/vllm/")
    }


TOUCHED = touched(fork.series_files())
ADDON_TOUCHED = touched(fork.addon_files())
PROBE_FILE = "vllm/p2p_fix_probe.py"  # a file only the test series creates
# The session fixture's install takes the first test's time.
pytestmark = pytest.mark.timeout(300)


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def hashes(site: Path) -> dict[str, str]:
    """sha256 of every file of the vllm package and its dist-info."""
    return {
        str(p.relative_to(site)): hashlib.sha256(p.read_bytes()).hexdigest()
        for top in site.glob("vllm*")
        for p in top.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


class Venv:
    def __init__(self, python: Path, site: Path):
        self.python, self.site = python, site
        self.metadata = next(site.glob("vllm-*.dist-info")) / "METADATA"
        self.saved = {
            rel: (site / rel).read_bytes()
            for rel in (*TOUCHED, *ADDON_TOUCHED, self.metadata)
        }
        self.stock = hashes(site)

    def tool(self, *args) -> subprocess.CompletedProcess:
        return run(sys.executable, TOOL, "--python", self.python, *args)

    def reset(self) -> None:
        for rel, data in self.saved.items():
            (self.site / rel).write_bytes(data)
        (self.site / PROBE_FILE).unlink(missing_ok=True)

    def changed(self) -> set[str]:
        now = hashes(self.site)
        return {
            f for f in now.keys() | self.stock.keys() if now.get(f) != self.stock.get(f)
        }


@pytest.fixture(scope="session")
def uv() -> Path:
    """The uv that ci/setup.sh installed, not one that happens to be on PATH."""
    if not fork.uv_bin().exists():
        pytest.fail(f"{fork.uv_bin()} is missing; run: bash ci/setup.sh")
    return fork.uv_bin()


@pytest.fixture(scope="session")
def stock_venv(tmp_path_factory, uv) -> Venv:
    wheel = fork.fetch_wheel()
    venv = tmp_path_factory.mktemp("apply_installed") / "venv"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1"}
    for cmd in (
        [uv, "venv", "-q", "--python", sys.executable, venv],
        # copy, not hardlink: the tests edit files that uv's cache would share
        [
            uv,
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--link-mode",
            "copy",
            "--python",
            venv / "bin" / "python",
            wheel,
        ],
    ):
        res = run(*cmd, env=env)
        assert res.returncode == 0, res.stderr
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Venv(python, Path(run(python, "-c", purelib).stdout.strip()))


@pytest.fixture
def venv(stock_venv: Venv):
    """The stock install, put back to stock after each test."""
    yield stock_venv
    stock_venv.reset()


def test_check_on_stock_writes_nothing(venv):
    res = run(venv.python, TOOL, "--check")  # default: the interpreter running it
    assert res.returncode == 0, res.stderr
    assert "is stock" in res.stdout and CONNECTOR in res.stdout
    assert venv.changed() == set()


def test_apply_changes_only_the_touched_files(venv):
    compile_ = f"import py_compile; py_compile.compile({str(venv.site / CONNECTOR)!r})"
    assert run(venv.python, "-c", compile_).returncode == 0
    pycache = (venv.site / CONNECTOR).parent / "__pycache__"
    assert list(pycache.glob("p2p_nccl_connector.*.pyc"))
    res = venv.tool()
    assert res.returncode == 0, res.stderr
    assert "applied the fix" in res.stdout
    assert "def get_transfer_id(" in (venv.site / CONNECTOR).read_text()
    assert venv.changed() == TOUCHED
    assert not list(pycache.glob("p2p_nccl_connector.*.pyc"))  # stale cache gone
    assert "is patched" in venv.tool("--check", "--revert").stdout


def test_core_addon_applies_and_reverts_with_the_series(venv):
    assert "vllm/v1/core/sched/scheduler.py" in ADDON_TOUCHED - TOUCHED
    res = venv.tool("--core-addon")
    assert res.returncode == 0, res.stderr
    assert venv.changed() == TOUCHED | ADDON_TOUCHED
    # The series alone no longer reverses: the add-on goes with it.
    assert venv.tool("--revert").returncode == 2
    assert venv.tool("--revert", "--core-addon").returncode == 0
    assert venv.changed() == set()


def test_core_addon_of_a_release_without_one_is_an_error(venv):
    text = venv.metadata.read_text()
    venv.metadata.write_text(text.replace("\nVersion: 0.23.0\n", "\nVersion: 0.22.1\n"))
    res = venv.tool("--core-addon", "--check")
    assert res.returncode == 2
    assert "the core add-on: vLLM 0.22.1 is not supported" in res.stderr


def test_apply_twice_is_an_error(venv):
    assert venv.tool().returncode == 0
    res = venv.tool()
    assert res.returncode == 2
    assert "already applied" in res.stderr and len(res.stderr.splitlines()) == 1
    assert venv.tool("--check").returncode == 2


def test_revert_restores_stock_bytes(venv):
    assert venv.tool().returncode == 0
    res = venv.tool("--revert")
    assert res.returncode == 0, res.stderr
    assert venv.changed() == set()


def test_revert_on_stock_is_an_error(venv):
    res = venv.tool("--revert")
    assert res.returncode == 2
    assert "not applied" in res.stderr
    assert venv.changed() == set()


def test_unsupported_version_lists_supported(venv):
    text = venv.metadata.read_text()
    venv.metadata.write_text(text.replace("\nVersion: 0.23.0\n", "\nVersion: 0.13.0\n"))
    res = venv.tool()
    assert res.returncode == 2
    assert "0.13.0 is not supported" in res.stderr and "0.23.0" in res.stderr
    assert venv.changed() == {str(venv.metadata.relative_to(venv.site))}


def test_index_picks_the_series_of_the_version(venv, tmp_path):
    patches = tmp_path / "patches"
    nested = patches / "backport" / "stable"  # patch names relative to the series
    nested.mkdir(parents=True)
    for patch in fork.series_files():
        shutil.copy(patch, nested / patch.name)
    names = "\n".join(p.name for p in fork.series_files())
    (nested / "series").write_text(f"# comment\n{names}\n")
    (patches / "index.json").write_text(
        '{"0.23.0": "backport/stable/series", "0.9.1": "none", "0.22.1": "none"}'
    )
    res = venv.tool("--check", "--patches-dir", patches)
    assert res.returncode == 0, res.stderr
    assert f"backport/stable/series ({len(fork.series_files())} patches)" in res.stdout
    venv.metadata.write_text(
        venv.metadata.read_text().replace("\nVersion: 0.23.0\n", "\nVersion: 0.13.0\n")
    )
    res = venv.tool("--patches-dir", patches)
    assert res.returncode == 2
    assert "(supported: 0.9.1, 0.22.1, 0.23.0)" in res.stderr


def test_not_installed(tmp_path, uv):
    res = run(uv, "venv", "-q", "--python", sys.executable, tmp_path / "bare")
    assert res.returncode == 0, res.stderr
    res = run(sys.executable, TOOL, "--python", tmp_path / "bare" / "bin" / "python")
    assert res.returncode == 2
    assert "vLLM is not installed" in res.stderr


def test_local_modification_is_refused_untouched(venv):
    path = venv.site / CONNECTOR
    stock = path.read_text()
    # A line that patch 0001 removes; the edit makes it neither stock nor patched.
    line = "            request_id = request.request_id\n"
    assert line in stock
    path.write_text(stock.replace(line, line.rstrip("\n") + "  # local\n", 1))
    before = hashes(venv.site)
    for args in ((), ("--revert",), ("--check",)):
        res = venv.tool(*args)
        assert res.returncode == 2
        assert "matches neither stock nor patched" in res.stderr
        assert hashes(venv.site) == before


def write_series(tmp_path: Path, second_patch: str) -> Path:
    """patches/series: the real first patch, then SECOND_PATCH (no index.json)."""
    first = fork.series_files()[0]
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copy(first, patches / first.name)
    (patches / "0002-test.patch").write_text(second_patch)
    (patches / "series").write_text(f"# test series\n{first.name}\n0002-test.patch\n")
    return patches


def test_mid_series_failure_writes_nothing(venv, tmp_path):
    broken = (
        f"diff --git a/{CONNECTOR} b/{CONNECTOR}\n--- a/{CONNECTOR}\n"
        f"+++ b/{CONNECTOR}\n@@ -1 +1 @@\n-no such line\n+never applied\n"
    )
    patches = write_series(tmp_path, broken)
    res = venv.tool("--patches-dir", patches)
    assert res.returncode == 2
    assert "0002-test.patch" in res.stderr
    assert venv.changed() == set()  # patch 0001 applied on the copy only


def test_failed_write_restores_originals(venv, tmp_path, monkeypatch):
    new_file = (
        f"diff --git a/{PROBE_FILE} b/{PROBE_FILE}\nnew file mode 100644\n"
        f"--- /dev/null\n+++ b/{PROBE_FILE}\n@@ -0,0 +1 @@\n+PROBE = 1\n"
    )
    patches = write_series(tmp_path, new_file)
    put = apply_installed.put

    def failing_put(src: Path, dst: Path) -> None:
        if dst.name == Path(PROBE_FILE).name and src.exists():
            raise OSError("disk full (simulated)")
        put(src, dst)

    monkeypatch.setattr(apply_installed, "put", failing_put)
    args = ["--python", str(venv.python), "--patches-dir", str(patches)]
    with pytest.raises(apply_installed.Error, match="installed files are unchanged"):
        apply_installed.main(args)
    assert venv.changed() == set()
    monkeypatch.undo()
    assert apply_installed.main(args) == 0
    assert venv.changed() == {CONNECTOR, PROBE_FILE}
    assert apply_installed.main([*args, "--revert"]) == 0
    assert venv.changed() == set()
