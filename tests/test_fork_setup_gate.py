"""ci/setup.sh stops at once, in one line, on a Python older than 3.10."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOO_OLD = [f"/root/.pyenv/versions/{v}/bin/python3" for v in ("3.9.18", "3.8.18")]
pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("python", TOO_OLD)
def test_setup_refuses_old_python(python, tmp_path):
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} is not on this machine")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").symlink_to(python)
    env = {"HOME": str(tmp_path), "PATH": f"{tmp_path}/bin:/usr/bin:/bin"}
    res = subprocess.run(
        ["bash", ROOT / "ci" / "setup.sh"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: error: python3 is 3."), lines
    assert "needs Python 3.10 to 3.14" in lines[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "bin"]  # nothing installed
