"""A peer that answers after the timeout leaves the pair working.

The two engines talk over vLLM's real ZMQ control plane (``zmq_wire``); an
NCCL send returns once the peer's recv took the tensor, as it does for KV.
A PUT or GET is answered by the peer's listener, which then waits in
ncclRecv (PUT) or ncclSend (GET) for the transfer it agreed to. When the
asking side gave up before that answer came (``send_timeout_s``; for a GET
also the load's ``recv_timeout_s`` if that ends first), the series as it was
dropped or replaced the socket and left the peer's listener waiting for
good: later transfers between the pair got no answer, and a GET consumer's
new NCCL handshake with that producer blocked. Patched, the asking side
drops the connection (its late answers are skipped: answers name their
message) and connects again; the new connection replaces the old one at the
peer, whose transfer the late answer agreed to fails there. A producer that
is gone costs at most one timeout, not a handshake that never ends, and one
that does not answer costs a decode step ``send_timeout_s``, not all of it.
"""

import itertools
import os
import time
from types import SimpleNamespace

import msgpack
import pytest

from . import zmq_wire as wire
from .pd import DECODE_KV_PORT, LAYERS, PREFILL_KV_PORT, PDEngine, expected_kv
from .test_dead_consumer import (
    decode,
    no_answer_warnings,
    producer_connections,
    run_prefill,
    run_until_idle_within,
    sends_of,
)
from .test_load_failures import wait_for
from .test_reliability import assert_loaded, assert_reference_text
from .test_two_engine import DECODE_MAX_TOKENS, make_prompt
from .zmq_wire import FakeNcclLibrary, zmq_wire  # noqa: F401

# A healthy peer answers far sooner, also on a loaded 2-core machine (a
# 0.2 s bound elsewhere was not enough there).
SEND_TIMEOUT_S = 0.5
RECV_TIMEOUT_S = 1.0
# Far above the timeouts: what is not done by then is stuck.
STUCK_S = 10.0
OPTIONS = {
    "send_timeout_s": SEND_TIMEOUT_S,
    "recv_timeout_s": RECV_TIMEOUT_S,
    "kv_load_failure_policy": "recompute",
}

pytestmark = pytest.mark.timeout(90)


def loaded(engine: PDEngine, req_id: str, prompt: list[int]) -> bool:
    """Whether the request's KV came from the producer (not recomputed)."""
    kv = engine.loaded_kv.get(req_id)
    return kv is not None and all(
        kv[layer].equal(expected_kv(prompt[:-1], i)) for i, layer in enumerate(LAYERS)
    )


def decode_without_kv(engine: PDEngine, external_id: str, prompt: list[int]):
    """Decode a request whose KV did not arrive: it is computed in full."""
    completion = engine.add_request(external_id, prompt, DECODE_MAX_TOKENS)
    run_until_idle_within(
        engine, STUCK_S + RECV_TIMEOUT_S, "the decode engine's step is stuck"
    )
    assert_reference_text(completion, prompt)


@pytest.fixture
def get_timeouts():
    """The consumer's warnings that a producer did not answer a GET in time."""
    with no_answer_warnings("[GET] No answer") as handler:
        yield handler


def transfer_from_a_new_prefill(
    model_dir: str, send_type: str, options: dict, failure: str
) -> tuple[str, list[int]]:
    """A prefill engine started at PREFILL_KV_PORT prefills one request; all
    its layers must reach the consumer. Returns the request's id and prompt."""
    prefill = PDEngine(model_dir, "kv_producer", PREFILL_KV_PORT, send_type, **options)
    prompt = make_prompt(2, 30)
    after = run_prefill(prefill, prompt)
    assert sends_of(prefill.transport, after) == [True] * len(LAYERS), failure
    return after, prompt


def put_and_never_send(sock, tensor_id: str) -> None:
    """As a producer on the DEALER socket ``sock``: complete an NCCL
    handshake with the consumer, send a PUT, get its answer, and never send
    the tensor. The consumer's listener then waits for it in ncclRecv."""
    unique_id = os.urandom(128)
    sock.send(msgpack.dumps({"cmd": "NEW", "unique_id": unique_id}))
    FakeNcclLibrary().ncclCommInitRank(2, SimpleNamespace(internal=unique_id), 0)
    put = {"cmd": "PUT", "tensor_id": tensor_id, "shape": [2, 4]}
    sock.send(msgpack.dumps(dict(put, dtype="float32", seq=1)))
    assert sock.poll(5000)
    answer = sock.recv()
    assert answer == b"0" or msgpack.loads(answer)["ret"] == 0


