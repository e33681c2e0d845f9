"""An in-process stand-in for the NCCL/ZMQ transport of P2pNcclEngine.

Only the wire is replaced. The class subclasses vLLM's own ``P2pNcclEngine``
so everything above the wire is vLLM's code: ``send_tensor`` (GET send store
with its LRU and buffer threshold, PUT_ASYNC send queue and sender thread),
``recv_tensor`` for PUT/PUT_ASYNC (the receiver waits on its condition
variable until the key arrives, forever, like the real engine),
``wait_for_sent``, ``get_finished`` and the id bookkeeping.

What the wire did in the real engine, and does here:
- PUT/PUT_ASYNC ``send_sync``: the peer's listener stores the tensor under the
  key in its ``recv_store`` and notifies waiting receivers.
- GET ``recv_tensor``: ask the peer for the key; the peer's listener answers
  from its send store, or with nothing for an unknown key (``ret != 0``), in
  which case the receiver gets ``None``.
Peers find each other by their ``<host>:<kv_port + rank>`` address, the one
the connector parses out of the request id.

Hang detection. A receiver in vLLM's ``recv_tensor`` (PUT, PUT_ASYNC) waits
on ``recv_store_cv`` until its key is in ``recv_store``; stock vLLM waits
forever. Here ``recv_store_cv`` is a ``HangDetectingCondition``: each of its
waits (and every 50 ms while waiting) asks the ``Network`` whether anything
can still deliver the key. Nothing can when every thread that drives an
engine, other than the waiting one, has ended (the tier drives both engines
of a pair from the test's thread, so while decode waits, prefill cannot step)
and every engine's PUT_ASYNC sender thread is parked in its queue wait with
an empty queue, or has died. Then the wait raises ``KVTransferHang``, naming
the key, at once instead of after the test's timeout. What the detector
cannot see (a thread that has not yet called into any engine, a wait outside
``recv_store_cv``) is left to pytest-timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_engine

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"

# The CUDA side of the wire. The engine orders its transfers against the
# compute stream (send_stream.wait_stream, tensor.record_stream); CPU tensors
# need no such ordering, so these do nothing.
HOST_STREAM = torch.Stream("cpu")
p2p_nccl_engine.current_stream = lambda: HOST_STREAM
_CPU_STREAM_OPS = torch.library.Library("aten", "IMPL")
_CPU_STREAM_OPS.impl("record_stream", lambda tensor, stream: None, "CPU")


class _HostSendStream:
    def wait_stream(self, stream: torch.Stream) -> None:
        pass


class KVTransferHang(RuntimeError):
    """A receiver waits for KV that nothing in the process can send anymore."""


class Network:
    """Address book of the in-process engines of one test, and who drives them."""

    def __init__(self) -> None:
        self.engines: dict[str, InProcessP2pEngine] = {}
        # Every engine still in memory, also those a test took off the address
        # book: its PUT_ASYNC thread may still be delivering.
        self.all_engines: weakref.WeakSet[InProcessP2pEngine] = weakref.WeakSet()
        # Threads that created or called an engine, other than its sender.
        self.drivers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

    def peer(self, address: str) -> InProcessP2pEngine:
        try:
            return self.engines[address]
        except KeyError:
            raise ConnectionError(f"no P2P engine listens on {address}") from None

    def reset(self) -> None:
        self.engines.clear()
        self.drivers = weakref.WeakSet()

    def driven_by_this_thread(self) -> None:
        self.drivers.add(threading.current_thread())

    def who_can_still_send(self) -> str | None:
        """What could still put a tensor into a recv_store, or None.

        Called by a receiver that waits (so its own thread sends nothing) with
        its recv_store_cv held (so no delivery to it runs meanwhile).
        """
        me = threading.current_thread()
        for thread in list(self.drivers):
            if thread is not me and thread.is_alive():
                return f"thread {thread.name} drives an engine"
        for engine in list(self.all_engines):
            sender = getattr(engine, "_send_thread", None)
            if sender is None or not sender.is_alive():
                continue
            # Queue first, then the parked sender: an item taken off the
            # queue is in flight until its thread is parked again.
            queued = len(engine.send_queue)
            if queued or not engine.send_queue_cv.is_parked(sender):
                return (
                    f"{engine.zmq_address}'s PUT_ASYNC sender is busy ({queued} queued)"
                )
        return None


NETWORK = Network()


class ParkingCondition(threading.Condition):
    """A Condition that knows which threads wait on it right now.

    For ``send_queue_cv``: a PUT_ASYNC sender thread waiting on it is parked
    (vLLM's ``send_async`` waits there only with an empty queue); one that is
    not may be delivering the item it took off the queue.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parked: set[int] = set()

    def is_parked(self, thread: threading.Thread) -> bool:
        return thread.ident in self._parked

    def wait(self, timeout: float | None = None) -> bool:
        me = threading.get_ident()
        self._parked.add(me)
        try:
            return super().wait(timeout)
        finally:
            self._parked.discard(me)


class HangDetectingCondition(threading.Condition):
    """``recv_store_cv``: its waits raise KVTransferHang when nothing can end them.

    While vLLM's ``recv_tensor`` waits for a key (the engine names it), the
    wait checks before it starts and every ``POLL_S`` whether anything can
    still send; other waits are threading's. A wait without a timeout still
    returns only on a notify, a wait with one returns False once it expires,
    so a bounded ``recv_tensor`` wait behaves as with threading.Condition.
    """

    POLL_S = 0.05

    def __init__(self, engine: InProcessP2pEngine) -> None:
        super().__init__()
        self._engine = weakref.ref(engine)

    def wait(self, timeout: float | None = None) -> bool:
        engine = self._engine()
        if engine is None or engine.awaited_key() is None or timeout is not None:
            # A bounded wait (the patched recv_tensor) is not a hang: it ends.
            return super().wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._raise_if_hung(engine)
            poll = self.POLL_S
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                poll = min(poll, remaining)
            if super().wait(poll):
                return True

    @staticmethod
    def _raise_if_hung(engine: InProcessP2pEngine) -> None:
        key = engine.awaited_key()
        if key is None or key in engine.recv_store:
            return
        if NETWORK.who_can_still_send() is not None:
            return
        raise KVTransferHang(
            f"hang: {engine.zmq_address} waits in recv_tensor for KV {key!r} "
            "that nothing will send (no engine is stepping, no PUT_ASYNC send "
            "is queued or in flight)"
        )


class InProcessP2pEngine(p2p_nccl_engine.P2pNcclEngine):
    def __init__(
        self,
        local_rank: int,
        config,
        hostname: str = "",
        port_offset: int = 0,
        library_path: str | None = None,
    ) -> None:
        # Mirrors P2pNcclEngine.__init__ without sockets, NCCL and CUDA.
        self.config = config
        self.rank = port_offset
        self.local_rank = local_rank
        self.device = torch.device("cpu")
        self._hostname = hostname or HOST
        self._port = int(config.kv_port) + port_offset
        self.zmq_address = f"{self._hostname}:{self._port}"
        self.proxy_address = ""
        self.http_address = ""
        self.send_store_cv = threading.Condition()
        self.send_queue_cv = ParkingCondition()
        self.recv_store_cv = HangDetectingCondition(self)
        self._awaited: dict[int, str] = {}  # thread ident -> key it waits for
        self.pool = None
        self.send_stream = _HostSendStream()
        # The patched engine's late-answer bookkeeping (the PUT_ASYNC sender
        # reads it); this wire answers at once, so it stays empty.
        self.unanswered: dict[str, deque] = {}
        self.reconnects: dict[str, int] = {}
        self.send_type = config.get_from_extra_config("send_type", "PUT_ASYNC")
        if self.send_type == "GET":
            self.send_store: dict[str, torch.Tensor] = {}
        else:
            self.send_queue: deque[p2p_nccl_engine.SendQueueItem] = deque()
            if self.send_type == "PUT_ASYNC":
                self._send_thread = threading.Thread(
                    target=self.send_async, daemon=True
                )
                self._send_thread.start()
        self.recv_store: dict[str, Any] = {}
        # Test hook: PUTs of the keys it is true for fail on the receiver (as
        # when it runs out of memory).
        self.fail_put: Callable[[str], bool] = lambda tensor_id: False
        self.recv_refs: dict[str, int] = {}  # the patched engine's bookkeeping
        self.recv_unloaded: dict[str, int] = {}
        self.recv_dropped: dict[str, int] = {}
        self.recv_deadlines: dict[str, float] = {}
        self.recv_expired: dict[str, int] = {}
        self.recv_expiry = float(
            config.get_from_extra_config(
                "recv_expiry_s", getattr(p2p_nccl_engine, "DEFAULT_RECV_EXPIRY_S", 0)
            )
        )
        # Written and never read by the engine (0012 removes them); stock's
        # get_finished still pops from them.
        self.recv_request_id_to_tensor_ids: dict[str, set[str]] = {}
        self.send_request_id_to_tensor_ids: dict[str, set[str]] = {}
        self.socks: dict[str, Any] = {}
        self.comms: dict[str, Any] = {}
        self.failed_peers: set[str] = set()  # the patched engine's
        self.buffer_size = 0
        self.buffer_size_threshold = float(config.kv_buffer_size)
        self.nccl_num_channels = "1"
        self._listener_thread = None
        self._ping_thread = None
        NETWORK.engines[self.zmq_address] = self
        NETWORK.all_engines.add(self)
        NETWORK.driven_by_this_thread()

    # ---- the calls of the engine's driver (the worker connector)
    def send_tensor(self, tensor_id: str, tensor: torch.Tensor, remote_address=None):
        NETWORK.driven_by_this_thread()
        return super().send_tensor(tensor_id, tensor, remote_address)

    def wait_for_sent(self):
        NETWORK.driven_by_this_thread()
        return super().wait_for_sent()

    def get_finished(self, *args, **kwargs):
        NETWORK.driven_by_this_thread()
        return super().get_finished(*args, **kwargs)

    @contextmanager
    def awaiting(self, tensor_id: str) -> Iterator[None]:
        """Name the key this thread's waits on recv_store_cv are for."""
        me = threading.get_ident()
        self._awaited[me] = tensor_id
        try:
            yield
        finally:
            self._awaited.pop(me, None)

    def awaited_key(self) -> str | None:
        return self._awaited.get(threading.get_ident())

    # ---- the wire, sender side (PUT, PUT_ASYNC)
    def send_sync(self, item: p2p_nccl_engine.SendQueueItem) -> bool:
        if item.remote_address is None:
            return False
        NETWORK.peer(item.remote_address)._on_put(item.tensor_id, item.tensor)
        return True

    # ---- the wire, receiver side of PUT (listen_for_requests, cmd PUT)
    def _on_put(self, tensor_id: str, tensor: torch.Tensor) -> None:
        if self.fail_put(tensor_id):
            # The listener ran out of memory: it stores None for the key.
            tensor = None
        else:
            tensor = tensor.clone()
            self.buffer_size += tensor.element_size() * tensor.numel()
        with self.recv_store_cv:
            if hasattr(self, "store_received_tensor"):  # the patched engine
                self.store_received_tensor(tensor_id, tensor)
            else:
                self.recv_store[tensor_id] = tensor
                self.have_received_tensor_id(tensor_id)
            self.recv_store_cv.notify()

    # ---- the wire, GET: ask the producer for one key
    def recv_tensor(self, tensor_id: str, remote_address: str | None = None, **kwargs):
        NETWORK.driven_by_this_thread()
        if self.send_type in ("PUT", "PUT_ASYNC"):
            with self.awaiting(tensor_id):
                return super().recv_tensor(tensor_id, remote_address, **kwargs)
        if remote_address is None:
            return None
        if remote_address not in NETWORK.engines:
            # The producer is gone: the real engine's GET waits for an answer
            # without bound (stock) or until its timeout (patched).
            if kwargs.get("timeout") is None:
                raise KVTransferHang(
                    f"hang: GET {tensor_id!r} from {remote_address}, which is gone"
                )
            return None
        tensor = NETWORK.peer(remote_address)._on_get(tensor_id)
        if tensor is None:
            logger.warning("[GET] %s has no tensor %s", remote_address, tensor_id)
        return tensor

    # ---- listen_for_requests, cmd GET
    def _on_get(self, tensor_id: str) -> torch.Tensor | None:
        with self.send_store_cv:
            tensor = self.send_store.pop(tensor_id, None)
            if tensor is None:
                return None
            self.send_store[tensor_id] = tensor  # LRU, as the real engine
        return tensor.clone()

    def held_tensor_ids(self) -> set[str]:
        """Received tensors still held: what get_finished failed to free."""
        with self.recv_store_cv:
            return set(self.recv_store)

    def close(self) -> None:
        NETWORK.engines.pop(self.zmq_address, None)
