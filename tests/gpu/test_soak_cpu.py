"""The pure parts of ci/gpu/soak.py, and its sender against fake servers (CPU)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci" / "gpu"))

import servers  # noqa: E402
import soak  # noqa: E402
import workload  # noqa: E402

pytestmark = pytest.mark.cpu


def test_parse_tree():
    tree = soak.parse_tree("stock=/tmp/site,rand=off,batched=65536")
    assert tree == soak.Tree("stock", Path("/tmp/site"), False, 65536)
    assert soak.parse_tree("p=/x") == soak.Tree("p", Path("/x"), True, None)
    for bad in ("/tmp/site", "a=", "a b=/x", "a=/x,rand=maybe", "a=/x,batched=lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            soak.parse_tree(bad)


def test_two_gpus_prefill_on_first_decode_on_second_multicast_off():
    trees = [soak.Tree("stock", Path("/s"), False, 65536), soak.Tree("p", Path("/p"))]
    cells = soak.plan_cells(trees, ["0", "1"])
    assert [c.key for c in cells] == [
        f"default:{t}:{s}" for t in ("stock", "p") for s in servers.SEND_TYPES
    ]
    names = [spec.name for c in cells for spec in (c.prefill, c.decode)]
    assert len(set(names)) == len(names)
    ports = [
        p for c in cells for s in (c.prefill, c.decode) for p in (s.port, s.kv_port)
    ]
    assert len(set(ports + [c.proxy_port for c in cells])) == 5 * len(cells)
    for cell in cells:
        for spec, gpu in ((cell.prefill, "0"), (cell.decode, "1")):
            env = {**servers.COMMON_ENV, **spec.env}
            assert env["CUDA_VISIBLE_DEVICES"] == gpu
            assert "NCCL_HOSTID" not in env
            assert env["NCCL_NVLS_ENABLE"] == "0"
            assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
            assert env["NVSHMEM_DISABLE_NVLS"] == "1"
            rand_off = env[servers.RANDOMIZATION_OFF]
            assert rand_off == (None if cell.tree.randomization else "1")
            batched = [
                a for a in spec.args("/m") if a.startswith("--max-num-batched-tokens")
            ]
            expected = cell.tree.max_batched_tokens or servers.MAX_NUM_BATCHED_TOKENS
            assert batched == [f"--max-num-batched-tokens={expected}"]
            assert (
                spec.kv_transfer_config()["kv_connector_extra_config"]["send_type"]
                == cell.send_type
            )
            assert spec.mode == "default"
            assert "--enforce-eager" not in spec.args("/m")
    refs = soak.plan_references(["0", "1"])
    assert refs["A"].env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert refs["B"].env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert refs["A"].kv_transfer_config() is None
    assert refs["A"].mode == refs["B"].mode == "default"


def test_a_mode_reaches_every_pair_and_both_references():
    trees = [soak.Tree("stock", Path("/s"), False, 65536)]
    cells = soak.plan_cells(trees, ["0", "1"], "v1-eager")
    refs = soak.plan_references(["0", "1"], "v1-eager")
    assert [c.key for c in cells] == [f"v1-eager:stock:{s}" for s in servers.SEND_TYPES]
    specs = [s for c in cells for s in (c.prefill, c.decode)] + list(refs.values())
    for spec in specs:
        assert spec.mode == "v1-eager"
        assert "--enforce-eager" in spec.args("/m")
        assert spec.environment()["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    # the tree's own prefill budget stays next to the mode's arguments
    assert "--max-num-batched-tokens=65536" in cells[0].prefill.args("/m")


def _answer(tokens, gaps=None) -> dict:
    return {"tokens": [tokens], "texts": ["t"], "gaps": [gaps or [1.0] * len(tokens)]}


def _ok(tokens) -> workload.Outcome:
    return workload.Outcome("ok", tokens=[tokens], texts=["t"])


def test_tally_counts_each_request_against_reference_a():
    requests = [workload.Request(f"r{i}", workload.COMPLETIONS, {}) for i in range(8)]
    oracle = [
        _answer([1, 2, 3]),
        _answer([1, 2, 3], gaps=[1.0, 0.001, 1.0]),  # near-tie at token 1
        _answer([1, 2, 3]),
        _answer([1, 2, 3]),
        _answer([1, 2, 3]),
        _answer([1, 2, 3]),
        _answer([1, 2, 3]),
        None,  # reference A failed this one
    ]
    check = list(oracle)
    check[3] = _answer([1, 9, 9])  # B disagrees with A where P/D does too
    outcomes = [
        _ok([1, 2, 3]),
        _ok([1, 7, 7]),
        _ok([5, 2, 3]),
        _ok([1, 9, 9]),
        workload.Outcome("timeout", detail="no answer in 45 s"),
        workload.Outcome("error", detail="HTTP 500"),
        None,
        _ok([1, 2, 3]),
    ]
    result = soak.tally(outcomes, oracle, check, requests)
    c = result["counts"]
    assert (c["match"], c["tie"], c["wrong"], c["timeout"], c["error"]) == (
        1,
        1,
        2,
        1,
        1,
    )
    assert (c["not_sent"], c["no_reference"], c["wrong_equal_b"]) == (1, 1, 1)
    assert result["letters"] == "mtWWHE-?"
    assert result["sent"] == 7
    assert result["verdict"] == "hang"  # a timeout outranks errors and wrongs
    assert result["first_difference_at"] == [0, 1, 1]
    assert any("r3: wrong" in n and "equals reference B" in n for n in result["notes"])

    only_wrong = soak.tally(outcomes[:4], oracle[:4], None, requests[:4])
    assert only_wrong["verdict"] == "wrong"
    assert only_wrong["counts"]["wrong_equal_b"] == 0
    none_sent = soak.tally([None] * 2, oracle[:2], None, requests[:2])
    assert none_sent["verdict"] == "not run"


def fake_engine(tokens_of, delay_of=lambda body: 0.0) -> web.Application:
    """Answers like vLLM's OpenAI server, with token ids from ``tokens_of``."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(delay_of(body))
        tokens = tokens_of(body)
        top = [{"a": -0.1, "b": -2.0} for _ in tokens]
        if request.path == workload.CHAT:
            content = [{"top_logprobs": [{"logprob": -0.1}, {"logprob": -2.0}]}]
            choice = {
                "index": 0,
                "message": {"content": "x"},
                "token_ids": tokens,
                "logprobs": {"content": content * len(tokens)},
            }
        else:
            choice = {
                "index": 0,
                "text": "x",
                "token_ids": tokens,
                "logprobs": {"top_logprobs": top},
            }
        choices = [dict(choice, index=k) for k in range(body.get("n", 1))]
        return web.json_response(
            {"choices": choices, "usage": {"completion_tokens": len(tokens)}}
        )

    app = web.Application()
    app.router.add_post(workload.COMPLETIONS, handle)
    app.router.add_post(workload.CHAT, handle)
    return app


