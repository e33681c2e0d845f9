#!/usr/bin/env python3
r"""Two-GPU P/D benchmark with an 8B-shaped model (issue 12).

Stock vLLM with request id randomization off (the workaround) against the
patched tree with it on (the fix). Both P/D pairs run at once, prefill engines
on the first GPU and decode engines on the second, each pair behind its own
tests/gpu/proxy.py; they are started once and kept up. Rounds alternate
A B B A A B ... (A stock, B patched); the two rounds of a pair send the same
prompts, so drift of the machine hits both trees alike. The model has
Llama-3.1-8B's shape with random weights (--load-format dummy; config.json and
a word-level tokenizer built here, nothing downloaded).

Per round: output tokens/s, TTFT p50/p90 and ITL p50 seen by the streaming
client through the proxy; then the patched/stock ratio of each with a paired
bootstrap 95% confidence interval over round pairs. Then, with the engines
idle: the NCCL limit (ci/gpu/nccl_bw.py, run before the engines start) next
to the KV bytes per request, and the share of TTFT spent in the transfer,
estimated by a direct two-step client (see transfer_probe).

Each round also keeps every request (request_records: the prompt's index,
length and send offset, TTFT, latency, its own ITL p50 and TPOT), its wall
clock start, and one nvidia-smi sample of both GPUs before and one after it
(sample_gpus: clocks, power, temperature, pstate, throttle reasons), to find
what splits ITL p50 into two modes across rounds.

Every engine runs in vLLM's default execution mode (CUDA graphs with
cudagraph_mode FULL_AND_PIECEWISE, the V2 model runner, async scheduling)
unless --mode names a variant: eager, piecewise, full, full_decode_only, v1,
sync, async, or a combination such as v1-eager (tests/gpu/servers.py
MODE_PARTS). The report and the JSON say which; bench_combine.py pools only
runs of one mode.

    python3 ci/gpu/bench_pd.py --stock-site /tmp/site \
        --patched-site /tmp/site-patched --out $OUT [--quick] [--mode eager]

Writes <out>/bench_pd.json (every round, the model shape, versions, topology)
and <out>/bench_pd.md, after every round, so a run cut short keeps its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import common
    from common import servers
except ImportError as exc:  # no aiohttp: the stats still serve bench_combine.py
    common = servers = None  # type: ignore[assignment]
    _CLIENT_MISSING: ImportError | None = exc
else:
    _CLIENT_MISSING = None

logger = logging.getLogger("bench_pd")

MODEL_NAME = "llama8b-dummy"
# Llama-3.1-8B's shape. rope_scaling is left out (plain RoPE): it changes no
# tensor shape and no kernel's cost.
LLAMA_8B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
BLOCK_SIZE = 16  # vLLM's default on CUDA
BOS, EOS, UNK = "<|bos|>", "<|eos|>", "<|unk|>"
SPECIALS = (BOS, EOS, UNK)
FIRST_WORD = len(SPECIALS)  # prompt token ids are drawn from here on
LENGTHS = (1024, 2048, 4096, 8192)
OUTPUT_TOKENS = 128
STOCK, PATCHED = "stock", "patched"  # A and B of the A B B A order
SAFE_ENV = {  # every process: NVLink multicast off (KINDS.md)
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
GIB = 1024**3


# ---------------------------------------------------------------- model


def model_config(num_layers: int = 32, max_position_embeddings: int = 16384) -> dict:
    """config.json of the model: Llama-3.1-8B's shape, bf16."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **LLAMA_8B,
        "num_hidden_layers": num_layers,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": SPECIALS.index(BOS),
        "eos_token_id": SPECIALS.index(EOS),
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def kv_bytes_per_token(config: dict) -> int:
    """K and V of every layer, bf16: 128 KiB for the 8B shape."""
    return (
        2
        * config["num_hidden_layers"]
        * config["num_key_value_heads"]
        * config["head_dim"]
        * 2
    )


def kv_bytes(config: dict, tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """What the connector sends for a prompt: whole blocks of every layer."""
    return math.ceil(tokens / block_size) * block_size * kv_bytes_per_token(config)


def word(i: int) -> str:
    return SPECIALS[i] if i < FIRST_WORD else f"w{i}"


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids.

    Every id the random model can sample decodes to text ("w123"), and a
    prompt of n words is n tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        model_max_length=max(LENGTHS) * 2,
    )


def build_model(out_dir: str | Path, num_layers: int = 32) -> Path:
    """config.json and tokenizer for --load-format dummy (reused if alike)."""
    out = Path(out_dir)
    config = model_config(num_layers)
    marker = out / "bench_pd_model.json"
    if marker.exists() and json.loads(marker.read_text()) == config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(config["vocab_size"]).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": config["bos_token_id"],
                "eos_token_id": config["eos_token_id"],
            }
        )
        + "\n"
    )
    marker.write_text(json.dumps(config) + "\n")
    return out


# ------------------------------------------------------------- workload


def round_prompts(
    pair: int, count: int, lengths=LENGTHS, vocab_size: int = 128256, seed: int = 0
) -> list[list[int]]:
    """The prompts (token ids) of round pair ``pair``: each length alike often.

    Random ids, so no two prompts share a prefix; shuffled, so long and short
    prompts mix in the closed loop.
    """
    rng = random.Random(seed * 1_000_003 + pair)
    sizes = [lengths[i % len(lengths)] for i in range(count)]
    rng.shuffle(sizes)
    return [[rng.randrange(FIRST_WORD, vocab_size) for _ in range(n)] for n in sizes]


def schedule(pairs: int) -> list[tuple[int, str]]:
    """(pair, tree) in the order A B B A A B ...: pair k uses prompts k."""
    order = []
    for k in range(pairs):
        first, second = (STOCK, PATCHED) if k % 2 == 0 else (PATCHED, STOCK)
        order += [(k, first), (k, second)]
    return order


def request_body(prompt: list[int], max_tokens: int = OUTPUT_TOKENS, stream=True):
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


