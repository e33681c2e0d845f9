"""The request mix of the GPU tier, how it is sent, and how a cell is judged.

The same requests go through the P/D proxy and straight to a plain reference
engine; every P/D answer must equal the reference token for token. A first
difference where the reference's top-2 logprobs are closer than TIE_GAP is a
numerical near-tie (fp16 rounding may differ with the batch), not a wrong KV
cache, and is counted apart. A cell is "correct" (all equal), "wrong" (all
answered, some differ), "hang" (some timed out) or "error" (some failed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp
from tiny_model import sentence

logger = logging.getLogger(__name__)

MODEL_NAME = "tiny"
# GPU_TIER_TIE_GAP=0 makes every difference count as wrong.
TIE_GAP = float(os.environ.get("GPU_TIER_TIE_GAP", "0.02"))
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# Words per prompt; ~1 token per word. LONG is over the engines'
# --max-num-batched-tokens (256), so that prompt is prefilled in chunks.
SHORT, MEDIUM, LARGE, LONG = 6, 40, 120, 420
DIAGNOSTIC_KEYS = (
    "logprobs",
    "top_logprobs",
    "return_token_ids",
    "return_tokens_as_token_ids",
)


@dataclass
class Request:
    name: str
    path: str
    body: dict


@dataclass
class Outcome:
    status: str  # "ok" | "timeout" | "error"
    tokens: list[list[int]] = field(default_factory=list)  # one list per choice
    texts: list[str] = field(default_factory=list)
    gaps: list[list[float | None]] = field(default_factory=list)  # top1 - top2
    detail: str = ""
    ttft: float | None = None
    output_tokens: int = 0


def build_requests(
    count: int = 16,
    *,
    max_tokens: tuple[int, ...] = (16, 24, 32),
    parallel_sampling: bool = True,
    seed: int = 0,
    chunked_prefill: bool = True,
) -> list[Request]:
    """Mixed completions/chat requests of mixed prompt length.

    Request 0 has a prompt longer than --max-num-batched-tokens, request 2
    asks for n=2. vLLM rejects n>1 with temperature 0, so that one samples
    with top_k=1, which is greedy by construction.
    """
    requests = []
    for i in range(count):
        rng = random.Random(seed * 100_003 + i)
        if i % 8 in (0, 5):
            words = LONG if chunked_prefill else LARGE
        else:
            words = (SHORT, MEDIUM, LARGE)[i % 3]
        text = sentence(rng, words)
        limit = max_tokens[i % len(max_tokens)]
        body: dict = {
            "model": MODEL_NAME,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if i % 2:
            path = CHAT
            body["messages"] = [{"role": "user", "content": text}]
            body["max_completion_tokens" if i % 4 == 3 else "max_tokens"] = limit
            body.update(logprobs=True, top_logprobs=2)
        else:
            path = COMPLETIONS
            body.update(prompt=text, max_tokens=limit, logprobs=2)
        if parallel_sampling and i == 2:
            body.update(n=2, temperature=1.0, top_k=1, seed=7)
        kind = "chat" if path == CHAT else "cmpl"
        requests.append(Request(f"{i:02d}-{kind}-{words}w", path, body))
    return requests


def streaming(req: Request) -> Request:
    """The benchmark variant: streamed, usage reported, no diagnostics."""
    body = {k: v for k, v in req.body.items() if k not in DIAGNOSTIC_KEYS}
    body.update(stream=True, stream_options={"include_usage": True})
    return Request(req.name, req.path, body)


def _gaps(logprobs: dict | None, chat: bool) -> list[float | None]:
    """Per generated token: top-1 minus top-2 logprob (None if unknown)."""
    if not logprobs:
        return []
    if chat:
        tops = [[t["logprob"] for t in p["top_logprobs"]] for p in logprobs["content"]]
    else:
        tops = [list((p or {}).values()) for p in logprobs["top_logprobs"]]
    gaps: list[float | None] = []
    for values in tops:
        values = sorted(values, reverse=True)
        gaps.append(values[0] - values[1] if len(values) > 1 else None)
    return gaps


def parse(path: str, payload: dict) -> Outcome:
    chat = path == CHAT
    out = Outcome("ok")
    for choice in sorted(payload["choices"], key=lambda c: c["index"]):
        out.texts.append(choice["message"]["content"] if chat else choice["text"])
        out.tokens.append(choice.get("token_ids") or [])
        out.gaps.append(_gaps(choice.get("logprobs"), chat))
    out.output_tokens = (payload.get("usage") or {}).get("completion_tokens", 0)
    return out


async def _post(
    session: aiohttp.ClientSession,
    base_url: str,
    req: Request,
    headers: dict | None = None,
) -> Outcome:
    async with session.post(
        base_url + req.path, json=req.body, headers=headers
    ) as resp:
        text = await resp.text()
        if resp.status == 504:
            return Outcome("timeout", detail=f"proxy: {text[:200]}")
        if resp.status != 200:
            return Outcome("error", detail=f"HTTP {resp.status}: {text[:300]}")
        return parse(req.path, json.loads(text))


async def sse_chunks(resp):
    """The JSON chunks of an OpenAI server-sent-events response."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data:") and line != "data: [DONE]":
            yield json.loads(line[5:])


