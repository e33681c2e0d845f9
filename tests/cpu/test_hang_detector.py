"""The in-process transport reports a receive that can never end as a hang.

vLLM's own ``recv_tensor`` (PUT, PUT_ASYNC) waits on ``recv_store_cv`` for its
key. When no thread but the waiting one drives an engine and no PUT_ASYNC
sender has anything queued or in flight, the key can never arrive: the wait
raises ``KVTransferHang`` naming the key, within ``DETECT_S``, instead of the
tier waiting out its timeout. A key still on its way is waited for.
"""

import threading
import time

import pytest
import torch
from vllm.config import KVTransferConfig

from .pd import DECODE_KV_PORT, PREFILL_KV_PORT
from .test_two_engine import HANG_TIMEOUT_S
from .transport import NETWORK, InProcessP2pEngine, KVTransferHang

pytestmark = pytest.mark.timeout(HANG_TIMEOUT_S)

DETECT_S = 1.0
DELIVERY_DELAY_S = 0.5


@pytest.fixture
def pair(request):
    send_type = request.param
    NETWORK.reset()
    engines = []
    for role, port in (
        ("kv_producer", PREFILL_KV_PORT),
        ("kv_consumer", DECODE_KV_PORT),
    ):
        config = KVTransferConfig(
            kv_connector="P2pNcclConnector",
            kv_role=role,
            kv_port=port,
            kv_buffer_size=1e9,
            kv_connector_extra_config={"send_type": send_type},
        )
        engines.append(InProcessP2pEngine(0, config))
    yield tuple(engines)
    NETWORK.reset()


def kv(value: float) -> torch.Tensor:
    return torch.full((2, 3), value)


def slow_wire(engine: InProcessP2pEngine, release: threading.Event) -> threading.Event:
    """Deliveries of the engine's sender wait until release is set. Returns
    an event set once the sender holds an item."""
    send_sync = engine.send_sync
    holds = threading.Event()

    def delayed(item):
        holds.set()
        release.wait()
        return send_sync(item)

    engine.send_sync = delayed
    return holds


@pytest.mark.parametrize("pair", ["PUT", "PUT_ASYNC"], indirect=True)
def test_receiver_waiting_for_unsent_key_is_a_hang(pair):
    prefill, decode = pair
    prefill.send_tensor("req-a#layer0", kv(1.0), decode.zmq_address)
    prefill.wait_for_sent()
    assert decode.recv_tensor("req-a#layer0").equal(kv(1.0))

    start = time.monotonic()
    with pytest.raises(KVTransferHang, match=r"hang: .*'req-b#layer0'"):
        decode.recv_tensor("req-b#layer0", prefill.zmq_address)
    assert time.monotonic() - start < DETECT_S


@pytest.mark.parametrize("pair", ["PUT_ASYNC"], indirect=True)
@pytest.mark.parametrize("state", ["in-flight", "queued"])
def test_key_on_its_way_from_put_async_thread_is_no_hang(pair, state):
    prefill, decode = pair
    release = threading.Event()
    holds = slow_wire(prefill, release)
    if state == "queued":
        # The sender holds a first item; the awaited key waits behind it.
        prefill.send_tensor("req-a#layer0", kv(1.0), decode.zmq_address)
    prefill.send_tensor("req-b#layer0", kv(2.0), decode.zmq_address)
    assert holds.wait(DETECT_S)
    # From here on nothing but the PUT_ASYNC thread can deliver the key.
    threading.Timer(DELIVERY_DELAY_S, release.set).start()

    start = time.monotonic()
    assert decode.recv_tensor("req-b#layer0").equal(kv(2.0))
    assert time.monotonic() - start >= DELIVERY_DELAY_S * 0.9


@pytest.mark.parametrize("pair", ["PUT", "PUT_ASYNC"], indirect=True)
def test_key_from_another_driving_thread_is_no_hang(pair):
    prefill, decode = pair
    driving = threading.Event()

    def drive_prefill():
        prefill.wait_for_sent()  # this thread now drives the producer
        driving.set()
        time.sleep(DELIVERY_DELAY_S)
        prefill.send_tensor("req-a#layer0", kv(1.0), decode.zmq_address)

    threading.Thread(target=drive_prefill).start()
    driving.wait()
    assert decode.recv_tensor("req-a#layer0").equal(kv(1.0))


@pytest.mark.parametrize("pair", ["PUT_ASYNC"], indirect=True)
def test_bounded_wait_is_left_to_its_timeout(pair):
    """A recv_tensor wait with a timeout (recv_timeout_s) ends by itself.

    vLLM's own timeout path then runs (the blocks are reported as not
    loaded), so the detector does not turn the wait into a hang.
    """
    prefill, decode = pair
    key = "req-a#layer0"
    cv = decode.recv_store_cv
    with decode.awaiting(key), cv:
        start = time.monotonic()
        assert cv.wait_for(lambda: key in decode.recv_store, timeout=0.2) is False
        assert time.monotonic() - start >= 0.2
    # Nothing was lost: a key sent now is received.
    prefill.send_tensor(key, kv(1.0), decode.zmq_address)
    assert decode.recv_tensor(key).equal(kv(1.0))