def _prompt(body: dict) -> str:
    return body.get("prompt") or body["messages"][0]["content"]


def _tokens(body: dict) -> list[int]:
    return [len(_prompt(body)) % 97, body.get("max_tokens", 0) or 1, 7]


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def test_drive_and_judge_find_the_one_corrupted_answer():
    requests = workload.build_requests(40)
    corrupted = _prompt(requests[5].body)

    def pd_tokens(body):
        tokens = _tokens(body)
        return [tokens[0] + 1, *tokens[1:]] if _prompt(body) == corrupted else tokens

    async def scenario():
        ref_runner, ref_url = await _serve(fake_engine(_tokens))
        pd_runner, pd_url = await _serve(fake_engine(pd_tokens))
        try:
            kwargs = dict(
                concurrency=8,
                timeout=10.0,
                launch_deadline=time.monotonic() + 60,
                hang_limit=3,
            )
            ref = await soak.drive(ref_url, requests, **kwargs)
            pd = await soak.drive(pd_url, requests, **kwargs)
        finally:
            await ref_runner.cleanup()
            await pd_runner.cleanup()
        return ref, pd

    ref, pd = asyncio.run(scenario())
    assert not ref.stopped and not pd.stopped
    oracle = soak.answers_of(ref)
    assert None not in oracle
    result = soak.tally(pd.outcomes, oracle, oracle, requests)
    assert result["verdict"] == "wrong"
    assert result["counts"]["wrong"] == 1
    assert result["counts"]["match"] == len(requests) - 1
    assert result["letters"][5] == "W"
    assert soak.tally(ref.outcomes, oracle, None, requests)["verdict"] == "correct"


