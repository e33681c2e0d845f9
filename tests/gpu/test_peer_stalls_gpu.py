"""A peer that stalls delays no other peer's requests (real NCCL).

Over NCCL's socket transport (one GPU shared by the engines, as P and D on
two hosts) a peer that joins no handshake, or joins and never sends, made
every later request of the pair hang or fail before the connection layer's
redesign (issue 21), also after the peer was killed: ncclCommInitRank and a
communicator's first ncclRecv wait for good, in the listener that served
every peer. A stand-in peer (standin_peer.py) stalls that way at the engine
that accepts connections (decode for PUT and PUT_ASYNC, prefill for GET)
while the healthy pair serves the workload; every answer must equal the
reference's, during the stall and after the stand-in is killed.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import servers
import workload
from settings import DTYPE, REQUESTS, SITE, TIMEOUT

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1200)]

SEND_TYPES = os.environ.get("GPU_TIER_STALL_SEND_TYPES", "PUT_ASYNC,GET").split(",")
STANDIN = Path(__file__).with_name("standin_peer.py")


def start_standin(address: str, stall: str, gpus, log_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[0], NCCL_NVLS_ENABLE="0")
    if len(gpus) == 1:
        env.update(NCCL_HOSTID="standin", NCCL_SOCKET_IFNAME="lo")
    if SITE:
        env["PYTHONPATH"] = SITE
    log = open(log_dir / f"standin-{stall}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(STANDIN), address, stall],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else "(nothing in 120 s)"
    if line.strip() != "stalled":
        proc.kill()
        raise AssertionError(f"stand-in did not stall: {line!r}; see {log.name}")
    return proc


def run_and_judge(pd: servers.PDStack, ref: list[dict], what: str) -> str:
    start = time.monotonic()
    outcomes = workload.run(pd.proxy, REQUESTS, TIMEOUT)
    seconds = time.monotonic() - start
    verdict = workload.judge(outcomes, ref, REQUESTS)
    notes = "\n".join(verdict.notes[:12])
    assert verdict.verdict == "correct", f"{what}: {verdict.summary()}\n{notes}"
    return f"{what}: {verdict.summary()} in {seconds:.1f} s"


@pytest.mark.parametrize("send_type", SEND_TYPES)
def test_a_stalled_peer_stalls_no_other(
    send_type,
    mode,
    reference,
    tiny_model_dir,
    gpus,
    log_dir,  # noqa: F811
):
    stalls = ["never-joins"] if send_type == "GET" else ["never-joins", "never-sends"]
    with servers.pd_stack(
        tiny_model_dir,
        gpus,
        log_dir,
        send_type=send_type,
        randomization=True,
        site=SITE,
        dtype=DTYPE,
        proxy_timeout=TIMEOUT + 30,
        mode=mode,
    ) as pd:
        acceptor = pd.prefill_kv if send_type == "GET" else pd.decode_kv
        report = []
        for stall in stalls:
            standin = start_standin(acceptor, stall, gpus, log_dir)
            try:
                report.append(run_and_judge(pd, reference, f"peer {stall}"))
            finally:
                standin.kill()
                standin.wait()
        report.append(run_and_judge(pd, reference, "after the stand-ins died"))
        assert workload.healthy(pd.decode) and workload.healthy(pd.prefill)
    print("\n".join(report))
