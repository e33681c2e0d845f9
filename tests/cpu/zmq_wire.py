"""vLLM's P2pNcclEngine with its real ZMQ control plane and an in-process NCCL.

``transport.InProcessP2pEngine`` replaces the whole wire. This one keeps all of
``P2pNcclEngine`` that is not CUDA or NCCL: ``__init__`` (the ROUTER socket
bound at ``<host>:<kv_port + rank>``, the listener and its per-connection
workers, the PUT_ASYNC sender thread), the DEALER sockets and the NEW
handshake, PUT/GET and their answers, and every wait and abort. Replaced, as
the CUDA/NCCL side of the wire (``FakeNcclLibrary``):

- a communicator is a rendezvous of the two ranks that share a unique id.
  ``ncclCommInitRankConfig`` (non-blocking) stays in progress
  (``ncclCommGetAsyncError``) until the other rank joins; a rank that never
  joins makes it fail after ``HANDSHAKE_TIMEOUT_S``, as NCCL over NVLink did
  when the peer died. Over NCCL's socket transport (one GPU, or sockets and IB
  between hosts) it waits for good: with the ``socket_transport`` fixture it
  stays in progress until aborted or the test ends (every process ends then);
- ``ncclSend``/``ncclRecv`` queue a transfer on a stream: a queue per
  communicator and direction; it completes (its CUDA event, ``FakeEvent``)
  once the peer's side took the tensor, and ``ncclCommAbort`` ends it. With
  ``socket_transport`` a communicator's first transfer stays in progress
  until the peer posts its side: NCCL sets up the connection there;
- for the series before the connection redesign, which called the blocking
  ``ncclCommInitRank`` and waited on its own ``send``/``recv``: the same
  rendezvous, blocking in the call (``ZmqP2pEngine.send``/``recv``);
- CUDA streams and the pinned memory pool (``HostTensorMemoryPool`` for
  tests that fill it); tensors live on the CPU.

``kill()`` ends an engine as a killed process ends: its listener stops and
its ROUTER socket closes, so nothing listens at its address any more.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_engine

from .transport import HOST

HANDSHAKE_TIMEOUT_S = 10.0
RECV_TIMEOUT_S = 10.0
# Set when the test ends: every engine's process ends, and an NCCL call that
# still waits in it returns with an error.
PROCESSES_END = threading.Event()


class FakeComm:
    def __init__(self) -> None:
        # rank -> set once that rank called ncclCommInitRank
        self.joined = {0: threading.Event(), 1: threading.Event()}
        # rank -> tensors sent to it, each with an event set once received
        self.inbox: dict[int, queue.Queue[tuple[torch.Tensor, threading.Event]]] = {
            0: queue.Queue(),
            1: queue.Queue(),
        }


class FakeCommEnd:
    """One rank's handle on a FakeComm; ncclCommAbort aborts only this end."""

    def __init__(self, comm: FakeComm) -> None:
        self.comm = comm
        self.inbox = comm.inbox
        self.aborted = threading.Event()
        self.connected = False  # a transfer on it went through
        self.first_transfer: _QueuedTransfer | None = None


class _PendingTransfer:
    """A send or recv queued on a fake stream: synchronize() returns once it
    is done or its communicator end was aborted (ncclCommAbort), and raises
    after RECV_TIMEOUT_S instead of hanging the test."""

    def __init__(self, comm: FakeCommEnd, step, what: str) -> None:
        self.comm, self.step, self.what = comm, step, what

    def synchronize(self) -> None:
        deadline = time.monotonic() + RECV_TIMEOUT_S
        while not self.step(0.01):
            if self.comm.aborted.is_set():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(self.what)


class FakeNcclLibrary:
    """The part of vLLM's NCCLLibrary that P2pNcclEngine calls for setup."""

    _comms: dict[bytes, FakeComm] = {}
    _lock = threading.Lock()
    # Whether a handshake with a rank that never joins waits for good.
    socket_transport = False

    def __init__(self, so_file: str | None = None) -> None:
        pass

    def ncclGetUniqueId(self) -> SimpleNamespace:
        return SimpleNamespace(internal=os.urandom(128))

    def unique_id_from_bytes(self, data: bytes) -> SimpleNamespace:
        return SimpleNamespace(internal=data)

    def ncclCommInitRank(self, world_size: int, unique_id, rank: int):
        assert world_size == 2
        comm = _join(unique_id, rank)
        # Blocks until the other rank joins, as NCCL does.
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while not comm.joined[rank ^ 1].wait(0.01):
            gave_up = not self.socket_transport and time.monotonic() > deadline
            if gave_up or PROCESSES_END.is_set():
                raise RuntimeError(
                    "NCCL error: remote process exited or there was a network error"
                )
        return FakeCommEnd(comm)

    class _Abort:
        """ncclCommAbort as the engine calls it, from the library (ctypes)."""

        restype = argtypes = None

        def __call__(self, comm) -> int:
            if not isinstance(comm, FakeCommEnd):  # a handle (ncclComm_t)
                comm = _comm_ends.pop(_value(comm))
            comm.aborted.set()
            return 0

    lib = {"ncclCommAbort": _Abort()}

    def ncclGetErrorString(self, result: int) -> str:
        return f"NCCL error {result}"

    def NCCL_CHECK(self, result: int) -> None:
        assert result == 0