def test_drive_stops_sending_to_a_hung_target_and_at_the_deadline():
    requests = workload.build_requests(30)

    async def scenario():
        # Every request with a long prompt hangs past the timeout.
        def delay(body):
            return 5.0 if len(_prompt(body).split()) > 200 else 0.0

        runner, url = await _serve(fake_engine(_tokens, delay))
        try:
            hung = await soak.drive(
                url,
                requests,
                concurrency=2,
                timeout=0.3,
                launch_deadline=time.monotonic() + 60,
                hang_limit=2,
            )
            late = await soak.drive(
                url,
                requests,
                concurrency=2,
                timeout=5.0,
                launch_deadline=time.monotonic() - 1,
                hang_limit=2,
            )
        finally:
            await runner.cleanup()
        return hung, late

    hung, late = asyncio.run(scenario())
    statuses = [o.status if o else None for o in hung.outcomes]
    # The limit stops new sends; requests already in flight still end.
    assert 2 <= statuses.count("timeout") <= 2 + 2 - 1
    assert "timed out" in hung.stopped
    assert None in statuses  # the rest was not sent
    assert late.outcomes == [None] * len(requests)
    assert late.stopped == "time budget spent"


def test_render_reports_noise_floor_next_to_the_cells():
    requests = [workload.Request("r0", workload.COMPLETIONS, {})]
    oracle = [_answer([1, 2])]
    cell = soak.tally([_ok([1, 3])], oracle, None, requests)
    cell.update(seconds=2.0, stopped="", log_errors=["decode: boom"])
    data = {
        "machine": {"gpu": "G", "topology": "prefill on GPU 0, decode on GPU 1"},
        "trees": {
            "p": {
                "vllm": "0.23.0",
                "state": "patched",
                "fix": "yes",
                "randomization": "on",
                "max_batched_tokens": 256,
                "site": "/p",
            }
        },
        "settings": {
            "requests": 1,
            "concurrency": 1,
            "timeout": 45.0,
            "dtype": "float32",
            "tie_gap": 0.02,
        },
        "modes": {
            "default": {
                "startup_seconds": 95.0,
                "reference": {
                    "b_vs_a": soak.tally([_ok([1, 2])], oracle, None, requests),
                    "b_seconds": 1.0,
                    "a_failed": 0,
                },
            },
            "eager": {"startup_seconds": 70.0},  # cut short: no reference
        },
        "cells": {"default:p:GET": cell, "eager:p:GET": cell},
        "written": "now",
    }
    text = soak.render(data)
    assert "| mode default (vLLM defaults) | engines up after 95.0 s |" in text
    assert "| mode eager (--enforce-eager) | engines up after 70.0 s |" in text
    assert "| default: reference B vs A (noise floor) | correct | 1 | 1 |" in text
    for mode in ("default", "eager"):
        row = f"| {mode}:p:GET | wrong | 1 | 0 | 0 | **1 (0 = B)** | **0** |"
        assert row in text
    assert "stream-order fix: yes" in text
    assert "float32" in text
    assert "decode: boom" in text
