"""Shared by run_matrix.py and bench.py: trees, machine facts, the results file.

The results live in <out>.json (merged across runs, so the matrix can be
filled by several shorter runs) and are rendered to <out> (markdown). A cell
is named <mode>:<tree>:<send_type>:<on|off>, mode being the engines'
execution mode (servers.MODE_PARTS; "default" is vLLM's own).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))

# Re-exported for run_matrix.py and bench.py.
import servers  # noqa: E402
import tiny_model  # noqa: E402, F401
import workload  # noqa: E402, F401

TREES = ("stock", "patched")
RANDOMIZATION = ("on", "off")
CONNECTOR = "vllm/distributed/kv_transfer/kv_connector/v1/p2p/p2p_nccl_connector.py"
# What stock vLLM 0.23.0 was seen to do (shared/gpu/README.md); patched: correct.
EXPECTED = {
    ("stock", "PUT", "on"): "hang",
    ("stock", "PUT_ASYNC", "on"): "hang",
    ("stock", "GET", "on"): "wrong",
}


def exit_on_signals() -> None:
    """SIGTERM/SIGINT raise SystemExit, so finally blocks end the servers."""

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def patch_files() -> list[Path]:
    series = ROOT / "patches" / "series"
    names = [
        line.strip()
        for line in series.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [ROOT / "patches" / name for name in names]


def patches_digest() -> str:
    h = hashlib.sha256()
    for path in patch_files():
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def patch_state(site: Path) -> str:
    """Whether patches/ is applied in ``site`` ("patched"), or applies ("stock")."""
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(site.resolve().parent))
    # --check takes each patch against the tree as it is: the last patch
    # reverses on a patched tree, the first one applies on a stock one.
    patches = patch_files()
    for state, extra, patch in (
        ("patched", ["--reverse"], patches[-1]),
        ("stock", [], patches[0]),
    ):
        cmd = ["git", "apply", "--check", "--include=vllm/*", *extra, str(patch)]
        if subprocess.run(cmd, cwd=site, env=env, capture_output=True).returncode == 0:
            return state
    return "unknown"


def site_info(site: str | Path) -> dict:
    site = Path(site).resolve()
    if not (site / CONNECTOR).exists():
        raise SystemExit(f"{site} has no {CONNECTOR}: not a site-packages with vLLM")
    dists = sorted(site.glob("vllm-*.dist-info"))
    version = dists[-1].name[5 : -len(".dist-info")] if dists else "?"
    return {"site": str(site), "vllm": version, "state": patch_state(site)}


def check_trees(stock: str | Path, patched: str | Path) -> dict[str, dict]:
    trees = {"stock": site_info(stock), "patched": site_info(patched)}
    for name, info in trees.items():
        if info["state"] != name:
            raise SystemExit(
                f"--{name}-site {info['site']} looks {info['state']}, not {name} "
                "(ci/gpu/prepare_sites.sh makes the patched one)"
            )
    return trees


def machine_info(gpus: list[str]) -> dict:
    import torch

    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    rows = [r.split(", ") for r in smi.stdout.strip().splitlines() if r]
    nccl = torch.cuda.nccl.version()
    if isinstance(nccl, int):  # older torch: 22809
        nccl = (nccl // 10000, nccl // 100 % 100, nccl % 100)
    if len(gpus) > 1:
        topology = f"prefill on GPU {gpus[0]}, decode on GPU {gpus[1]}"
    else:
        topology = (
            f"prefill and decode share GPU {gpus[0]} (NCCL_HOSTID per process, "
            "NCCL socket transport over lo)"
        )
    return {
        "gpu": ", ".join(r[0] for r in rows) or "?",
        "driver": rows[0][1] if rows and len(rows[0]) > 1 else "?",
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, nccl)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpus_visible": gpus,
        "topology": topology,
    }


def fingerprint(model_dir: Path, requests: list, *extra: str) -> str:
    h = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    h.update(json.dumps([r.body for r in requests], sort_keys=True).encode())
    for item in extra:
        h.update(item.encode())
    return h.hexdigest()[:16]


class Results:
    """The results of one GPU kind: <out>.json (data) and <out> (markdown)."""

    def __init__(self, out: str | Path):
        self.md = Path(out)
        self.json = self.md.with_suffix(".json")
        self.data = json.loads(self.json.read_text()) if self.json.exists() else {}
        # Files from before execution modes: every cell ran with
        # --enforce-eager, and the reference is computed again per mode.
        cells = self.data.get("cells", {})
        for key in [k for k in cells if k.count(":") == 2]:
            cells[f"eager:{key}"] = cells.pop(key)
        self.data.pop("reference", None)

    def save(self) -> None:
        self.md.parent.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (self.json, json.dumps(self.data, indent=2) + "\n"),
            (self.md, render(self.data)),
        ):
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, delete=False, suffix=".tmp"
            ) as tmp:
                tmp.write(text)
            os.replace(tmp.name, path)


def _cell_text(cell: dict | None, key: tuple[str, str, str]) -> str:
    if cell is None:
        return "not run"
    text = f"{cell['summary']}, {cell['seconds']:.0f} s"
    if cell["verdict"] != EXPECTED.get(key, "correct"):
        text += f" **unexpected** (was {EXPECTED.get(key, 'correct')})"
    return text


def modes_of(cells: dict) -> list[str]:
    """The execution modes of the cells, "default" first."""
    modes = {key.split(":")[0] for key in cells} or {servers.DEFAULT_MODE}
    return sorted(modes, key=lambda mode: (mode != servers.DEFAULT_MODE, mode))


def render(data: dict) -> str:
    m, trees = data.get("machine", {}), data.get("trees", {})
    cells = data.get("cells", {})
    modes = modes_of(cells)
    lines = [
        f"# P2pNcclConnector P/D on {m.get('gpu', '?')}",
        "",
        f"Updated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by ci/gpu/run_matrix.py "
        "and ci/gpu/bench.py.",
        "",
        "| | |",
        "|---|---|",
        f"| GPU | {m.get('gpu', '?')} (visible: {m.get('gpus_visible', '?')}) |",
        f"| driver | {m.get('driver', '?')} |",
        f"| CUDA (torch) | {m.get('cuda', '?')} |",
        f"| NCCL (torch.cuda.nccl) | {m.get('nccl', '?')} |",
        f"| torch / Python | {m.get('torch', '?')} / {m.get('python', '?')} |",
    ]
    for name in TREES:
        if name in trees:
            t = trees[name]
            lines.append(f"| vLLM {name} | {t['vllm']} ({t['state']}, {t['site']}) |")
    lines += [
        f"| patches/ (sha256) | {data.get('patches', '?')} |",
        f"| topology | {m.get('topology', '?')} |",
        f"| workload | {data.get('workload', '?')} |",
        "| execution modes | "
        + "; ".join(servers.describe_mode(mode) for mode in modes)
        + " |",
        "",
        "## Matrix",
        "",
        "send_type x request id randomization x tree, one table per execution "
        "mode (the reference engine runs in the same mode). correct: every "
        "answer equals the reference engine's; wrong: all answered, some "
        "differ; hang: some timed out.",
    ]
    for mode in modes:
        lines += [
            "",
            f"### Mode {servers.describe_mode(mode)}",
            "",
            "| send_type | "
            + " | ".join(f"{t}, rand {r}" for t in TREES for r in RANDOMIZATION)
            + " |",
            "|---|" + "---|" * 4,
        ]
        for send_type in servers.SEND_TYPES:
            row = [
                _cell_text(cells.get(f"{mode}:{t}:{send_type}:{r}"), (t, send_type, r))
                for t in TREES
                for r in RANDOMIZATION
            ]
            lines.append(f"| {send_type} | " + " | ".join(row) + " |")
    noted = {k: c for k, c in sorted(cells.items()) if c.get("notes")}
    if noted:
        lines += ["", "### Details (first 5 per cell)", ""]
        for key, cell in noted.items():
            lines.append(f"- `{key}`:")
            lines += [f"  - {note}" for note in cell["notes"][:5]]
    checked = {
        k: c["reliability"] for k, c in sorted(cells.items()) if c.get("reliability")
    }
    if checked:
        lines += [
            "",
            "## Requests the proxy did not route; duplicate X-Request-Id",
            "",
            "After the workload of a cell: a plain /v1/completions straight to each"
            " server (compared with the reference), both servers' /health, the"
            " workload again through the proxy, and, with randomization on, two"
            " requests at once with one X-Request-Id (other prompts / same prompt).",
            "",
        ]
        names = list(dict.fromkeys(n for rows in checked.values() for n in rows))
        lines += ["| cell | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key, rows in checked.items():
            lines.append(
                f"| {key} | " + " | ".join(rows.get(n, "-") for n in names) + " |"
            )
    if bench := data.get("bench"):
        # A bench from before execution modes ran eager.
        mode = bench.get("mode", "eager")
        lines += ["", f"## Benchmark, mode {mode}", "", bench["setup"], ""]
        lines += [
            "| run | output tokens/s | median TTFT (ms) | failed |",
            "|---|---|---|---|",
        ]
        for name, run in bench["runs"].items():
            lines.append(
                f"| {name} | {run['tokens_per_s']} | {run['median_ttft_ms']} "
                f"| {run['failed']}/{run['requests']} |"
            )
        lines += ["", bench["ratio"]]
    return "\n".join(lines) + "\n"


def cli(doc: str, out_help: str = "markdown file") -> argparse.ArgumentParser:
    """The arguments every GPU script takes: the two trees and the results file."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    parser.add_argument("--stock-site", required=True, type=Path)
    parser.add_argument("--patched-site", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    return parser


def start_logging() -> None:
    """Log to stderr, and end every server started here on SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    exit_on_signals()
