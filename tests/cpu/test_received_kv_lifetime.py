"""Received KV must neither kill the decode engine's listener nor stay forever.

Consumer side of PUT and PUT_ASYNC, on vLLM's real ``P2pNcclEngine`` listener
and ZMQ control plane (``zmq_wire``), with real schedulers and connectors:

- KV over ``kv_buffer_size`` goes to the pinned host pool. When the pool was
  full, storing it raised in the listener thread: from then on no PUT to this
  decode engine was answered (every producer waited ``send_timeout_s``) and
  every decode request failed to load. Now the listener keeps serving, and
  that request's KV is reported as not loaded (``kv_load_failure_policy``).
- KV received for a request whose decode never starts (the client went away
  after prefill, the proxy dropped the decode request) was held until the
  engine stopped, counted against ``kv_buffer_size`` or held in the pool:
  over days it fills the pool. Now KV that no request loaded within
  ``recv_expiry_s`` is freed, and a request that comes for it later is
  reported as not loaded at once.
"""

from __future__ import annotations

import contextlib
import time

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_engine

from .pd import (
    DECODE_KV_PORT,
    LAYERS,
    PREFILL_KV_PORT,
    Completion,
    PDEngine,
    proxy_request_id,
    set_randomization,
)
from .test_dead_consumer import run_until_idle_within
from .test_load_failures import (
    PROMPT_LEN,
    TENSOR_BYTES,
    assert_outcome,
    wait_for,
)
from .test_reliability import assert_loaded
from .test_two_engine import DECODE_MAX_TOKENS, make_prompt
from .zmq_wire import HostTensorMemoryPool, zmq_wire  # noqa: F401

# No test here waits for a send to time out: far above the time a healthy
# decode takes to answer a PUT on a loaded 2-core machine (0.2 s was not).
SEND_TIMEOUT_S = 2.0
# How long received KV waits for a request to load it, in these tests.
RECV_EXPIRY_S = 1.0
# Far above RECV_EXPIRY_S and the time a step takes: a wait this long is a
# wait for KV that is not coming.
STUCK_S = 10.0
# Far above STUCK_S: a decode that waits for freed KV is seen as stuck.
RECV_TIMEOUT_S = 3 * STUCK_S
# Room for one request's KV: each tensor takes a block of 1 KiB.
ONE_REQUEST_POOL_GB = len(LAYERS) * 1024 / 1024**3

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"]),
]


class EngineClock:
    """The engine module's ``time``, with a monotonic clock a test can stop.

    What a test does "within recv_expiry_s" (receive a request's KV twice,
    start loading it) runs with the engine's clock stopped: on a loaded
    2-core machine one prefill step can take longer than RECV_EXPIRY_S, and
    the KV then expires before the test got there (seen in CI). Expiry
    itself still runs on the engine's own listener, in real time.
    """

    def __init__(self) -> None:
        self.stopped_at: float | None = None
        self.lost = 0.0

    def __getattr__(self, name: str):
        return getattr(time, name)

    def monotonic(self) -> float:
        if self.stopped_at is not None:
            return self.stopped_at
        return time.monotonic() - self.lost

    @contextlib.contextmanager
    def stopped(self):
        self.stopped_at = self.monotonic()
        start = time.monotonic()
        try:
            yield
        finally:
            self.lost += time.monotonic() - start
            self.stopped_at = None


@pytest.fixture
def engine_clock(monkeypatch) -> EngineClock:
    clock = EngineClock()
    monkeypatch.setattr(p2p_nccl_engine, "time", clock)
    return clock


@pytest.fixture
def pd_wire(zmq_wire, monkeypatch):  # noqa: F811
    """The real-ZMQ pair, with a host pool that fills."""
    set_randomization(monkeypatch, "on")
    monkeypatch.setattr(p2p_nccl_engine, "TensorMemoryPool", HostTensorMemoryPool)
    return zmq_wire


def make_pair(model_dir, send_type, policy="fail", **decode_options):
    prefill = PDEngine(
        model_dir,
        "kv_producer",
        PREFILL_KV_PORT,
        send_type,
        send_timeout_s=SEND_TIMEOUT_S,
    )
    options = {"recv_timeout_s": RECV_TIMEOUT_S, "recv_expiry_s": RECV_EXPIRY_S}
    decode = PDEngine(
        model_dir,
        "kv_consumer",
        DECODE_KV_PORT,
        send_type,
        kv_load_failure_policy=policy,
        **{**options, **decode_options},
    )
    return prefill, decode


def new_request(index: int) -> tuple[str, list[int]]:
    """An id as the API server makes it from the proxy's, and a prompt."""
    return f"cmpl-{proxy_request_id()}-0", make_prompt(index, PROMPT_LEN)


