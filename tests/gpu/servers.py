"""Start and stop the vLLM servers (and the proxy) of the GPU tier.

Each server runs in its own process group (start_new_session=True) and logs
to <log_dir>/<name>.log; ServerGroup always ends its groups with killpg,
SIGTERM first, SIGKILL after a grace period. Where each engine runs is decided
by plan_pd/plan_reference, pure functions of the visible GPUs.

How the engines execute the model is a mode (MODE_PARTS): "default", vLLM's
own settings (CUDA graphs, cudagraph_mode FULL_AND_PIECEWISE, the V2 model
runner, async scheduling), is the main configuration; "eager", "piecewise",
"v1-eager", ... are variants. Both engines of a pair and the reference they
are compared with always run in the same mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workload import MODEL_NAME

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HOST = "127.0.0.1"
# Small, so that prompts are prefilled in chunks. GPU_TIER_MAX_BATCHED_TOKENS
# raises it: stock 0.23.0's producer dies on some later prefill chunks.
MAX_NUM_BATCHED_TOKENS = int(os.environ.get("GPU_TIER_MAX_BATCHED_TOKENS", "256"))
RANDOMIZATION_OFF = "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"
SEND_TYPES = ("PUT", "PUT_ASYNC", "GET")
# Environment of every engine; a None value removes the variable.
COMMON_ENV: dict[str, str | None] = {
    "VLLM_HOST_IP": HOST,
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    # NVLink multicast off: it can take a shared host's GPUs out of service.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    RANDOMIZATION_OFF: None,
}
ENGINE_ARGS = [
    "--max-model-len=1024",
    "--kv-cache-memory-bytes=536870912",
    "--gpu-memory-utilization=0.3",
    f"--max-num-batched-tokens={MAX_NUM_BATCHED_TOKENS}",
    "--max-num-seqs=128",
    "--seed=0",
    "--disable-uvicorn-access-log",
]


def _cudagraph_mode(mode: str) -> str:
    return "--compilation-config=" + json.dumps({"cudagraph_mode": mode})


# Execution modes. "default" adds nothing: vLLM 0.23.0's own settings (CUDA
# graphs with cudagraph_mode FULL_AND_PIECEWISE, the V2 model runner for
# Llama, async scheduling), the main configuration of every GPU script. A
# mode name joins parts with "-" ("v1-eager", "piecewise-sync"); each part
# adds (vllm serve arguments, environment variables).
MODE_PARTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "default": ((), {}),
    "eager": (("--enforce-eager",), {}),
    "piecewise": ((_cudagraph_mode("PIECEWISE"),), {}),
    "full": ((_cudagraph_mode("FULL"),), {}),
    "full_decode_only": ((_cudagraph_mode("FULL_DECODE_ONLY"),), {}),
    "v1": ((), {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
    "sync": (("--no-async-scheduling",), {}),
    "async": (("--async-scheduling",), {}),
}
DEFAULT_MODE = "default"
# At most one part of each group in a mode.
EXCLUSIVE_PARTS = (
    {"eager", "piecewise", "full", "full_decode_only"},
    {"sync", "async"},
)


def mode_settings(mode: str) -> tuple[list[str], dict[str, str]]:
    """(extra vllm serve arguments, extra environment) of a mode."""
    parts = mode.split("-")
    for group in EXCLUSIVE_PARTS:
        if len(group.intersection(parts)) > 1:
            raise ValueError(f"mode {mode!r}: more than one of {sorted(group)}")
    args: list[str] = []
    env: dict[str, str] = {}
    for part in parts:
        if part not in MODE_PARTS:
            known = ", ".join(MODE_PARTS)
            raise ValueError(f"mode {mode!r}: unknown part {part!r} (parts: {known})")
        part_args, part_env = MODE_PARTS[part]
        args += part_args
        env.update(part_env)
    return args, env


def describe_mode(mode: str) -> str:
    """The mode and what it adds, for reports: "eager (--enforce-eager)"."""
    args, env = mode_settings(mode)
    added = " ".join([*args, *(f"{k}={v}" for k, v in env.items())])
    return f"{mode} ({added or 'vLLM defaults'})"


def parse_modes(text: str) -> list[str]:
    """A --mode option: mode names, comma separated (argparse type)."""
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not modes:
        raise argparse.ArgumentTypeError("no mode given")
    for mode in modes:
        try:
            mode_settings(mode)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return modes


def add_mode_argument(parser: argparse.ArgumentParser, in_turn: bool = False) -> None:
    """--mode: the engines' execution modes (in_turn: run one after another)."""
    parser.add_argument(
        "--mode",
        type=parse_modes,
        default=DEFAULT_MODE,
        help="execution modes of the engines, comma separated"
        + (", run one after another" if in_turn else "")
        + " (default: vLLM's defaults; variants: eager, piecewise, v1-eager, ...)",
    )


