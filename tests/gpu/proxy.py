r"""A small xPyD proxy for vLLM's P2pNcclConnector (no service discovery).

For each /v1/completions or /v1/chat/completions request it mints the
X-Request-Id that P2pNcclConnector parses,
``___prefill_addr_<ip:kv_port>___decode_addr_<ip:kv_port>_<uuid4 hex>``,
runs the request on a prefill instance with max_tokens=1 (not streamed), then
sends the original request with the same id to a decode instance and streams
decode's answer back. Instances are picked round-robin.

    python proxy.py --port 8000 \
        --prefill 127.0.0.1:8100,127.0.0.1:21001 \
        --decode 127.0.0.1:8200,127.0.0.1:22001

Each instance is ``HTTP_HOST:PORT,KV_HOST:PORT``; the kv address is the
engine's ZMQ address (VLLM_HOST_IP and kv_port of its kv_transfer_config).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

logger = logging.getLogger("pd_proxy")

ROUTES = ("/v1/completions", "/v1/chat/completions")
SESSION = web.AppKey("session", aiohttp.ClientSession)
# On an error answer of the proxy's own or of prefill: the stage that failed.
STAGE_HEADER = "X-PD-Stage"


@dataclass(frozen=True)
class Instance:
    http: str  # host:port of the OpenAI server
    kv: str  # host:port of its P2pNcclConnector ZMQ socket

    @classmethod
    def parse(cls, text: str) -> Instance:
        http, _, kv = text.partition(",")
        if not http or not kv:
            raise argparse.ArgumentTypeError(f"expected HTTP_ADDR,KV_ADDR: {text!r}")
        return cls(http.strip(), kv.strip())


def make_request_id(prefill_kv: str, decode_kv: str) -> str:
    return f"___prefill_addr_{prefill_kv}___decode_addr_{decode_kv}_{uuid.uuid4().hex}"


def prefill_body(body: dict) -> dict:
    """The request as the prefill instance gets it: one token, not streamed."""
    body = dict(body, max_tokens=1, stream=False)
    if "min_tokens" in body:  # vLLM refuses min_tokens > max_tokens
        body["min_tokens"] = min(body["min_tokens"], 1)
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)  # only valid with stream=True
    return body


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def build_app(
    prefills: Sequence[Instance], decodes: Sequence[Instance], timeout: float
) -> web.Application:
    """The proxy app; ``timeout`` bounds each request (both stages) in seconds."""
    if not prefills or not decodes:
        raise ValueError("need at least one prefill and one decode instance")
    counter = itertools.count()

    async def client_session(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0)
        timeouts = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeouts) as s:
            app[SESSION] = s
            yield

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def forward(
        request: web.Request,
        body: dict,
        prefill: Instance,
        decode: Instance,
        headers: dict[str, str],
        started: list[web.StreamResponse],
        stage: list[str],
    ) -> web.StreamResponse:
        session = request.app[SESSION]
        url = f"http://{prefill.http}{request.path}"
        async with session.post(url, json=prefill_body(body), headers=headers) as resp:
            payload = await resp.read()
            if resp.status != 200:
                logger.warning(
                    "prefill %s: HTTP %s for %s",
                    url,
                    resp.status,
                    headers["X-Request-Id"],
                )
                return web.Response(
                    status=resp.status,
                    body=payload,
                    content_type=resp.content_type,
                    headers={STAGE_HEADER: "prefill"},
                )
        stage[0] = "decode"
        url = f"http://{decode.http}{request.path}"
        async with session.post(url, json=body, headers=headers) as resp:
            content_type = resp.headers.get("Content-Type", "application/json")
            response = web.StreamResponse(
                status=resp.status,
                headers={
                    "Content-Type": content_type,
                    "X-Request-Id": headers["X-Request-Id"],
                },
            )
            started.append(response)
            await response.prepare(request)
            async for chunk in resp.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON")
        n = next(counter)
        prefill, decode = prefills[n % len(prefills)], decodes[n % len(decodes)]
        request_id = make_request_id(prefill.kv, decode.kv)
        headers = {"X-Request-Id": request_id}
        if auth := request.headers.get("Authorization"):
            headers["Authorization"] = auth
        started: list[web.StreamResponse] = []  # decode's answer, once under way
        stage = ["prefill"]  # the stage in progress, for error answers
        try:
            return await asyncio.wait_for(
                forward(request, body, prefill, decode, headers, started, stage),
                timeout,
            )
        except asyncio.TimeoutError:
            logger.warning("timed out after %s s: %s", timeout, request_id)
            if started:  # headers are out: the client sees a cut stream
                return started[0]
            return _error(504, f"no answer within {timeout} s ({request_id})")
        except aiohttp.ClientError as exc:
            logger.warning("upstream error for %s: %r", request_id, exc)
            if started:
                return started[0]
            response = _error(502, f"upstream error ({stage[0]}): {exc!r}")
            response.headers[STAGE_HEADER] = stage[0]
            return response

    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/health", health)
    for route in ROUTES:
        app.router.add_post(route, handle)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="P/D proxy for P2pNcclConnector")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--prefill", type=Instance.parse, action="append", required=True
    )
    parser.add_argument("--decode", type=Instance.parse, action="append", required=True)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logger.info("prefill %s, decode %s", args.prefill, args.decode)
    app = build_app(args.prefill, args.decode, args.timeout)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