@dataclass
class Sample:
    """One streamed request as the client saw it."""

    prompt_tokens: int
    ok: bool = False
    detail: str = ""
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # gaps between text chunks


async def _stream_one(session, url: str, prompt: list[int], timeout: float) -> Sample:
    import aiohttp

    sample = Sample(len(prompt))
    start = time.perf_counter()
    last = None
    try:
        async with asyncio.timeout(timeout):
            async with session.post(
                url + "/v1/completions", json=request_body(prompt)
            ) as resp:
                if resp.status != 200:
                    sample.detail = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return sample
                async for chunk in common.workload.sse_chunks(resp):
                    if chunk.get("usage"):
                        sample.output_tokens = chunk["usage"]["completion_tokens"]
                    if any(c.get("text") for c in chunk.get("choices", [])):
                        now = time.perf_counter()
                        if last is None:
                            sample.ttft = now - start
                        else:
                            sample.itls.append(now - last)
                        last = now
    except TimeoutError:
        sample.detail = f"no answer in {timeout:.0f} s"
        return sample
    except (aiohttp.ClientError, ValueError, KeyError) as exc:
        sample.detail = repr(exc)[:200]
        return sample
    sample.latency = time.perf_counter() - start
    sample.ok = sample.ttft is not None
    if sample.ok and sample.output_tokens != OUTPUT_TOKENS:
        sample.detail = f"{sample.output_tokens} output tokens"
    return sample


def _client_session():
    """One client session per round: no connection limit, no total timeout
    (each request has its own)."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
    )


async def _closed_loop(url, prompts, concurrency, timeout):
    queue = list(enumerate(prompts))[::-1]
    samples: list[Sample | None] = [None] * len(prompts)
    async with _client_session() as session:

        async def worker():
            while queue:
                i, prompt = queue.pop()
                samples[i] = await _stream_one(session, url, prompt, timeout)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.perf_counter() - start


def arrival_offsets(pair: int, count: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s after the round starts) of a Poisson process of ``rate``.

    The same for both rounds of a pair, so both trees see one arrival
    schedule; the first request goes at 0.
    """
    rng = random.Random((seed + 1) * 7_000_003 + pair)
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def _open_loop(url, prompts, offsets, timeout):
    async with _client_session() as session:
        start = time.perf_counter()

        async def send(prompt, offset):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await _stream_one(session, url, prompt, timeout)

        samples = await asyncio.gather(
            *(send(p, o) for p, o in zip(prompts, offsets, strict=True))
        )
        return list(samples), time.perf_counter() - start


def run_round(
    url, prompts, concurrency, timeout, offsets: list[float] | None = None
) -> tuple[list[Sample], float]:
    """Send ``prompts``: at ``offsets`` (open loop), else with ``concurrency``
    in flight (closed loop)."""
    if offsets is not None:
        return asyncio.run(_open_loop(url, prompts, offsets, timeout))
    return asyncio.run(_closed_loop(url, prompts, concurrency, timeout))


# ---------------------------------------------------------------- stats