def parse_mode(text: str) -> str:
    """A --mode option that takes one mode (argparse type)."""
    modes = parse_modes(text)
    if len(modes) > 1:
        raise argparse.ArgumentTypeError(f"one mode only, not {text!r}")
    return modes[0]


def log_root() -> Path:
    return Path(os.environ.get("GPU_TIER_LOG_DIR") or ROOT / "test-logs")


@dataclass
class EngineSpec:
    """One vLLM OpenAI server: where it runs and how its KV connector is set."""

    name: str
    port: int
    env: dict[str, str | None]
    kv_role: str | None = None  # None: no KV transfer (reference engine)
    kv_port: int | None = None
    send_type: str | None = None
    mode: str = DEFAULT_MODE  # execution mode (MODE_PARTS)
    # After ENGINE_ARGS and the mode's arguments; they win over both.
    extra_args: list[str] = field(default_factory=list)
    # Merged into kv_transfer_config (e.g. kv_buffer_size,
    # kv_load_failure_policy) and into its kv_connector_extra_config.
    kv_overrides: dict = field(default_factory=dict)
    kv_extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        mode_settings(self.mode)  # an unknown mode fails here, not in vllm serve

    @property
    def kv_address(self) -> str:
        """The ZMQ address of the connector: VLLM_HOST_IP:kv_port (rank 0)."""
        return f"{HOST}:{self.kv_port}"

    @property
    def http_address(self) -> str:
        return f"{HOST}:{self.port}"

    def kv_transfer_config(self) -> dict | None:
        if self.kv_role is None:
            return None
        return {
            "kv_connector": "P2pNcclConnector",
            "kv_role": self.kv_role,
            "kv_port": self.kv_port,
            "kv_buffer_size": 1e9,
            **self.kv_overrides,
            "kv_connector_extra_config": {
                "send_type": self.send_type,
                "mem_pool_size_gb": "1",
                "nccl_num_channels": "2",
                "http_port": str(self.port),
                **self.kv_extra,
            },
        }

    def args(self, model_dir: str | Path, dtype: str = "float16") -> list[str]:
        extra = [*mode_settings(self.mode)[0], *self.extra_args]
        overridden = {a.split("=", 1)[0] for a in extra}
        args = [
            f"--model={model_dir}",
            f"--served-model-name={MODEL_NAME}",
            f"--host={HOST}",
            f"--port={self.port}",
            f"--dtype={dtype}",
            *(a for a in ENGINE_ARGS if a.split("=", 1)[0] not in overridden),
            *extra,
        ]
        if (config := self.kv_transfer_config()) is not None:
            args.append("--kv-transfer-config=" + json.dumps(config))
        return args

    def environment(self) -> dict[str, str | None]:
        """COMMON_ENV, then the mode's variables, then the spec's own env."""
        return {**COMMON_ENV, **mode_settings(self.mode)[1], **self.env}


