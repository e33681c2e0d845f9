"""Every wait on a peer ends, and a connection that failed is replaced.

The engines talk over vLLM's real ZMQ control plane; NCCL is the in-process
wire of ``zmq_wire`` with its socket transport (``socket_transport``): a
handshake or a communicator's first transfer whose peer never does its part
waits until it is aborted, as NCCL over sockets or IB does. A stand-in peer
speaks the control plane and does only the NCCL part it is told to.

Before the connection layer's redesign (issue 21) each of these waited for
good (a prefill's step, decode's forward pass), or a thread died on an
unexpected error and the pair stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from types import SimpleNamespace

import msgpack
import pytest
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_engine

from .pd import DECODE_KV_PORT, LAYERS, PREFILL_KV_PORT, PDEngine, proxy_request_id
from .test_dead_consumer import (
    STUCK_S,
    decode,
    run_prefill,
    run_until_idle_within,
    sends_of,
)
from .test_load_failures import wait_for
from .test_reliability import assert_reference_text
from .test_two_engine import DECODE_MAX_TOKENS, make_prompt
from .transport import HOST
from .zmq_wire import (  # noqa: F401
    FakeNcclLibrary,
    HostTensorMemoryPool,
    socket_transport,
    zmq_wire,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("zmq_wire", "socket_transport"),
]

# Far below STUCK_S (test_dead_consumer): a step still waiting then is stuck.
BOUND_S = 0.5
OPTIONS = {
    "send_timeout_s": BOUND_S,
    "transfer_timeout_s": BOUND_S,
    "recv_timeout_s": 2.0,
    "kv_load_failure_policy": "recompute",
}


def answer(data: dict, **fields) -> bytes:
    """The answer of a peer to a PUT or GET, as the engine under test reads
    it (before the redesign a PUT was answered b"0", unnamed)."""
    if hasattr(p2p_nccl_engine, "UNKNOWN_PEER_PUT_REPLY") and data["cmd"] == "PUT":
        return b"0"
    return msgpack.dumps({"ret": 0, "seq": data.get("seq"), **fields})


@contextlib.contextmanager
def stand_in(port: int, join: bool, answers: bool):
    """A peer at HOST:port: it joins the NCCL handshakes it is asked for (or
    never does) and answers every PUT and GET (or none), but never posts a
    transfer. Leaving the block is its death."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(f"tcp://{HOST}:{port}")
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if not router.poll(20):
                continue
            identity, message = router.recv_multipart()
            data = msgpack.loads(message)
            if data["cmd"] == "NEW" and join:
                unique_id = SimpleNamespace(internal=bytes(data["unique_id"]))
                threading.Thread(
                    target=FakeNcclLibrary().ncclCommInitRank,
                    args=(2, unique_id, 1),
                    daemon=True,
                ).start()
            elif data["cmd"] in ("PUT", "GET") and answers:
                fields = {"shape": [2, 4], "dtype": "float32"}
                reply = answer(data, **fields if data["cmd"] == "GET" else {})
                router.send_multipart([identity, reply])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield
    finally:
        stop.set()
        server.join(5)
        router.close(linger=0)
        context.term()


def prefill_engine(tiny_model_dir: str, send_type: str) -> PDEngine:
    return PDEngine(
        tiny_model_dir, "kv_producer", PREFILL_KV_PORT, send_type, **OPTIONS
    )


def consumer_engine(tiny_model_dir: str, send_type: str) -> PDEngine:
    return PDEngine(tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type, **OPTIONS)


def transfer_until_it_goes_through(prefill: PDEngine, consumer: PDEngine) -> None:
    """A consumer (re)started where a failed one was gets the next transfers
    (ZMQ reconnects within 0.1 s; sends before that fail at once)."""
    deadline = time.monotonic() + STUCK_S
    for n in itertools.count():
        prompt = make_prompt(100 + n, 33)
        after = run_prefill(prefill, prompt)
        if sends_of(prefill.transport, after) == [True] * len(LAYERS):
            decode(consumer, after, prompt)
            return
        assert time.monotonic() < deadline, "the new consumer never got KV"
        time.sleep(0.05)


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_producer_gives_up_on_a_consumer_that_never_joins(tiny_model_dir, send_type):
    """Decode's process is alive but never joins the NCCL handshake (it hangs,
    or dies in it). Each prefill step ends within the bound; once a decode
    engine listens there again it gets the KV."""
    prefill = prefill_engine(tiny_model_dir, send_type)
    with stand_in(DECODE_KV_PORT, join=False, answers=False):
        for n in range(2):
            lost = run_prefill(prefill, make_prompt(n, 30))
            assert sends_of(prefill.transport, lost) == [False] * len(LAYERS)
    consumer = consumer_engine(tiny_model_dir, send_type)
    transfer_until_it_goes_through(prefill, consumer)
    # Every reconnect used the peer's one stream (PyTorch's pool has 32).
    streams = getattr(prefill.transport, "streams", {})
    assert list(streams) == [consumer.transport.zmq_address]


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_producer_gives_up_on_a_consumer_that_dies_mid_transfer(
    tiny_model_dir, send_type
):
    """Decode joins the handshake and answers the PUT, then never receives,
    and dies. The prefill step that sends ends within the bound, and so do
    later ones while nothing listens at decode's address."""
    prefill = prefill_engine(tiny_model_dir, send_type)
    with stand_in(DECODE_KV_PORT, join=True, answers=True):
        lost = run_prefill(prefill, make_prompt(1, 30))
        assert sends_of(prefill.transport, lost) == [False] * len(LAYERS)
    for n in range(2, 4):
        lost = run_prefill(prefill, make_prompt(n, 30))
        assert sends_of(prefill.transport, lost) == [False] * len(LAYERS)
    transfer_until_it_goes_through(prefill, consumer_engine(tiny_model_dir, send_type))


