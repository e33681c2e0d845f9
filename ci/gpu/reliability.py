#!/usr/bin/env python3
r"""Reliability of the patched P2pNcclConnector on GPUs (issue 9).

One P/D pair per send type and kv_load_failure_policy (recompute, fail),
randomization on, kv_connector_extra_config.recv_timeout_s small (5 s), plus
two GET pairs whose producer has a small kv_buffer_size, and one plain
reference engine; all start at once (prefill on the first visible GPU, decode
on the second, multicast off in every process). Then, on every pair at once:

- retry (regular pairs): two requests with one proxy-format X-Request-Id,
  sent by a two-step client (prefill with max_tokens=1 to the prefill server,
  then the request to the decode server) in several interleavings: a
  sequential retry; B's prefill overlapping A's and B's decode after A's
  decode finished (the issue-9 freeze); overlapping prefills and decodes;
  B's prefill while A decodes; another prompt with the same id. Every answer
  must equal the reference's; then a fresh request through the proxy.
- kill (regular pairs, after retry): requests start through the proxy
  (--kill-requests, spread over --spread s); --kill-after s after the first,
  the prefill engine's process group gets SIGKILL. Every request must end
  within recv_timeout_s + --margin s, with the reference's answer or an error
  (an error is allowed with policy fail, or when prefill itself failed: the
  proxy marks those X-PD-Stage: prefill), never wrong, never a hang. Decode's
  /health must stay 200; then prefill restarts on the same ports and a fresh
  workload must be answered correctly.
- overflow (GET pairs with the small send store): --overflow-requests at once;
  recompute: all correct; fail: every answer correct or an error, never wrong,
  never a hang; decode healthy afterwards and a few requests one at a time
  correct.

Answers are compared token for token (temperature 0) with the reference; a
first difference where the reference's top-2 logprobs are closer than
workload.TIE_GAP is a near-tie, counted as correct and listed apart. The
reference answers every request twice (all at once both times, different
order): how many of those differ is reported as the noise floor.

Every engine, the reference included, runs in vLLM's default execution mode
(CUDA graphs, V2 model runner, async scheduling) unless --mode names others:
variants such as eager, piecewise, v1-eager (tests/gpu/servers.py
MODE_PARTS), comma separated. The modes run one after another, each with its
own engines, reference and --budget; a pair is reported as
<mode>:<pair>:<policy>, its logs under <log-dir>/<mode>/.

    python ci/gpu/reliability.py --site /tmp/site-series --out $OUT/rel \
        [--mode default,eager]

Writes <out>.json and <out>.md, prints the table; exit status 0 whether or not
a scenario failed (the table says), 1 if the run itself broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))

import proxy  # noqa: E402
import servers  # noqa: E402
import tiny_model  # noqa: E402
import workload  # noqa: E402

logger = logging.getLogger("reliability")

POLICIES = ("recompute", "fail")
# recompute on vLLM's V1 model runner (the V2 runner, 0.23.0's default for
# Llama, has an open recompute bug upstream, #49250): for PUT_ASYNC and the
# overflow pair only, to tell the two apart.
# Patch 0009 turns recompute into fail where vLLM core recomputes wrong: with
# async scheduling or the V2 runner without the core add-on, and on the V1
# runner with async scheduling even with it (recompute-v1). Such pairs answer
# with errors and their recompute verdict says so; run the recompute pairs on
# the add-on's tree (device.sh: GPU_SITE=/tmp/site-addon).
V1_RECOMPUTE = "recompute-v1"
# recompute without async scheduling (the V2 runner, synchronous scheduler).
SYNC_RECOMPUTE = "recompute-sync"
V1_RECOMPUTE_SEND_TYPES = ("PUT_ASYNC",)
SCENARIOS = ("retry", "kill", "overflow")
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
COUNT_KEYS = ("correct", "tie", "wrong", "error", "prefill_error", "hang")
# Decode-side log lines that say KV did not arrive (patch 0004) or a GET
# was not answered.
LOAD_ERROR_RE = re.compile(r"was not received|No tensor .* after|No answer from")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "half": 2, "float32": 4, "float": 4}


# ---- plan


@dataclass
class Pair:
    key: str  # "PUT:recompute", "GET-small:fail", ...
    send_type: str
    policy: str
    scenarios: tuple[str, ...]
    prefill: servers.EngineSpec
    decode: servers.EngineSpec
    proxy_port: int


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """KV bytes one token takes in all layers (K and V) of the model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
    )
    return config["num_hidden_layers"] * 2 * heads * head_dim * DTYPE_BYTES[dtype]