def percentile(values, q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    values = sorted(values)
    if not values:
        return None
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def tpot(sample: Sample) -> float | None:
    """Time per output token after the first (s): unlike ITL it does not
    depend on how the stream was cut into chunks."""
    if sample.latency is None or sample.ttft is None or sample.output_tokens < 2:
        return None
    return (sample.latency - sample.ttft) / (sample.output_tokens - 1)


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def summarize_round(samples: list[Sample], seconds: float) -> dict:
    ok = [s for s in samples if s.ok]
    ttfts = [s.ttft for s in ok]
    itls = [g for s in ok for g in s.itls]
    tpots = [t for t in map(tpot, ok) if t is not None]
    tokens = sum(s.output_tokens for s in ok)
    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "short": sum(1 for s in ok if s.output_tokens != OUTPUT_TOKENS),
        "prompt_tokens": sum(s.prompt_tokens for s in samples),
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p90_ms": ms(percentile(ttfts, 90)),
        "itl_p50_ms": ms(percentile(itls, 50)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
        "errors": sorted({s.detail for s in samples if s.detail})[:5],
    }


def request_records(
    samples: list[Sample], offsets: list[float] | None = None
) -> list[dict]:
    """One record per request of a round, in the order of its prompt list.

    ``index`` is the prompt's place in round_prompts(), the same in both
    rounds of a pair, so the two trees' answers to one prompt can be paired.
    ``offset_s`` is the scheduled send time (open loop; None in the closed
    loop). Times in ms, rounded to 0.01 ms; ``tpot_ms`` as in tpot().
    """
    records = []
    for i, s in enumerate(samples):
        record = {
            "index": i,
            "prompt_tokens": s.prompt_tokens,
            "offset_s": None if offsets is None else round(offsets[i], 3),
            "ok": s.ok,
            "ttft_ms": ms(s.ttft),
            "latency_ms": ms(s.latency),
            "output_tokens": s.output_tokens,
            "itl_p50_ms": ms(percentile(s.itls, 50)),
            "tpot_ms": ms(tpot(s)),
        }
        if s.detail:
            record["detail"] = s.detail[:200]
        records.append(record)
    return records


METRICS = (  # key, label, higher is better
    ("tokens_per_s", "output tokens/s", True),
    ("ttft_p50_ms", "TTFT p50 (ms)", False),
    ("ttft_p90_ms", "TTFT p90 (ms)", False),
    ("itl_p50_ms", "ITL p50 (ms)", False),
    ("tpot_p50_ms", "TPOT p50 (ms)", False),
)


def paired(rounds: list[dict], key: str) -> list[tuple[float, float]]:
    """(stock, patched) values of ``key`` for each complete round pair."""
    by_pair: dict[int, dict[str, float]] = {}
    for r in rounds:
        value = r["summary"].get(key)
        if value is not None and not r["summary"]["failed"]:
            by_pair.setdefault(r["pair"], {})[r["tree"]] = value
    return [
        (v[STOCK], v[PATCHED])
        for _, v in sorted(by_pair.items())
        if STOCK in v and PATCHED in v
    ]


def bootstrap_ratio(
    pairs: list[tuple[float, float]], resamples: int = 10000, seed: int = 0
) -> dict | None:
    """Patched/stock ratio of means, with a paired percentile bootstrap 95% CI.

    Round pairs are resampled with replacement, so what drifts within a pair
    stays paired.
    """
    if not pairs:
        return None
    n = len(pairs)
    ratio = sum(p for _, p in pairs) / sum(s for s, _ in pairs)
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        picks = [pairs[rng.randrange(n)] for _ in range(n)]
        ratios.append(sum(p for _, p in picks) / sum(s for s, _ in picks))
    lo, hi = percentile(ratios, 2.5), percentile(ratios, 97.5)
    return {
        "ratio": round(ratio, 4),
        "ci95": [round(lo, 4), round(hi, 4)],
        "half_width_pct": round(50 * (hi - lo) / ratio, 2),
        "pairs": n,
        "resamples": resamples,
    }


REQUEST_METRICS = (  # request record field, key in ratios, label; lower is better
    ("ttft_ms", "ttft_per_request", "TTFT (per-request paired)"),
    ("tpot_ms", "tpot_per_request", "TPOT (per-request paired)"),
)


def request_pairs(rounds: list[dict], name: str) -> list[list[tuple[float, float]]]:
    """Per complete round pair: (stock, patched) ``name`` of each request.

    Requests are matched by their index in the pair's prompt list (the same
    prompt, sent at the same offset); a request that failed in either round,
    or lacks the value, is left out. Pairs where a round has no request
    records (runs before they were kept) or no request is left are left out.
    """
    by_pair: dict[int, dict[str, list[dict]]] = {}
    for r in rounds:
        if r.get("requests"):
            by_pair.setdefault(r["pair"], {})[r["tree"]] = r["requests"]
    out = []
    for pair, trees in sorted(by_pair.items()):
        if STOCK not in trees or PATCHED not in trees:
            continue
        patched = {q["index"]: q for q in trees[PATCHED]}
        values = []
        for s in trees[STOCK]:
            p = patched.get(s["index"])
            if p is None:
                continue
            if p["prompt_tokens"] != s["prompt_tokens"]:
                raise ValueError(
                    f"pair {pair}, request {s['index']}: {s['prompt_tokens']} "
                    f"prompt tokens in stock, {p['prompt_tokens']} in patched"
                )
            a, b = s.get(name), p.get(name)
            if s["ok"] and p["ok"] and a and b and a > 0 and b > 0:
                values.append((a, b))
        if values:
            out.append(values)
    return out


def bootstrap_log_ratio(
    groups: list[list[tuple[float, float]]], resamples: int = 10000, seed: int = 0
) -> dict | None:
    """Per-request paired ratio: the geometric mean of patched/stock over
    requests, with a bootstrap 95% CI that resamples round pairs.

    ``groups``: per round pair, (stock, patched) of each request (from
    request_pairs). Per pair m_k = mean over its requests of log(patched /
    stock); ratio = exp(mean over pairs of m_k), so each pair weighs alike.

    Why: both rounds of a pair send the same prompts at the same offsets, so
    comparing each request with itself takes out what the ratio of round
    p50s mixes in (a round's p50 moves with which of the 1k..8k prompts land
    near the middle and with queueing under that schedule). The bootstrap
    still resamples whole pairs, never single requests: the requests of a
    round share its queue and the machine's state, so drift between rounds
    stays in the interval. It is a different estimator from the ratio of
    p50s (every request counts alike, short and long prompts), not a
    narrower view of the same number.
    """
    if not groups:
        return None
    means = [statistics.fmean(math.log(p / s) for s, p in g) for g in groups]
    n = len(means)
    ratio = math.exp(statistics.fmean(means))
    rng = random.Random(seed)
    ratios = [
        math.exp(sum(means[rng.randrange(n)] for _ in range(n)) / n)
        for _ in range(resamples)
    ]
    lo, hi = percentile(ratios, 2.5), percentile(ratios, 97.5)
    return {
        "ratio": round(ratio, 4),
        "ci95": [round(lo, 4), round(hi, 4)],
        "half_width_pct": round(50 * (hi - lo) / ratio, 2),
        "pairs": n,
        "requests": sum(len(g) for g in groups),
        "resamples": resamples,
    }


def ratios(rounds: list[dict], resamples: int = 10000) -> dict:
    """Ratio of round values for each of METRICS; the per-request paired
    ones (REQUEST_METRICS) only where rounds have request records."""
    out = {
        key: bootstrap_ratio(paired(rounds, key), resamples) for key, _, _ in METRICS
    }
    for name, key, _ in REQUEST_METRICS:
        r = bootstrap_log_ratio(request_pairs(rounds, name), resamples)
        if r is not None:
            out[key] = r
    return out


# -------------------------------------------------------------- engines


@dataclass
class EnginePlan:
    """Engine settings; defaults fit two 8B engines per 80 GB GPU."""

    max_model_len: int = max(LENGTHS) + OUTPUT_TOKENS + 128
    prefill_batched_tokens: int = 16384
    prefill_kv_gib: float = 4.0
    decode_kv_gib: float = 10.0
    kv_buffer_gib: float = 6.0  # consumer GPU buffer before spilling to host
    mem_pool_gib: float = 2.0  # pinned host pool per engine (spill space)
    gpu_memory_utilization: float = 0.3  # only the startup check of free memory
    max_num_seqs: int = 64
    nccl_num_channels: str = "8"
    send_type: str = "PUT_ASYNC"
    mode: str = "default"  # execution mode, servers.MODE_PARTS
    extra_args: list[str] = field(default_factory=list)  # win over the mode's

    def args(self, role: str) -> list[str]:
        prefill = role == "prefill"
        kv = self.prefill_kv_gib if prefill else self.decode_kv_gib
        batched = self.prefill_batched_tokens if prefill else self.max_model_len
        return [
            "--load-format=dummy",
            "--dtype=bfloat16",
            f"--max-model-len={self.max_model_len}",
            f"--kv-cache-memory-bytes={int(kv * GIB)}",
            f"--gpu-memory-utilization={self.gpu_memory_utilization}",
            f"--max-num-batched-tokens={max(batched, self.max_model_len)}",
            f"--max-num-seqs={self.max_num_seqs}",
            # Stock 0.23.0's producer dies on a later prefill chunk
            # (results/README.md); whole prompts only, prefix cache off so a
            # prompt sent again is computed again.
            "--no-enable-chunked-prefill",
            "--no-enable-prefix-caching",
            "--seed=0",
            "--disable-uvicorn-access-log",
            *servers.mode_settings(self.mode)[0],
            *self.extra_args,
        ]

    def env(self, spec: servers.EngineSpec, site: str | Path) -> dict:
        """An engine's environment: the GPU tier's, the mode's, its own, and
        PYTHONPATH=site (its vLLM tree)."""
        return {
            **servers.COMMON_ENV,
            **servers.mode_settings(self.mode)[1],
            **spec.env,
            "PYTHONPATH": str(site),
        }

    def kv_transfer_config(self, spec: servers.EngineSpec) -> dict:
        return {
            "kv_connector": "P2pNcclConnector",
            "kv_role": spec.kv_role,
            "kv_port": spec.kv_port,
            "kv_buffer_size": int(self.kv_buffer_gib * GIB),
            "kv_connector_extra_config": {
                "send_type": self.send_type,
                "mem_pool_size_gb": str(self.mem_pool_gib),
                "nccl_num_channels": self.nccl_num_channels,
                "http_port": str(spec.port),
            },
        }


def plan_pairs(gpus: list[str], ports: list[int]) -> dict[str, tuple]:
    """EngineSpecs of both trees: prefill on gpus[0], decode on gpus[1].

    ports: 4 per tree (prefill http, prefill kv, decode http, decode kv).
    """
    if len(gpus) < 2:
        raise ValueError(f"need two GPUs, see {gpus}")
    out = {}
    for i, tree in enumerate((STOCK, PATCHED)):
        p_http, p_kv, d_http, d_kv = ports[4 * i : 4 * i + 4]
        specs = []
        for role, gpu, http, kv in (
            ("prefill", gpus[0], p_http, p_kv),
            ("decode", gpus[1], d_http, d_kv),
        ):
            env: dict[str, str | None] = {
                "CUDA_VISIBLE_DEVICES": gpu,
                "NCCL_HOSTID": None,
                "NCCL_SOCKET_IFNAME": None,
                servers.RANDOMIZATION_OFF: "1" if tree == STOCK else None,
                **SAFE_ENV,
            }
            kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
            specs.append(
                servers.EngineSpec(
                    f"{tree}-{role}", http, env, kv_role, kv, "PUT_ASYNC"
                )
            )
        out[tree] = tuple(specs)
    return out


def engine_command(spec, plan: EnginePlan, model_dir: Path) -> list[str]:
    role = "prefill" if spec.kv_role == "kv_producer" else "decode"
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        f"--model={model_dir}",
        f"--served-model-name={MODEL_NAME}",
        f"--host={servers.HOST}",
        f"--port={spec.port}",
        *plan.args(role),
        "--kv-transfer-config=" + json.dumps(plan.kv_transfer_config(spec)),
    ]


