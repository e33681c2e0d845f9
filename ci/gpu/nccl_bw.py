#!/usr/bin/env python3
r"""What NCCL reaches between two GPUs, through vLLM's own P2P engine.

Two processes, producer on the first GPU and consumer on the second (one
CUDA_VISIBLE_DEVICES each), each build vLLM's P2pNcclEngine (the transport of
P2pNcclConnector: ZMQ handshake, NCCLLibrary ncclSend/ncclRecv, the same
NCCL_MAX/MIN_NCHANNELS and NCCL_CUMEM_ENABLE). For each prompt length it
times, on the communicator that engine opened:

- plain: one ncclSend/ncclRecv of the request's whole KV (all layers);
- per layer: one ncclSend/ncclRecv per layer, each waited for, no ZMQ;
- connector: the engine's PUT_ASYNC path, one tensor per layer
  (send_tensor x layers, then until the consumer holds all of them).

KV layout per layer is FlashAttention's [blocks, 2, block_size, kv_heads,
head_dim] in bf16, so the bytes equal what the connector sends for a prompt.

    python3 ci/gpu/nccl_bw.py --site /tmp/site --out /tmp/nccl_bw.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

HOST = "127.0.0.1"
AUTH = b"nccl-bw"
# Multicast off in every process (KINDS.md), and no NCCL_HOSTID: two GPUs.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def layer_shape(tokens: int, block_size: int, kv_heads: int, head_dim: int):
    return (math.ceil(tokens / block_size), 2, block_size, kv_heads, head_dim)


def layer_bytes(tokens: int, block_size=16, kv_heads=8, head_dim=128) -> int:
    blocks = math.ceil(tokens / block_size)
    return blocks * 2 * block_size * kv_heads * head_dim * 2  # bf16


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _engine(role: str, port: int, channels: str):
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.p2p.p2p_nccl_engine import (
        P2pNcclEngine,
    )

    config = KVTransferConfig(
        kv_connector="P2pNcclConnector",
        kv_role=role,
        kv_port=port,
        kv_buffer_size=16e9,  # every received tensor stays on the GPU
        kv_connector_extra_config={
            "send_type": "PUT_ASYNC",
            "nccl_num_channels": channels,
            "mem_pool_size_gb": "0.25",
        },
    )
    return P2pNcclEngine(local_rank=0, config=config, hostname=HOST, port_offset=0)


def child(args) -> None:
    import torch

    torch.cuda.set_device(0)
    producer = args.role == "producer"
    my_port, peer_port = (
        (args.p_port, args.c_port) if producer else (args.c_port, args.p_port)
    )
    engine = _engine(
        "kv_producer" if producer else "kv_consumer", my_port, args.channels
    )
    peer = f"{HOST}:{peer_port}"
    if producer:
        ctl = Listener((HOST, args.ctl_port), authkey=AUTH).accept()
    else:
        for _ in range(300):
            try:
                ctl = Client((HOST, args.ctl_port), authkey=AUTH)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("consumer: no control connection")
    dev = torch.device("cuda", 0)
    results = []
    tokens_list = [int(t) for t in args.tokens.split(",")]
    for tokens in tokens_list:
        shape = layer_shape(tokens, 16, args.kv_heads, args.head_dim)
        per_layer = layer_bytes(tokens, 16, args.kv_heads, args.head_dim)
        total = per_layer * args.layers
        row = {"tokens": tokens, "bytes": total, "layer_bytes": per_layer}
        layers = [
            torch.ones(shape, dtype=torch.bfloat16, device=dev)
            for _ in range(args.layers if producer else 0)
        ]
        big = torch.ones(total // 2, dtype=torch.bfloat16, device=dev)
        torch.cuda.synchronize()

        # connector: PUT_ASYNC through the engine (first rep warms up; on the
        # first size it also opens the communicator).
        times = []
        for rep in range(args.reps + 1):
            ids = [f"t{tokens}r{rep}#model.layers.{i}.attn" for i in range(args.layers)]
            if producer:
                ctl.recv()  # consumer ready
                t0 = time.perf_counter()
                for i, tid in enumerate(ids):
                    engine.send_tensor(tid, layers[i], peer)
                engine.wait_for_sent()
                ctl.send(t0)
                ctl.recv()  # consumer has all
            else:
                ctl.send("ready")
                with engine.recv_store_cv:
                    while not all(t in engine.recv_store for t in ids):
                        engine.recv_store_cv.wait(timeout=60)
                t1 = time.perf_counter()
                t0 = ctl.recv()
                ctl.send("done")
                if rep:
                    times.append(t1 - t0)
                for tid in ids:  # free, and keep the buffer accounting right
                    engine.recv_tensor(tid)
                    engine.recv_store.pop(tid, None)
        if not producer:
            row["connector_s"] = _median(times)

        comm, rank = engine.comms[peer]
        # per layer: ncclSend/Recv per layer tensor, each synchronized.
        # plain: one ncclSend/Recv of everything.
        for key, count, nbytes in (
            ("per_layer_s", args.layers, per_layer),
            ("plain_s", 1, total),
        ):
            views = [big[: nbytes // 2] for _ in range(count)]
            times = []
            for rep in range(args.reps + 1):
                if producer:
                    ctl.send("go")
                    ctl.recv()
                else:
                    ctl.recv()
                    ctl.send("ack")
                t0 = time.perf_counter()
                for v in views:
                    if producer:
                        engine.send(comm, v, rank ^ 1, engine.send_stream)
                    else:
                        engine.recv(comm, v, rank ^ 1, engine.recv_stream)
                if rep:
                    times.append(time.perf_counter() - t0)
            if not producer:
                row[key] = _median(times)
        if not producer:
            for key in ("connector_s", "per_layer_s", "plain_s"):
                row[key.replace("_s", "_GBps")] = round(total / row[key] / 1e9, 1)
                row[key] = round(row[key], 6)
            results.append(row)
            print(json.dumps(row), flush=True)
        del layers, big
        torch.cuda.empty_cache()
    if not producer:
        out = {
            "nccl": engine.nccl.ncclGetVersion(),
            "nccl_num_channels": args.channels,
            "layers": args.layers,
            "reps": args.reps,
            "rows": results,
        }
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if producer:
        ctl.send("bye")
    else:
        ctl.recv()
    os._exit(0)  # the engine's threads never end


def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", help="PYTHONPATH of the children (vLLM)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpus", default="0,1", help="producer,consumer GPU")
    parser.add_argument("--tokens", default="1024,2048,4096,8192")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--channels", default="8", help="nccl_num_channels")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=150.0)
    parser.add_argument(
        "--role", choices=("producer", "consumer"), help=argparse.SUPPRESS
    )
    parser.add_argument("--p-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--c-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ctl-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return 0

    gpus = args.gpus.split(",")
    ports = {
        "--p-port": free_port(),
        "--c-port": free_port(),
        "--ctl-port": free_port(),
    }
    base = [sys.executable, os.path.abspath(__file__), "--out", args.out]
    for opt in ("tokens", "layers", "kv_heads", "head_dim", "channels", "reps"):
        base += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    base += [str(x) for kv in ports.items() for x in kv]
    procs = []
    for role, gpu in zip(("producer", "consumer"), gpus, strict=True):
        env = dict(
            os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1", **SAFE_ENV
        )
        env.pop("NCCL_HOSTID", None)
        if args.site:
            env["PYTHONPATH"] = args.site
        procs.append(subprocess.Popen(base + ["--role", role], env=env))
    deadline = time.monotonic() + args.timeout
    rc = 0
    for p in procs:
        try:
            rc |= p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = 124
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if rc:
        print(f"nccl_bw: children ended with {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
