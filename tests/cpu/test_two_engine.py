"""Prefill (kv_producer) and decode (kv_consumer) engines exchange KV.

The protocol of one request through the xPyD proxy: the proxy mints
``___prefill_addr_…___decode_addr_…_<uuid>``; the API server of each engine
turns it into ``cmpl-<id>-<prompt index>``; each engine's InputProcessor
randomizes that (unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1). The prefill
engine runs the prompt with max_tokens=1 and saves every layer's KV; then the
decode engine schedules the request, loads the KV, and generates.

What a user would see when the KV does not arrive under the key the decode
engine waits for: PUT/PUT_ASYNC decode waits forever (here: the test's
timeout); GET decode computes on KV it never received (wrong text).
"""

import pytest

from .pd import (
    BLOCK_SIZE,
    DECODE_KV_PORT,
    EXECUTION_MODES,
    LAYERS,
    MAX_NUM_BATCHED_TOKENS,
    PREFILL_KV_PORT,
    PDEngine,
    expected_kv,
    proxy_request_id,
    reference_tokens,
    set_randomization,
)

# A hang of the decode engine ends the test after this many seconds.
HANG_TIMEOUT_S = 20
DECODE_MAX_TOKENS = 4

WORKLOADS = {
    # name: list of (prompt length, n, API-server id prefix)
    "one": [(37, 1, "cmpl")],
    # The seven short prompts (115 tokens) and 13 tokens of the long one share
    # the first step; the long prompt's prefill goes on in two more chunks.
    "concurrent8": [
        (5, 1, "cmpl"),
        (17, 1, "chatcmpl"),
        (33, 1, "cmpl"),
        (9, 1, "chatcmpl"),
        (23, 1, "cmpl"),
        (16, 1, "cmpl"),
        (12, 1, "chatcmpl"),
        (MAX_NUM_BATCHED_TOKENS + 33, 1, "cmpl"),  # chunked prefill
    ],
    "n2": [(29, 2, "cmpl")],
}


def make_prompt(index: int, length: int) -> list[int]:
    return [(index * 131 + i * 7) % 990 + 5 for i in range(length)]


def make_prompts(workload: list[tuple[int, int, str]]) -> dict:
    """external id -> (prompt, n) for each (prompt length, n, API prefix)."""
    return {
        f"{api_prefix}-{proxy_request_id()}-0": (make_prompt(i, length), n)
        for i, (length, n, api_prefix) in enumerate(workload)
    }


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("randomization", ["on", "off"])
@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"])
def test_pd_transfer(
    network, tiny_model_dir, monkeypatch, send_type, randomization, workload
):
    set_randomization(monkeypatch, randomization)
    prefill = PDEngine(tiny_model_dir, "kv_producer", PREFILL_KV_PORT, send_type)
    decode = PDEngine(tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type)
    prompts = make_prompts(WORKLOADS[workload])
    transfer_and_check(prefill, decode, prompts, randomization)
    if workload == "concurrent8":
        assert max(prefill.prefill_chunks.values(), default=1) > 1, "no chunked prefill"


# Workloads whose steps take each CUDA graph path of the model runner: on
# decode, every first step of a request runs one token; on prefill, the last
# chunk of a prompt one token longer than the step's budget runs one token,
# and so does a prompt whose full blocks are all in the prefix cache.
GRAPH_WORKLOADS = {
    "concurrent8": WORKLOADS["concurrent8"],
    "last_chunk_of_one_token": [(MAX_NUM_BATCHED_TOKENS + 1, 1, "cmpl")],
    "prefix_cached": [(2 * BLOCK_SIZE + 1, 1, "cmpl")],
}


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize("workload", list(GRAPH_WORKLOADS))
@pytest.mark.parametrize("mode", EXECUTION_MODES)
@pytest.mark.parametrize("randomization", ["on", "off"])
@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"])
def test_pd_transfer_under_cuda_graphs(
    network, tiny_model_dir, monkeypatch, send_type, randomization, mode, workload
):
    """vLLM's default execution mode replays FULL CUDA graphs for batches of
    one-token requests: the attention layers' save_kv_layer hooks do not run,
    and the V2 runner calls start_load_kv without attention metadata. Stock
    0.22/0.23 decode then never loads the KV (wrong text, with randomization
    on or off)."""
    set_randomization(monkeypatch, randomization)
    prefill = PDEngine(
        tiny_model_dir, "kv_producer", PREFILL_KV_PORT, send_type, mode=mode
    )
    decode = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type, mode=mode
    )
    prompts = make_prompts(GRAPH_WORKLOADS[workload])
    if workload == "prefix_cached":
        # The same prompt came before for another decode engine (1P2D).
        other = PDEngine(
            tiny_model_dir, "kv_consumer", DECODE_KV_PORT + 1, send_type, mode=mode
        )
        earlier = {
            f"cmpl-{proxy_request_id(decode_port=DECODE_KV_PORT + 1)}-0": p
            for p in prompts.values()
        }
        transfer_and_check(prefill, other, earlier, randomization)
    transfer_and_check(prefill, decode, prompts, randomization)
    if mode != "eager":
        assert prefill.full_graph_steps or workload == "concurrent8"
        assert decode.full_graph_steps, "decode replayed no FULL graph"


