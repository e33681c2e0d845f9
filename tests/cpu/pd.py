"""Two vLLM engines of a P/D pair in one process, on the CPU.

Each ``PDEngine`` is a real vLLM ``Scheduler`` (with the real
``P2pNcclConnector`` in scheduler role, made by vLLM's connector factory) and a
real ``P2pNcclConnector`` in worker role, driven the way vLLM's model runner
drives it (bind metadata, ``start_load_kv``, forward with ``save_kv_layer``
per layer, ``wait_for_save``, ``get_finished``, clear metadata). Only the
transport under the connector is replaced (``transport.InProcessP2pEngine``)
and the model forward is a stand-in that writes known KV values per token.

Request ids are made by vLLM: ``InputProcessor.assign_request_id`` per engine,
and ``ParentRequest.get_child_info`` for n > 1, from one proxy-format id.
"""

from __future__ import annotations

import copy
import os
import uuid
from dataclasses import dataclass, field

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.forward_context import get_forward_context, set_forward_context
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.parallel_sampling import ParentRequest
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from . import compat
from .transport import HOST

BLOCK_SIZE = 16
NUM_BLOCKS = 512
MAX_NUM_BATCHED_TOKENS = 128
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
# How the model runner executes a step, as far as the connector can tell:
#   eager       every hook runs inside a forward context with attention
#               metadata (also PIECEWISE graphs: attention runs outside them)
#   v1_default  the V1 runner under FULL_AND_PIECEWISE: a batch whose requests
#               all run one token replays a FULL graph, which skips the
#               attention layers' save_kv_layer hooks
#   v2_default  the V2 runner under FULL_AND_PIECEWISE (vLLM 0.23.0's default):
#               as v1_default, and such a batch's start_load_kv runs outside
#               any forward context (attn_metadata None)
#   v2_full     the V2 runner under FULL: every batch replays a FULL graph
EXECUTION_MODES = ("eager", "v1_default", "v2_default", "v2_full")
KV_WIDTH = 4  # per token: token id, position, layer index, request tag
VOCAB = 1000
# The real-ZMQ tests bind these; another port lets two runs share a machine.
PREFILL_KV_PORT = int(os.environ.get("CPU_TIER_KV_PORT", "21001"))
DECODE_KV_PORT = PREFILL_KV_PORT + 1000


def set_randomization(monkeypatch, randomization: str) -> None:
    """Request id randomization "on" (vLLM's default) or "off" in both engines."""
    monkeypatch.setenv(
        "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0" if randomization == "on" else "1"
    )


def proxy_request_id(
    prefill_port: int = PREFILL_KV_PORT, decode_port: int = DECODE_KV_PORT
) -> str:
    """X-Request-Id as the xPyD proxy mints it."""
    return (
        f"___prefill_addr_{HOST}:{prefill_port}___decode_addr_"
        f"{HOST}:{decode_port}_{uuid.uuid4().hex}"
    )


def token_kv(token_id: int, position: int, layer: int) -> torch.Tensor:
    """What the stand-in model writes into the KV cache for one token."""
    return torch.tensor(
        [token_id, position, layer, (token_id * 31 + position) % 97],
        dtype=torch.float32,
    )


def expected_kv(token_ids: list[int], layer: int) -> torch.Tensor:
    return torch.stack([token_kv(t, p, layer) for p, t in enumerate(token_ids)])


def build_vllm_config(
    model_dir: str,
    kv_role: str,
    kv_port: int,
    send_type: str,
    kv_load_failure_policy: str = "fail",
    kv_buffer_size: float = 1e9,
    async_scheduling: bool | None = None,
    **extra_config,
) -> VllmConfig:
    """The engine's config; extra_config goes to kv_connector_extra_config.

    async_scheduling: by default off under ``recompute``, where the default
    series recomputes only without it (patch 0009; vLLM #45138), else vLLM's
    default (on).
    """
    if async_scheduling is None and kv_load_failure_policy == "recompute":
        async_scheduling = False
    model_config = ModelConfig(
        model=model_dir, dtype="float16", seed=42, skip_tokenizer_init=True
    )
    return VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(
            max_num_seqs=16,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
            max_model_len=1024,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
            async_scheduling=async_scheduling,
        ),
        cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(
            kv_connector="P2pNcclConnector",
            kv_role=kv_role,
            kv_port=kv_port,
            kv_buffer_size=kv_buffer_size,
            kv_load_failure_policy=kv_load_failure_policy,
            kv_connector_extra_config={"send_type": send_type, **extra_config},
        ),
        device_config=DeviceConfig("cpu"),
    )


@dataclass
class WorkerRequest:
    """The model runner's view of one request."""

    token_ids: list[int]
    block_ids: list[int]
    num_computed: int = 0
    num_prompt: int = 0


@dataclass
class Completion:
    external_id: str
    request_ids: list[str]
    outputs: dict[str, list[int]] = field(default_factory=dict)