def plan_pd(
    gpus: Sequence[str],
    *,
    send_type: str,
    randomization: bool,
    ports: Sequence[int],
    slot: int = 0,
    mode: str = DEFAULT_MODE,
) -> tuple[EngineSpec, EngineSpec]:
    """Prefill and decode engine of one cell, both in execution mode ``mode``.

    ports: prefill http, prefill kv, decode http, decode kv. Two or more GPUs:
    prefill on the first, decode on the second. One GPU: both on it; NCCL
    refuses two ranks on one GPU of one host, so each process claims its own
    NCCL_HOSTID and the tensors go through the socket transport on loopback.
    slot numbers cells that run side by side.
    """
    if not gpus:
        raise ValueError("no GPU visible")
    if send_type not in SEND_TYPES:
        raise ValueError(f"send_type {send_type!r} not in {SEND_TYPES}")
    p_http, p_kv, d_http, d_kv = ports
    specs = []
    for role, gpu, http, kv in (
        ("prefill", gpus[0], p_http, p_kv),
        ("decode", gpus[1] if len(gpus) > 1 else gpus[0], d_http, d_kv),
    ):
        env: dict[str, str | None] = {
            "CUDA_VISIBLE_DEVICES": gpu,
            "NCCL_NVLS_ENABLE": "0",
            RANDOMIZATION_OFF: None if randomization else "1",
        }
        if len(gpus) == 1:
            env.update(NCCL_HOSTID=f"{role}{slot}", NCCL_SOCKET_IFNAME="lo")
        kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
        specs.append(
            EngineSpec(f"{role}{slot}", http, env, kv_role, kv, send_type, mode)
        )
    return specs[0], specs[1]


def plan_reference(
    gpus: Sequence[str], port: int, mode: str = DEFAULT_MODE
) -> EngineSpec:
    """The plain engine (no KV transfer) whose answers are the expected ones.

    ``mode`` must be that of the pairs it is compared with.
    """
    if not gpus:
        raise ValueError("no GPU visible")
    return EngineSpec("reference", port, {"CUDA_VISIBLE_DEVICES": gpus[0]}, mode=mode)


def visible_gpus() -> list[str]:
    """GPU ids to hand out through CUDA_VISIBLE_DEVICES (no CUDA context)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# Ports free_ports handed out in this process. A port stays free until its
# server binds it, so a later call could hand it out again: two engines of one
# run on one port (seen: "Address already in use" with 15 servers at once).
_handed_out: set[int] = set()


def free_ports(count: int) -> list[int]:
    """``count`` ports free now and never handed out before in this process."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)  # open until the end: the OS gives another port
            if (port := s.getsockname()[1]) not in _handed_out:
                ports.append(port)
        _handed_out.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


_LIVE: set[int] = set()  # process groups started here and not yet ended
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set by stop_all: start nothing more


def start(
    name: str, cmd: list[str], env: dict[str, str | None], log_dir: Path, url: str
) -> Server:
    if _STOPPING.is_set():
        raise RuntimeError(f"not starting {name}: shutting down")
    full_env = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n# env: {json.dumps(env)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            cwd=log_dir,  # not the repository: nothing there shadows a module
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with _LIVE_LOCK:
        _LIVE.add(proc.pid)
    logger.info("started %s (pid %s), log %s", name, proc.pid, log_path)
    return Server(name, url, proc, log_path)


def start_engine(
    spec: EngineSpec,
    model_dir: str | Path,
    log_dir: Path,
    *,
    site: str | Path | None = None,
    dtype: str = "float16",
) -> Server:
    """Start ``spec`` with the vLLM found on PYTHONPATH=site (or inherited)."""
    env = spec.environment()
    if site is not None:
        env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return start(spec.name, cmd + spec.args(model_dir, dtype), env, log_dir, url(spec))


def start_proxy(
    port: int,
    prefill: EngineSpec,
    decode: EngineSpec,
    log_dir: Path,
    *,
    timeout: float,
    name: str = "proxy",
) -> Server:
    cmd = [
        sys.executable,
        str(HERE / "proxy.py"),
        f"--port={port}",
        f"--prefill={prefill.http_address},{prefill.kv_address}",
        f"--decode={decode.http_address},{decode.kv_address}",
        f"--timeout={timeout}",
    ]
    env = {"PYTHONUNBUFFERED": "1"}
    return start(name, cmd, env, log_dir, f"http://{HOST}:{port}")


