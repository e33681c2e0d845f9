"""The P/D proxy against two fake OpenAI servers (CPU only, no vLLM)."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from aiohttp import web
from proxy import Instance, build_app

pytestmark = pytest.mark.cpu

P_KV, D_KV = "127.0.0.1:21001", "127.0.0.1:22001"
ID_RE = re.compile(
    r"___prefill_addr_127\.0\.0\.1:21001___decode_addr_127\.0\.0\.1:22001_[0-9a-f]{32}"
)
# The patterns P2pNcclConnector.parse_request_id applies on either side.
PREFILL_SIDE = r"___decode_addr_(.*):(\d+)"
DECODE_SIDE = r"___prefill_addr_(.*):(\d+)___"


def fake_engine(role: str, seen: list, delay: float = 0.0) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((request.path, request.headers.get("X-Request-Id"), body))
        await asyncio.sleep(delay)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in ("a", "b"):
                await resp.write(f"data: {json.dumps({'text': piece})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response({"role": role, "echo": body})

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"{host}:{port}"


async def exchange(path: str, body: dict, *, decode_delay=0.0, timeout=10.0):
    """Send one request through the proxy; return (status, text, P seen, D seen)."""
    p_seen, d_seen = [], []
    p_runner, p_http = await serve(fake_engine("prefill", p_seen))
    d_runner, d_http = await serve(fake_engine("decode", d_seen, decode_delay))
    app = build_app([Instance(p_http, P_KV)], [Instance(d_http, D_KV)], timeout)
    proxy_runner, proxy_http = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{proxy_http}/health") as resp:
                assert resp.status == 200
            async with session.post(f"http://{proxy_http}{path}", json=body) as resp:
                return resp.status, await resp.text(), p_seen, d_seen
    finally:
        for runner in (proxy_runner, p_runner, d_runner):
            await runner.cleanup()


def test_completions_prefill_then_decode_with_one_id():
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 16, "temperature": 0}
    status, text, p_seen, d_seen = asyncio.run(exchange("/v1/completions", body))
    assert status == 200
    assert json.loads(text) == {"role": "decode", "echo": body}
    [(p_path, p_id, p_body)], [(d_path, d_id, d_body)] = p_seen, d_seen
    assert p_path == d_path == "/v1/completions"
    assert ID_RE.fullmatch(p_id) and p_id == d_id
    assert p_body == dict(body, max_tokens=1, stream=False)
    assert d_body == body
    # Both connectors find the other side's address in the id.
    assert re.search(PREFILL_SIDE, p_id).groups() == ("127.0.0.1", "22001")
    assert re.search(DECODE_SIDE, p_id).groups() == ("127.0.0.1", "21001")


def test_chat_streamed_with_max_completion_tokens():
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, text, p_seen, d_seen = asyncio.run(exchange("/v1/chat/completions", body))
    assert status == 200
    assert text.count("data: ") == 3 and text.rstrip().endswith("[DONE]")
    p_body, d_body = p_seen[0][2], d_seen[0][2]
    assert p_body["max_tokens"] == p_body["max_completion_tokens"] == 1
    assert p_body["stream"] is False and "stream_options" not in p_body
    assert d_body == body
    assert p_seen[0][1] == d_seen[0][1]


def test_ids_are_unique_per_request():
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}

    async def two():
        return [await exchange("/v1/completions", body) for _ in range(2)]

    ids = {result[2][0][1] for result in asyncio.run(two())}
    assert len(ids) == 2


def test_decode_timeout_gives_504():
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4}
    status, text, _, d_seen = asyncio.run(
        exchange("/v1/completions", body, decode_delay=2.0, timeout=0.5)
    )
    assert status == 504 and "no answer" in text
    assert len(d_seen) == 1


@pytest.mark.parametrize("text", ["127.0.0.1:8100", ",127.0.0.1:21001"])
def test_instance_needs_both_addresses(text):
    with pytest.raises(Exception, match="HTTP_ADDR,KV_ADDR"):
        Instance.parse(text)
