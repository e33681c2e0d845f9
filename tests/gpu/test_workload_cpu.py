"""How answers are read and how a cell is judged (CPU only)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from workload import (
    CHAT,
    COMPLETIONS,
    Outcome,
    Request,
    _run_all,
    build_requests,
    judge,
    streaming,
)

pytestmark = pytest.mark.cpu

REQS = build_requests(3, parallel_sampling=False)
REF = [
    {"tokens": [[1, 2, 3]], "texts": ["abc"], "gaps": [[0.5, 0.001, 0.5]]} for _ in REQS
]


def ok(tokens, text="abc"):
    return Outcome("ok", tokens=[tokens], texts=[text])


@pytest.mark.parametrize(
    ("outcomes", "verdict", "summary"),
    [
        ([ok([1, 2, 3])] * 3, "correct", "correct (3/3)"),
        ([ok([1, 2, 3]), ok([1, 9, 9]), ok([1, 2, 3])], "correct", "1 near-tie"),
        ([ok([1, 2, 3]), ok([7, 2, 3]), ok([1, 2, 3])], "wrong", "wrong (1/3 differ)"),
        ([ok([1, 2, 3]), ok([7, 2, 3]), Outcome("timeout")], "hang", "hang (1/3"),
        ([ok([1, 2, 3]), Outcome("error"), ok([1, 2, 3])], "error", "error (1/3"),
        ([ok([1, 2]), ok([1, 2, 3]), ok([1, 2, 3])], "wrong", "wrong (1/3"),
    ],
)
def test_judge(outcomes, verdict, summary):
    result = judge(outcomes, REF, REQS)
    assert result.verdict == verdict
    assert summary in result.summary()
    assert result.total == 3


def test_requests_are_deterministic_and_greedy():
    assert build_requests(16) == build_requests(16)
    for req in build_requests(16):
        sampled = req.body.get("n") == 2
        assert req.body["temperature"] == (1.0 if sampled else 0.0)
        assert req.body["ignore_eos"] is True
        if sampled:
            assert req.body["top_k"] == 1


def test_streaming_variant():
    req = streaming(build_requests(2)[1])
    assert req.body["stream"] is True
    assert "logprobs" not in req.body and "return_token_ids" not in req.body


def vllm_like_app() -> web.Application:
    """Answers shaped like vLLM's (token_ids, logprobs, SSE with usage)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("prompt") == "slow":
            await asyncio.sleep(2)
        top = [{"token_id:5": -0.1, "token_id:6": -0.4}, {"token_id:7": -0.2}]
        choice = {"index": 0, "text": "ab", "token_ids": [5, 7]}
        choice["logprobs"] = {"top_logprobs": top}
        return web.json_response({"choices": [choice]})

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        deltas = [{"role": "assistant", "content": ""}, {"content": "x"}, {}]
        for delta in deltas:
            chunk = {"choices": [{"index": 0, "delta": delta}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": 2}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post(COMPLETIONS, completions)
    app.router.add_post(CHAT, chat)
    return app


def test_send_parses_answers_and_times_out():
    async def main():
        runner = web.AppRunner(vllm_like_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        reqs = [
            Request("plain", COMPLETIONS, {"prompt": "hi"}),
            Request("slow", COMPLETIONS, {"prompt": "slow"}),
            Request("chat", CHAT, {"messages": [], "stream": True}),
        ]
        try:
            plain, slow = await _run_all(f"http://{host}:{port}", reqs[:2], 0.5, False)
            [chat] = await _run_all(f"http://{host}:{port}", reqs[2:], 5, True)
        finally:
            await runner.cleanup()
        return plain, slow, chat

    plain, slow, chat = asyncio.run(main())
    assert plain.status == "ok" and plain.tokens == [[5, 7]] and plain.texts == ["ab"]
    assert plain.gaps == [[pytest.approx(0.3), None]]
    assert slow.status == "timeout"
    assert chat.status == "ok" and chat.texts == ["x"] and chat.output_tokens == 2
    assert chat.ttft is not None and chat.ttft < 5
