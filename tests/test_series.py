"""The patch series applies where users apply it, and patches/ is not stale."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
import fork  # noqa: E402

STOCK_VENV = ROOT / ".venv-stock"


def git_apply_check(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    patches = [str(p) for p in fork.series_files()]
    assert patches, "patches/series lists no patch"
    # Outside any repository, as in a user's site-packages: do not let git find
    # this project's repository above cwd.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.parent)}
    return subprocess.run(
        ["git", "apply", "--check", *extra, *patches],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_series_is_exported_from_fork():
    if not fork.fork_ready():
        pytest.skip("vllm_fork/ not initialized (bash ci/setup.sh)")
    res = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "fork.py"), "check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_patches_carry_sign_off_and_removal_condition():
    for patch in fork.series_files():
        text = patch.read_text()
        header = text.split("\ndiff --git ", 1)[0]
        assert "\nSigned-off-by: " in header, f"{patch.name}: no DCO sign-off"
        assert "\nRemove-When: " in header, f"{patch.name}: no Remove-When"
        assert "\nUpstream-Status: " in header, f"{patch.name}: no Upstream-Status"


def test_series_applies_to_release_tree(tmp_path):
    sdist = fork.fetch_sdist(sha256=fork.CONFIG["sdist_sha256"])
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="tar")
    tree = tmp_path / f"vllm-{fork.CONFIG['version']}"
    res = git_apply_check(tree)
    assert res.returncode == 0, res.stderr


def test_series_applies_in_installed_site_packages():
    """As a user would: git apply inside site-packages, vllm/ files only."""
    python = STOCK_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-stock missing (bash ci/setup.sh)")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site = Path(purelib)
    assert (site / "vllm" / "distributed").is_dir()
    # --check writes nothing: run it in the real site-packages.
    res = git_apply_check(site, "--include=vllm/*")
    assert res.returncode == 0, res.stderr
