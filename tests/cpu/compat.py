"""What differs between the vLLM releases the CPU tier runs on (0.14.0-0.23.0).

``pd.py`` builds the vLLM objects whose signatures changed across releases
through these helpers. Each one detects the installed API (fields,
signatures), never the version number, and passes exactly what vLLM's own
code passes on that release. ``ci/release/run_tier.py`` runs the tier on every
release family with this one adapter; there are no copies of the tier.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch
from vllm.forward_context import ForwardContext
from vllm.v1.engine import EngineCoreRequest

_ENGINE_CORE_REQUEST_FIELDS = frozenset(EngineCoreRequest.__struct_fields__)


def engine_core_request(**kwargs: Any) -> EngineCoreRequest:
    """An ``EngineCoreRequest`` from the fields every release has.

    Before 0.17.0 it also had a required ``eos_token_id``, which the input
    processor fills from the tokenizer: None without one (skip_tokenizer_init).
    """
    if "eos_token_id" in _ENGINE_CORE_REQUEST_FIELDS:
        kwargs.setdefault("eos_token_id", None)
    return EngineCoreRequest(**kwargs)


def _connector_dispatches_on_layout() -> bool:
    """Before 0.23.0 the connector moves KV only in the MLA, FlashInfer
    (blocks, 2, ...) and FlashAttention (2, blocks, ...) layouts; from 0.23.0
    on any layout with blocks first (``kv_layer[block_ids, ...]``)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.p2p.p2p_nccl_connector import (
        P2pNcclConnector,
    )

    # save_kv_layer, or the helper it sends through (0010's _send_layer).
    names = ("save_kv_layer", "_send_layer")
    methods = [getattr(P2pNcclConnector, n, None) for n in names]
    consts = [c for m in methods if m is not None for c in m.__code__.co_consts]
    return any(getattr(c, "co_name", None) == "extract_kv_from_layer" for c in consts)


def kv_layer(cache: torch.Tensor) -> torch.Tensor:
    """One layer's KV cache (num_blocks, block_size, width) as the attention
    backend hands it to the connector.

    Where the connector dispatches on the layout, the same memory viewed as
    FlashInfer's (num_blocks, 2, ...): K and V halves of each block. The
    connector copies whole blocks either way, so the bytes moved are the same.
    """
    if _DISPATCHES_ON_LAYOUT:
        return cache.view(cache.shape[0], 2, -1)
    return cache


def attention_layer(cache: torch.Tensor) -> SimpleNamespace:
    """What an attention layer registers in static_forward_context: its KV
    cache, a list with one per virtual engine before 0.19.0 (the connector
    picks ``kv_cache[forward_context.virtual_engine]``)."""
    if "virtual_engine" in {f.name for f in dataclasses.fields(ForwardContext)}:
        return SimpleNamespace(kv_cache=[kv_layer(cache)])
    return SimpleNamespace(kv_cache=kv_layer(cache))


_DISPATCHES_ON_LAYOUT = _connector_dispatches_on_layout()
