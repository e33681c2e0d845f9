"""ci/fork.py's sdist extraction on every Python the README promises (3.10+).

``tarfile``'s extraction filters exist only from 3.10.12 / 3.11.4 on; Debian
12's /usr/bin/python3 is 3.11.2. Each available interpreter extracts crafted
archives through ``fork.extract_tar``: the good one must come out whole, every
malicious one must stop with a clear error and write nothing outside.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)

INTERPRETERS = {
    "current": sys.executable,
    "debian12-system": "/usr/bin/python3",
    "oldest-3.10": "/root/.pyenv/versions/3.10.13/bin/python",
}

# Runs in the interpreter under test: extract each archive into its own
# folder and report what happened, one JSON line.
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fork
out = {"version": list(sys.version_info[:3])}
for archive, dest in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        fork.extract_tar(archive, dest)
        out[archive] = "ok"
    except fork.UnsafeArchive as e:
        out[archive] = "unsafe: " + str(e)
print(json.dumps(out))
"""


def _add(tar, name, kind=tarfile.REGTYPE, data=b"", linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _good(tar):
    _add(tar, "pkg-1.0", tarfile.DIRTYPE, mode=0o755)
    _add(tar, "pkg-1.0/PKG-INFO", data=b"Name: pkg\n")
    _add(tar, "pkg-1.0/bin/run.sh", data=b"#!/bin/sh\n", mode=0o755)
    _add(tar, "pkg-1.0/docs/link.md", tarfile.SYMTYPE, linkname="../PKG-INFO")
    _add(tar, "pkg-1.0/hard", tarfile.LNKTYPE, linkname="pkg-1.0/PKG-INFO")


# name -> (members added after a good file, words the error must contain)
MALICIOUS = {
    "absolute": ([("/tmp/evil", tarfile.REGTYPE, "")], "absolute"),
    "dotdot": ([("pkg-1.0/../../evil", tarfile.REGTYPE, "")], ".."),
    "symlink-abs": ([("pkg-1.0/l", tarfile.SYMTYPE, "/etc/passwd")], "link"),
    "symlink-out": ([("pkg-1.0/l", tarfile.SYMTYPE, "../../evil")], "link"),
    "hardlink-out": ([("pkg-1.0/h", tarfile.LNKTYPE, "../evil")], "link"),
    "through-symlink": (
        [
            ("pkg-1.0/up", tarfile.SYMTYPE, "."),
            ("pkg-1.0/up/x", tarfile.REGTYPE, ""),
        ],
        "symlink",
    ),
    "chardev": ([("pkg-1.0/null", tarfile.CHRTYPE, "")], "device"),
    "fifo": ([("pkg-1.0/pipe", tarfile.FIFOTYPE, "")], "device"),
}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("archives")
    paths = {}
    with tarfile.open(base / "good.tar.gz", "w:gz") as tar:
        _good(tar)
    paths["good"] = base / "good.tar.gz"
    for name, (members, _) in MALICIOUS.items():
        with tarfile.open(base / f"{name}.tar", "w") as tar:
            _add(tar, "pkg-1.0/PKG-INFO", data=b"Name: pkg\n")
            for member, kind, link in members:
                _add(tar, member, kind, linkname=link)
        paths[name] = base / f"{name}.tar"
    return paths


@pytest.mark.parametrize("label", INTERPRETERS)
def test_extract_tar(label, archives, tmp_path):
    python = INTERPRETERS[label]
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} is not on this machine")
    # Each archive gets dest two levels down, so that "../evil" lands in a
    # folder this test owns and can look at.
    dests = {n: tmp_path / n / "a" / "b" for n in archives}
    argv = [python, "-c", PROBE, ROOT / "ci"]
    for name, archive in archives.items():
        argv += [archive, dests[name]]
    res = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert tuple(out["version"]) >= (3, 10)

    assert out[str(archives["good"])] == "ok"
    good = dests["good"] / "pkg-1.0"
    assert (good / "PKG-INFO").read_text() == "Name: pkg\n"
    assert (good / "docs" / "link.md").read_text() == "Name: pkg\n"
    assert (good / "hard").read_text() == "Name: pkg\n"
    assert os.access(good / "bin" / "run.sh", os.X_OK)

    for name, (_, words) in MALICIOUS.items():
        verdict = out[str(archives[name])]
        assert verdict.startswith("unsafe: ") and words in verdict, (name, verdict)
        # Refused before anything was written, inside or outside.
        written = [p for p in (tmp_path / name).rglob("*") if not p.is_dir()]
        assert written == [], (name, written)
    assert not Path("/tmp/evil").exists()