NCCL_IN_PROGRESS = 7
NCCL_REMOTE_ERROR = 6
_handles = itertools.count(1)
# ncclComm_t, cudaStream_t and buffer values -> what they stand for
_comm_ends: dict[int, FakeCommEnd] = {}
_streams: dict[int, FakeStream] = {}


class FakeStream:
    """A CUDA stream: the NCCL sends and recvs queued on it, in order."""

    def __init__(self, *args, **kwargs) -> None:
        self.cuda_stream = next(_handles)
        _streams[self.cuda_stream] = self
        self.queued: list[_QueuedTransfer] = []

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeEvent:
    """torch.cuda.Event: done once the transfers queued before it are."""

    def record(self, stream: FakeStream) -> None:
        self.transfers = list(stream.queued)

    def query(self) -> bool:
        return all(transfer.progress() for transfer in self.transfers)


class _QueuedTransfer:
    """An ncclSend or ncclRecv on a non-blocking communicator: it moves once
    the peer posts its side; its communicator's abort ends it."""

    def __init__(self, comm: FakeCommEnd, op: str, tensor: torch.Tensor, peer: int):
        self.comm, self.op, self.tensor, self.peer = comm, op, tensor, peer
        self.received = threading.Event()
        self.done = False
        if op == "send":
            comm.inbox[peer].put((tensor.clone(), self.received))

    def progress(self) -> bool:
        if self.done or self.comm.aborted.is_set() or PROCESSES_END.is_set():
            return True
        if self.op == "send":
            self.done = self.received.is_set()
        else:
            try:
                sent, received = self.comm.inbox[self.peer ^ 1].get_nowait()
            except queue.Empty:
                return False
            self.tensor.copy_(sent)
            received.set()
            self.done = True
        if self.done:
            self.comm.connected = True
        return self.done


_TORCH_DTYPES = {6: torch.float16, 7: torch.float32, 9: torch.bfloat16}


class _RawFunction:
    """A function of the NCCL library as ctypes returns it (raw results)."""

    restype = argtypes = None

    def __init__(self, call) -> None:
        self._call = call

    def __call__(self, *args) -> int:
        return self._call(*args)


def _value(arg):
    """The value of a ctypes argument (byref, c_void_p) or a plain one."""
    arg = getattr(arg, "_obj", arg)
    return getattr(arg, "value", arg)


def _join(unique_id, rank: int) -> FakeComm:
    """This rank's part of the rendezvous of the two ranks of unique_id."""
    with FakeNcclLibrary._lock:
        comm = FakeNcclLibrary._comms.setdefault(bytes(unique_id.internal), FakeComm())
    comm.joined[rank].set()
    return comm


def _init_rank_config(comm_ref, world_size, unique_id, rank, config_ref) -> int:
    assert world_size == 2 and _value(config_ref).blocking == 0
    end = FakeCommEnd(_join(unique_id, rank))
    end.rank, end.since = rank, time.monotonic()
    handle = next(_handles)
    _comm_ends[handle] = end
    comm_ref._obj.value = handle
    return NCCL_IN_PROGRESS


def _get_async_error(comm, state_ref) -> int:
    """ncclCommGetAsyncError: in progress until the peer joins the handshake
    (and, over sockets, posts its side of the first transfer)."""
    end = _comm_ends[_value(comm)]
    if PROCESSES_END.is_set():
        state = NCCL_REMOTE_ERROR
    elif not end.comm.joined[end.rank ^ 1].is_set():
        gave_up = (
            not FakeNcclLibrary.socket_transport
            and time.monotonic() - end.since > HANDSHAKE_TIMEOUT_S
        )
        state = NCCL_REMOTE_ERROR if gave_up else NCCL_IN_PROGRESS
    elif end.first_transfer is not None and not end.first_transfer.progress():
        state = NCCL_IN_PROGRESS
    else:
        end.first_transfer = None
        state = 0
    state_ref._obj.value = state
    return 0