def test_load_ends_when_a_producer_never_sends(tiny_model_dir):
    """GET: prefill joins the handshake and answers the GET, then never sends
    (it hangs or dies). Decode's forward pass ends within the bound, and the
    request is computed in full (kv_load_failure_policy recompute)."""
    consumer = consumer_engine(tiny_model_dir, "GET")
    with stand_in(PREFILL_KV_PORT, join=True, answers=True):
        prompt = make_prompt(1, 30)
        completion = consumer.add_request(proxy_request_id(), prompt, DECODE_MAX_TOKENS)
        run_until_idle_within(consumer, 10.0, "decode's forward pass is stuck")
        assert_reference_text(completion, prompt)


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_listener_survives_a_malformed_message(tiny_model_dir, send_type):
    """A peer sends a PUT without its fields on a working connection. The
    listener logs it and goes on serving (it died on anything but an NCCL
    RuntimeError)."""
    consumer = consumer_engine(tiny_model_dir, send_type)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt_string(zmq.IDENTITY, f"{HOST}:{PREFILL_KV_PORT + 7}")
    sock.connect(f"tcp://{consumer.transport.zmq_address}")
    try:
        unique_id = os.urandom(128)
        sock.send(msgpack.dumps({"cmd": "NEW", "unique_id": unique_id}))
        FakeNcclLibrary().ncclCommInitRank(2, SimpleNamespace(internal=unique_id), 0)
        sock.send(msgpack.dumps({"cmd": "PUT", "seq": 1}))
        prefill = prefill_engine(tiny_model_dir, send_type)
        prompt = make_prompt(2, 30)
        after = run_prefill(prefill, prompt)
        assert sends_of(prefill.transport, after) == [True] * len(LAYERS)
        decode(consumer, after, prompt)
    finally:
        sock.close(linger=0)
        context.term()


def test_sender_survives_an_unexpected_error(tiny_model_dir, monkeypatch):
    """PUT_ASYNC: an unexpected error in a send (here injected into the
    connection setup) fails that send; the sender thread goes on and
    wait_for_sent returns (the thread died, and the next step's
    wait_for_sent waited for good)."""
    prefill = prefill_engine(tiny_model_dir, "PUT_ASYNC")
    consumer = consumer_engine(tiny_model_dir, "PUT_ASYNC")
    transport = prefill.transport
    create_connect = transport.create_connect
    calls = []

    def fails_once(remote_address):
        calls.append(remote_address)
        if len(calls) == 1:
            raise ValueError("injected")
        return create_connect(remote_address)

    monkeypatch.setattr(transport, "create_connect", fails_once)
    run_prefill(prefill, make_prompt(1, 30))
    wait_for(lambda: calls, "the sender never ran")
    prompt = make_prompt(2, 30)
    after = run_prefill(prefill, prompt)
    assert sends_of(transport, after) == [True] * len(LAYERS)
    decode(consumer, after, prompt)


@pytest.mark.parametrize("buffer", [1, 1e9], ids=["host-pool", "gpu"])
def test_received_kv_accounting_with_two_prefills_at_once(
    tiny_model_dir, monkeypatch, buffer
):
    """Two prefills send to one decode at the same time (two accepted
    connections, two workers storing) while decode loads and frees, with
    threads switching every few microseconds; the received KV goes to the
    host pool or stays on the device. At the end decode holds nothing: the
    pool is whole and buffer_size is 0. This guards the accounting of
    several workers; the unlocked updates of the series before the redesign
    did not show here (3 runs passed there), so it is no regression test."""
    monkeypatch.setattr(p2p_nccl_engine, "TensorMemoryPool", HostTensorMemoryPool)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-6)
    try:
        prefills = [
            PDEngine(tiny_model_dir, "kv_producer", port, "PUT_ASYNC", **OPTIONS)
            for port in (PREFILL_KV_PORT, PREFILL_KV_PORT + 1)
        ]
        decode = PDEngine(
            tiny_model_dir,
            "kv_consumer",
            DECODE_KV_PORT,
            "PUT_ASYNC",
            kv_buffer_size=buffer,
            **OPTIONS,
        )
        for n in range(8):
            requests = {
                proxy_request_id(): make_prompt(10 * n + i, 30 + i) for i in (0, 1)
            }
            threads = [
                threading.Thread(
                    target=run_prefill_of, args=(prefill, external_id, prompt)
                )
                for prefill, (external_id, prompt) in zip(
                    prefills, requests.items(), strict=True
                )
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(STUCK_S)
            for external_id, prompt in requests.items():
                decode.add_request(external_id, prompt, DECODE_MAX_TOKENS)
            run_until_idle_within(decode, STUCK_S, "decode's step is stuck")
    finally:
        sys.setswitchinterval(switch_interval)
    wait_for(
        lambda: not decode.transport.held_tensor_ids(),
        "received KV is still held",
        STUCK_S,
    )
    assert decode.transport.pool.allocated() == 0
    assert decode.transport.buffer_size == 0
    assert decode.loaded_kv, "no KV was loaded"


def run_prefill_of(prefill: PDEngine, external_id: str, prompt: list[int]) -> None:
    prefill.add_request(external_id, prompt, 1)
    prefill.run_until_idle()