def small_buffer_bytes(per_token: int, requests: float = 2.5) -> int:
    """A GET send store that holds ``requests`` of the longest prompts."""
    tokens = (workload.LONG + 28 + 15) // 16 * 16  # chat template, whole blocks
    return int(requests * tokens * per_token)


def plan_pairs(
    gpus: list[str],
    *,
    send_types: tuple[str, ...] = servers.SEND_TYPES,
    policies: tuple[str, ...] = POLICIES,
    recv_timeout: float = 5.0,
    small_buffer: int = 0,
    overflow_batched: int = 8192,
    v1_recompute: bool = False,
    mode: str = servers.DEFAULT_MODE,
) -> list[Pair]:
    """Regular pairs (retry, kill) and, if small_buffer, GET-small pairs.

    Every engine runs in execution mode ``mode``; the recompute-v1 and
    recompute-sync policies add their runner and scheduling on top.
    """
    plans = [(s, p, ("retry", "kill")) for s in send_types for p in policies]
    extra = (V1_RECOMPUTE, SYNC_RECOMPUTE) if v1_recompute else ()
    plans += [(s, p, ("kill",)) for s in V1_RECOMPUTE_SEND_TYPES for p in extra]
    if small_buffer:
        plans += [("GET", p, ("overflow",)) for p in (*policies, *extra)]
    pairs = []
    for send_type, policy, scenarios in plans:
        *ports, proxy_port = servers.free_ports(5)
        prefill, decode = servers.plan_pd(
            gpus,
            send_type=send_type,
            randomization=True,
            ports=ports,
            slot=len(pairs),
            mode=mode,
        )
        name = send_type if scenarios != ("overflow",) else "GET-small"
        for spec in (prefill, decode):
            spec.name = f"{name}-{policy}-{spec.name}"
            spec.kv_overrides = {"kv_load_failure_policy": policy.split("-")[0]}
            if policy == V1_RECOMPUTE:
                spec.env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            if policy == SYNC_RECOMPUTE:
                spec.extra_args = [*spec.extra_args, "--no-async-scheduling"]
            spec.kv_extra = {"recv_timeout_s": str(recv_timeout)}
        if scenarios == ("overflow",):
            prefill.kv_overrides["kv_buffer_size"] = small_buffer
            # Many prompts in one step: their KV waits in the store together.
            batched = f"--max-num-batched-tokens={overflow_batched}"
            prefill.extra_args = [*prefill.extra_args, batched]
        pairs.append(
            Pair(
                f"{name}:{policy}",
                send_type,
                policy,
                scenarios,
                prefill,
                decode,
                proxy_port,
            )
        )
    return pairs


# ---- requests