def _transfer(op: str):
    def call(buffer, count, datatype, peer, comm, stream) -> int:
        end = _comm_ends[_value(comm)]
        dtype = _TORCH_DTYPES[datatype]
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        memory = (ctypes.c_char * nbytes).from_address(_value(buffer))
        tensor = torch.frombuffer(memory, dtype=dtype)
        transfer = _QueuedTransfer(end, op, tensor, peer)
        _streams[_value(stream)].queued.append(transfer)
        if FakeNcclLibrary.socket_transport and not end.connected:
            # NCCL connects the peers inside the first transfer: the call
            # stays in progress until the peer posts its side.
            end.first_transfer = transfer
            return NCCL_IN_PROGRESS
        return 0

    return call


FakeNcclLibrary.lib.update(
    ncclCommInitRankConfig=_RawFunction(_init_rank_config),
    ncclCommGetAsyncError=_RawFunction(_get_async_error),
    ncclSend=_RawFunction(_transfer("send")),
    ncclRecv=_RawFunction(_transfer("recv")),
)


class FakeTensorMemoryPool:
    def __init__(self, max_block_size: int, min_block_size: int = 512) -> None:
        pass

    def store_tensor(self, tensor: torch.Tensor) -> int:
        raise AssertionError("the tests keep received KV under kv_buffer_size")


def _round_to_power_of_two(size: int) -> int:
    return 1 << (size - 1).bit_length()


class HostTensorMemoryPool:
    """vLLM's TensorMemoryPool on the CPU, with its capacity and its errors,
    for tests that fill it (patch it in as p2p_nccl_engine.TensorMemoryPool).

    Blocks are a power of two bytes, at least min_block_size, out of
    max_block_size; a store that does not fit raises ValueError ("Insufficient
    memory", or "Requested size exceeds maximum block size"), as the real
    pool's allocate does, and so does freeing an address it does not hold (a
    double free).
    """

    def __init__(self, max_block_size: int, min_block_size: int = 512) -> None:
        self.max_block_size = _round_to_power_of_two(max_block_size)
        self.min_block_size = _round_to_power_of_two(min_block_size)
        self.blocks: dict[int, tuple[int, torch.Tensor]] = {}  # addr: size, data
        self._next_addr = 1

    def allocated(self) -> int:
        """Bytes in blocks not freed yet."""
        return sum(size for size, _ in self.blocks.values())

    def store_tensor(self, tensor: torch.Tensor) -> int:
        size = _round_to_power_of_two(
            max(tensor.element_size() * tensor.numel(), self.min_block_size)
        )
        if size > self.max_block_size:
            raise ValueError("Requested size exceeds maximum block size")
        if self.allocated() + size > self.max_block_size:
            raise ValueError("Insufficient memory")
        addr, self._next_addr = self._next_addr, self._next_addr + size
        self.blocks[addr] = (size, tensor.clone())
        return addr

    def load_tensor(self, addr, dtype, shape, device) -> torch.Tensor:
        if addr not in self.blocks:
            raise ValueError("Invalid address to load")
        return self.blocks[addr][1].clone().to(device)

    def free(self, addr: int) -> None:
        if addr not in self.blocks:
            raise ValueError("Invalid address to free")
        del self.blocks[addr]


class _Killed(Exception):
    pass


