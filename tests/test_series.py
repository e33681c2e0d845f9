"""The patch series applies where users apply it, and patches/ is not stale."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
import fork  # noqa: E402

STOCK_VENV = ROOT / ".venv-stock"


def git_apply(cwd: Path, patches: list[Path], *extra: str) -> None:
    """git apply each patch in order, as a user would, outside any repository."""
    assert patches, "patches/series lists no patch"
    # Do not let git find this project's repository above cwd.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.parent)}
    for patch in patches:
        res = subprocess.run(
            ["git", "apply", *extra, str(patch)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, f"{patch.name}: {res.stderr}"


def touched_files(patches: list[Path]) -> set[str]:
    return {
        line[len("+++ b/") :]
        for patch in patches
        for line in patch.read_text().splitlines()
        if line.startswith("+++ b/")
    }


def test_series_is_exported_from_fork():
    if not fork.fork_ready():
        pytest.skip("vllm_fork/ not initialized (bash ci/setup.sh)")
    res = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "fork.py"), "check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_default_series_changes_only_the_connector_and_tests():
    """vLLM core changes go into the opt-in core add-on."""
    p2p = "vllm/distributed/kv_transfer/kv_connector/v1/p2p/"
    allowed = {p2p + "p2p_nccl_connector.py", p2p + "p2p_nccl_engine.py"}
    vllm_files = {
        f for f in touched_files(fork.series_files()) if not f.startswith("tests/")
    }
    assert vllm_files <= allowed
    assert any(f.startswith("vllm/v1/core/") for f in touched_files(fork.addon_files()))


def test_series_and_addon_apply_to_release_tree(tmp_path):
    sdist = fork.fetch_sdist(sha256=fork.CONFIG["sdist_sha256"])
    fork.extract_tar(sdist, tmp_path)
    tree = tmp_path / f"vllm-{fork.CONFIG['version']}"
    git_apply(tree, fork.series_files() + fork.addon_files())


def test_patches_carry_sign_off_and_removal_condition():
    for patch in fork.series_files() + fork.addon_files():
        text = patch.read_text()
        header = text.split("\ndiff --git ", 1)[0]
        assert "\nSigned-off-by: " in header, f"{patch.name}: no DCO sign-off"
        assert "\nRemove-When: " in header, f"{patch.name}: no Remove-When"
        assert "\nUpstream-Status: " in header, f"{patch.name}: no Upstream-Status"


def test_series_applies_to_release_tree(tmp_path):
    sdist = fork.fetch_sdist(sha256=fork.CONFIG["sdist_sha256"])
    fork.extract_tar(sdist, tmp_path)  # safe on Pythons without tarfile filters
    tree = tmp_path / f"vllm-{fork.CONFIG['version']}"
    git_apply(tree, fork.series_files()[:1], "--check")  # the fix alone
    git_apply(tree, fork.series_files())


def test_series_applies_in_installed_site_packages(tmp_path):
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
    patches = fork.series_files()
    # --check writes nothing: the first patch is checked in the real site.
    git_apply(site, patches[:1], "--check", "--include=vllm/*")
    # The whole series, in order, on a copy of the files it touches.
    copy = tmp_path / "site-packages"
    for rel in touched_files(patches):
        if rel.startswith("vllm/"):
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(site / rel, copy / rel)
    git_apply(copy, patches, "--include=vllm/*")