def retry_requests(count: int, seed: int = 21) -> list[workload.Request]:
    """Completions with top-2 logprobs (for near-ties), one per retry prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = (workload.MEDIUM, workload.LARGE)[i % 2]
        body = {
            "model": workload.MODEL_NAME,
            "prompt": tiny_model.sentence(rng, words),
            "max_tokens": 16,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "logprobs": 2,
        }
        out.append(
            workload.Request(f"retry{i:02d}-cmpl-{words}w", workload.COMPLETIONS, body)
        )
    return out


def named(prefix: str, requests: list[workload.Request]) -> list[workload.Request]:
    return [workload.Request(f"{prefix}-{r.name}", r.path, r.body) for r in requests]


@dataclass
class RequestSets:
    kill: list[workload.Request]
    fresh: list[workload.Request]
    retry: list[workload.Request]
    overflow: list[workload.Request]
    overflow_fresh: list[workload.Request]

    def all(self) -> list[workload.Request]:
        return self.kill + self.fresh + self.retry + self.overflow + self.overflow_fresh


def build_sets(kill: int = 32, fresh: int = 16, overflow: int = 32) -> RequestSets:
    return RequestSets(
        # Longer answers: decode is still busy when prefill is killed.
        kill=named(
            "kill", workload.build_requests(kill, max_tokens=(48, 64, 96), seed=31)
        ),
        fresh=named("fresh", workload.build_requests(fresh, seed=32)),
        retry=retry_requests(7),
        overflow=named("ovf", workload.build_requests(overflow, seed=33)),
        overflow_fresh=named("ovf-fresh", workload.build_requests(4, seed=34)),
    )


# ---- sending


@dataclass
class Result:
    status: str  # "ok" | "error" | "timeout"
    seconds: float
    outcome: workload.Outcome | None = None
    http: int | None = None
    stage: str = ""  # X-PD-Stage of an error answer of the proxy
    detail: str = ""
    start: float = 0.0  # time.monotonic() when sent


async def post(
    session: aiohttp.ClientSession,
    base_url: str,
    req: workload.Request,
    timeout: float,
    *,
    headers: dict | None = None,
    body: dict | None = None,
) -> Result:
    """One request; no answer within ``timeout`` s is a timeout (a hang)."""
    start = time.monotonic()

    async def go() -> Result:
        async with session.post(
            base_url + req.path, json=body or req.body, headers=headers
        ) as resp:
            text = await resp.text()
            stage = resp.headers.get(proxy.STAGE_HEADER, "")
            if resp.status == 504:
                return Result("timeout", 0, http=504, detail=text[:200])
            if resp.status != 200:
                return Result(
                    "error", 0, http=resp.status, stage=stage, detail=text[:300]
                )
            return Result("ok", 0, outcome=workload.parse(req.path, json.loads(text)))

    try:
        result = await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        result = Result("timeout", 0, detail=f"no answer in {timeout:.0f} s")
    except (aiohttp.ClientError, ValueError, KeyError) as exc:
        result = Result("error", 0, detail=repr(exc)[:300])
    result.seconds = round(time.monotonic() - start, 3)
    result.start = start
    return result


async def healthy(base_url: str, timeout: float = 5.0) -> bool:
    limit = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(base_url + "/health", timeout=limit) as resp,
        ):
            return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


# ---- judging


def classify(result: Result, ref: dict | None) -> tuple[str, str]:
    """One request: a COUNT_KEYS key and a detail."""
    if result.status == "timeout":
        return "hang", result.detail
    if result.status == "error":
        key = "prefill_error" if result.stage == "prefill" else "error"
        return key, f"HTTP {result.http}: {result.detail}"
    if ref is None:
        return "error", "no reference answer"
    status, detail = workload.compare(result.outcome, ref)
    return {"match": "correct", "tie": "tie", "wrong": "wrong"}[status], detail


def tally(
    results: list[Result], requests: list[workload.Request], refs: dict[str, dict]
) -> dict:
    counts = dict.fromkeys(COUNT_KEYS, 0)
    notes = []
    for req, res in zip(requests, results, strict=True):
        key, detail = classify(res, refs.get(req.name))
        counts[key] += 1
        if key != "correct" and len(notes) < 8:
            notes.append(f"{req.name}: {key} after {res.seconds:.1f} s: {detail[:160]}")
    return {
        "n": len(results),
        "counts": counts,
        "max_seconds": max((r.seconds for r in results), default=0.0),
        "notes": notes,
    }


def all_correct(t: dict) -> bool:
    return t["counts"]["correct"] + t["counts"]["tie"] == t["n"]


def no_wrong_no_hang(t: dict) -> bool:
    return t["counts"]["wrong"] == 0 and t["counts"]["hang"] == 0


def count_log(path: Path | None, pattern: re.Pattern = LOAD_ERROR_RE) -> int:
    if path is None:
        return 0
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if pattern.search(line))
    except OSError:
        return 0


# ---- scenarios (one pair each; the pair is a Handle)


@dataclass
class Handle:
    """A running pair, as the scenarios see it."""

    key: str
    send_type: str
    policy: str
    scenarios: tuple[str, ...]
    proxy: str  # base URLs
    prefill: str
    decode: str
    prefill_kv: str  # ZMQ addresses, for X-Request-Id
    decode_kv: str
    kill_prefill: Callable[[], Awaitable[None]]
    restart_prefill: Callable[[], Awaitable[bool]]  # True once healthy again
    decode_log: Path | None = None


@dataclass
class Config:
    recv_timeout: float = 5.0
    margin: float = 25.0  # the time allowed past recv_timeout
    kill_after: float = 1.0
    spread: float = 2.0  # kill workload: requests spread over this many s
    restart_timeout: float = 210.0  # torch.compile and graph capture included

    @property
    def request_timeout(self) -> float:
        return self.recv_timeout + self.margin


def judged(scenario: str, policy: str, parts: dict) -> tuple[str, list[str]]:
    """("pass" | "FAIL", reasons) of one scenario of one pair."""
    reasons = []
    if scenario == "kill":
        w = parts["workload"]
        if not no_wrong_no_hang(w):
            reasons.append("wrong or hung answers while prefill died")
        if policy.startswith("recompute") and w["counts"]["error"]:
            reasons.append("decode-side errors with policy recompute")
        if not parts["decode_healthy_after_kill"]:
            reasons.append("decode /health not 200 after the kill")
        if not parts["prefill_restarted"]:
            reasons.append("prefill did not come back on the same ports")
        elif not all_correct(parts["fresh"]):
            reasons.append("fresh workload after the restart not all correct")
    elif scenario == "retry":
        bad = [c for c, r in parts["cases"].items() if r["verdict"] != "correct"]
        if bad:
            reasons.append("not correct: " + ", ".join(bad))
        if not parts["fresh_correct"]:
            reasons.append("fresh request after the retries not correct")
    elif scenario == "overflow":
        w = parts["workload"]
        if policy.startswith("recompute") and not all_correct(w):
            reasons.append("not all correct with policy recompute")
        if not no_wrong_no_hang(w):
            reasons.append("wrong or hung answers")
        if not parts["decode_healthy"]:
            reasons.append("decode /health not 200 afterwards")
        if not all_correct(parts["fresh"]):
            reasons.append("requests one at a time afterwards not all correct")
    return ("FAIL" if reasons else "pass"), reasons


async def scenario_kill(
    h: Handle,
    reqs: list[workload.Request],
    fresh: list[workload.Request],
    refs: dict,
    cfg: Config,
) -> dict:
    timeout = cfg.request_timeout
    step = cfg.spread / max(len(reqs), 1)
    async with session() as s:
        t0 = time.monotonic()

        async def one(i: int, req: workload.Request) -> Result:
            await asyncio.sleep(i * step)
            return await post(s, h.proxy, req, timeout)

        async def killer() -> float:
            await asyncio.sleep(cfg.kill_after)
            await h.kill_prefill()
            return time.monotonic()

        killed_at, *results = await asyncio.gather(
            killer(), *(one(i, r) for i, r in enumerate(reqs))
        )
        parts: dict = {"workload": tally(results, reqs, refs)}
        parts["sent_before_kill"] = sum(r.start < killed_at for r in results)
        parts["kill_at_s"] = round(killed_at - t0, 2)
        parts["decode_healthy_after_kill"] = await healthy(h.decode)
        parts["prefill_restarted"] = await h.restart_prefill()
        if parts["prefill_restarted"]:
            res = await asyncio.gather(*(post(s, h.proxy, r, timeout) for r in fresh))
            parts["fresh"] = tally(res, fresh, refs)
        parts["decode_healthy_at_end"] = await healthy(h.decode)
    return parts


async def retry_case(
    s: aiohttp.ClientSession,
    h: Handle,
    plan: str,
    req_a: workload.Request,
    req_b: workload.Request,
    refs: dict,
    timeout: float,
) -> dict:
    """One interleaving: "pA+pB dA dB" = prefills of A and B at once, then
    decode A, then decode B; all with one new proxy-format X-Request-Id."""
    headers = {"X-Request-Id": proxy.make_request_id(h.prefill_kv, h.decode_kv)}
    answers: dict[str, Result] = {}

    async def step(token: str) -> None:
        req = req_b if token[1] == "B" else req_a
        if token[0] == "p":
            body = proxy.prefill_body(req.body)
            answers[token] = await post(
                s, h.prefill, req, timeout, headers=headers, body=body
            )
        else:
            answers[token] = await post(s, h.decode, req, timeout, headers=headers)

    for group in plan.split():
        await asyncio.gather(*(step(t.rstrip("'")) for t in group.split("+")))
    verdicts = {
        token: classify(answers[token], refs.get(req.name))
        for token, req in (("dA", req_a), ("dB", req_b))
    }
    keys = [k for k, _ in verdicts.values()]
    prefill = [answers[t].status for t in ("pA", "pB")]
    if "hang" in keys or "timeout" in prefill:
        verdict = "hang"
    elif "wrong" in keys:
        verdict = "wrong"
    elif "error" in prefill or any(k in ("error", "prefill_error") for k in keys):
        verdict = "error"
    else:
        verdict = "correct"
    return {
        "plan": plan,
        "id": headers["X-Request-Id"],
        "verdict": verdict,
        "prefill": prefill,
        "answers": {
            t: f"{k} ({answers[t].seconds:.1f} s){': ' + d[:120] if d else ''}"
            for t, (k, d) in verdicts.items()
        },
    }


async def scenario_retry(
    h: Handle, prompts: list[workload.Request], fresh: workload.Request, refs, cfg
) -> dict:
    """Interleavings of two requests A and B with one X-Request-Id."""
    timeout = cfg.request_timeout
    cases = {
        "sequential retry": "pA dA pB dB",
        "B prefill overlaps A's, B decode after A's": "pA+pB dA dB",
        "prefills overlap, decodes overlap": "pA+pB dA+dB",
        "B prefill while A decodes": "pA dA+pB dB",
        "other prompt, same id": "pA+pB' dA+dB'",
    }
    parts: dict = {"cases": {}}
    async with session() as s:
        for n, (case, plan) in enumerate(cases.items()):
            req_a = prompts[n % len(prompts)]
            req_b = prompts[(n + 1) % len(prompts)] if "'" in plan else req_a
            result = await retry_case(s, h, plan, req_a, req_b, refs, timeout)
            parts["cases"][case] = result
            if result["verdict"] == "hang":  # decode is likely stuck: stop here
                for rest in list(cases)[n + 1 :]:
                    parts["cases"][rest] = {"plan": cases[rest], "verdict": "not run"}
                break
        res = await post(s, h.proxy, fresh, timeout)
        parts["fresh"] = classify(res, refs.get(fresh.name))[0]
        parts["fresh_correct"] = parts["fresh"] in ("correct", "tie")
        parts["decode_healthy"] = await healthy(h.decode)
    return parts


async def scenario_overflow(
    h: Handle,
    reqs: list[workload.Request],
    fresh: list[workload.Request],
    refs: dict,
    cfg: Config,
) -> dict:
    timeout = cfg.request_timeout
    before = count_log(h.decode_log)
    async with session() as s:
        res = await asyncio.gather(*(post(s, h.proxy, r, timeout) for r in reqs))
        parts: dict = {"workload": tally(res, reqs, refs)}
        parts["decode_healthy"] = await healthy(h.decode)
        one_by_one = [await post(s, h.proxy, r, timeout) for r in fresh]
        parts["fresh"] = tally(one_by_one, fresh, refs)
    parts["decode_load_error_lines"] = count_log(h.decode_log) - before
    return parts


async def run_pair(h: Handle, sets: RequestSets, refs: dict, cfg: Config, sink: dict):
    """Run the pair's scenarios in order; each result goes to sink[scenario]."""
    for scenario in h.scenarios:
        t0 = time.monotonic()
        try:
            if scenario == "retry":
                parts = await scenario_retry(h, sets.retry, sets.fresh[0], refs, cfg)
            elif scenario == "kill":
                parts = await scenario_kill(h, sets.kill, sets.fresh, refs, cfg)
            else:
                parts = await scenario_overflow(
                    h, sets.overflow, sets.overflow_fresh, refs, cfg
                )
            verdict, reasons = judged(scenario, h.policy, parts)
        except Exception as exc:  # noqa: BLE001 - recorded, the others go on
            logger.exception("%s %s", h.key, scenario)
            parts, verdict, reasons = {}, "FAIL", [f"scenario broke: {exc!r}"]
        parts.update(verdict=verdict, reasons=reasons)
        parts["seconds"] = round(time.monotonic() - t0, 1)
        sink[scenario] = parts
        logger.info("%s %s: %s %s", h.key, scenario, verdict, reasons)


