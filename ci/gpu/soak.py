#!/usr/bin/env python3
r"""Soak P2pNcclConnector P/D: many concurrent requests, each checked.

For every tree (a site-packages folder holding vllm/) and send type, one P/D
pair runs behind its own proxy: prefill on the first visible GPU, decode on
the second (one GPU: both on it, NCCL_HOSTID per process). Two plain
reference engines (no KV transfer) run beside them, A on the first GPU and B
on the last. All start at once. The same requests (completions and chat,
mixed prompt lengths, some over --max-num-batched-tokens so they are
prefilled in chunks, greedy) go to every pair and to both references, each
stream --concurrency at a time.

Every P/D answer is compared token for token with reference A. B answers the
same requests in the same run: B against A is the noise floor of the oracle
(batch-dependent numerics), reported next to the P/D counts, not assumed. A
first difference where A's top-2 logprobs are closer than
workload.TIE_GAP is counted as a near-tie, apart from wrong; a wrong answer
that equals B's is counted as well.

    python ci/gpu/soak.py --tree stock=/tmp/site,rand=off,batched=65536 \
        --tree patched=/tmp/site-patched --out /tmp/out/soak.md \
        [--requests 1000] [--concurrency 64] [--budget 450] [--dtype float32] \
        [--mode default,eager]

A tree is NAME=SITE[,rand=on|off][,batched=N]: request id randomization of
its engines (default on) and their --max-num-batched-tokens (default
servers.MAX_NUM_BATCHED_TOKENS, 256; stock 0.23.0's producer dies on a later
prefill chunk, so give stock a budget no prompt batch reaches). Nothing is
sent after --budget seconds minus --timeout; a cell with --hang-limit timed
out requests gets no more. Writes <out> (markdown) and <out>.json.

Every engine, the references included, runs in vLLM's default execution mode
(CUDA graphs, V2 model runner, async scheduling) unless --mode names others:
variants such as eager, piecewise, v1-eager (tests/gpu/servers.py
MODE_PARTS), comma separated. The modes run one after another, each with its
own engines, references and --budget (which includes their start-up); a cell
is reported as <mode>:<tree>:<send_type>, its logs under <log-dir>/<mode>/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import common
from common import servers, tiny_model, workload

logger = logging.getLogger("soak")

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# One letter per request in the JSON, in request order.
LETTERS = {
    "match": "m",
    "tie": "t",
    "wrong": "W",
    "timeout": "H",
    "error": "E",
    "not_sent": "-",
    "no_reference": "?",
}
COUNT_KEYS = tuple(LETTERS)


@dataclass(frozen=True)
class Tree:
    name: str
    site: Path
    randomization: bool = True
    max_batched_tokens: int | None = None


def parse_tree(text: str) -> Tree:
    """NAME=SITE[,rand=on|off][,batched=N]"""
    name, sep, rest = text.partition("=")
    parts = rest.split(",")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not parts[0]:
        raise argparse.ArgumentTypeError(f"expected NAME=SITE[,options]: {text!r}")
    tree = {"name": name, "site": Path(parts[0])}
    for option in parts[1:]:
        key, _, value = option.partition("=")
        if key == "rand" and value in ("on", "off"):
            tree["randomization"] = value == "on"
        elif key == "batched" and value.isdigit():
            tree["max_batched_tokens"] = int(value)
        else:
            raise argparse.ArgumentTypeError(f"unknown tree option {option!r}")
    return Tree(**tree)


@dataclass
class Cell:
    key: str  # "<mode>:<tree>:<send_type>"
    tree: Tree
    send_type: str
    prefill: servers.EngineSpec
    decode: servers.EngineSpec
    proxy_port: int


def plan_cells(
    trees: list[Tree], gpus: list[str], mode: str = servers.DEFAULT_MODE
) -> list[Cell]:
    """One P/D pair per tree and send type, in execution mode ``mode``;
    slots number them (NCCL_HOSTID)."""
    cells = []
    for tree in trees:
        for send_type in servers.SEND_TYPES:
            *ports, proxy_port = servers.free_ports(5)
            prefill, decode = servers.plan_pd(
                gpus,
                send_type=send_type,
                randomization=tree.randomization,
                ports=ports,
                slot=len(cells),
                mode=mode,
            )
            if tree.max_batched_tokens is not None:
                extra = [f"--max-num-batched-tokens={tree.max_batched_tokens}"]
                prefill.extra_args = decode.extra_args = extra
            for spec in (prefill, decode):
                spec.name = f"{tree.name}-{send_type}-{spec.name}"
            key = f"{mode}:{tree.name}:{send_type}"
            cells.append(Cell(key, tree, send_type, prefill, decode, proxy_port))
    return cells


def plan_references(
    gpus: list[str], mode: str = servers.DEFAULT_MODE
) -> dict[str, servers.EngineSpec]:
    """Reference A on the first GPU (the oracle), B on the last (its check),
    both in the execution mode of the cells they judge."""
    ports = servers.free_ports(2)
    return {
        name: servers.EngineSpec(
            f"reference-{name}", port, {"CUDA_VISIBLE_DEVICES": g}, mode=mode
        )
        for name, port, g in (("A", ports[0], gpus[0]), ("B", ports[1], gpus[-1]))
    }


# ---- sending


@dataclass
class Drive:
    """How one target was driven: an outcome per request, None if not sent."""

    outcomes: list[workload.Outcome | None]
    seconds: float = 0.0
    stopped: str = ""  # why it stopped sending early


async def drive(
    base_url: str,
    requests: list[workload.Request],
    *,
    concurrency: int,
    timeout: float,
    launch_deadline: float,
    hang_limit: int,
) -> Drive:
    """Keep ``concurrency`` requests in flight until all are sent.

    Nothing is sent after ``launch_deadline`` (time.monotonic()), nor after
    ``hang_limit`` requests timed out (a hung pair would hold every slot
    for ``timeout`` seconds per round).
    """
    result = Drive([None] * len(requests))
    order = iter(range(len(requests)))
    timeouts = 0
    start = time.monotonic()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal timeouts
        while True:
            if timeouts >= hang_limit:
                result.stopped = result.stopped or f"{timeouts} requests timed out"
                return
            if time.monotonic() > launch_deadline:
                result.stopped = result.stopped or "time budget spent"
                return
            i = next(order, None)
            if i is None:
                return
            out = await workload.send(session, base_url, requests[i], timeout)
            result.outcomes[i] = out
            timeouts += out.status == "timeout"

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.seconds = time.monotonic() - start
    return result


def answers_of(drive_result: Drive) -> list[dict | None]:
    """A reference's answers, as workload.compare takes them (None: no answer)."""
    return [
        {"tokens": o.tokens, "texts": o.texts, "gaps": o.gaps}
        if o is not None and o.status == "ok"
        else None
        for o in drive_result.outcomes
    ]