# ------------------------------------------------- transfer share probe


def _post(url: str, body: dict, request_id: str, timeout: float) -> float:
    """POST /v1/completions (not streamed); seconds until the whole answer."""
    import urllib.request

    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    start = time.perf_counter()
    with opener.open(req, timeout=timeout) as resp:
        payload = json.loads(resp.read())
    seconds = time.perf_counter() - start
    if not payload.get("choices"):
        raise RuntimeError(f"no choices: {str(payload)[:200]}")
    return seconds


def transfer_probe(
    specs: dict[str, tuple], lengths, reps: int, timeout: float, seed: int = 7
) -> dict:
    """How much of TTFT the KV transfer takes, one request at a time.

    For each tree and prompt length, a direct two-step client (what the proxy
    does) with the proxy's X-Request-Id: prefill with max_tokens=1, then
    decode with max_tokens=1. The prefill call returns once the producer's
    step has handed every layer to NCCL (wait_for_save), so it holds the part
    of the transfer that compute did not hide. The baseline is the same prompt
    on the patched prefill engine with an id that names no decode address:
    the patch serves it locally, without transfer (stock's engine would die
    on such an id, so stock is never sent one). Exposed transfer = prefill
    with transfer - prefill alone; share = exposed / (prefill + decode).
    """
    import proxy

    rng = random.Random(seed)
    out: dict = {"method": transfer_probe.__doc__.split("\n\n")[1], "rows": []}
    for length in lengths:
        prompts = [
            [rng.randrange(FIRST_WORD, 128256) for _ in range(length)]
            for _ in range(reps + 1)
        ]
        row: dict = {"tokens": length}
        local = []
        p_local = servers.url(specs[PATCHED][0])
        for i, prompt in enumerate(prompts):
            t = _post(
                p_local,
                request_body(prompt, 1, False),
                f"local-{uuid.uuid4().hex}",
                timeout,
            )
            if i:
                local.append(t)
        row["prefill_alone_ms"] = round(1000 * statistics.median(local), 2)
        for tree in (STOCK, PATCHED):
            prefill, decode = specs[tree]
            t_p, t_d = [], []
            for i, prompt in enumerate(prompts):
                rid = proxy.make_request_id(prefill.kv_address, decode.kv_address)
                a = _post(
                    servers.url(prefill), request_body(prompt, 1, False), rid, timeout
                )
                b = _post(
                    servers.url(decode), request_body(prompt, 1, False), rid, timeout
                )
                if i:
                    t_p.append(a)
                    t_d.append(b)
            p_ms = 1000 * statistics.median(t_p)
            d_ms = 1000 * statistics.median(t_d)
            exposed = p_ms - row["prefill_alone_ms"]
            row[tree] = {
                "prefill_with_transfer_ms": round(p_ms, 2),
                "decode_first_token_ms": round(d_ms, 2),
                "ttft_ms": round(p_ms + d_ms, 2),
                "exposed_transfer_ms": round(exposed, 2),
                "transfer_share_of_ttft": round(exposed / (p_ms + d_ms), 4),
            }
        out["rows"].append(row)
        logger.info("transfer probe: %s", row)
    return out