async def _post_streaming(
    session: aiohttp.ClientSession, base_url: str, req: Request
) -> Outcome:
    """A streamed request; the time to its first generated text is its TTFT."""
    start = time.perf_counter()
    out = Outcome("ok", texts=[""])
    async with session.post(base_url + req.path, json=req.body) as resp:
        if resp.status != 200:
            status = "timeout" if resp.status == 504 else "error"
            return Outcome(status, detail=f"HTTP {resp.status}")
        async for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                out.output_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content") or choice.get("text")
                if delta and out.ttft is None:
                    out.ttft = time.perf_counter() - start
                out.texts[0] += delta or ""
    return out


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    req: Request,
    timeout: float,
    *,
    stream: bool = False,
    headers: dict | None = None,
) -> Outcome:
    """Send one request; no answer within ``timeout`` seconds is a timeout."""
    try:
        if stream:
            coro = _post_streaming(session, base_url, req)
        else:
            coro = _post(session, base_url, req, headers)
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        return Outcome("timeout", detail=f"no answer in {timeout:.0f} s")
    except (aiohttp.ClientError, ValueError, KeyError) as exc:
        return Outcome("error", detail=repr(exc)[:300])


async def _run_all(base_url, requests, timeout, stream) -> list[Outcome]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await asyncio.gather(
            *(send(session, base_url, r, timeout, stream=stream) for r in requests)
        )


def run(
    base_url: str, requests: list[Request], timeout: float, *, stream: bool = False
) -> list[Outcome]:
    """Send all requests at once; each one has its own ``timeout`` (seconds)."""
    return asyncio.run(_run_all(base_url, requests, timeout, stream))


def reference_of(outcomes: list[Outcome], requests: list[Request]) -> list[dict]:
    """The reference answers as plain data (for JSON), or raise."""
    bad = [
        f"{r.name}: {o.status} {o.detail}"
        for r, o in zip(requests, outcomes, strict=True)
        if o.status != "ok"
    ]
    if bad:
        raise RuntimeError("reference engine failed: " + "; ".join(bad))
    return [{"tokens": o.tokens, "texts": o.texts, "gaps": o.gaps} for o in outcomes]


def _first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(outcome: Outcome, ref: dict) -> tuple[str, str]:
    """Return ("match" | "tie" | "wrong", detail) for one answered request."""
    if len(outcome.tokens) != len(ref["tokens"]):
        return "wrong", f"{len(outcome.tokens)} choices, expected {len(ref['tokens'])}"
    verdict, detail = "match", ""
    for k, (got, exp) in enumerate(zip(outcome.tokens, ref["tokens"], strict=True)):
        gaps = ref["gaps"][k]
        if not exp:  # no token ids in the answer: compare the text
            got, exp, gaps = outcome.texts[k], ref["texts"][k], []
        pos = _first_difference(got, exp)
        if pos is None:
            continue
        gap = gaps[pos] if pos < len(gaps) else None
        where = f"choice {k} differs at token {pos}"
        if gap is not None and gap < TIE_GAP:
            verdict, detail = "tie", f"{where} (reference top-2 gap {gap:.4f})"
            continue
        got_text, exp_text = outcome.texts[k][:40], ref["texts"][k][:40]
        return "wrong", f"{where}: got {got_text!r}, expected {exp_text!r}"
    return verdict, detail