# ---- judging


def tally(
    outcomes: list[workload.Outcome | None],
    oracle: list[dict | None],
    check: list[dict | None] | None,
    requests: list[workload.Request],
    max_notes: int = 20,
) -> dict:
    """Count each request against the oracle (reference A).

    ``check`` (reference B's answers) only annotates: a wrong or near-tie
    answer that equals B's is counted in ``*_equal_b``.
    """
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts.update(wrong_equal_b=0, tie_equal_b=0)
    letters, notes, positions = [], [], []
    for i, (req, out) in enumerate(zip(requests, outcomes, strict=True)):
        ref = oracle[i]
        detail = ""
        if out is None:
            status = "not_sent"
        elif out.status != "ok":
            status, detail = out.status, out.detail
        elif ref is None:
            status = "no_reference"
        else:
            status, detail = workload.compare(out, ref)
            if status in ("wrong", "tie"):
                if (m := re.search(r"differs at token (\d+)", detail)) is not None:
                    positions.append(int(m.group(1)))
                other = check[i] if check is not None else None
                if other is not None and workload.compare(out, other)[0] == "match":
                    counts[f"{status}_equal_b"] += 1
                    detail += " (equals reference B)"
        counts[status] += 1
        letters.append(LETTERS[status])
        if detail and status != "not_sent" and len(notes) < max_notes:
            notes.append(f"{req.name}: {status}: {detail}")
    sent = len(requests) - counts["not_sent"]
    if counts["timeout"]:
        verdict = "hang"
    elif counts["error"]:
        verdict = "error"
    elif counts["wrong"]:
        verdict = "wrong"
    elif sent == 0:
        verdict = "not run"
    else:
        verdict = "correct"
    return {
        "verdict": verdict,
        "sent": sent,
        "counts": counts,
        "first_difference_at": sorted(positions),
        "notes": notes,
        "letters": "".join(letters),
    }


def first_error_lines(log_path: Path, limit: int = 3) -> list[str]:
    """The first lines of a server log that report an error."""
    pattern = re.compile(r"Traceback|Error|ERROR|AssertionError|NCCL WARN")
    found = []
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if pattern.search(line):
                    found.append(line.strip()[:300])
                    if len(found) >= limit:
                        break
    except OSError:
        pass
    return found