def held_of(decode: PDEngine, external_id: str) -> set[str]:
    """The received tensors decode holds for the request."""
    return {t for t in decode.transport.held_tensor_ids() if external_id in t}


def run_prefill(prefill: PDEngine, external_id: str, prompt: list[int]) -> list:
    """Prefill one request and wait until its sends returned.

    Returns their results (True: decode's listener took the tensor).
    """
    sends_before = sum(external_id in tid for tid, _ in prefill.transport.send_results)
    prefill.add_request(external_id, prompt, 1)
    prefill.run_until_idle()

    def sends():
        return [
            sent for tid, sent in prefill.transport.send_results if external_id in tid
        ][sends_before:]

    wait_for(
        lambda: len(sends()) == len(LAYERS),
        "the producer's sends did not return",
        timeout=STUCK_S,
    )
    return sends()


def wait_received(decode: PDEngine, external_id: str, copies: int = 1) -> None:
    """Wait until decode's listener stored the request's KV ``copies`` times
    (prefills of one transfer id share one copy, counted in recv_refs)."""

    def received() -> bool:
        refs = decode.transport.recv_refs
        held = held_of(decode, external_id)
        return len(held) == len(LAYERS) and all(refs.get(t) == copies for t in held)

    wait_for(
        received,
        f"decode did not receive the KV of {external_id}",
        timeout=STUCK_S,
    )


def decode_within_bound(
    decode: PDEngine, requests: dict[str, list[int]]
) -> dict[str, Completion]:
    """Decode the requests; fail if decode is stuck (waits recv_timeout_s)."""
    completions = {
        external_id: decode.add_request(external_id, prompt, DECODE_MAX_TOKENS)
        for external_id, prompt in requests.items()
    }
    run_until_idle_within(
        decode,
        STUCK_S,
        "decode waits recv_timeout_s for KV it received and freed long ago",
    )
    return completions


def assert_nothing_held(decode: PDEngine) -> None:
    transport = decode.transport
    assert transport.held_tensor_ids() == set(), "received KV leaked"
    assert transport.buffer_size == 0, "freed KV still counts against the buffer"
    assert transport.pool.allocated() == 0, "freed KV still holds the host pool"


def assert_serves(
    clock: EngineClock, prefill: PDEngine, decode: PDEngine, external_id, prompt
) -> None:
    """The pair transfers the request: decode loads the KV prefill sent."""
    with clock.stopped():
        assert run_prefill(prefill, external_id, prompt) == [True] * len(LAYERS)
        wait_received(decode, external_id)
        completion = decode_within_bound(decode, {external_id: prompt})
    completion = completion[external_id]
    (req_id,) = completion.request_ids
    assert_loaded(decode, req_id, prompt)
    assert_outcome(decode, completion, prompt, "fail", kv_missing=False)
    assert_nothing_held(decode)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_listener_survives_a_full_host_pool(
    pd_wire, engine_clock, tiny_model_dir, send_type, policy
):
    """KV that finds the host pool full is reported as not loaded."""
    prefill, decode = make_pair(
        tiny_model_dir,
        send_type,
        policy,
        kv_buffer_size=1,  # all received KV goes to the host pool
        mem_pool_size_gb=ONE_REQUEST_POOL_GB,
    )
    (first, first_prompt), (second, second_prompt) = new_request(1), new_request(2)
    with engine_clock.stopped():
        assert run_prefill(prefill, first, first_prompt) == [True] * len(LAYERS)
        wait_received(decode, first)
        assert decode.transport.pool.allocated() == len(LAYERS) * 1024
        # The pool is full: the second request's KV does not fit.
        sent = run_prefill(prefill, second, second_prompt)
        assert decode.transport._listener_thread.is_alive(), (
            "decode's listener died on a full host pool: no PUT is answered any more"
        )
        assert sent == [True] * len(LAYERS), "decode's listener stopped answering PUTs"
        wait_received(decode, second)

        requests = {first: first_prompt, second: second_prompt}
        completions = decode_within_bound(decode, requests)
    assert_loaded(decode, completions[first].request_ids[0], first_prompt)
    for external_id, prompt in requests.items():
        assert_outcome(
            decode, completions[external_id], prompt, policy, external_id == second
        )
    assert_nothing_held(decode)
    assert_serves(engine_clock, prefill, decode, *new_request(3))


