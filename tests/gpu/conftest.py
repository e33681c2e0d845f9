"""GPU tier of the P2pNcclConnector patch.

Tests marked ``gpu`` start real vLLM servers; they are skipped at collection
when no CUDA GPU is visible, before any fixture runs or vllm is imported.
Settings (environment):
  GPU_TIER_SITE           PYTHONPATH of the servers (a site-packages with vllm/)
  GPU_TIER_MODE           execution modes of the engines, comma separated:
                          "default" (vLLM's defaults: CUDA graphs, V2 runner;
                          the main configuration), or variants such as
                          "eager", "piecewise", "v1-eager" (servers.MODE_PARTS)
  GPU_TIER_RANDOMIZATION  cells to run, "on" (default) or "on,off"
  GPU_TIER_TIMEOUT        seconds per request (60); longer counts as a hang
  GPU_TIER_DTYPE          --dtype of the engines (float16)
  GPU_TIER_TIE_GAP        near-tie tolerance of the comparison (0.02; 0: none)
  GPU_TIER_MODEL_DIR      where the tiny model is built (a temporary folder)
  GPU_TIER_LOG_DIR        server logs (test-logs/), kept when a test fails
  GPU_TIER_KEEP_LOGS=1    keep them after a pass too
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU and vLLM; starts vLLM servers"
    )


def gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not importable"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and (reason := gpu_skip_reason()):
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"GPU tier: {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import tiny_model

    out = os.environ.get("GPU_TIER_MODEL_DIR") or tmp_path_factory.mktemp("tiny")
    return tiny_model.build(out)


@pytest.fixture(scope="session")
def gpus():
    import servers

    return servers.visible_gpus()


@pytest.fixture
def log_dir(request):
    """This test's log folder; removed after a pass unless GPU_TIER_KEEP_LOGS."""
    import servers

    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    path = servers.log_root() / "pytest" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    yield path
    report = getattr(request.node, "report_call", None)
    if (
        report is not None
        and report.passed
        and not os.environ.get("GPU_TIER_KEEP_LOGS")
    ):
        shutil.rmtree(path, ignore_errors=True)


def _modes() -> list[str]:
    from settings import MODES

    return MODES


@pytest.fixture(scope="session", params=_modes())
def mode(request) -> str:
    """The engines' execution mode (GPU_TIER_MODE), one cell each."""
    return request.param


@pytest.fixture(scope="session")
def reference(mode, tiny_model_dir, gpus) -> list[dict]:
    """The workload's answers from a plain engine in the same mode."""
    import servers
    import workload
    from settings import DTYPE, REQUESTS, SITE, TIMEOUT

    log_dir = servers.log_root() / "pytest" / f"reference-{mode}"
    with servers.reference_stack(
        tiny_model_dir, gpus, log_dir, site=SITE, dtype=DTYPE, mode=mode
    ) as url:
        outcomes = workload.run(url, REQUESTS, TIMEOUT)
    return workload.reference_of(outcomes, REQUESTS)