async def reference_answers(
    base_url: str, requests: list[workload.Request], timeout: float = 60.0
) -> tuple[dict[str, dict], dict]:
    """The oracle (first pass) and the noise floor (second pass, shuffled)."""
    async with session() as s:
        first = await asyncio.gather(*(post(s, base_url, r, timeout) for r in requests))
        order = list(range(len(requests)))
        random.Random(5).shuffle(order)
        second_shuffled = await asyncio.gather(
            *(post(s, base_url, requests[i], timeout) for i in order)
        )
    second = [None] * len(requests)
    for i, res in zip(order, second_shuffled, strict=True):
        second[i] = res
    refs = {}
    for req, res in zip(requests, first, strict=True):
        if res.status == "ok":
            o = res.outcome
            refs[req.name] = {"tokens": o.tokens, "texts": o.texts, "gaps": o.gaps}
    noise = tally(second, requests, refs)
    noise["failed_first_pass"] = len(requests) - len(refs)
    return refs, noise


# ---- report


def cell_counts(scenario: str, parts: dict) -> dict:
    """correct / error / wrong / hang of one cell, over all its requests."""
    c = dict.fromkeys(("correct", "error", "wrong", "hang"), 0)
    tallies = []
    if scenario in ("kill", "overflow"):
        tallies = [parts.get("workload"), parts.get("fresh")]
    for t in filter(None, tallies):
        k = t["counts"]
        c["correct"] += k["correct"] + k["tie"]
        c["error"] += k["error"] + k["prefill_error"]
        c["wrong"] += k["wrong"]
        c["hang"] += k["hang"]
    if scenario == "retry":
        for case in parts.get("cases", {}).values():
            v = case["verdict"]
            key = {"correct": "correct", "wrong": "wrong", "hang": "hang"}.get(
                v, "error"
            )
            if v != "not run":
                c[key] += 1
    return c


