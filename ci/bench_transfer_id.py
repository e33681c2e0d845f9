#!/usr/bin/env python3
"""Micro-benchmark: the series' work on the scheduler's hot loop, per request.

    .venv/bin/python ci/bench_transfer_id.py [--repeat 7]

Prints, with the spread over repeats (min / median / max):
- get_transfer_id(): one call per request id (target: under 1 µs);
- the transfer id of a request (id + prompt digest, once per request) against
  the prompt length, next to what vLLM already computes for the same request
  (Request.from_engine_core_request with the prefix-caching block hasher).
Runs on the CPU against the patched vLLM in .venv; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import timeit

from vllm import SamplingParams
from vllm.config.cache import CacheConfig
from vllm.distributed.kv_transfer.kv_connector.v1.p2p.p2p_nccl_connector import (
    get_prompt_digest,
    get_transfer_id,
)
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.request import Request

PROXY_ID = (
    "___prefill_addr_10.0.0.1:21001___decode_addr_10.0.0.2:22001_"
    "0123456789abcdef0123456789abcdef"
)
PROMPT_LENGTHS = (1024, 8192, 32768, 131072)


def spread(fn, number: int, repeat: int) -> tuple[float, float, float]:
    """Seconds per call: min, median, max over the repeats."""
    times = [t / number for t in timeit.repeat(fn, number=number, repeat=repeat)]
    return min(times), statistics.median(times), max(times)


def fmt(values: tuple[float, float, float], unit: float, name: str) -> str:
    return " / ".join(f"{v / unit:.3g}" for v in values) + f" {name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    request_id = f"cmpl-{PROXY_ID}-0-1a2b3c4d"
    t = spread(lambda: get_transfer_id(request_id, True), 200_000, args.repeat)
    print(f"get_transfer_id, randomized id: {fmt(t, 1e-6, 'µs')} (min/median/max)")
    t = spread(lambda: get_transfer_id(request_id, False), 200_000, args.repeat)
    print(f"get_transfer_id, not randomized: {fmt(t, 1e-6, 'µs')}")

    algo = CacheConfig().prefix_caching_hash_algo
    hash_fn = get_hash_fn_by_name(algo)
    init_none_hash(hash_fn)
    block_hasher = get_request_block_hasher(16, hash_fn)
    rng = random.Random(0)
    print(
        "\nper request, µs (min/median/max): prompt digest of the transfer id | "
        f"vLLM's Request with block hashes ({algo}, block 16) | share"
    )
    for length in PROMPT_LENGTHS:
        prompt = [rng.randrange(128_000) for _ in range(length)]

        def vllm_request(prompt=prompt):
            core = EngineCoreRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                mm_features=None,
                sampling_params=SamplingParams(max_tokens=1),
                pooling_params=None,
                arrival_time=0.0,
                lora_request=None,
                cache_salt=None,
                data_parallel_rank=None,
            )
            return Request.from_engine_core_request(core, block_hasher)

        number = max(1, 200_000 // length)
        ours = spread(
            lambda prompt=prompt: get_prompt_digest(prompt), number, args.repeat
        )
        theirs = spread(vllm_request, max(1, number // 20), args.repeat)
        print(
            f"  {length:>6} tokens: {fmt(ours, 1e-6, '')}| {fmt(theirs, 1e-6, '')}"
            f"| {ours[1] / theirs[1]:.1%}"
        )


if __name__ == "__main__":
    main()