@dataclass
class Verdict:
    verdict: str
    counts: dict[str, int]
    notes: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        c, n = self.counts, self.total
        text = {
            "hang": f"hang ({c['timeout']}/{n} timed out)",
            "error": f"error ({c['error']}/{n} failed)",
            "wrong": f"wrong ({c['wrong']}/{n} differ)",
            "correct": f"correct ({c['match'] + c['tie']}/{n})",
        }[self.verdict]
        if self.verdict == "correct" and c["tie"]:
            text = text[:-1] + f", {c['tie']} near-tie)"
        return text


def judge(
    outcomes: list[Outcome], reference: list[dict], requests: list[Request]
) -> Verdict:
    counts = dict.fromkeys(("match", "tie", "wrong", "timeout", "error"), 0)
    notes = []
    for req, out, ref in zip(requests, outcomes, reference, strict=True):
        if out.status == "ok":
            status, detail = compare(out, ref)
        else:
            status, detail = out.status, out.detail
        counts[status] += 1
        if detail:
            notes.append(f"{req.name}: {status}: {detail}")
    for verdict, key in (("hang", "timeout"), ("error", "error"), ("wrong", "wrong")):
        if counts[key]:
            return Verdict(verdict, counts, notes)
    return Verdict("correct", counts, notes)


def throughput(outcomes: list[Outcome], seconds: float) -> dict:
    """Benchmark numbers of one streamed round."""
    ok = [o for o in outcomes if o.status == "ok"]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    return {
        "requests": len(outcomes),
        "failed": len(outcomes) - len(ok),
        "output_tokens": sum(o.output_tokens for o in ok),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(sum(o.output_tokens for o in ok) / seconds, 1),
        "median_ttft_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
    }


# ---- requests the proxy did not route, and duplicate X-Request-Ids (issue 6)


def reliability_requests() -> list[Request]:
    """A probe sent straight to a server, and two prompts for duplicate ids."""
    rng = random.Random(4242)
    out = []
    for name in ("probe", "dup-a", "dup-b"):
        body = {
            "model": MODEL_NAME,
            "prompt": sentence(rng, MEDIUM),
            "max_tokens": 16,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "logprobs": 2,
        }
        out.append(Request(f"{name}-cmpl-{MEDIUM}w", COMPLETIONS, body))
    return out


def healthy(base_url: str, timeout: float = 5.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


async def _same_id(prefill_url, decode_url, reqs, request_id, timeout):
    """What a router that reuses X-Request-Id does: prefill all, then decode all."""
    headers = {"X-Request-Id": request_id}
    prefill_reqs = [Request(r.name, r.path, {**r.body, "max_tokens": 1}) for r in reqs]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        first = await asyncio.gather(
            *(
                send(session, prefill_url, r, timeout, headers=headers)
                for r in prefill_reqs
            )
        )
        bad = [o for o in first if o.status != "ok"]
        if bad:
            return [Outcome(o.status, detail="prefill: " + o.detail) for o in first]
        return await asyncio.gather(
            *(send(session, decode_url, r, timeout, headers=headers) for r in reqs)
        )


def same_id(prefill_url, decode_url, reqs, request_id, timeout) -> list[Outcome]:
    """Send ``reqs`` at once with one X-Request-Id; decode's answers."""
    return asyncio.run(_same_id(prefill_url, decode_url, reqs, request_id, timeout))


def answered_like(outcome: Outcome, ref: dict) -> str:
    """ "correct", "wrong", "hang" or "error" for one request."""
    if outcome.status != "ok":
        return {"timeout": "hang"}.get(outcome.status, "error")
    return "wrong" if compare(outcome, ref)[0] == "wrong" else "correct"