class PDEngine:
    """One engine of the pair: scheduler + worker connector + KV cache."""

    def __init__(
        self,
        model_dir: str,
        kv_role: str,
        kv_port: int,
        send_type: str,
        num_blocks: int = NUM_BLOCKS,
        mode: str = "eager",
        **kv_options,
    ):
        assert mode in EXECUTION_MODES, mode
        self.kv_role = kv_role
        self.mode = mode
        self.vllm_config = build_vllm_config(
            model_dir, kv_role, kv_port, send_type, **kv_options
        )
        spec = FullAttentionSpec(
            block_size=BLOCK_SIZE,
            num_kv_heads=1,
            head_size=KV_WIDTH,
            dtype=torch.float32,
        )
        self.kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)],
        )
        self.vllm_config.cache_config.num_gpu_blocks = num_blocks
        init_none_hash(sha256)
        self.block_hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
        with set_current_vllm_config(self.vllm_config):
            # The scheduler class vllm serve picks for this config.
            async_scheduling = self.vllm_config.scheduler_config.async_scheduling
            scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
            self.scheduler = scheduler_cls(
                vllm_config=self.vllm_config,
                kv_cache_config=self.kv_cache_config,
                log_stats=False,
                structured_output_manager=StructuredOutputManager(self.vllm_config),
                block_size=BLOCK_SIZE,
            )
            # The attention layers, as the model registers them.
            self.kv_caches = {
                name: torch.zeros(num_blocks, BLOCK_SIZE, KV_WIDTH) for name in LAYERS
            }
            ctx = self.vllm_config.compilation_config.static_forward_context
            for name in LAYERS:
                ctx[name] = compat.attention_layer(self.kv_caches[name])
            self.connector = KVConnectorFactory.create_connector(
                self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config
            )
            # As the model runner does once the KV cache is allocated.
            self.connector.register_kv_caches(
                {name: compat.kv_layer(self.kv_caches[name]) for name in LAYERS}
            )
        self.transport = self.connector.p2p_nccl_engine
        self.requests: dict[str, WorkerRequest] = {}
        self.completions: dict[str, Completion] = {}
        # request id -> KV it held right after start_load_kv, per layer
        self.loaded_kv: dict[str, dict[str, torch.Tensor]] = {}
        # requests the connector loaded (consumer) or saved (producer) KV for
        self.connector_requests: set[str] = set()
        # requests preempted at least once
        self.preempted: set[str] = set()
        # request id -> why it finished (FinishReason), as the client sees it
        self.finish_reasons: dict[str, object] = {}
        # request id -> number of prompt chunks it was prefilled in
        self.prefill_chunks: dict[str, int] = {}
        # steps that replayed a FULL CUDA graph
        self.full_graph_steps = 0

    # ---- front end: what AsyncLLM does with an incoming request
    def add_request(
        self, external_id: str, prompt: list[int], max_tokens: int, n: int = 1
    ) -> Completion:
        # vLLM refuses n > 1 with greedy sampling; the stand-in model's sampling
        # is deterministic either way.
        params = SamplingParams(
            max_tokens=max_tokens, n=n, temperature=0.0 if n == 1 else 1.0, seed=0
        )
        request = compat.engine_core_request(
            request_id=external_id,
            prompt_token_ids=list(prompt),
            mm_features=None,
            sampling_params=params,
            pooling_params=None,
            arrival_time=0.0,
            lora_request=None,
            cache_salt=None,
            data_parallel_rank=None,
        )
        InputProcessor.assign_request_id(request)
        if n == 1:
            children = [request]
        else:
            parent = ParentRequest(request)
            children = []
            for idx in range(n):
                child_id, child_params = parent.get_child_info(idx)
                child = copy.copy(request)
                child.request_id = child_id
                child.sampling_params = child_params
                children.append(child)
        completion = Completion(external_id, [c.request_id for c in children])
        for child in children:
            self.scheduler.add_request(
                Request.from_engine_core_request(child, self.block_hasher)
            )
            self.completions[child.request_id] = completion
        return completion

    # ---- one engine step: schedule, execute (worker), update
    def step(self) -> SchedulerOutput:
        with set_current_vllm_config(self.vllm_config):
            out = self.scheduler.schedule()
            runner_output = self._execute(out)
            engine_outputs = self.scheduler.update_from_output(out, runner_output)
        for outputs in engine_outputs.values():
            for output in outputs.outputs:
                # What the client receives, as the engine core emits it.
                completion = self.completions[output.request_id]
                completion.outputs.setdefault(output.request_id, []).extend(
                    output.new_token_ids
                )
                if output.finish_reason is not None:
                    self.finish_reasons[output.request_id] = output.finish_reason
        return out

    def run_until_idle(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            self.step()
            if not self.scheduler.has_requests():
                # One more step delivers finished_req_ids to the worker.
                self.step()
                return
        raise AssertionError(f"{self.kv_role}: requests did not finish")

    def _full_graph(self, out: SchedulerOutput) -> bool:
        """Whether the model runner replays a FULL CUDA graph for this step."""
        num_tokens = out.num_scheduled_tokens.values()
        if self.mode == "eager" or not num_tokens:
            return False
        return self.mode == "v2_full" or all(n == 1 for n in num_tokens)

    def _execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_worker_state(out)
        attn_metadata = (
            {name: object() for name in LAYERS} if out.num_scheduled_tokens else None
        )
        full_graph = self._full_graph(out)
        self.full_graph_steps += full_graph
        with set_forward_context(attn_metadata, self.vllm_config):
            self.connector.bind_connector_metadata(out.kv_connector_metadata)
            self.connector_requests.update(
                r.request_id for r in out.kv_connector_metadata.requests
            )
            if full_graph and self.mode.startswith("v2"):
                # The V2 runner's KVConnector.pre_forward for a FULL graph.
                with set_forward_context(None, self.vllm_config):
                    self.connector.start_load_kv(get_forward_context())
            else:
                self.connector.start_load_kv(get_forward_context())
            self._record_loaded_kv(out)
            if attn_metadata is not None:
                self._forward(out, attn_metadata, save_hooks=not full_graph)
            self.connector.wait_for_save()
            sending, recving = self.connector.get_finished(out.finished_req_ids)
            # As vLLM's model runner does (KVConnectorModelRunnerMixin).
            invalid_block_ids = self.connector.get_block_ids_with_load_errors()
            self.connector.clear_connector_metadata()
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        return self._sample(
            out,
            KVConnectorOutput(
                finished_sending=sending,
                finished_recving=recving,
                invalid_block_ids=invalid_block_ids,
            ),
        )

    def _update_worker_state(self, out: SchedulerOutput) -> None:
        self.preempted.update(out.preempted_req_ids or ())
        for new in out.scheduled_new_reqs:
            self.requests[new.req_id] = WorkerRequest(
                token_ids=list(new.prompt_token_ids or []),
                block_ids=list(new.block_ids[0]),
                num_computed=new.num_computed_tokens,
                num_prompt=len(new.prompt_token_ids or []),
            )
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            req = self.requests[req_id]
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                req.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks is not None:
                req.block_ids.extend(new_blocks[0])
            req.num_computed = cached.num_computed_tokens[i]
            # Tokens the scheduler discarded (a failed KV load) are dropped, as
            # vLLM's model runner does.
            del req.token_ids[req.num_prompt + cached.num_output_tokens[i] :]

    def _slots(self, req: WorkerRequest, start: int, end: int):
        blocks = torch.tensor(
            [req.block_ids[p // BLOCK_SIZE] for p in range(start, end)],
            dtype=torch.long,
        )
        offsets = torch.tensor(
            [p % BLOCK_SIZE for p in range(start, end)], dtype=torch.long
        )
        return blocks, offsets

    def _record_loaded_kv(self, out: SchedulerOutput) -> None:
        """Snapshot what a consumer holds for its external tokens after loading."""
        if self.kv_role != "kv_consumer":
            return
        for new in out.scheduled_new_reqs:
            if new.num_computed_tokens == 0:
                continue
            req = self.requests[new.req_id]
            blocks, offsets = self._slots(req, 0, new.num_computed_tokens)
            self.loaded_kv[new.req_id] = {
                name: self.kv_caches[name][blocks, offsets].clone() for name in LAYERS
            }

    def _forward(self, out: SchedulerOutput, attn_metadata, save_hooks: bool) -> None:
        """Stand-in model: write each scheduled token's KV, layer by layer.

        save_hooks: whether each attention layer calls save_kv_layer (not in a
        FULL CUDA graph's replay).
        """
        for layer_idx, name in enumerate(LAYERS):
            cache = self.kv_caches[name]
            for req_id, num in out.num_scheduled_tokens.items():
                req = self.requests[req_id]
                start = req.num_computed
                blocks, offsets = self._slots(req, start, start + num)
                cache[blocks, offsets] = torch.stack(
                    [
                        token_kv(req.token_ids[p], p, layer_idx)
                        for p in range(start, start + num)
                    ]
                )
            if save_hooks:
                self.connector.save_kv_layer(
                    name, compat.kv_layer(cache), attn_metadata
                )

    def _sample(self, out: SchedulerOutput, kv_output: KVConnectorOutput):
        """Next token: a function of the KV cache the request attends to."""
        req_ids = list(out.num_scheduled_tokens)
        sampled: list[list[int]] = []
        for req_id in req_ids:
            req = self.requests[req_id]
            end = req.num_computed + out.num_scheduled_tokens[req_id]
            if end < len(req.token_ids):  # a prefill chunk: nothing sampled
                self.prefill_chunks[req_id] = self.prefill_chunks.get(req_id, 1) + 1
                sampled.append([])
                continue
            blocks, offsets = self._slots(req, 0, end)
            kv = torch.cat([self.kv_caches[n][blocks, offsets] for n in LAYERS])
            token = 3 + int(kv.sum().item() * 7 + end) % (VOCAB - 3)
            req.token_ids.append(token)
            sampled.append([token])
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=kv_output,
        )


def reference_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What a plain (not disaggregated) engine generates for the prompt."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        end = len(tokens)
        kv = torch.cat([expected_kv(tokens, i) for i in range(len(LAYERS))])
        token = 3 + int(kv.sum().item() * 7 + end) % (VOCAB - 3)
        tokens.append(token)
        out.append(token)
    return out
