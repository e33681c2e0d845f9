"""A peer engine that stalls in its NCCL handshake or its first transfer.

Run with the servers' vLLM on PYTHONPATH (and, on one GPU, an NCCL_HOSTID of
its own): ``python standin_peer.py ADDRESS never-joins|never-sends``. It
connects to the P2P listener at ADDRESS as a new peer would and sends NEW
with a real NCCL unique id; then

  never-joins  it never calls ncclCommInitRank (a peer that hangs or dies
               during the handshake);
  never-sends  it joins the handshake on GPU 0, sends a PUT, reads the
               answer and never sends the tensor (a producer that hangs or
               dies mid-transfer; PUT and PUT_ASYNC consumers only).

It prints ``stalled`` once it stalls and then sleeps until killed.
"""

from __future__ import annotations

import sys
import time

import msgpack
import zmq


def main(address: str, mode: str) -> None:
    from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

    nccl = NCCLLibrary()
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt_string(zmq.IDENTITY, f"127.0.0.1:{int(time.time() * 1e6) % 60000}")
    sock.connect(f"tcp://{address}")
    unique_id = nccl.ncclGetUniqueId()
    sock.send(msgpack.dumps({"cmd": "NEW", "unique_id": bytes(unique_id.internal)}))
    if mode == "never-sends":
        import torch

        torch.cuda.set_device(0)
        nccl.ncclCommInitRank(2, unique_id, 0)
        put = {"cmd": "PUT", "tensor_id": "standin#layer", "seq": 1}
        sock.send(msgpack.dumps(dict(put, shape=[1024], dtype="float16")))
        if not sock.poll(60_000):
            raise SystemExit("standin: the consumer did not answer the PUT")
        sock.recv()
    elif mode != "never-joins":
        raise SystemExit(f"standin: unknown mode {mode!r}")
    print("stalled", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(*sys.argv[1:])
