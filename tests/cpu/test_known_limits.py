"""Known limits of the series, each as a strict xfail: a fix turns it into a
failure, and the mark goes with the fix. Listed in patches/UPSTREAM_PR.md.

On vLLM's real ``P2pNcclEngine`` listener and ZMQ control plane
(``zmq_wire``), with real schedulers and connectors.
"""

from __future__ import annotations

import pytest

from .pd import LAYERS
from .test_load_failures import assert_outcome
from .test_received_kv_lifetime import (
    decode_within_bound,
    make_pair,
    new_request,
    pd_wire,  # noqa: F401
    run_prefill,
)
from .zmq_wire import zmq_wire  # noqa: F401

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"]),
]


@pytest.mark.xfail(
    strict=True,
    reason="known limit (UPSTREAM_PR): the marker a request leaves when it "
    "gave up on its KV drops the next copy of its transfer id, also a "
    "retry's own; fixing it needs a redesign of the received store",
)
def test_retry_after_lost_kv_loads_its_own(
    pd_wire,  # noqa: F811
    tiny_model_dir,
    send_type,
):
    """A request gave up on KV that never came (its prefill died); the client
    retries with the same X-Request-Id and prompt, and that prefill's KV
    arrives: the retry loads it."""
    prefill, decode = make_pair(tiny_model_dir, send_type, recv_timeout_s=1.0)
    external_id, prompt = new_request(1)
    lost = decode_within_bound(decode, {external_id: prompt})[external_id]
    assert_outcome(decode, lost, prompt, "fail", kv_missing=True)

    assert run_prefill(prefill, external_id, prompt) == [True] * len(LAYERS)
    retry = decode_within_bound(decode, {external_id: prompt})[external_id]
    assert_outcome(decode, retry, prompt, "fail", kv_missing=False)
