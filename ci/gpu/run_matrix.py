#!/usr/bin/env python3
r"""Run the P/D matrix on this GPU machine and write the results file.

Cells: send_type {PUT, PUT_ASYNC, GET} x request id randomization {on, off}
x tree {stock, patched}, per execution mode (--mode). A tree is a
site-packages folder holding vllm/; the servers of a cell run with
PYTHONPATH=<that folder>. Make the patched one with ci/gpu/prepare_sites.sh.
The reference answers come once per mode from a plain engine of the stock
tree in that mode and are kept in <out>.json with the cells, so a run with
--cells can fill in part of the matrix and a later one the rest.

    python ci/gpu/run_matrix.py --stock-site /tmp/site \
        --patched-site /tmp/site-patched --out results/gpu-h100.md \
        [--cells 'stock:*:on,patched:GET:*'] [--parallel 3] [--mode default,eager]

--mode: vLLM's defaults ("default": CUDA graphs, V2 model runner) unless
told; "eager", "piecewise", "full", "full_decode_only", "v1", "sync",
"async" and combinations such as "v1-eager" are the variants
(tests/gpu/servers.py MODE_PARTS). A cell is named
<mode>:<tree>:<send_type>:<on|off> in the results and logged under
<log-dir>/<mode>/<tree>-<send_type>-<on|off>/.

A cell starts its prefill and decode servers (about 1 to 1.5 min in eager
mode; torch.compile and CUDA graph capture add to that), sends the workload
(seconds; --timeout when it hangs) and stops them. --parallel runs cells side
by side (each pair has its own NCCL_HOSTIDs on one GPU). SIGTERM or SIGINT
ends every server started here: wrap the run in `timeout` when the machine
enforces a time limit.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import queue
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import common
from common import RANDOMIZATION, TREES, Results, servers, tiny_model, workload

logger = logging.getLogger("run_matrix")


def all_cells() -> list[str]:
    return [
        f"{tree}:{send_type}:{rand}"
        for tree in TREES
        for rand in RANDOMIZATION
        for send_type in servers.SEND_TYPES
    ]


def select(patterns: str) -> list[str]:
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    cells = [c for c in all_cells() if any(fnmatch.fnmatchcase(c, g) for g in globs)]
    if not cells:
        raise SystemExit(f"--cells {patterns!r} selects none of {all_cells()}")
    return cells


def main() -> int:
    parser = common.cli(__doc__)
    parser.add_argument(
        "--cells", default="*", help="TREE:SEND_TYPE:on|off globs, comma separated"
    )
    servers.add_mode_argument(parser)
    parser.add_argument("--timeout", type=float, default=60.0, help="s per request")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=1, help="cells at once")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument(
        "--no-chunked-prefill",
        action="store_true",
        help="no prompt over --max-num-batched-tokens (stock 0.23.0's producer "
        "dies on a later prefill chunk that needs no new block)",
    )
    parser.add_argument(
        "--reliability",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the workload: a request straight to each server, the workload "
        "again, and (randomization on) two requests with one X-Request-Id",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("/tmp/p2p-gpu-tier/tiny-llama")
    )
    parser.add_argument("--log-dir", type=Path, default=servers.log_root() / "matrix")
    args = parser.parse_args()
    common.start_logging()

    cells = [f"{mode}:{cell}" for mode in args.mode for cell in select(args.cells)]
    trees = common.check_trees(args.stock_site, args.patched_site)
    sites = {name: Path(info["site"]) for name, info in trees.items()}
    gpus = servers.visible_gpus()
    if not gpus:
        raise SystemExit("no GPU visible")
    model_dir = tiny_model.build(args.model_dir)
    requests = workload.build_requests(
        args.requests, chunked_prefill=not args.no_chunked_prefill
    )
    extra = workload.reliability_requests()
    results = Results(args.out)
    results.data.update(
        machine=common.machine_info(gpus),
        trees=trees,
        workload=(
            f"{len(requests)} concurrent requests (completions and chat, "
            + (
                "no prompt over --max-num-batched-tokens"
                if args.no_chunked_prefill
                else "prompts over --max-num-batched-tokens="
                f"{servers.MAX_NUM_BATCHED_TOKENS}"
            )
            + f", one n=2), greedy, tiny random Llama ({args.dtype}), "
            f"{args.timeout:.0f} s per request"
        ),
    )
    cells_done = results.data.setdefault("cells", {})
    if results.data.get("patches") != (digest := common.patches_digest()):
        for key in [k for k in cells_done if k.split(":")[1] == "patched"]:
            logger.info("dropping %s: measured with other patches", key)
            del cells_done[key]
        results.data["patches"] = digest
    try:
        references = {}  # mode -> (reference answers, extra requests with theirs)
        for mode in args.mode:
            answers = get_reference(
                args, results, mode, model_dir, requests + extra, gpus, sites
            )
            references[mode] = (
                answers[: len(requests)],
                list(zip(extra, answers[len(requests) :], strict=True)),
            )
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(args.parallel):
            slots.put(slot)

        def run(cell: str) -> dict:
            slot = slots.get()
            reference, extra_pairs = references[cell.split(":")[0]]
            try:
                return run_cell(
                    args,
                    cell,
                    slot,
                    model_dir,
                    requests,
                    reference,
                    gpus,
                    sites,
                    extra_pairs,
                )
            finally:
                slots.put(slot)

        pool = ThreadPoolExecutor(args.parallel)
        try:
            futures = {pool.submit(run, cell): cell for cell in cells}
            for future in as_completed(futures):
                cell = futures[future]
                results.data["cells"][cell] = result = future.result()
                results.save()
                logger.info(
                    "%s: %s (%.0f s)", cell, result["summary"], result["seconds"]
                )
        finally:
            servers.stop_all()
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        servers.stop_all()
    print(common.render(results.data))
    print(f"written: {results.md} and {results.json}")
    return 0


def get_reference(args, results, mode, model_dir, requests, gpus, sites) -> list:
    """The answers of a plain engine of the stock tree in ``mode`` (cached)."""
    key = common.fingerprint(
        model_dir, requests, args.dtype, results.data["trees"]["stock"]["vllm"], mode
    )
    cached = results.data.setdefault("references", {}).get(mode, {})
    if cached.get("key") == key:
        logger.info("%s: reference answers from %s", mode, results.json)
        return cached["answers"]
    logger.info("%s: computing the reference answers (stock tree, plain engine)", mode)
    with servers.reference_stack(
        model_dir,
        gpus,
        args.log_dir / mode / "reference",
        site=sites["stock"],
        dtype=args.dtype,
        mode=mode,
    ) as url:
        outcomes = workload.run(url, requests, args.timeout)
    answers = workload.reference_of(outcomes, requests)
    results.data["references"][mode] = {"key": key, "answers": answers}
    results.save()
    return answers


def run_cell(
    args, cell, slot, model_dir, requests, reference, gpus, sites, extra_pairs
) -> dict:
    mode, tree, send_type, rand = cell.split(":")
    log_dir = args.log_dir / mode / f"{tree}-{send_type}-{rand}"
    start = time.monotonic()
    logger.info("%s: starting (slot %s, logs %s)", cell, slot, log_dir)
    try:
        with servers.pd_stack(
            model_dir,
            gpus,
            log_dir,
            send_type=send_type,
            randomization=rand == "on",
            site=sites[tree],
            dtype=args.dtype,
            proxy_timeout=args.timeout + 30,
            slot=slot,
            mode=mode,
        ) as pd:
            up = time.monotonic() - start
            outcomes = workload.run(pd.proxy, requests, args.timeout)
            rows = None
            # Stock with randomization on already hangs: nothing more to learn.
            if args.reliability and (tree == "patched" or rand == "off"):
                try:
                    rows = reliability(args, pd, rand, requests, reference, extra_pairs)
                except Exception as exc:  # keep the cell's own result
                    logger.exception("%s: reliability checks failed", cell)
                    rows = {"reliability checks": f"error: {exc!r}"[:200]}
    except Exception as exc:  # a cell that cannot start is a result too
        logger.exception("%s failed", cell)
        first_line = (str(exc) or repr(exc)).splitlines()[0]
        return {
            "verdict": "error",
            "summary": f"error (did not run: {first_line[:120]})",
            "counts": {},
            "notes": [f"logs: {log_dir}", str(exc)[-2000:]],
            "seconds": time.monotonic() - start,
        }
    verdict = workload.judge(outcomes, reference, requests)
    return {
        "verdict": verdict.verdict,
        "summary": verdict.summary(),
        "counts": verdict.counts,
        "notes": verdict.notes,
        "seconds": round(time.monotonic() - start, 1),
        "startup_seconds": round(up, 1),
        "reliability": rows,
    }


def reliability(args, pd, rand, requests, reference, extra_pairs) -> dict:
    """Requests the proxy did not route, then duplicate X-Request-Ids.

    A plain request goes straight to the prefill and to the decode server (a
    health probe, a user calling a server directly); both servers must stay
    up and the workload through the proxy must still be answered correctly.
    With randomization on, two requests share one X-Request-Id at once, with
    other prompts and with the same prompt; both must equal the reference.
    """
    (probe, ref_probe), (dup_a, ref_a), (dup_b, ref_b) = extra_pairs
    timeout = min(args.timeout, 30.0)
    rows = {}
    for name, base in (
        ("probe to prefill", pd.prefill),
        ("probe to decode", pd.decode),
    ):
        (outcome,) = workload.run(base, [probe], timeout)
        verdict = workload.answered_like(outcome, ref_probe)
        rows[name] = f"{verdict} {outcome.detail[:100]}".strip()
    time.sleep(2)
    rows["healthy after probes"] = ", ".join(
        f"{name} {'yes' if workload.healthy(base) else 'NO'}"
        for name, base in (("prefill", pd.prefill), ("decode", pd.decode))
    )
    after = workload.run(pd.proxy, requests, timeout)
    rows["workload after probes"] = workload.judge(after, reference, requests).summary()
    if rand == "on":
        for name, pair, refs in (
            ("one X-Request-Id, other prompts", [dup_a, dup_b], [ref_a, ref_b]),
            ("one X-Request-Id, same prompt", [dup_a, dup_a], [ref_a, ref_a]),
        ):
            request_id = (
                f"___prefill_addr_{pd.prefill_kv}___decode_addr_{pd.decode_kv}"
                f"_{uuid.uuid4().hex}"
            )
            outs = workload.same_id(pd.prefill, pd.decode, pair, request_id, timeout)
            rows[name] = ", ".join(
                workload.answered_like(o, r) for o, r in zip(outs, refs, strict=True)
            )
    return rows


if __name__ == "__main__":
    sys.exit(main())
