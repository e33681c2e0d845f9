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
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_engine

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


class Network:
    """Address book of the in-process engines of one test."""

    def __init__(self) -> None:
        self.engines: dict[str, InProcessP2pEngine] = {}

    def peer(self, address: str) -> InProcessP2pEngine:
        try:
            return self.engines[address]
        except KeyError:
            raise ConnectionError(f"no P2P engine listens on {address}") from None


NETWORK = Network()


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
        self.send_queue_cv = threading.Condition()
        self.recv_store_cv = threading.Condition()
        self.pool = None
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
        self.recv_request_id_to_tensor_ids: dict[str, set[str]] = {}
        self.send_request_id_to_tensor_ids: dict[str, set[str]] = {}
        self.socks: dict[str, Any] = {}
        self.comms: dict[str, Any] = {}
        self.buffer_size = 0
        self.buffer_size_threshold = float(config.kv_buffer_size)
        self.nccl_num_channels = "1"
        self._listener_thread = None
        self._ping_thread = None
        NETWORK.engines[self.zmq_address] = self

    # ---- the wire, sender side (PUT, PUT_ASYNC)
    def send_sync(self, item: p2p_nccl_engine.SendQueueItem) -> bool:
        if item.remote_address is None:
            return False
        NETWORK.peer(item.remote_address)._on_put(item.tensor_id, item.tensor)
        if self.send_type == "PUT_ASYNC":
            self.have_sent_tensor_id(item.tensor_id)
        return True

    # ---- the wire, receiver side of PUT (listen_for_requests, cmd PUT)
    def _on_put(self, tensor_id: str, tensor: torch.Tensor) -> None:
        tensor = tensor.clone()
        self.buffer_size += tensor.element_size() * tensor.numel()
        with self.recv_store_cv:
            self.recv_store[tensor_id] = tensor
            self.have_received_tensor_id(tensor_id)
            self.recv_store_cv.notify()

    # ---- the wire, GET: ask the producer for one key
    def recv_tensor(self, tensor_id: str, remote_address: str | None = None):
        if self.send_type in ("PUT", "PUT_ASYNC"):
            return super().recv_tensor(tensor_id, remote_address)
        if remote_address is None:
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
            self.have_sent_tensor_id(tensor_id)
        return tensor.clone()

    def held_tensor_ids(self) -> set[str]:
        """Received tensors still held: what get_finished failed to free."""
        with self.recv_store_cv:
            return set(self.recv_store)

    def close(self) -> None:
        NETWORK.engines.pop(self.zmq_address, None)