class _KillablePoller:
    """The listener's zmq.Poller, which ends the listener once killed.

    As zmq.Poller.poll, it returns no events once the timeout (ms) passed.
    """

    def __init__(self, poller: zmq.Poller, killed: threading.Event) -> None:
        self._poller, self._killed = poller, killed
        self.paused = threading.Event()  # set: the listener reads nothing

    def poll(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while not self._killed.is_set():
            if self.paused.is_set():
                self._killed.wait(0.01)
                continue
            if deadline is None:
                events = self._poller.poll(50)
            else:
                remaining_ms = (deadline - time.monotonic()) * 1000
                events = self._poller.poll(max(0, min(50, int(remaining_ms))))
                if not events and remaining_ms <= 0:
                    return events
            if events:
                return events
        raise _Killed


class ZmqP2pEngine(p2p_nccl_engine.P2pNcclEngine):
    """P2pNcclEngine on real ZMQ sockets at 127.0.0.1; NCCL and CUDA in-process."""

    live: list[ZmqP2pEngine] = []

    def __init__(self, local_rank, config, hostname="", port_offset=0, **kwargs):
        self._killed = threading.Event()
        # send_sync results: (tensor_id, sent) in the order the sends returned
        self.send_results: list[tuple[str, bool]] = []
        # NCCL sends and recvs entered so far
        self.nccl_calls = {"send": 0, "recv": 0}
        super().__init__(local_rank, config, HOST, port_offset, **kwargs)
        self.device = torch.device("cpu")
        ZmqP2pEngine.live.append(self)

    def listen_for_requests(self):
        self.poller = _KillablePoller(self.poller, self._killed)
        try:
            super().listen_for_requests()
        except _Killed:
            self.router_socket.close(linger=0)

    def send_sync(self, item):
        sent = super().send_sync(item)
        self.send_results.append((item.tensor_id, sent))
        return sent

    def transfer(self, conn, op: str, tensor: torch.Tensor, peer: str) -> None:
        self.nccl_calls[op] += 1
        super().transfer(conn, op, tensor, peer)

    # ---- the NCCL wire (the series before the connection redesign)
    def send(self, comm: FakeCommEnd, tensor: torch.Tensor, dst: int, stream=None):
        self.nccl_calls["send"] += 1
        received = threading.Event()
        comm.inbox[dst].put((tensor.clone(), received))
        self._transfer(
            comm,
            _PendingTransfer(
                comm, received.wait, "ncclSend: the peer never posted the recv"
            ),
        )

    def recv(self, comm: FakeCommEnd, tensor: torch.Tensor, src: int, stream=None):
        self.nccl_calls["recv"] += 1

        def step(timeout: float) -> bool:
            try:
                sent, received = comm.inbox[src ^ 1].get(timeout=timeout)
            except queue.Empty:
                return False
            tensor.copy_(sent)
            received.set()
            return True

        self._transfer(
            comm, _PendingTransfer(comm, step, "ncclRecv: the peer never sent")
        )

    def _transfer(self, comm: FakeCommEnd, pending: _PendingTransfer) -> None:
        """NCCL sets up a communicator's P2P connection inside its first
        ncclSend/ncclRecv, which blocks until the peer posts its side; over
        sockets nothing notices a peer that never does (socket_transport)."""
        if comm.connected or not FakeNcclLibrary.socket_transport:
            self._wait(comm, pending)
            comm.connected = True
            return
        while not pending.step(0.01):
            if comm.aborted.is_set():
                return
            if PROCESSES_END.is_set():
                raise RuntimeError("NCCL error: the process ended")
        comm.connected = True

    def _wait(self, comm: FakeCommEnd, pending: _PendingTransfer) -> None:
        """The wait of the series before the connection redesign."""
        if hasattr(self, "wait_for_transfer"):
            self.wait_for_transfer(comm, pending)
        else:
            pending.synchronize()

    def pause_listener(self) -> None:
        """Leave what arrives unread until resume_listener (a busy listener)."""
        self.poller.paused.set()
        time.sleep(0.2)  # past the poll in progress

    def resume_listener(self) -> None:
        self.poller.paused.clear()

    def kill(self) -> None:
        """Stop listening, as a killed process does."""
        self._killed.set()
        self._listener_thread.join(5)
        assert not self._listener_thread.is_alive(), "listener did not stop"

    def held_tensor_ids(self) -> set[str]:
        with self.recv_store_cv:
            return set(self.recv_store)


@pytest.fixture
def zmq_wire(monkeypatch, world_group):
    """Route P2pNcclConnector's engine to ZmqP2pEngine; kill them all after."""
    from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_connector

    monkeypatch.setattr(p2p_nccl_connector, "P2pNcclEngine", ZmqP2pEngine)
    monkeypatch.setattr(p2p_nccl_engine, "NCCLLibrary", FakeNcclLibrary)
    monkeypatch.setattr(p2p_nccl_engine, "TensorMemoryPool", FakeTensorMemoryPool)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    PROCESSES_END.clear()
    yield ZmqP2pEngine
    PROCESSES_END.set()
    while ZmqP2pEngine.live:
        engine = ZmqP2pEngine.live.pop()
        engine._killed.set()
        engine._listener_thread.join(5)
        # A socket left with messages for a peer that is gone (killed, or its
        # listener died) would block its context's term() in whatever thread
        # collects the engine, in a later test.
        engine.context.destroy(linger=0)


@pytest.fixture
def socket_transport(monkeypatch):
    """NCCL over sockets: a handshake whose peer never joins waits for good."""
    monkeypatch.setattr(FakeNcclLibrary, "socket_transport", True)