@pytest.mark.parametrize("policy", ["recompute", "fail"])
@pytest.mark.parametrize("storage", ["device", "host-pool"])
def test_unclaimed_kv_is_freed(
    pd_wire, engine_clock, tiny_model_dir, send_type, policy, storage
):
    """KV whose decode never started is freed; a late decode fails at once."""
    options = {"kv_buffer_size": 1} if storage == "host-pool" else {}
    prefill, decode = make_pair(tiny_model_dir, send_type, policy, **options)
    external_id, prompt = new_request(1)
    with engine_clock.stopped():
        assert run_prefill(prefill, external_id, prompt) == [True] * len(LAYERS)
        wait_received(decode, external_id)
        if storage == "device":
            assert decode.transport.buffer_size == len(LAYERS) * TENSOR_BYTES
        else:
            assert decode.transport.pool.allocated() == len(LAYERS) * 1024

    # The decode request never comes (the client went away).
    wait_for(
        lambda: decode.transport.held_tensor_ids() == set(),
        "KV that no request loaded is held forever: it fills the buffer and "
        "the host pool",
        timeout=RECV_EXPIRY_S + STUCK_S,
    )
    assert_nothing_held(decode)

    # It comes after all: its KV is reported as not loaded, without a wait.
    completion = decode_within_bound(decode, {external_id: prompt})[external_id]
    assert_outcome(decode, completion, prompt, policy, kv_missing=True)
    assert_nothing_held(decode)
    assert not decode.transport.recv_dropped

    # A retry with the same X-Request-Id and prompt transfers again, and so
    # does another request.
    assert_serves(engine_clock, prefill, decode, external_id, prompt)
    assert_serves(engine_clock, prefill, decode, *new_request(2))


def test_kv_claimed_in_time_is_kept(pd_wire, engine_clock, tiny_model_dir, send_type):
    """KV that its request loaded stays until the request finishes."""
    prefill, decode = make_pair(tiny_model_dir, send_type)
    claimed, claimed_prompt = new_request(1)
    unclaimed, unclaimed_prompt = new_request(2)
    with engine_clock.stopped():
        assert run_prefill(prefill, claimed, claimed_prompt) == [True] * len(LAYERS)
        wait_received(decode, claimed)
        claimed_kv = held_of(decode, claimed)

        # Decode starts the request as it comes (it loads its KV) and runs
        # one step of it.
        completion = decode.add_request(claimed, claimed_prompt, DECODE_MAX_TOKENS)
        decode.step()
        (req_id,) = completion.request_ids
        assert_loaded(decode, req_id, claimed_prompt)

        # KV that comes later and that no request loads is freed; the KV of
        # the running request is kept (no longer counted against the buffer).
        sent = run_prefill(prefill, unclaimed, unclaimed_prompt)
        assert sent == [True] * len(LAYERS)
        wait_received(decode, unclaimed)
    wait_for(
        lambda: not held_of(decode, unclaimed),
        "KV that no request loaded is held forever",
        timeout=RECV_EXPIRY_S + STUCK_S,
    )
    assert decode.transport.held_tensor_ids() == claimed_kv
    assert decode.transport.buffer_size == 0

    decode.run_until_idle()
    assert_outcome(decode, completion, claimed_prompt, "fail", kv_missing=False)
    assert_nothing_held(decode)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
@pytest.mark.parametrize("decodes_in_time", [0, 1])
def test_retried_transfer_id(
    pd_wire, engine_clock, tiny_model_dir, send_type, policy, decodes_in_time
):
    """Two prefills of one X-Request-Id and prompt (a client retry) share one
    received copy. Decodes that never come do not keep it; decodes that come
    late fail at once; later transfers of the id are not dropped."""
    prefill, decode = make_pair(tiny_model_dir, send_type, policy)
    external_id, prompt = new_request(1)
    with engine_clock.stopped():
        for copies in (1, 2):
            assert run_prefill(prefill, external_id, prompt) == [True] * len(LAYERS)
            wait_received(decode, external_id, copies)
        assert decode.transport.buffer_size == len(LAYERS) * TENSOR_BYTES

        for _ in range(decodes_in_time):
            completion = decode_within_bound(decode, {external_id: prompt})
            completion = completion[external_id]
            assert_loaded(decode, completion.request_ids[0], prompt)
            assert_outcome(decode, completion, prompt, policy, kv_missing=False)
    # The other decodes never come.
    wait_for(
        lambda: decode.transport.held_tensor_ids() == set(),
        "KV of a retried request whose decode never came is held forever",
        timeout=RECV_EXPIRY_S + STUCK_S,
    )
    assert_nothing_held(decode)

    # They come late, one after the other: not loaded, at once.
    for _ in range(2 - decodes_in_time):
        completion = decode_within_bound(decode, {external_id: prompt})[external_id]
        assert_outcome(decode, completion, prompt, policy, kv_missing=True)
    assert_nothing_held(decode)
    assert not decode.transport.recv_dropped

    # The id is retried once more: its KV is neither dropped nor refused.
    assert_serves(engine_clock, prefill, decode, external_id, prompt)