def diff_state(site: Path, diff: Path) -> str:
    """Whether ``diff`` is applied in ``site``: "yes", "no" or "?"."""
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(site.resolve().parent))
    for state, extra in (("yes", ["--reverse"]), ("no", [])):
        cmd = ["git", "apply", "--check", *extra, str(diff.resolve())]
        if subprocess.run(cmd, cwd=site, env=env, capture_output=True).returncode == 0:
            return state
    return "?"


# ---- report


def _row(label: str, result: dict, seconds: float | None) -> str:
    c = result["counts"]
    rate = f"{result['sent'] / seconds:.1f}" if seconds else "-"
    wrong = f"{c['wrong']}" + (f" ({c['wrong_equal_b']} = B)" if c["wrong"] else "")
    tie = f"{c['tie']}" + (f" ({c['tie_equal_b']} = B)" if c["tie"] else "")
    return (
        f"| {label} | {result['verdict']} | {result['sent']} | {c['match']} "
        f"| {tie} | **{wrong}** | **{c['timeout']}** | {c['error']} "
        f"| {c['not_sent']} | {c['no_reference']} | {rate} |"
    )


def render(data: dict) -> str:
    m, s = data.get("machine", {}), data["settings"]
    lines = [
        f"# P2pNcclConnector P/D soak on {m.get('gpu', '?')}",
        "",
        f"Written {data['written']} by ci/gpu/soak.py.",
        "",
        "| | |",
        "|---|---|",
        f"| GPU | {m.get('gpu', '?')} (visible: {m.get('gpus_visible', '?')}) |",
        f"| driver / CUDA / NCCL | {m.get('driver', '?')} / {m.get('cuda', '?')} "
        f"/ {m.get('nccl', '?')} |",
        f"| torch / Python | {m.get('torch', '?')} / {m.get('python', '?')} |",
        f"| topology | {m.get('topology', '?')} |",
    ]
    for name, t in data["trees"].items():
        lines.append(
            f"| tree {name} | vLLM {t['vllm']} ({t['state']}; stream-order fix: "
            f"{t['fix']}), randomization {t['randomization']}, "
            f"--max-num-batched-tokens {t['max_batched_tokens']}, {t['site']} |"
        )
    lines += [
        f"| patches/ (sha256) | {data.get('patches', '?')} |",
        f"| workload | {s['requests']} requests per target (completions and chat, "
        f"prompts of 6 to 420 words, one n=2), greedy, {s['concurrency']} in "
        f"flight per target, {s['timeout']:.0f} s per request, {s['dtype']} |",
    ]
    modes = data.get("modes", {})
    for mode, facts in modes.items():
        lines.append(
            f"| mode {servers.describe_mode(mode)} | engines up after "
            f"{facts.get('startup_seconds', '?')} s |"
        )
    lines += [
        "",
        "Each answer compared token for token with reference A of its mode. "
        "near-tie: the "
        f"first difference is where A's top-2 logprobs are closer than "
        f"{s['tie_gap']}; (n = B): that many of them equal reference B's answer. "
        "hang: no answer within the timeout.",
        "",
        "| target | verdict | sent | correct | near-tie | wrong | hang | error "
        "| not sent | no reference | req/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for mode, facts in modes.items():
        ref = facts.get("reference")
        label = f"{mode}: reference B vs A"
        if ref:
            lines.append(
                _row(f"{label} (noise floor)", ref["b_vs_a"], ref["b_seconds"])
            )
            if ref["b_vs_a"]["notes"]:
                details.append((label, ref["b_vs_a"]))
        for key, cell in data["cells"].items():
            if key.split(":")[0] == mode:
                lines.append(_row(key, cell, cell.get("seconds")))
                if cell.get("notes"):
                    details.append((key, cell))
    for mode, facts in modes.items():
        if (ref := facts.get("reference")) and ref.get("a_failed"):
            lines += [
                "",
                f"Reference A ({mode}) failed {ref['a_failed']} requests: not judged.",
            ]
    if details:
        lines += ["", "## Details (first notes per target)", ""]
        for key, cell in details:
            extra = ""
            if positions := cell.get("first_difference_at"):
                where = Counter(positions)
                extra = " first difference at token (x times): " + ", ".join(
                    f"{pos} (x{n})" for pos, n in sorted(where.items())
                )
            if cell.get("stopped"):
                extra += f"; stopped sending: {cell['stopped']}"
            lines.append(f"- `{key}`:{extra}")
            lines += [f"  - {note}" for note in cell["notes"][:10]]
            lines += [f"  - log: {line}" for line in cell.get("log_errors", [])]
    return "\n".join(lines) + "\n"


# ---- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--tree", type=parse_tree, action="append", required=True)
    parser.add_argument("--out", required=True, type=Path, help="markdown file")
    parser.add_argument("--requests", type=int, default=1000, help="per target")
    parser.add_argument("--concurrency", type=int, default=64, help="per target")
    parser.add_argument("--timeout", type=float, default=45.0, help="s per request")
    parser.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="s per mode, start-up included (the first mode's from the script's start)",
    )
    parser.add_argument("--hang-limit", type=int, default=8)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--seed", type=int, default=0)
    servers.add_mode_argument(parser, in_turn=True)
    # 20 engines at once came up in about 75 s in eager mode; torch.compile
    # and CUDA graph capture add to that.
    parser.add_argument("--startup-timeout", type=float, default=270.0)
    parser.add_argument(
        "--reference-site", type=Path, help="vLLM of the references (first tree's)"
    )
    parser.add_argument(
        "--fix-diff", type=Path, help="report whether this diff is applied per tree"
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("/tmp/p2p-gpu-tier/tiny-llama")
    )
    parser.add_argument("--log-dir", type=Path, default=servers.log_root() / "soak")
    parser.add_argument("--logs-tar", type=Path, help="tar.gz of the server logs")
    args = parser.parse_args()
    t0 = time.monotonic()
    common.start_logging()
    os.environ.update(MULTICAST_OFF)  # every process started here inherits it

    names = [t.name for t in args.tree]
    if len(set(names)) != len(names):
        raise SystemExit(f"tree names must differ: {names}")
    gpus = servers.visible_gpus()
    if not gpus:
        raise SystemExit("no GPU visible")
    if len(gpus) < 2:
        logger.warning("one GPU: prefill and decode share it (socket transport)")
    trees = {}
    for tree in args.tree:
        info = common.site_info(tree.site)
        info.update(
            fix=diff_state(tree.site, args.fix_diff) if args.fix_diff else "-",
            randomization="on" if tree.randomization else "off",
            max_batched_tokens=tree.max_batched_tokens
            or servers.MAX_NUM_BATCHED_TOKENS,
        )
        trees[tree.name] = info
    model_dir = tiny_model.build(args.model_dir)
    requests = workload.build_requests(args.requests, seed=args.seed)
    random.Random(args.seed).shuffle(requests)  # long prompts spread out
    data: dict = {
        "machine": common.machine_info(gpus),
        "trees": trees,
        "patches": common.patches_digest(),
        "settings": {
            "requests": len(requests),
            "concurrency": args.concurrency,
            "timeout": args.timeout,
            "dtype": args.dtype,
            "tie_gap": workload.TIE_GAP,
            "budget": args.budget,
            "hang_limit": args.hang_limit,
            "seed": args.seed,
        },
        "modes": {mode: {} for mode in args.mode},  # start-up, references
        "cells": {},  # "<mode>:<tree>:<send_type>" -> results
    }
    ref_site = args.reference_site or args.tree[0].site
    try:
        mode_start = t0
        for mode in args.mode:
            run_mode(args, mode, mode_start, gpus, model_dir, ref_site, requests, data)
            mode_start = time.monotonic()
    finally:
        servers.stop_all()
        data["written"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        data["wall_seconds"] = round(time.monotonic() - t0, 1)
        write(args.out, data)
        if args.logs_tar:
            with tarfile.open(args.logs_tar, "w:gz") as tar:
                tar.add(args.log_dir, arcname="soak-logs")
    print(render(data))
    print(f"written: {args.out} and {args.out.with_suffix('.json')}")
    return 0


def run_mode(args, mode, t0, gpus, model_dir, ref_site, requests, data) -> None:
    """One execution mode: start its pairs and references, drive them until
    --budget s after ``t0``, stop them, judge. Results go to data["cells"]
    and data["modes"][mode]."""
    facts = data["modes"][mode]
    cells = plan_cells(args.tree, gpus, mode)
    refs = plan_references(gpus, mode)
    log_dir = args.log_dir / mode
    with servers.ServerGroup() as group:
        started = start_all(args, group, cells, refs, model_dir, ref_site, log_dir)
        failed = wait_up(group, started, cells, args.startup_timeout)
        facts["startup_seconds"] = round(time.monotonic() - t0, 1)
        launch_deadline = t0 + args.budget - args.timeout - 15
        drives = asyncio.run(
            drive_all(args, cells, refs, failed, requests, launch_deadline)
        )
        alive = {name: s.proc.poll() is None for name, s in started.items()}
    judge_all(data, mode, cells, refs, failed, drives, requests, started, alive)


def start_all(args, group, cells, refs, model_dir, ref_site, log_dir) -> dict:
    """Start every engine and proxy, logging under log_dir; name -> Server."""
    started = {}
    for name, spec in refs.items():
        started[spec.name] = group.add(
            servers.start_engine(
                spec,
                model_dir,
                log_dir / f"reference-{name}",
                site=ref_site,
                dtype=args.dtype,
            )
        )
    for cell in cells:
        cell_dir = log_dir / f"{cell.tree.name}-{cell.send_type}"
        for spec in (cell.prefill, cell.decode):
            started[spec.name] = group.add(
                servers.start_engine(
                    spec, model_dir, cell_dir, site=cell.tree.site, dtype=args.dtype
                )
            )
        started[cell.key] = group.add(
            servers.start_proxy(
                cell.proxy_port,
                cell.prefill,
                cell.decode,
                cell_dir,
                timeout=args.timeout + 15,
                name="proxy",
            )
        )
    return started


def _members(cell: Cell) -> tuple[str, str, str]:
    return cell.prefill.name, cell.decode.name, cell.key


def wait_up(group, started, cells, timeout: float) -> dict[str, str]:
    """Wait until every server answers /health; cell key -> why it failed.

    A cell whose server exits or does not come up fails alone; a reference
    that does not come up ends the soak.
    """
    owner = {name: cell.key for cell in cells for name in _members(cell)}
    failed: dict[str, str] = {}
    pending = dict(started)
    deadline = time.monotonic() + timeout
    while pending:
        for name, server in list(pending.items()):
            cell = owner.get(name)
            if cell in failed:
                del pending[name]
            elif server.proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"{name} exited with {server.proc.returncode}"
                    if server.proc.poll() is not None
                    else f"{name} not healthy after {timeout:.0f} s"
                )
                if cell is None:
                    tail = server.log_tail()
                    raise RuntimeError(f"{why}; {server.log_path}:\n{tail}")
                logger.error("%s: %s", cell, why)
                failed[cell] = why
                del pending[name]
            elif servers._healthy(server):
                del pending[name]
        time.sleep(1.0)
    logger.info("servers up; failed cells: %s", failed or "none")
    return failed


