"""P/D disaggregation on real GPUs, against a plain reference engine.

A prefill (kv_producer) and a decode (kv_consumer) vLLM server joined by
P2pNcclConnector sit behind proxy.py; the workload's answers must equal, token
for token, those of a reference engine without KV transfer. The servers use
the vLLM this interpreter finds, or the one under $GPU_TIER_SITE (PYTHONPATH).
With the patch, every send_type must be correct with request id randomization
on (vLLM's default); stock 0.23.0 hangs (PUT, PUT_ASYNC) or answers wrongly
(GET) there. GPU_TIER_RANDOMIZATION=on,off adds the cells with it off.

The engines run in vLLM's default execution mode (CUDA graphs, V2 model
runner); GPU_TIER_MODE=default,eager adds the cells of another mode (the
reference engine then runs once per mode, in that mode).
"""

from __future__ import annotations

import os

import pytest
import servers
import workload
from settings import DTYPE, REQUESTS, SITE, TIMEOUT

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]

RANDOMIZATION = os.environ.get("GPU_TIER_RANDOMIZATION", "on").split(",")


@pytest.mark.parametrize("randomization", RANDOMIZATION)
@pytest.mark.parametrize("send_type", servers.SEND_TYPES)
def test_pd_matches_reference(
    send_type, randomization, mode, reference, tiny_model_dir, gpus, log_dir
):
    with servers.pd_stack(
        tiny_model_dir,
        gpus,
        log_dir,
        send_type=send_type,
        randomization=randomization == "on",
        site=SITE,
        dtype=DTYPE,
        proxy_timeout=TIMEOUT + 30,
        mode=mode,
    ) as pd:
        outcomes = workload.run(pd.proxy, REQUESTS, TIMEOUT)
    verdict = workload.judge(outcomes, reference, REQUESTS)
    notes = "\n".join(verdict.notes[:12])
    assert verdict.verdict == "correct", f"{verdict.summary()}; logs {log_dir}\n{notes}"