def cell_notes(scenario: str, parts: dict) -> str:
    notes = list(parts.get("reasons", []))
    w = parts.get("workload")
    if scenario == "kill" and w:
        k = w["counts"]
        fresh = parts.get("fresh")
        notes.append(
            f"workload: {k['correct'] + k['tie']}/{w['n']} correct, prefill-stage "
            f"errors {k['prefill_error']}, decode errors {k['error']}, slowest "
            f"{w['max_seconds']:.1f} s; kill at {parts.get('kill_at_s')} s, "
            f"{parts.get('sent_before_kill')} sent before; decode health "
            f"{parts.get('decode_healthy_after_kill')}; restart "
            f"{parts.get('prefill_restarted')}; fresh after restart: "
            + (
                f"{fresh['counts']['correct'] + fresh['counts']['tie']}/{fresh['n']} "
                "correct"
                if fresh
                else "not run"
            )
        )
    if scenario == "overflow" and w:
        notes.append(
            f"errors {w['counts']['error']}, decode 'not received' log lines "
            f"{parts.get('decode_load_error_lines')}; slowest {w['max_seconds']:.1f} s"
        )
    if scenario == "retry" and parts.get("cases"):
        bad = [
            f"{c}: {r['verdict']}"
            for c, r in parts["cases"].items()
            if r["verdict"] != "correct"
        ]
        notes += bad
        notes.append(f"fresh: {parts.get('fresh')}")
    for t in (w, parts.get("fresh") if isinstance(parts.get("fresh"), dict) else None):
        if t and (tie := t["counts"]["tie"]):
            notes.append(f"{tie} near-tie")
    return "; ".join(notes)