def transfer_and_check(
    prefill: PDEngine, decode: PDEngine, prompts: dict, randomization: str
) -> None:
    """Prompts through the proxy's two steps; decode's KV and text are right."""
    # Proxy step 1: prefill with max_tokens=1; the producer saves the KV.
    for external_id, (prompt, n) in prompts.items():
        prefill.add_request(external_id, prompt, max_tokens=1, n=n)
    prefill.run_until_idle()

    # Proxy step 2: decode; the consumer loads the KV, then generates.
    completions = [
        decode.add_request(external_id, prompt, DECODE_MAX_TOKENS, n=n)
        for external_id, (prompt, n) in prompts.items()
    ]
    decode.run_until_idle()

    for completion in completions:
        prompt, n = prompts[completion.external_id]
        assert len(completion.request_ids) == n
        if randomization == "on":
            assert all(r != completion.external_id for r in completion.request_ids)
        for req_id in completion.request_ids:
            loaded = decode.loaded_kv.get(req_id)
            assert loaded is not None, f"decode never loaded KV for {req_id}"
            for layer_idx, layer in enumerate(LAYERS):
                assert loaded[layer].equal(expected_kv(prompt[:-1], layer_idx)), (
                    f"decode computes {req_id} on KV that prefill did not send "
                    f"(layer {layer}): wrong text"
                )
            assert completion.outputs[req_id] == reference_tokens(
                prompt, DECODE_MAX_TOKENS
            ), f"{req_id}: decode text differs from a plain engine's"

    # Every received tensor is released once its request finished.
    assert decode.transport.held_tensor_ids() == set(), "received KV leaked"
    assert decode.transport.recv_request_id_to_tensor_ids == {}
    for engine in (prefill, decode):
        assert not engine.scheduler.has_requests()
        assert engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == (
            engine.scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1
        )


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize("randomization", ["on", "off"])
def test_prefill_chunk_within_allocated_blocks(
    network, tiny_model_dir, monkeypatch, randomization
):
    """A later prefill chunk that fits in already allocated blocks.

    The scheduler then sends ``new_block_ids=None`` for the request. Stock
    0.23.0's producer asserts on that and the engine core dies.
    """
    set_randomization(monkeypatch, randomization)
    prefill = PDEngine(tiny_model_dir, "kv_producer", PREFILL_KV_PORT, "PUT_ASYNC")
    decode = PDEngine(tiny_model_dir, "kv_consumer", DECODE_KV_PORT, "PUT_ASYNC")
    # Step 1: all of the first prompt and 28 tokens (2 blocks) of the second;
    # step 2: the second prompt's last 3 tokens, inside its second block.
    first_len = MAX_NUM_BATCHED_TOKENS - 28
    prompts = {
        f"cmpl-{proxy_request_id()}-{i}": make_prompt(i, length)
        for i, length in enumerate([first_len, 31])
    }
    for external_id, prompt in prompts.items():
        prefill.add_request(external_id, prompt, max_tokens=1)
    prefill.run_until_idle()
    assert max(prefill.prefill_chunks.values()) == 2

    completions = [
        decode.add_request(e, p, DECODE_MAX_TOKENS) for e, p in prompts.items()
    ]
    decode.run_until_idle()
    for completion in completions:
        (req_id,) = completion.request_ids
        prompt = prompts[completion.external_id]
        assert completion.outputs[req_id] == reference_tokens(prompt, DECODE_MAX_TOKENS)
    assert decode.transport.held_tensor_ids() == set(), "received KV leaked"


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize("randomization", ["on", "off"])
@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"])
@pytest.mark.parametrize(
    ("num_blocks", "num_requests"),
    # (10, 6): a request resumes in a step that also runs others; the
    # connector used to stop at the first running one and load nothing.
    [(13, 4), (10, 6)],
    ids=["resumed-alone", "resumed-with-others"],
)
def test_decode_preempted_and_resumed(
    network,
    tiny_model_dir,
    monkeypatch,
    send_type,
    randomization,
    num_blocks,
    num_requests,
):
    """Decode runs out of KV blocks, preempts requests, and loads them again."""
    set_randomization(monkeypatch, randomization)
    max_tokens = 40
    prefill = PDEngine(tiny_model_dir, "kv_producer", PREFILL_KV_PORT, send_type)
    decode = PDEngine(
        tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type, num_blocks=num_blocks
    )
    prompts = {
        f"cmpl-{proxy_request_id()}-0": make_prompt(i, 30 + i)
        for i in range(num_requests)
    }
    for external_id, prompt in prompts.items():
        prefill.add_request(external_id, prompt, max_tokens=1)
    prefill.run_until_idle()

    completions = [decode.add_request(e, p, max_tokens) for e, p in prompts.items()]
    decode.run_until_idle()
    assert decode.preempted, "the decode engine preempted nothing"
    for completion in completions:
        (req_id,) = completion.request_ids
        prompt = prompts[completion.external_id]
        assert completion.outputs[req_id] == reference_tokens(prompt, max_tokens), (
            f"{req_id}: decode text differs from a plain engine's"
        )
    assert decode.transport.held_tensor_ids() == set(), "received KV leaked"
