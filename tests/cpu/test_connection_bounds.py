"""A peer that stalls in the NCCL handshake must not stall the others.

Over NCCL's socket transport (two engines on one GPU; sockets or IB between
hosts, the usual P/D deployment) ``ncclCommInitRank`` does not notice a peer
that died or stalls before joining: it waits for good. On one H100 a stand-in
peer that sent NEW with a real NCCL unique id and never joined made every
later request of the pair fail or hang, also after it was killed (issue 21).
The wire models that transport here (``socket_transport``: the handshake
blocks until the test ends).

The series before the connection layer's redesign (issue 21: every NCCL
step bounded, one peer cannot stall another's transfers) fails both.
"""

import os
import time

import msgpack
import pytest

from .pd import DECODE_KV_PORT, PREFILL_KV_PORT, PDEngine
from .test_dead_consumer import decode, producer_connections
from .test_late_answers import (
    OPTIONS,
    put_and_never_send,
    transfer_from_a_new_prefill,
)
from .test_load_failures import wait_for
from .zmq_wire import socket_transport, zmq_wire  # noqa: F401

pytestmark = pytest.mark.timeout(60)
# The consumer's listener is the same for PUT and PUT_ASYNC; each case costs
# the producer's stuck bound (10 s) until the redesign passes it.
SEND_TYPE = "PUT_ASYNC"


def test_consumer_serves_a_producer_while_another_never_joins(
    zmq_wire,  # noqa: F811
    socket_transport,  # noqa: F811
    tiny_model_dir,
):
    """Another prefill engine (xPyD) asks the consumer for an NCCL handshake
    and never joins it; it stays connected. A healthy prefill engine's
    transfers to that consumer must still go through."""
    consumer = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, SEND_TYPE, **OPTIONS
    )
    stalled = producer_connections(consumer.transport.zmq_address, PREFILL_KV_PORT + 7)
    with stalled as connect:
        connect().send(msgpack.dumps({"cmd": "NEW", "unique_id": os.urandom(128)}))
        time.sleep(0.5)  # the consumer's listener is in the handshake
        after, prompt = transfer_from_a_new_prefill(
            tiny_model_dir,
            SEND_TYPE,
            OPTIONS,
            "a stalled peer's handshake stalls the healthy prefill's transfers",
        )
        decode(consumer, after, prompt)


def test_consumer_serves_a_producer_while_another_never_sends(
    zmq_wire,  # noqa: F811
    socket_transport,  # noqa: F811
    tiny_model_dir,
):
    """Another prefill engine completes its NCCL handshake with the consumer,
    sends a PUT, gets the answer and never sends the tensor (it hangs; on one
    H100 every request of a healthy prefill then hung, also after the stalled
    one was killed). The healthy prefill's transfers must still go through,
    and the stalled transfer must end as not received."""
    options = dict(OPTIONS, transfer_timeout_s=0.5)
    consumer = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, SEND_TYPE, **options
    )
    stalled = producer_connections(consumer.transport.zmq_address, PREFILL_KV_PORT + 7)
    with stalled as connect:
        put_and_never_send(connect(), "stalled#layer")
        # The consumer's listener is in its first ncclRecv from the stalled peer.
        after, prompt = transfer_from_a_new_prefill(
            tiny_model_dir,
            SEND_TYPE,
            options,
            "a peer that never sends stalls the healthy prefill's transfers",
        )
        decode(consumer, after, prompt)
        # The stalled transfer ends within its bound, as not received.
        wait_for(
            lambda: "stalled#layer" in consumer.transport.held_tensor_ids(),
            "the stalled transfer never ended",
            10.0,
        )
        with consumer.transport.recv_store_cv:
            assert consumer.transport.recv_store["stalled#layer"] is None