def render(data: dict) -> str:
    s = data.get("settings", {})
    m = data.get("machine", {})
    lines = [
        f"# P2pNcclConnector reliability (issue 9) on {m.get('gpu', '?')}",
        "",
        f"Written {data.get('written', '?')} by ci/gpu/reliability.py.",
        "",
        "| | |",
        "|---|---|",
        f"| site | {data.get('site', {})} |",
        f"| patches/ (sha256) | {data.get('patches', '?')} |",
        f"| topology | {m.get('topology', '?')} |",
        f"| settings | {json.dumps(s)} |",
    ]
    modes = data.get("modes", {})
    for mode, facts in modes.items():
        lines.append(
            f"| mode {servers.describe_mode(mode)} | engines up after "
            f"{facts.get('startup_seconds', '?')} s |"
        )
        if noise := facts.get("noise"):
            lines.append(
                f"| reference noise floor, {mode} | second pass vs first: "
                f"{noise['counts']} of {noise['n']} |"
            )
    lines += [
        "",
        "correct includes near-ties (first difference where the reference's "
        f"top-2 logprobs are closer than {s.get('tie_gap', '?')}). kill: errors "
        "include requests whose prefill failed (prefill dead), see notes.",
        "",
        "| mode | scenario | pair | policy | verdict | correct | error | wrong "
        "| hang | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, per in data.get("pairs", {}).items():
        mode, name, policy = key.split(":")
        for scenario in SCENARIOS:
            if (parts := per.get(scenario)) is None:
                continue
            c = cell_counts(scenario, parts)
            lines.append(
                f"| {mode} | {scenario} | {name} | {policy} "
                f"| {parts.get('verdict', '?')} "
                f"| {c['correct']} | {c['error']} | **{c['wrong']}** | **{c['hang']}** "
                f"| {cell_notes(scenario, parts)} |"
            )
    for mode, facts in modes.items():
        if facts.get("did_not_start"):
            lines += ["", f"Did not start ({mode}): {facts['did_not_start']}"]
    details = []
    for key, per in data.get("pairs", {}).items():
        for scenario, parts in per.items():
            for t in (parts.get("workload"), parts.get("fresh")):
                if isinstance(t, dict) and t.get("notes"):
                    details.append(f"- `{key}` {scenario}:")
                    details += [f"  - {n}" for n in t["notes"][:5]]
    if details:
        lines += ["", "## Details (first notes)", "", *details]
    return "\n".join(lines) + "\n"


def write(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data["written"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(render(data))


# ---- main (GPU)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--site", required=True, type=Path, help="patched site-packages"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="<out>.json and <out>.md"
    )
    parser.add_argument("--send-types", default=",".join(servers.SEND_TYPES))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--no-overflow", action="store_true", help="no GET-small pairs")
    parser.add_argument(
        "--v1-recompute",
        action="store_true",
        help="also recompute on the V1 runner (PUT_ASYNC kill, overflow)",
    )
    parser.add_argument("--recv-timeout", type=float, default=5.0)
    parser.add_argument("--margin", type=float, default=25.0)
    parser.add_argument("--kill-after", type=float, default=1.0)
    parser.add_argument("--spread", type=float, default=2.0)
    parser.add_argument("--kill-requests", type=int, default=32)
    parser.add_argument("--overflow-requests", type=int, default=32)
    parser.add_argument("--buffer-requests", type=float, default=2.5)
    parser.add_argument("--dtype", default="float32")
    servers.add_mode_argument(parser, in_turn=True)
    parser.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="s per mode (the first mode's from the script's start)",
    )
    # Graph capture and torch.compile of ~17 engines at once: 30 s and more
    # over the 70 to 135 s they took in eager mode.
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--model-dir", type=Path, default=Path("/tmp/p2p-gpu-tier/tiny-llama")
    )
    parser.add_argument(
        "--log-dir", type=Path, default=servers.log_root() / "reliability"
    )
    parser.add_argument("--logs-tar", type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> int:  # pragma: no cover - needs GPUs and vLLM
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    os.environ.update(MULTICAST_OFF)
    os.environ.pop("NCCL_HOSTID", None)
    t0 = time.monotonic()
    gpus = servers.visible_gpus()
    if len(gpus) < 2:
        logger.warning("fewer than two GPUs: prefill and decode share one")
    model_dir = tiny_model.build(args.model_dir)  # served with --dtype
    per_token = kv_bytes_per_token(model_dir, args.dtype)
    small = (
        0 if args.no_overflow else small_buffer_bytes(per_token, args.buffer_requests)
    )
    cfg = Config(args.recv_timeout, args.margin, args.kill_after, args.spread)
    sets = build_sets(args.kill_requests, 16, args.overflow_requests)
    data: dict = {
        "site": str(args.site),
        "settings": {
            "recv_timeout_s": args.recv_timeout,
            "margin_s": args.margin,
            "kill_after_s": args.kill_after,
            "dtype": args.dtype,
            "kv_bytes_per_token": per_token,
            "small_kv_buffer_size": small,
            "tie_gap": workload.TIE_GAP,
            "randomization": "on",
        },
        "modes": {mode: {} for mode in args.mode},  # startup, noise floor, ...
        "pairs": {},  # "<mode>:<pair>:<policy>" -> scenario -> results
    }
    with contextlib.suppress(Exception):
        import common  # ci/gpu: GPU names, driver, NCCL

        data["machine"] = common.machine_info(gpus)
        data["patches"] = common.patches_digest()
    rc = 0
    try:
        mode_start = t0
        for mode in args.mode:
            rc |= run_mode(
                args, mode, mode_start, gpus, model_dir, sets, cfg, small, data
            )
            mode_start = time.monotonic()
    finally:
        servers.stop_all()
        data["wall_seconds"] = round(time.monotonic() - t0, 1)
        write(args.out, data)
        if args.logs_tar:
            with (
                contextlib.suppress(OSError),
                tarfile.open(args.logs_tar, "w:gz") as tar,
            ):
                tar.add(args.log_dir, arcname="reliability-logs")
    print(render(data))
    return rc


def run_mode(
    args, mode, t0, gpus, model_dir, sets, cfg, small, data
) -> int:  # pragma: no cover - needs GPUs and vLLM
    """One execution mode: start its pairs and reference, run every scenario
    until --budget s after ``t0``, stop them. Results go to
    data["pairs"]["<mode>:<key>"] and data["modes"][mode]; 1 if the run
    broke, else 0."""
    facts = data["modes"][mode]
    log_dir = args.log_dir / mode
    pairs = plan_pairs(
        gpus,
        send_types=tuple(s for s in args.send_types.split(",") if s),
        policies=tuple(args.policies.split(",")),
        recv_timeout=args.recv_timeout,
        small_buffer=small,
        v1_recompute=args.v1_recompute,
        mode=mode,
    )
    ref_spec = servers.plan_reference(gpus, servers.free_ports(1)[0], mode)
    sinks = {p.key: data["pairs"].setdefault(f"{mode}:{p.key}", {}) for p in pairs}
    try:
        with servers.ServerGroup() as group:
            started = {
                "ref": group.add(
                    servers.start_engine(
                        ref_spec,
                        model_dir,
                        log_dir,
                        site=args.site,
                        dtype=args.dtype,
                    )
                )
            }
            for p in pairs:
                d = log_dir / p.key.replace(":", "-")
                for spec in (p.prefill, p.decode):
                    started[spec.name] = group.add(
                        servers.start_engine(
                            spec, model_dir, d, site=args.site, dtype=args.dtype
                        )
                    )
                started[p.key] = group.add(
                    servers.start_proxy(
                        p.proxy_port,
                        p.prefill,
                        p.decode,
                        d,
                        timeout=cfg.request_timeout + 5,
                    )
                )
            down = wait_up(started, args.startup_timeout)
            facts["startup_seconds"] = round(time.monotonic() - t0, 1)
            if "ref" in down:
                raise RuntimeError(f"reference did not start: {down['ref']}")
            handles = []
            for p in pairs:
                names = (p.prefill.name, p.decode.name, p.key)
                if any(n in down for n in names):
                    facts.setdefault("did_not_start", {})[p.key] = [
                        down.get(n) for n in names
                    ]
                    continue
                handles.append(
                    make_handle(p, group, started, model_dir, args, cfg, log_dir)
                )
            refs, noise = asyncio.run(
                reference_answers(servers.url(ref_spec), sets.all())
            )
            facts["noise"] = noise
            remaining = max(30.0, args.budget - (time.monotonic() - t0))

            async def everything():
                await asyncio.wait_for(
                    asyncio.gather(
                        *(run_pair(h, sets, refs, cfg, sinks[h.key]) for h in handles)
                    ),
                    remaining,
                )

            try:
                asyncio.run(everything())
            except asyncio.TimeoutError:
                facts["cut_short"] = f"budget of {args.budget:.0f} s spent"
                logger.error("%s: budget spent: results so far only", mode)
                for h in handles:
                    for scenario in h.scenarios:
                        sinks[h.key].setdefault(
                            scenario,
                            {"verdict": "not finished (budget)", "reasons": []},
                        )
    except Exception:
        logger.exception("%s: reliability run broke", mode)
        return 1
    return 0


def wait_up(started: dict, timeout: float) -> dict[str, str]:  # pragma: no cover
    """name -> why it is not up (exited / not healthy in time)."""
    pending, down = dict(started), {}
    deadline = time.monotonic() + timeout
    while pending:
        for name, server in list(pending.items()):
            if server.proc.poll() is not None:
                down[name] = f"exited with {server.proc.returncode}"
            elif time.monotonic() > deadline:
                down[name] = f"not healthy after {timeout:.0f} s"
            elif servers._healthy(server):
                pass
            else:
                continue
            del pending[name]
        time.sleep(1.0)
    logger.info("servers up; not up: %s", down or "none")
    return down


def make_handle(
    p: Pair, group, started, model_dir, args, cfg, log_dir: Path
) -> Handle:  # pragma: no cover
    """The pair as the scenarios see it; its prefill restarts under log_dir."""
    state = {"prefill": started[p.prefill.name]}

    async def kill() -> None:
        proc = state["prefill"].proc
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        logger.info("%s: SIGKILL to prefill group %s", p.key, proc.pid)
        for _ in range(100):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)

    async def restart() -> bool:
        restart_dir = log_dir / p.key.replace(":", "-") / "restarted"
        server = group.add(
            servers.start_engine(
                p.prefill, model_dir, restart_dir, site=args.site, dtype=args.dtype
            )
        )
        state["prefill"] = server
        deadline = time.monotonic() + cfg.restart_timeout
        while time.monotonic() < deadline and server.proc.poll() is None:
            if await healthy(servers.url(p.prefill), 2.0):
                return True
            await asyncio.sleep(1.0)
        return False

    return Handle(
        key=p.key,
        send_type=p.send_type,
        policy=p.policy,
        scenarios=p.scenarios,
        proxy=f"http://{servers.HOST}:{p.proxy_port}",
        prefill=servers.url(p.prefill),
        decode=servers.url(p.decode),
        prefill_kv=p.prefill.kv_address,
        decode_kv=p.decode.kv_address,
        kill_prefill=kill,
        restart_prefill=restart,
        decode_log=started[p.decode.name].log_path,
    )


if __name__ == "__main__":
    sys.exit(main())