# --------------------------------------------------------------- report


def render_per_request(ratios: dict) -> list[str]:
    """The per-request paired table; nothing for runs without request records."""
    rows = [(label, ratios.get(key)) for _, key, label in REQUEST_METRICS]
    if not any(r for _, r in rows):
        return []
    lines = [
        "",
        "Per-request paired: for each request that succeeded in both rounds of"
        " a pair (the same prompt at the same send offset), log(patched /"
        " stock); the mean over a pair's requests, then over pairs; ratio = exp"
        " of that, a geometric mean of per-request ratios. 95% CI: bootstrap"
        " over round pairs, as above.",
        "",
        "| metric | ratio | 95% CI | +-% | pairs | requests |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        if r:
            lines.append(
                f"| {label} | {r['ratio']:.4f} | {r['ci95'][0]:.4f}-"
                f"{r['ci95'][1]:.4f} | {r['half_width_pct']:.2f} | {r['pairs']} | "
                f"{r['requests']} |"
            )
    return lines


def throttle_names(value) -> str:
    """nvidia-smi's active clock event reasons (hex bitmask) in words."""
    try:
        bits = int(value, 16)
    except (TypeError, ValueError):
        return str(value)
    names = [name for bit, name in THROTTLE_BITS if bits & bit]
    unknown = bits & ~sum(bit for bit, _ in THROTTLE_BITS)
    if unknown:
        names.append(hex(unknown))
    return "+".join(names) or "none"


def render_gpu_state(rounds: list[dict]) -> list[str]:
    """Each round's GPU samples, before -> after; nothing for older runs."""
    if not any("gpu_before" in r for r in rounds):
        return []
    cols = ("sm_mhz", "mem_mhz", "power_w", "temp_c", "pstate", "throttle")
    lines = [
        "",
        "## GPU state around each round",
        "",
        "One nvidia-smi sample of each GPU just before and just after the round"
        " (before -> after). ITL p50 of the round for reference.",
        "",
        "| # | tree | start (UTC) | ITL p50 | GPU | SM MHz | mem MHz | W | C "
        "| pstate | throttle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds):
        start = r.get("start_unix_s")
        when = "-" if start is None else time.strftime("%H:%M:%S", time.gmtime(start))
        head = f"| {i} | {r['tree']} | {when} | {r['summary'].get('itl_p50_ms')} |"
        before, after = r.get("gpu_before") or {}, r.get("gpu_after") or {}
        errors = [x["error"] for x in (before, after) if x.get("error")]
        if errors:
            lines.append(f"{head} error: {'; '.join(errors)} |" + " |" * 6)
            continue
        after_by_gpu = {g.get("index"): g for g in after.get("gpus", [])}
        for g in before.get("gpus", []):
            a = after_by_gpu.get(g.get("index"), {})
            cells = []
            for col in cols:
                x, y = (v if v is not None else "-" for v in (g.get(col), a.get(col)))
                if col == "throttle":
                    x, y = throttle_names(x), throttle_names(y)
                cells.append(f"{x} -> {y}")
            lines.append(f"{head} {g.get('index')} | {' | '.join(cells)} |")
    return lines


def render(data: dict) -> str:
    m = data.get("machine", {})
    lines = [
        f"# P/D benchmark, two GPUs: {m.get('gpu', '?')}",
        "",
        f"Written by ci/gpu/bench_pd.py{' (--quick)' if data.get('quick') else ''}"
        f" at {data.get('written', '?')}.",
        "",
        "| | |",
        "|---|---|",
        f"| GPUs | {m.get('gpu', '?')} (driver {m.get('driver', '?')}) |",
        f"| torch / CUDA / NCCL (torch) | {m.get('torch', '?')} / {m.get('cuda', '?')}"
        f" / {m.get('nccl', '?')} |",
        f"| NCCL (vLLM's NCCLLibrary) | {data.get('nccl_bw', {}).get('nccl', '?')} |",
    ]
    for tree, t in data.get("trees", {}).items():
        lines.append(f"| vLLM {tree} | {t['vllm']} ({t['state']}, {t['site']}) |")
    lines += [
        f"| patches/ (sha256) | {data.get('patches', '?')} |",
        f"| model | {data.get('model_summary', '?')} |",
        f"| engines | {data.get('engines_summary', '?')} |",
        # Runs from before execution modes ran eager.
        f"| execution mode | {data.get('mode', 'eager')} |",
        f"| workload | {data.get('workload', '?')} |",
        "",
        "Topology (`nvidia-smi topo -m`):",
        "",
        "```",
        data.get("topology", "?").rstrip(),
        "```",
        "",
    ]
    rounds = data.get("rounds", [])
    if rounds:
        lines += [
            "## Patched (rand on) / stock (rand off)",
            "",
            "Ratio of means over round pairs; 95% CI from a paired bootstrap "
            "(resamples of the pairs: see the JSON). TTFT and ITL: lower is better.",
            "",
            "| metric | stock mean | patched mean | ratio | 95% CI | +-% |",
            "|---|---|---|---|---|---|",
        ]
        for key, label, _ in METRICS:
            pairs = paired(rounds, key)
            r = data.get("ratios", {}).get(key)
            if not pairs or not r:
                lines.append(f"| {label} | - | - | - | - | - |")
                continue
            s = statistics.mean(p[0] for p in pairs)
            p = statistics.mean(p[1] for p in pairs)
            lines.append(
                f"| {label} | {s:.1f} | {p:.1f} | {r['ratio']:.4f} | "
                f"{r['ci95'][0]:.4f}-{r['ci95'][1]:.4f} | {r['half_width_pct']:.2f} |"
            )
        lines += render_per_request(data.get("ratios", {}))
        lines += [
            "",
            "## Rounds",
            "",
            "| # | pair | tree | tokens/s | TTFT p50 | TTFT p90 | ITL p50 | s "
            "| failed | short |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(rounds):
            s = r["summary"]
            lines.append(
                f"| {i} | {r['pair']} | {r['tree']} | {s['tokens_per_s']} | "
                f"{s['ttft_p50_ms']} | {s['ttft_p90_ms']} | {s['itl_p50_ms']} | "
                f"{s['seconds']} | {s['failed']} | {s['short']} |"
            )
        lines += render_gpu_state(rounds)
    bw = data.get("nccl_bw") or {}
    probe = data.get("transfer_probe") or {}
    if bw.get("rows") or probe.get("rows"):
        lines += [
            "",
            "## Transfer: bytes, bandwidth, share of TTFT",
            "",
            "KV bytes of one request (whole 16-token blocks, 32 layers). GB/s from"
            " ci/gpu/nccl_bw.py on GPU 0 -> GPU 1 with vLLM's P2pNcclEngine"
            f" (nccl_num_channels {bw.get('nccl_num_channels', '?')}): one plain"
            " ncclSend of all bytes; one ncclSend per layer; the connector's"
            " PUT_ASYNC path (ZMQ handshake per layer). Probe: see method below.",
            "",
            "| prompt tokens | KV bytes | plain GB/s (ms) | per layer GB/s (ms) | "
            "connector GB/s (ms) | prefill alone ms | tree | prefill+transfer ms |"
            " exposed transfer ms | TTFT ms | share of TTFT |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        bw_rows = {r["tokens"]: r for r in bw.get("rows", [])}
        probe_rows = {r["tokens"]: r for r in probe.get("rows", [])}
        for tokens in sorted(set(bw_rows) | set(probe_rows)):
            b = bw_rows.get(tokens, {})

            def cell(name, b=b):
                if f"{name}_s" not in b:
                    return "-"
                return f"{b[f'{name}_GBps']} ({1000 * b[f'{name}_s']:.2f})"

            p = probe_rows.get(tokens, {})
            nbytes = b.get("bytes") or data.get("kv_bytes", {}).get(str(tokens), "-")
            for tree in (STOCK, PATCHED):
                t = p.get(tree, {})
                lines.append(
                    f"| {tokens} | {nbytes} | {cell('plain')} | {cell('per_layer')} | "
                    f"{cell('connector')} | {p.get('prefill_alone_ms', '-')} | "
                    f"{tree} | "
                    f"{t.get('prefill_with_transfer_ms', '-')} | "
                    f"{t.get('exposed_transfer_ms', '-')} | {t.get('ttft_ms', '-')} | "
                    f"{t.get('transfer_share_of_ttft', '-')} |"
                )
        if probe.get("method"):
            lines += ["", "Method: " + " ".join(probe["method"].split())]
    for note in data.get("notes", []):
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


COMPACT_ITEMS = ("requests", "gpus")  # lists whose items take one line each


def to_json(data: dict) -> str:
    """json.dumps(indent=2), but each per-request record and each GPU of a
    sample on one line: a run of 32 rounds of 32 requests stays near 300 KB
    and a round's requests can be read down the page."""
    lines: list[str] = []

    def walk(obj, key=None):
        if isinstance(obj, dict):
            return {k: walk(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            if key not in COMPACT_ITEMS:
                return [walk(v) for v in obj]
            out = []
            for item in obj:
                lines.append(json.dumps(item))
                out.append(f"\0{len(lines) - 1}\0")
            return out
        return obj

    text = json.dumps(walk(data), indent=2)
    text = re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: lines[int(m.group(1))], text)
    return text + "\n"


def save(out: Path, data: dict, resamples: int = 1000) -> None:
    """Write the JSON and the markdown (the final save: resamples=10000)."""
    data["written"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    data["ratios"] = ratios(data.get("rounds", []), resamples)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("bench_pd.json", to_json(data)),
        ("bench_pd.md", render(data)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def shell(cmd: list[str]) -> str:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd[0]}: {exc}"


# What a GPU sample records: name, then the nvidia-smi --query-gpu fields that
# may hold it, first choice first (drivers rename fields: clocks_throttle_
# reasons became clocks_event_reasons).
GPU_FIELDS = (
    ("index", ("index",)),
    ("sm_mhz", ("clocks.sm",)),
    ("mem_mhz", ("clocks.mem",)),
    ("power_w", ("power.draw", "power.draw.average", "power.draw.instant")),
    ("temp_c", ("temperature.gpu",)),
    ("pstate", ("pstate",)),
    ("throttle", ("clocks_event_reasons.active", "clocks_throttle_reasons.active")),
)
# nvml.h's clock event (throttle) reason bits, for the report.
THROTTLE_BITS = (
    (0x1, "idle"),
    (0x2, "app-clocks"),
    (0x4, "sw-power-cap"),
    (0x8, "hw-slowdown"),
    (0x10, "sync-boost"),
    (0x20, "sw-thermal"),
    (0x40, "hw-thermal"),
    (0x80, "hw-power-brake"),
    (0x100, "display-clocks"),
)


def gpu_query_fields(help_text: str) -> dict[str, str]:
    """Name -> the first of its GPU_FIELDS that ``nvidia-smi
    --help-query-gpu`` lists; names with none are left out."""
    listed = set(re.findall(r'"([\w.]+)"', help_text))
    fields = {}
    for name, candidates in GPU_FIELDS:
        for candidate in candidates:
            if candidate in listed:
                fields[name] = candidate
                break
    return fields


def _gpu_value(cell: str):
    cell = cell.strip()
    if not cell or cell.startswith("["):  # [N/A], [Not Supported]
        return None
    try:
        value = float(cell)
    except ValueError:
        return cell  # pstate "P0", throttle "0x0000000000000004"
    return int(value) if value.is_integer() and "." not in cell else value


def parse_gpu_csv(names: list[str], text: str) -> list[dict]:
    """Rows of ``--format=csv,noheader,nounits`` as {name: value}."""
    rows = []
    for line in text.splitlines():
        if line.strip():
            cells = line.split(",")
            rows.append({n: _gpu_value(c) for n, c in zip(names, cells, strict=False)})
    return rows


def sample_gpus(gpus: list[str], fields: dict[str, str], timeout=10.0) -> dict:
    """Clocks, power, temperature, pstate and throttle reasons of ``gpus``
    now: one nvidia-smi call. Never raises; what failed is in "error"."""
    sample: dict = {"unix_s": round(time.time(), 3)}
    if not fields:
        sample["error"] = "no nvidia-smi query fields"
        return sample
    cmd = [
        "nvidia-smi",
        "--id=" + ",".join(gpus),
        "--query-gpu=" + ",".join(fields.values()),
        "--format=csv,noheader,nounits",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        sample["error"] = f"nvidia-smi: {exc}"[:200]
        return sample
    if proc.returncode:
        sample["error"] = (proc.stderr.strip() or proc.stdout.strip())[:200]
        return sample
    sample["gpus"] = parse_gpu_csv(list(fields), proc.stdout)
    return sample


def gpu_memory_used() -> str:
    return shell(
        [
            "nvidia-smi",
            "--query-gpu=index,memory.used,memory.total",
            "--format=csv,noheader",
        ]
    )


# ----------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.cli(__doc__, out_help="output folder")
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--pairs", type=int, help="round pairs at most (16)")
    parser.add_argument("--requests", type=int, help="requests per round (48)")
    parser.add_argument("--concurrency", type=int, help="in flight per round (12)")
    parser.add_argument(
        "--rate",
        type=float,
        help="open loop: Poisson arrivals of this many requests/s, one schedule "
        "per pair (default: closed loop with --concurrency in flight)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="start no round pair that would end past this many "
        "seconds after start, keeping time for the probe",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="s per request")
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--probe-reps", type=int, help="per length and tree (3)")
    parser.add_argument("--no-nccl-bw", action="store_true")
    parser.add_argument("--decode-kv-gib", type=float, default=EnginePlan.decode_kv_gib)
    parser.add_argument(
        "--prefill-kv-gib", type=float, default=EnginePlan.prefill_kv_gib
    )
    parser.add_argument("--kv-buffer-gib", type=float, default=EnginePlan.kv_buffer_gib)
    parser.add_argument("--mem-pool-gib", type=float, default=EnginePlan.mem_pool_gib)
    parser.add_argument("--nccl-num-channels", default=EnginePlan.nccl_num_channels)
    parser.add_argument(
        "--mode",
        type=servers.parse_mode,
        default=EnginePlan.mode,
        help="execution mode of every engine (default: vLLM's defaults; "
        "variants: eager, piecewise, v1-eager, ...)",
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        help="extra vllm serve argument for every engine",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-pd/model"))
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/bench-pd/logs"))
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "pairs": 2 if quick else 16,
        "requests": 8 if quick else 48,
        "concurrency": 4 if quick else 12,
        "probe_reps": 1 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    if _CLIENT_MISSING is not None:
        raise SystemExit(f"bench_pd.py needs the GPU tier's client: {_CLIENT_MISSING}")
    t_start = time.monotonic()
    args = parse_args(argv)
    common.start_logging()
    os.environ.update(SAFE_ENV)
    os.environ.pop("NCCL_HOSTID", None)
    trees = common.check_trees(args.stock_site, args.patched_site)
    gpus = servers.visible_gpus()
    if len(gpus) < 2:
        raise SystemExit(f"need two GPUs, see {gpus}")
    gpus = gpus[:2]
    lengths = LENGTHS[:2] if args.quick else LENGTHS
    model_dir = build_model(args.model_dir, args.num_layers)
    config = model_config(args.num_layers)
    plan = EnginePlan(
        prefill_kv_gib=args.prefill_kv_gib,
        decode_kv_gib=args.decode_kv_gib,
        kv_buffer_gib=args.kv_buffer_gib,
        mem_pool_gib=args.mem_pool_gib,
        nccl_num_channels=args.nccl_num_channels,
        mode=args.mode,
        extra_args=args.engine_arg,
    )
    data: dict = {
        "quick": args.quick,
        "mode": plan.mode,
        "machine": common.machine_info(gpus),
        "topology": shell(["nvidia-smi", "topo", "-m"]),
        "gpu_memory_total": gpu_memory_used(),
        # sampled before and after each round (ITL's two modes, issue 12)
        "gpu_query_fields": gpu_query_fields(shell(["nvidia-smi", "--help-query-gpu"])),
        "trees": trees,
        "patches": common.patches_digest(),
        "model": config,
        "model_summary": (
            f"Llama-3.1-8B shape, random weights (--load-format dummy), bf16: "
            f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
            f"{config['num_attention_heads']} heads, {config['num_key_value_heads']} "
            f"KV heads, head_dim {config['head_dim']}, vocab {config['vocab_size']}; "
            f"KV {kv_bytes_per_token(config) // 1024} KiB/token"
        ),
        "engine_plan": asdict(plan),
        "engine_args": {r: plan.args(r) for r in ("prefill", "decode")},
        "engines_summary": (
            f"prefill on GPU {gpus[0]}, decode on GPU {gpus[1]}, both trees side by "
            f"side; {plan.send_type}, kv_buffer_size {plan.kv_buffer_gib} GiB, "
            f"mem_pool_size_gb {plan.mem_pool_gib}, nccl_num_channels "
            f"{plan.nccl_num_channels}; KV cache prefill {plan.prefill_kv_gib} GiB, "
            f"decode {plan.decode_kv_gib} GiB; mode {servers.describe_mode(plan.mode)}"
            f", no chunked prefill, no prefix cache; stock with "
            f"{servers.RANDOMIZATION_OFF}=1, patched with "
            "randomization on"
        ),
        "workload": (
            f"{args.requests} requests a round, "
            + (
                f"Poisson arrivals at {args.rate} requests/s (open loop, one "
                "schedule per pair)"
                if args.rate
                else f"{args.concurrency} in flight (closed loop)"
            )
            + f", prompts of {'/'.join(map(str, lengths))} tokens (random ids, "
            f"each length alike often), {OUTPUT_TOKENS} output tokens (ignore_eos, "
            f"min_tokens), greedy, streamed through tests/gpu/proxy.py; rounds "
            "A B B A (A stock) with the same prompts within a pair"
        ),
        "kv_bytes": {str(n): kv_bytes(config, n) for n in lengths},
        "rounds": [],
        "notes": [],
    }
    save(args.out, data)

    if not args.no_nccl_bw:
        bw_json = args.out / "nccl_bw.json"
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("nccl_bw.py")),
            "--site",
            str(trees[STOCK]["site"]),
            "--out",
            str(bw_json),
            "--gpus",
            ",".join(gpus),
            "--tokens",
            ",".join(map(str, lengths)),
            "--layers",
            str(config["num_hidden_layers"]),
            "--channels",
            plan.nccl_num_channels,
        ]
        logger.info("nccl_bw: %s", " ".join(cmd))
        try:
            rc = subprocess.run(cmd, timeout=200).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        if bw_json.exists():
            data["nccl_bw"] = json.loads(bw_json.read_text())
        else:
            data["notes"].append(f"ci/gpu/nccl_bw.py failed (exit {rc})")
        save(args.out, data)

    ports = servers.free_ports(10)
    specs = plan_pairs(gpus, ports[:8])
    proxy_ports = dict(zip((STOCK, PATCHED), ports[8:], strict=True))
    urls = {}
    try:
        with servers.ServerGroup() as group:
            t0 = time.monotonic()
            for tree in (STOCK, PATCHED):
                site = trees[tree]["site"]
                for spec in specs[tree]:
                    env = plan.env(spec, site)
                    cmd = engine_command(spec, plan, model_dir)
                    group.add(
                        servers.start(
                            spec.name, cmd, env, args.log_dir, servers.url(spec)
                        )
                    )
                proxy = group.add(
                    servers.start_proxy(
                        proxy_ports[tree],
                        *specs[tree],
                        args.log_dir,
                        timeout=args.timeout + 30,
                        name=f"{tree}-proxy",
                    )
                )
                urls[tree] = proxy.url
            group.wait_healthy(timeout=420)
            data["engine_start_s"] = round(time.monotonic() - t0, 1)
            data["gpu_memory_after_start"] = gpu_memory_used()
            logger.info("all up after %.0f s", data["engine_start_s"])
            save(args.out, data)
            measure(args, data, urls, specs, lengths, t_start, gpus)
    except Exception as exc:  # keep what was measured, say what broke
        logger.exception("benchmark stopped")
        data["notes"].append(f"stopped: {exc!r}"[:2000])
        save(args.out, data, resamples=10000)
        return 1
    finally:
        servers.stop_all()
    data["total_s"] = round(time.monotonic() - t_start, 1)
    save(args.out, data, resamples=10000)
    print((args.out / "bench_pd.md").read_text())
    return 0


def measure(args, data, urls, specs, lengths, t_start, gpus) -> None:
    gpu_fields = data.get("gpu_query_fields", {})
    # Warm-up (not recorded): opens each pair's NCCL communicator and fills
    # the allocators, with every prompt length.
    warm = round_prompts(-1, 2 * len(lengths), lengths)
    for tree in (STOCK, PATCHED):
        samples, seconds = run_round(urls[tree], warm, len(warm), args.timeout)
        summary = summarize_round(samples, seconds)
        logger.info("warm-up %s: %s", tree, summary)
        if summary["failed"]:
            raise RuntimeError(f"warm-up of {tree} failed: {summary}")
    reserve = 60.0  # probe, teardown, writing
    pair_times: list[float] = []
    order = schedule(args.pairs)
    for i in range(0, len(order), 2):
        elapsed = time.monotonic() - t_start
        estimate = max(pair_times) if pair_times else 0.0
        if pair_times and elapsed + 1.2 * estimate + reserve > args.budget_s:
            data["notes"].append(
                f"stopped after {i // 2} of {args.pairs} round pairs: time budget "
                f"{args.budget_s:.0f} s"
            )
            break
        t_pair = time.monotonic()
        for pair, tree in order[i : i + 2]:
            prompts = round_prompts(pair, args.requests, lengths)
            offsets = (
                arrival_offsets(pair, args.requests, args.rate) if args.rate else None
            )
            gpu_before = sample_gpus(gpus, gpu_fields)
            started = time.time()
            samples, seconds = run_round(
                urls[tree], prompts, args.concurrency, args.timeout, offsets
            )
            gpu_after = sample_gpus(gpus, gpu_fields)
            summary = summarize_round(samples, seconds)
            data["rounds"].append(
                {
                    "pair": pair,
                    "tree": tree,
                    "summary": summary,
                    "start_unix_s": round(started, 3),
                    "gpu_before": gpu_before,
                    "gpu_after": gpu_after,
                    "requests": request_records(samples, offsets),
                }
            )
            logger.info("pair %d %s: %s", pair, tree, summary)
            save(args.out, data)
        pair_times.append(time.monotonic() - t_pair)
    data["gpu_memory_after_rounds"] = gpu_memory_used()
    save(args.out, data, resamples=10000)
    try:
        data["transfer_probe"] = transfer_probe(
            specs, lengths, args.probe_reps, min(args.timeout, 60.0)
        )
    except Exception as exc:  # the rounds stand without it
        logger.exception("transfer probe failed")
        data["notes"].append(f"transfer probe failed: {exc!r}"[:1000])
    save(args.out, data, resamples=10000)


if __name__ == "__main__":
    sys.exit(main())