def connected_pair(
    model_dir: str, send_type: str, **options
) -> tuple[PDEngine, PDEngine]:
    """A producer and a consumer that have transferred one request."""
    options = options or OPTIONS
    prefill = PDEngine(model_dir, "kv_producer", PREFILL_KV_PORT, send_type, **options)
    consumer = PDEngine(model_dir, "kv_consumer", DECODE_KV_PORT, send_type, **options)
    prompt = make_prompt(1, 37)
    first = run_prefill(prefill, prompt)
    if send_type != "GET":
        assert sends_of(prefill.transport, first) == [True] * len(LAYERS)
    decode(consumer, first, prompt)
    return prefill, consumer


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_producer_sends_what_a_late_put_answer_agreed_to(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    send_type,
):
    prefill, consumer = connected_pair(tiny_model_dir, send_type)
    producer = prefill.transport

    # The consumer's listener is busy past the producer's timeout.
    consumer.transport.pause_listener()
    late_prompt = make_prompt(2, 30)
    late = run_prefill(prefill, late_prompt)
    assert sends_of(producer, late) == [False] * len(LAYERS)

    # It reads the PUT, answers it and waits in ncclRecv for the tensor.
    recvs = consumer.transport.nccl_calls["recv"]
    consumer.transport.resume_listener()
    wait_for(
        lambda: consumer.transport.nccl_calls["recv"] > recvs,
        "timed out waiting for the consumer to answer the late PUT",
        STUCK_S,
    )

    # The next request's KV is transferred and loaded.
    prompt = make_prompt(3, 45)
    after = run_prefill(prefill, prompt)
    assert sends_of(producer, after) == [True] * len(LAYERS), (
        "the consumer's listener still waits for the tensor of the late PUT"
    )
    # The late request got a part of its KV: it is computed in full.
    decode_without_kv(consumer, late, late_prompt)
    decode(consumer, after, prompt)
    assert consumer.transport._listener_thread.is_alive()


def test_consumer_receives_what_a_late_get_answer_agreed_to(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    get_timeouts,
):
    prefill, consumer = connected_pair(tiny_model_dir, "GET")
    producer = prefill.transport

    # The producer's listener is busy past the consumer's load deadline.
    producer.pause_listener()
    late_prompt = make_prompt(2, 30)
    late = run_prefill(prefill, late_prompt)
    decode_without_kv(consumer, late, late_prompt)
    assert len(get_timeouts.tensor_ids) == 1

    # It reads the GET, answers it and waits in ncclSend with the tensor.
    sends = producer.nccl_calls["send"]
    producer.resume_listener()
    wait_for(
        lambda: producer.nccl_calls["send"] > sends,
        "timed out waiting for the producer to answer the late GET",
        STUCK_S,
    )

    # The next request's KV is transferred and loaded.
    prompt = make_prompt(3, 45)
    after = run_prefill(prefill, prompt)
    decode(consumer, after, prompt)
    assert producer._listener_thread.is_alive()
    assert len(get_timeouts.tensor_ids) == 1


def test_a_stalled_producer_leaves_the_step_to_other_producers(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    get_timeouts,
):
    """A producer that takes GETs and never answers (a stopped process with
    its socket open) costs a decode step send_timeout_s, not all of its
    recv_timeout_s: the step's requests from other producers still load."""
    options = {**OPTIONS, "recv_timeout_s": 25 * SEND_TIMEOUT_S}
    stalled, consumer = connected_pair(tiny_model_dir, "GET", **options)
    healthy = PDEngine(
        tiny_model_dir, "kv_producer", PREFILL_KV_PORT + 10, "GET", **options
    )
    warm_up = make_prompt(2, 30)
    decode(consumer, run_prefill(healthy, warm_up, PREFILL_KV_PORT + 10), warm_up)

    prompts = [make_prompt(3, 30), make_prompt(4, 22)]
    external_ids = [
        run_prefill(stalled, prompts[0]),
        run_prefill(healthy, prompts[1], PREFILL_KV_PORT + 10),
    ]
    stalled.transport.pause_listener()
    completions = [
        consumer.add_request(external_id, prompt, DECODE_MAX_TOKENS)
        for external_id, prompt in zip(external_ids, prompts, strict=True)
    ]
    consumer.step()  # loads both requests' KV
    stalled.transport.resume_listener()
    run_until_idle_within(consumer, STUCK_S, "the decode engine's step is stuck")

    assert len(get_timeouts.tensor_ids) == 1
    assert not loaded(consumer, completions[0].request_ids[0], prompts[0])
    assert loaded(consumer, completions[1].request_ids[0], prompts[1]), (
        "a stalled producer used up the step's recv_timeout_s: the KV of "
        "another producer was not loaded"
    )
    for completion, prompt in zip(completions, prompts, strict=True):
        assert_reference_text(completion, prompt)


