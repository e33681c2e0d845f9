"""Fixtures of the CPU tier: a tiny local model config and a gloo world group."""

import json
import os
import tempfile

import pytest

TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "torch_dtype": "float16",
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A model folder with only config.json: enough for ModelConfig."""
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    return str(path)


@pytest.fixture(scope="session")
def world_group():
    """Single-process gloo world: the worker-role connector asks for its rank."""
    from vllm.distributed import parallel_state

    if parallel_state._WORLD is None:
        fd, path = tempfile.mkstemp(prefix="gloo-")
        os.close(fd)
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"file://{path}",
            local_rank=0,
            backend="gloo",
        )
    return parallel_state.get_world_group()


@pytest.fixture
def network(monkeypatch, world_group):
    """Route P2pNcclConnector's engine to the in-process transport."""
    from vllm.distributed.kv_transfer.kv_connector.v1.p2p import p2p_nccl_connector

    from .transport import NETWORK, InProcessP2pEngine

    monkeypatch.setattr(p2p_nccl_connector, "P2pNcclEngine", InProcessP2pEngine)
    NETWORK.reset()
    yield NETWORK
    NETWORK.reset()
