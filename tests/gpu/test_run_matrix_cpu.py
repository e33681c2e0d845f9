"""ci/gpu/run_matrix.py and the results file of ci/gpu/common.py (CPU only):
cells and reference answers per execution mode."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci" / "gpu"))

import common  # noqa: E402
import run_matrix  # noqa: E402
import servers  # noqa: E402
import workload  # noqa: E402

pytestmark = pytest.mark.cpu


def _cell(verdict: str = "correct") -> dict:
    return {"verdict": verdict, "summary": verdict, "seconds": 80.0, "notes": []}


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        dtype="float16", timeout=5.0, log_dir=tmp_path / "logs", reliability=False
    )


def test_results_from_before_modes_hold_eager_cells(tmp_path):
    out = tmp_path / "gpu.md"
    old = {"cells": {"patched:GET:on": _cell()}, "reference": {"key": "k"}}
    out.with_suffix(".json").write_text(json.dumps(old))
    data = common.Results(out).data
    assert data["cells"] == {"eager:patched:GET:on": _cell()}
    assert "reference" not in data  # computed again, once per mode


def test_render_one_table_per_mode_default_first():
    cells = {"eager:stock:GET:on": _cell("wrong"), "default:patched:PUT:on": _cell()}
    text = common.render({"cells": cells})
    assert (
        "| execution modes | default (vLLM defaults); eager (--enforce-eager) |" in text
    )
    default = text.index("### Mode default (vLLM defaults)")
    eager = text.index("### Mode eager (--enforce-eager)")
    assert default < eager
    # columns: stock on, stock off, patched on, patched off
    assert "| PUT | not run | not run | correct, 80 s | not run |" in text[:eager]
    assert "| GET | wrong, 80 s | not run | not run | not run |" in text[eager:]


def test_reference_answers_per_mode_from_a_reference_engine_in_that_mode(
    tmp_path, monkeypatch
):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    requests = workload.build_requests(2, parallel_sampling=False)
    calls = []

    @contextlib.contextmanager
    def fake_reference_stack(model_dir, gpus, log_dir, *, site, dtype, mode):
        calls.append((mode, log_dir))
        yield "http://reference"

    def fake_run(url, reqs, timeout):
        return [workload.Outcome("ok", [[len(calls)]], ["t"]) for _ in reqs]

    monkeypatch.setattr(servers, "reference_stack", fake_reference_stack)
    monkeypatch.setattr(workload, "run", fake_run)
    results = common.Results(tmp_path / "gpu.md")
    results.data["trees"] = {
        "stock": {"vllm": "0.23.0", "state": "stock", "site": "/s"}
    }

    def reference(mode):
        return run_matrix.get_reference(
            _args(tmp_path), results, mode, model, requests, ["0"], {"stock": "/s"}
        )

    default = reference("default")
    eager = reference("eager")
    cached = reference("default")
    assert [mode for mode, _ in calls] == ["default", "eager"]  # then the cache
    assert cached == default != eager
    assert calls[1][1] == tmp_path / "logs" / "eager" / "reference"
    saved = json.loads(results.json.read_text())["references"]
    assert saved["eager"]["answers"] == eager
    assert saved["default"]["key"] != saved["eager"]["key"]


def test_a_cell_runs_in_its_mode_and_logs_under_it(tmp_path, monkeypatch):
    seen = {}

    @contextlib.contextmanager
    def fake_pd_stack(model_dir, gpus, log_dir, **kw):
        seen.update(kw, log_dir=log_dir)
        raise RuntimeError("no GPU here")
        yield

    monkeypatch.setattr(servers, "pd_stack", fake_pd_stack)
    cell = "v1-eager:patched:GET:on"
    result = run_matrix.run_cell(
        _args(tmp_path), cell, 0, "/m", [], [], ["0"], {"patched": "/p"}, []
    )
    assert result["verdict"] == "error"
    assert seen["mode"] == "v1-eager"
    assert (seen["send_type"], seen["randomization"]) == ("GET", True)
    assert seen["log_dir"] == tmp_path / "logs" / "v1-eager" / "patched-GET-on"
