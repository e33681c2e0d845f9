"""A producer never waits without bound on a consumer that is gone.

The two engines talk over vLLM's real ZMQ control plane (``zmq_wire``): the
producer's PUT waits for the consumer's answer before it sends the tensor.
When the decode engine dies after the pair connected, that answer never
comes. Stock, the wait has no bound: with PUT the prefill engine's forward
pass blocks for good, with PUT_ASYNC its single sender thread does, and every
later transfer to every decode engine stalls. Patched, the wait ends after
``send_timeout_s``: the transfer fails, later sends to the dead peer fail at
once, and a decode engine restarted at the same address is connected again.
"""

import contextlib
import logging
import re
import threading
import time

import msgpack
import pytest
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_engine

from .pd import DECODE_KV_PORT, LAYERS, PREFILL_KV_PORT, PDEngine, proxy_request_id
from .test_reliability import assert_loaded, assert_reference_text
from .test_two_engine import DECODE_MAX_TOKENS, make_prompt
from .transport import HOST
from .zmq_wire import zmq_wire  # noqa: F401

# A healthy peer answers far sooner, also on a loaded 2-core machine (a
# 0.2 s bound elsewhere was not enough there).
SEND_TIMEOUT_S = 0.5
# Far above SEND_TIMEOUT_S: a prefill that is not done by then is stuck.
STUCK_S = 10.0

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"]),
]


def run_prefill(
    prefill: PDEngine, prompt: list[int], prefill_port: int = PREFILL_KV_PORT
) -> str:
    """Prefill one proxied request; fail (not hang) if the producer is stuck.

    Returns the transfer id's request part (the X-Request-Id).
    """
    external_id = proxy_request_id(prefill_port)
    prefill.add_request(external_id, prompt, 1)
    run_until_idle_within(
        prefill, STUCK_S, "the prefill engine's step is stuck in a send"
    )
    return external_id


def run_until_idle_within(engine: PDEngine, timeout: float, failure: str) -> None:
    """engine.run_until_idle() in a thread: fail, not hang, if it is stuck;
    an error in it is raised here."""
    done = threading.Event()
    errors: list[BaseException] = []

    def steps():
        try:
            engine.run_until_idle()
        except BaseException as e:  # shown in the test's thread
            errors.append(e)
        done.set()

    threading.Thread(target=steps, daemon=True).start()
    assert done.wait(timeout), failure
    if errors:
        raise errors[0]


def sends_of(engine, external_id: str, timeout: float = STUCK_S) -> list[bool]:
    """The results of the producer's sends for one request, once all returned."""
    done = threading.Event()

    def results():
        return [sent for tid, sent in engine.send_results if external_id in tid]

    def wait():
        while len(results()) < len(LAYERS):
            if done.wait(0.01):
                return
        done.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout)
    done.set()
    sent = results()
    assert len(sent) == len(LAYERS), (
        f"the producer's sender is stuck: {len(sent)} of {len(LAYERS)} sends "
        f"of {external_id} returned"
    )
    return sent


class NoAnswerWarnings(logging.Handler):
    """The engine's warnings that a peer did not answer in time, one kind
    ("[PUT] No answer", "[GET] No answer"): their tensor ids."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.WARNING)
        self.prefix = prefix
        self.tensor_ids: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.tensor_ids.append(re.search(r" for (\S+) after ", message)[1])


@contextlib.contextmanager
def no_answer_warnings(prefix: str):
    handler = NoAnswerWarnings(prefix)
    engine_logger = logging.getLogger(p2p_nccl_engine.__name__)
    engine_logger.addHandler(handler)
    try:
        yield handler
    finally:
        engine_logger.removeHandler(handler)


@pytest.fixture
def send_timeouts():
    """The producer's warnings that a consumer did not answer a PUT in time."""
    with no_answer_warnings("[PUT] No answer") as handler:
        yield handler


def decode(engine: PDEngine, external_id: str, prompt: list[int]):
    completion = engine.add_request(external_id, prompt, DECODE_MAX_TOKENS)
    engine.run_until_idle()
    (req_id,) = completion.request_ids
    assert_loaded(engine, req_id, prompt)
    assert_reference_text(completion, prompt)
    assert engine.transport.held_tensor_ids() == set(), "received KV leaked"