def url(spec: EngineSpec) -> str:
    return f"http://{spec.http_address}"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxies


def _healthy(server: Server) -> bool:
    try:
        with _DIRECT.open(server.url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_groups(pgids: Sequence[int], grace: float = 10.0) -> None:
    """SIGTERM the process groups, SIGKILL what is left after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        alive = [g for g in pgids if _group_alive(g)]
        for pgid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            for pgid in alive:  # reap our own children, so they leave the group
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pgid, os.WNOHANG)
            alive = [g for g in alive if _group_alive(g)]
            time.sleep(0.2)
    with _LIVE_LOCK:
        _LIVE.difference_update(pgids)


def stop_all() -> None:
    """End every process group started here, and start no more (at exit)."""
    _STOPPING.set()
    with _LIVE_LOCK:
        pgids = list(_LIVE)
    stop_groups(pgids, grace=5.0)


@dataclass
class ServerGroup:
    """Servers that start together and always end together."""

    servers: list[Server] = field(default_factory=list)

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc) -> None:
        stop_groups([s.proc.pid for s in self.servers])
        for s in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=1)

    def add(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def wait_healthy(self, timeout: float = 600.0) -> None:
        pending = list(self.servers)
        deadline = time.monotonic() + timeout
        while pending:
            for server in list(pending):
                if server.proc.poll() is not None:
                    raise RuntimeError(
                        f"{server.name} exited with {server.proc.returncode}; "
                        f"{server.log_path}:\n{server.log_tail()}"
                    )
                if _healthy(server):
                    pending.remove(server)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"not healthy after {timeout:.0f} s: {names}")
            time.sleep(1.0)


@contextlib.contextmanager
def pd_stack(
    model_dir: str | Path,
    gpus: Sequence[str],
    log_dir: Path,
    *,
    send_type: str,
    randomization: bool,
    site: str | Path | None = None,
    dtype: str = "float16",
    proxy_timeout: float = 300.0,
    slot: int = 0,
    mode: str = DEFAULT_MODE,
) -> Iterator[PDStack]:
    """Prefill + decode + proxy; yields their URLs (a PDStack)."""
    *engine_ports, proxy_port = free_ports(5)
    prefill, decode = plan_pd(
        gpus,
        send_type=send_type,
        randomization=randomization,
        ports=engine_ports,
        slot=slot,
        mode=mode,
    )
    with ServerGroup() as group:
        for spec in (prefill, decode):
            group.add(start_engine(spec, model_dir, log_dir, site=site, dtype=dtype))
        proxy = group.add(
            start_proxy(proxy_port, prefill, decode, log_dir, timeout=proxy_timeout)
        )
        group.wait_healthy()
        yield PDStack(
            proxy=proxy.url,
            prefill=url(prefill),
            decode=url(decode),
            prefill_kv=prefill.kv_address,
            decode_kv=decode.kv_address,
        )


@dataclass(frozen=True)
class PDStack:
    """Base URLs of a running P/D pair and its proxy, and the engines' KV ports."""

    proxy: str
    prefill: str
    decode: str
    prefill_kv: str
    decode_kv: str


@contextlib.contextmanager
def reference_stack(
    model_dir: str | Path,
    gpus: Sequence[str],
    log_dir: Path,
    *,
    site: str | Path | None = None,
    dtype: str = "float16",
    mode: str = DEFAULT_MODE,
) -> Iterator[str]:
    """The reference engine alone, in execution mode ``mode``; yields its URL."""
    spec = plan_reference(gpus, free_ports(1)[0], mode)
    with ServerGroup() as group:
        group.add(start_engine(spec, model_dir, log_dir, site=site, dtype=dtype))
        group.wait_healthy()
        yield url(spec)
