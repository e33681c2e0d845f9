#!/usr/bin/env python3
r"""Benchmark (not a test): what the fix costs against the old workaround.

Patched tree with request id randomization on (the fix) against the stock tree
with it off (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1, the workaround), one
after the other on the same GPUs, with the same streamed workload through the
proxy. Reports output tokens/s and median TTFT (first streamed text, seen by
the client through the proxy) and adds them to the results file. The
engines run in vLLM's default execution mode (CUDA graphs, V2 model runner)
unless --mode names a variant (eager, piecewise, v1-eager, ...:
tests/gpu/servers.py MODE_PARTS); the report says which.

    python ci/gpu/bench.py --stock-site /tmp/site \
        --patched-site /tmp/site-patched --out results/gpu-h100.md [--mode eager]
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

import common
from common import Results, servers, tiny_model, workload

logger = logging.getLogger("bench")
RUNS = {"patched, rand on": ("patched", True), "stock, rand off": ("stock", False)}


def measure(args, url: str, requests: list[workload.Request]) -> dict:
    warmup = workload.build_requests(4, max_tokens=(8,), parallel_sampling=False)
    workload.run(
        url, [workload.streaming(r) for r in warmup], args.timeout, stream=True
    )
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        outcomes = workload.run(url, requests, args.timeout, stream=True)
        rounds.append(workload.throughput(outcomes, time.perf_counter() - start))
        logger.info("round: %s", rounds[-1])
    ttfts = [r["median_ttft_ms"] for r in rounds if r["median_ttft_ms"] is not None]
    return {
        "requests": rounds[0]["requests"],
        "failed": max(r["failed"] for r in rounds),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rounds), 1),
        "median_ttft_ms": round(statistics.median(ttfts), 1) if ttfts else None,
        "rounds": rounds,
    }


def main() -> int:
    parser = common.cli(__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--send-type", default="PUT_ASYNC", choices=servers.SEND_TYPES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="s per request")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument(
        "--mode",
        type=servers.parse_mode,
        default=servers.DEFAULT_MODE,
        help="execution mode of every engine (default: vLLM's defaults)",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("/tmp/p2p-gpu-tier/tiny-llama")
    )
    parser.add_argument("--log-dir", type=Path, default=servers.log_root() / "bench")
    args = parser.parse_args()
    common.start_logging()

    trees = common.check_trees(args.stock_site, args.patched_site)
    gpus = servers.visible_gpus()
    if not gpus:
        raise SystemExit("no GPU visible")
    model_dir = tiny_model.build(args.model_dir)
    requests = [
        workload.streaming(r)
        for r in workload.build_requests(
            args.requests,
            max_tokens=(args.max_tokens,),
            parallel_sampling=False,
            seed=1,
        )
    ]
    runs = {}
    try:
        for name, (tree, randomization) in RUNS.items():
            logger.info("%s: starting", name)
            with servers.pd_stack(
                model_dir,
                gpus,
                args.log_dir / args.mode / name.replace(", ", "-").replace(" ", "-"),
                send_type=args.send_type,
                randomization=randomization,
                site=trees[tree]["site"],
                dtype=args.dtype,
                proxy_timeout=args.timeout + 30,
                mode=args.mode,
            ) as pd:
                runs[name] = measure(args, pd.proxy, requests)
    finally:
        servers.stop_all()

    new, old = runs["patched, rand on"], runs["stock, rand off"]
    ratio = "Ratio patched/stock: output tokens/s x%.3f" % (
        new["tokens_per_s"] / old["tokens_per_s"]
    )
    if new["median_ttft_ms"] and old["median_ttft_ms"]:
        ratio += ", median TTFT x%.3f" % (new["median_ttft_ms"] / old["median_ttft_ms"])
    print(ratio)
    results = Results(args.out)
    results.data.setdefault("machine", common.machine_info(gpus))
    results.data.setdefault("trees", trees)
    results.data.setdefault("patches", common.patches_digest())
    results.data["bench"] = {
        "setup": (
            f"{args.requests} streamed requests at once through the proxy, "
            f"{args.max_tokens} output tokens each (ignore_eos), send_type "
            f"{args.send_type}, median of {args.rounds} rounds after a warm-up; "
            f"TTFT is the client's, through the proxy (prefill + first decode token). "
            f"Execution mode {servers.describe_mode(args.mode)}."
        ),
        "mode": args.mode,
        "runs": runs,
        "ratio": ratio + ".",
    }
    results.save()
    print(f"written: {results.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