def test_producer_survives_a_dead_consumer(
    zmq_wire,  # noqa: F811
    send_timeouts,
    tiny_model_dir,
    send_type,
):
    options = {"send_timeout_s": SEND_TIMEOUT_S, "recv_timeout_s": STUCK_S}
    prefill = PDEngine(
        tiny_model_dir, "kv_producer", PREFILL_KV_PORT, send_type, **options
    )
    consumer = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type, **options
    )

    # The pair connects and transfers.
    prompt = make_prompt(1, 37)
    first = run_prefill(prefill, prompt)
    assert sends_of(prefill.transport, first) == [True] * len(LAYERS)
    decode(consumer, first, prompt)

    # The decode engine dies. The producer's sends of the next request fail
    # within the timeout, and its step goes on.
    consumer.transport.kill()
    lost = run_prefill(prefill, make_prompt(2, 30))
    assert sends_of(prefill.transport, lost) == [False] * len(LAYERS)
    assert not prefill.scheduler.has_requests()

    # While nothing listens there, later requests do not wait at all: at
    # most one wait for the peer (a PUT sent before the producer saw the
    # connection close), not one per layer and request.
    lost_again = run_prefill(prefill, make_prompt(3, 20))
    assert sends_of(prefill.transport, lost_again) == [False] * len(LAYERS)
    timed_out = list(send_timeouts.tensor_ids)
    assert len(timed_out) <= 1
    assert all(lost in t and t.endswith(f"#{LAYERS[0]}") for t in timed_out)

    # A decode engine restarted at the same address is connected again.
    restarted = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type, **options
    )
    # ZMQ notices it within its reconnect interval (0.1 s); sends before
    # that fail at once, as while it was down (the first layers of a request
    # may fail and the next ones go through).
    deadline = time.monotonic() + STUCK_S
    while True:
        prompt = make_prompt(4 + len(prefill.completions), 45)
        after = run_prefill(prefill, prompt)
        sent = sends_of(prefill.transport, after)
        if sent == [True] * len(LAYERS) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sent == [True] * len(LAYERS), "the restarted consumer gets no KV"
    decode(restarted, after, prompt)
    assert send_timeouts.tensor_ids == timed_out, "the producer waited again"


# A PUT from a peer the consumer has no communicator with.
UNKNOWN_PEER_PUT = msgpack.dumps(
    {"cmd": "PUT", "tensor_id": "x#layer", "shape": [1], "dtype": "float32"}
)


def is_unknown_peer_reply(reply: bytes) -> bool:
    """The consumer's answer to a PUT from a peer it has no connection with."""
    old_reply = getattr(p2p_nccl_engine, "UNKNOWN_PEER_PUT_REPLY", None)
    if old_reply is not None:  # the series before the connection redesign
        return reply == old_reply
    return msgpack.loads(reply)["ret"] == p2p_nccl_engine.UNKNOWN_PEER


@contextlib.contextmanager
def producer_connections(consumer_address: str, port: int = PREFILL_KV_PORT):
    """Opens DEALER sockets to the consumer with the identity of the producer
    at ``port``, as its create_connect does; all closed at the end."""
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def connect() -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt_string(zmq.IDENTITY, f"{HOST}:{port}")
        sock.connect(f"tcp://{consumer_address}")
        sockets.append(sock)
        return sock

    try:
        yield connect
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()


def test_consumer_answers_a_producer_that_reconnects_at_once(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    send_type,
):
    """A producer that drops its socket and connects again (0007, 0008) is
    answered, even while the consumer's ROUTER still holds the old connection
    under the same identity (its disconnect not seen yet; here: still open).

    Without ROUTER_HANDOVER the ROUTER ignores the new connection, the
    producer's NEW handshake is never read, and ncclCommInitRank on the
    producer waits forever: seen once in this tier under load.
    """
    consumer = PDEngine(tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type)
    with producer_connections(consumer.transport.zmq_address) as connect:
        for _ in range(2):
            sock = connect()
            sock.send(UNKNOWN_PEER_PUT)
            assert sock.poll(5000), "the consumer did not answer this connection"
            # A peer it has no communicator with: asked to connect again.
            assert is_unknown_peer_reply(sock.recv())


def test_listener_survives_what_a_replaced_connection_still_delivers(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    send_type,
):
    """A producer reconnects while its old connection still has a PUT unread
    at the consumer (0008 after a timeout, a busy listener). With
    ROUTER_HANDOVER the new connection gets the identity; libzmq (4.3.5)
    terminates the old one, and what it held is dropped, so the listener is
    never handed a message under the old connection's renamed id (checked
    here: it keeps answering). Without the option the new connection is
    ignored.
    """
    consumer = PDEngine(tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type)
    transport = consumer.transport
    with producer_connections(transport.zmq_address) as connect:
        transport.pause_listener()
        for _ in range(2):
            new = connect()
            new.send(UNKNOWN_PEER_PUT)
            time.sleep(0.2)  # the PUT waits unread at the consumer
        transport.resume_listener()
        for _ in range(2):  # its PUT, then one more after both were read
            assert new.poll(5000), "the consumer's listener stopped answering"
            assert is_unknown_peer_reply(new.recv())
            new.send(UNKNOWN_PEER_PUT)
        assert transport._listener_thread.is_alive()