async def drive_all(args, cells, refs, failed, requests, launch_deadline) -> dict:
    """Drive both references and every cell at once; target -> Drive."""
    targets = {f"reference-{n}": servers.url(s) for n, s in refs.items()}
    for cell in cells:
        if cell.key not in failed:
            targets[cell.key] = f"http://{servers.HOST}:{cell.proxy_port}"
    results = await asyncio.gather(
        *(
            drive(
                base,
                requests,
                concurrency=args.concurrency,
                timeout=args.timeout,
                launch_deadline=launch_deadline,
                hang_limit=args.hang_limit,
            )
            for base in targets.values()
        )
    )
    return dict(zip(targets, results, strict=True))


def judge_all(
    data, mode, cells, refs, failed, drives, requests, started, alive
) -> None:
    """Each cell of ``mode`` against that mode's reference A."""
    oracle = answers_of(drives["reference-A"])
    check = answers_of(drives["reference-B"])
    b_vs_a = tally(drives["reference-B"].outcomes, oracle, None, requests)
    data["modes"][mode]["reference"] = {
        "b_vs_a": b_vs_a,
        "a_failed": sum(a is None for a in oracle),
        "a_seconds": round(drives["reference-A"].seconds, 1),
        "b_seconds": round(drives["reference-B"].seconds, 1),
    }
    for cell in cells:
        if cell.key in failed:
            result = tally([None] * len(requests), oracle, check, requests)
            result.update(verdict="did not start", stopped=failed[cell.key])
        else:
            d = drives[cell.key]
            result = tally(d.outcomes, oracle, check, requests)
            result.update(seconds=round(d.seconds, 1), stopped=d.stopped)
        result["alive_at_end"] = {
            name: alive.get(name, False) for name in _members(cell)
        }
        result["log_errors"] = [
            f"{name}: {line}"
            for name in _members(cell)[:2]
            for line in first_error_lines(started[name].log_path)
        ]
        data["cells"][cell.key] = result
        logger.info("%s: %s %s", cell.key, result["verdict"], result["counts"])


def write(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data.setdefault("settings", {})
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    try:
        out.write_text(render(data))
    except KeyError as exc:  # cut short before the results existed
        out.write_text(f"# soak cut short\n\nmissing {exc}; see {out.suffix}.json\n")


if __name__ == "__main__":
    sys.exit(main())