def test_consumer_does_not_wait_again_for_a_dead_producer(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    get_timeouts,
):
    prefill, consumer = connected_pair(tiny_model_dir, "GET")

    # The prefill engine dies after two more prefills.
    prompts = [make_prompt(2, 30), make_prompt(3, 22)]
    lost = [run_prefill(prefill, prompt) for prompt in prompts]
    prefill.transport.kill()

    # The first load waits for the deadline; the next one does not wait for
    # an answer or a new NCCL handshake with the dead producer.
    for external_id, prompt in zip(lost, prompts, strict=True):
        decode_without_kv(consumer, external_id, prompt)
    timed_out = list(get_timeouts.tensor_ids)
    assert len(timed_out) <= 1 and all(lost[0] in t for t in timed_out)

    # A prefill engine restarted at the same address is connected again.
    restarted = PDEngine(
        tiny_model_dir, "kv_producer", PREFILL_KV_PORT, "GET", **OPTIONS
    )
    # ZMQ notices it within its reconnect interval (0.1 s); loads before that
    # fail at once, as while it was down.
    deadline = time.monotonic() + STUCK_S
    for n in itertools.count(4):
        prompt = make_prompt(n, 41)
        after = run_prefill(restarted, prompt)
        completion = consumer.add_request(after, prompt, DECODE_MAX_TOKENS)
        consumer.run_until_idle()
        assert_reference_text(completion, prompt)
        (req_id,) = completion.request_ids
        if loaded(consumer, req_id, prompt) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert loaded(consumer, req_id, prompt), "the restarted producer's KV is not used"
    prompt = make_prompt(1001, 33)
    decode(consumer, run_prefill(restarted, prompt), prompt)
    assert get_timeouts.tensor_ids == timed_out, "the consumer waited again"


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_consumer_listener_survives_a_producer_that_dies_mid_transfer(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    send_type,
):
    """A producer dies after the consumer answered its PUT and before it sent
    the tensor. The consumer's listener waited in ncclRecv for good: no later
    handshake or PUT was read (seen on two H200s: a prefill engine restarted
    after a kill never connected). Patched, the transfer is aborted after
    transfer_timeout_s, its KV counts as not received, and the listener
    serves a prefill engine restarted at that address."""
    options = dict(OPTIONS, transfer_timeout_s=0.5)
    consumer = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type, **options
    )
    with producer_connections(consumer.transport.zmq_address) as connect:
        put_and_never_send(connect(), "gone#layer")
    # The producer is gone; the consumer's listener waits for the tensor.

    after, prompt = transfer_from_a_new_prefill(
        tiny_model_dir,
        send_type,
        options,
        "the consumer's listener still waits for the dead producer's tensor",
    )
    completion = consumer.add_request(after, prompt, DECODE_MAX_TOKENS)
    consumer.run_until_idle()
    (req_id,) = completion.request_ids
    assert_loaded(consumer, req_id, prompt)
    assert_reference_text(completion, prompt)
    with consumer.transport.recv_store_cv:
        assert consumer.transport.recv_store["gone#layer"] is None
    assert consumer.transport._listener_thread.is_alive()


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_consumer_listener_survives_a_producer_that_dies_in_its_handshake(
    zmq_wire,  # noqa: F811
    monkeypatch,
    tiny_model_dir,
    send_type,
):
    """A producer dies after it asked for an NCCL handshake (NEW) and before
    it joined. ncclCommInitRank fails on the consumer; the exception ended
    its listener (seen on two H200s: prefill killed during its first
    transfer, and the restarted one never got an answer). Patched, the
    listener logs it and serves a prefill engine restarted at that address."""
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.5)
    consumer = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type, **OPTIONS
    )
    with producer_connections(consumer.transport.zmq_address) as connect:
        connect().send(msgpack.dumps({"cmd": "NEW", "unique_id": os.urandom(128)}))
        time.sleep(1.0)  # past the consumer's failed handshake

    after, prompt = transfer_from_a_new_prefill(
        tiny_model_dir,
        send_type,
        OPTIONS,
        "the consumer's listener did not survive the failed handshake",
    )
    decode(consumer, after, prompt)
    assert consumer.transport._listener_thread.is_alive()
