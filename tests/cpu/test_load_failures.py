"""KV that does not arrive: decode must neither wait forever nor compute on it.

Every way a consumer can miss a request's KV, with both of vLLM's
``kv_load_failure_policy`` values:

- GET: the producer's send store evicted it (``kv_buffer_size`` reached), or
  skipped it (one tensor larger than the store), or the producer is gone;
- PUT/PUT_ASYNC: the producer died before it sent (decode waits, upstream
  #28108), or the receiver ran out of memory and stored ``None``;
- KV that comes after its request gave up waiting.

``recompute``: decode computes the missing KV itself and answers like a plain
engine. ``fail``: the request ends with ``FinishReason.ERROR`` and no token
computed on missing KV. Either way the engine stays healthy (the next request
transfers and is correct) and no received KV stays behind.
"""

import re
import time

import pytest
from vllm.v1.engine import FinishReason

from .pd import (
    BLOCK_SIZE,
    DECODE_KV_PORT,
    LAYERS,
    PREFILL_KV_PORT,
    PDEngine,
    proxy_request_id,
    reference_tokens,
    set_randomization,
)
from .test_reliability import assert_loaded
from .test_two_engine import DECODE_MAX_TOKENS, HANG_TIMEOUT_S, make_prompt

pytestmark = [
    pytest.mark.timeout(HANG_TIMEOUT_S),
    pytest.mark.parametrize("policy", ["recompute", "fail"]),
    pytest.mark.parametrize("randomization", ["on", "off"]),
]

# Short, so that the cases that wait for KV that never comes stay fast.
RECV_TIMEOUT_S = 0.1
# Per layer, a prompt of PROMPT_LEN tokens is 3 blocks of 16 x 4 float32.
PROMPT_LEN = 37
TENSOR_BYTES = 3 * 16 * 4 * 4


def make_engine(model_dir, kv_role, send_type, policy, **kv_options):
    port = PREFILL_KV_PORT if kv_role == "kv_producer" else DECODE_KV_PORT
    return PDEngine(
        model_dir,
        kv_role,
        port,
        send_type,
        kv_load_failure_policy=policy,
        recv_timeout_s=RECV_TIMEOUT_S,
        **kv_options,
    )


def prefill_all(prefill, prompts):
    for external_id, prompt in prompts.items():
        prefill.add_request(external_id, prompt, max_tokens=1)
    prefill.run_until_idle()


def decode_all(decode, prompts):
    completions = {
        external_id: decode.add_request(external_id, prompt, DECODE_MAX_TOKENS)
        for external_id, prompt in prompts.items()
    }
    decode.run_until_idle()
    return completions


def new_prompts(count, first_index=0):
    return {
        f"cmpl-{proxy_request_id()}-0": make_prompt(first_index + i, PROMPT_LEN)
        for i in range(count)
    }


def assert_outcome(decode, completion, prompt, policy, kv_missing):
    """What the client gets for one request."""
    (req_id,) = completion.request_ids
    outputs = completion.outputs.get(req_id, [])
    if kv_missing and policy == "fail":
        assert decode.finish_reasons.get(req_id) == FinishReason.ERROR, (
            f"{req_id}: KV did not arrive, but the request did not fail"
        )
        assert outputs == [], f"{req_id}: tokens computed on KV it never received"
        return
    assert outputs == reference_tokens(prompt, DECODE_MAX_TOKENS), (
        f"{req_id}: decode text differs from a plain engine's (wrong text)"
    )
    assert decode.finish_reasons.get(req_id) == FinishReason.LENGTH


def assert_healthy(prefill, decode):
    """No received KV left behind, and the pair serves the next request."""
    assert decode.transport.held_tensor_ids() == set(), "received KV leaked"
    prompts = new_prompts(1, first_index=50)
    prefill_all(prefill, prompts)
    ((external_id, prompt),) = prompts.items()
    completion = decode_all(decode, prompts)[external_id]
    assert_loaded(decode, completion.request_ids[0], prompt)
    assert_outcome(decode, completion, prompt, "recompute", kv_missing=False)
    assert decode.transport.held_tensor_ids() == set(), "received KV leaked"


def assert_decoded(decode, prompts, completions, policy, missing):
    for external_id, prompt in prompts.items():
        assert_outcome(
            decode, completions[external_id], prompt, policy, external_id in missing
        )


@pytest.mark.parametrize("send_type", ["GET"])
@pytest.mark.parametrize("cause", ["evicted", "larger-than-store"])
def test_get_kv_not_in_send_store(
    network, tiny_model_dir, monkeypatch, randomization, send_type, policy, cause
):
    """The producer's GET store no longer (or never) has the KV."""
    set_randomization(monkeypatch, randomization)
    # Room for four of the six tensors; "larger-than-store": not for one.
    buffer_size = 4 * TENSOR_BYTES if cause == "evicted" else TENSOR_BYTES - 1
    prefill = make_engine(
        tiny_model_dir, "kv_producer", send_type, policy, kv_buffer_size=buffer_size
    )
    decode = make_engine(tiny_model_dir, "kv_consumer", send_type, policy)
    prompts = new_prompts(3)
    prefill_all(prefill, prompts)
    # Sent layer by layer: layer 0 of the first two requests was evicted.
    # Too large: nothing was stored.
    stored = len(prefill.transport.send_store)
    assert stored == (4 if cause == "evicted" else 0)
    missing = list(prompts)[:2] if cause == "evicted" else list(prompts)
    prefill.transport.buffer_size_threshold = 1e9

    completions = decode_all(decode, prompts)
    assert_decoded(decode, prompts, completions, policy, missing)
    assert_healthy(prefill, decode)


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"])
def test_prefill_engine_dies(
    network, tiny_model_dir, monkeypatch, randomization, send_type, policy
):
    """The prefill engine dies: PUT before it sent, GET before decode asks."""
    set_randomization(monkeypatch, randomization)
    prefill = make_engine(tiny_model_dir, "kv_producer", send_type, policy)
    decode = make_engine(tiny_model_dir, "kv_consumer", send_type, policy)
    prompts = new_prompts(2)
    if send_type == "GET":
        prefill_all(prefill, prompts)
    prefill.transport.close()

    completions = decode_all(decode, prompts)
    assert_decoded(decode, prompts, completions, policy, missing=set(prompts))

    # A new prefill engine on the same address: the pair serves again.
    prefill = make_engine(tiny_model_dir, "kv_producer", send_type, policy)
    assert_healthy(prefill, decode)


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
@pytest.mark.parametrize("failed_layers", [1, 2], ids=["one-layer", "all-layers"])
def test_receiver_out_of_memory(
    network,
    tiny_model_dir,
    monkeypatch,
    randomization,
    send_type,
    policy,
    failed_layers,
):
    """The receiver could not allocate a tensor and stored None for its key."""
    set_randomization(monkeypatch, randomization)
    prefill = make_engine(tiny_model_dir, "kv_producer", send_type, policy)
    decode = make_engine(tiny_model_dir, "kv_consumer", send_type, policy)
    prompts = new_prompts(2)
    first = next(iter(prompts))
    failing = LAYERS[:failed_layers]
    decode.transport.fail_put = lambda tensor_id: (
        tensor_id.startswith(first) and tensor_id.endswith(failing)
    )
    prefill_all(prefill, prompts)

    completions = decode_all(decode, prompts)
    assert_decoded(decode, prompts, completions, policy, missing={first})
    assert_healthy(prefill, decode)


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_kv_that_comes_after_its_request_gave_up(
    network, tiny_model_dir, monkeypatch, randomization, send_type, policy
):
    """Decode gave up waiting; the KV that prefill sends later is dropped."""
    set_randomization(monkeypatch, randomization)
    prefill = make_engine(tiny_model_dir, "kv_producer", send_type, policy)
    decode = make_engine(tiny_model_dir, "kv_consumer", send_type, policy)
    prompts = new_prompts(2)

    completions = decode_all(decode, prompts)
    assert_decoded(decode, prompts, completions, policy, missing=set(prompts))
    prefill_all(prefill, prompts)
    assert_healthy(prefill, decode)


def wait_for(condition, failure: str, timeout: float = 5.0) -> None:
    """Wait for what another thread (PUT_ASYNC's sender) makes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_received_kv_counts_against_buffer_until_loaded(
    network, tiny_model_dir, monkeypatch, randomization, send_type, policy
):
    """kv_buffer_size counts received KV until it is loaded, and no longer.

    Counted until its request finished, the KV of the requests a decode engine
    runs fills kv_buffer_size, and every later transfer spills to host memory
    (seen on two H200s as a cost of the series). KV that came too late is not
    counted after it is dropped.
    """
    set_randomization(monkeypatch, randomization)
    prefill = make_engine(tiny_model_dir, "kv_producer", send_type, policy)
    decode = make_engine(tiny_model_dir, "kv_consumer", send_type, policy)
    prompts = new_prompts(2)
    loaded, late = prompts
    prefill_all(prefill, {loaded: prompts[loaded]})
    # Received, not loaded yet: counted (PUT_ASYNC's sender may still be busy).
    wait_for(
        lambda: decode.transport.buffer_size >= len(LAYERS) * TENSOR_BYTES,
        "the KV did not arrive",
    )
    assert decode.transport.buffer_size == len(LAYERS) * TENSOR_BYTES

    completion = decode.add_request(loaded, prompts[loaded], DECODE_MAX_TOKENS)
    decode.step()
    (req_id,) = completion.request_ids
    assert_loaded(decode, req_id, prompts[loaded])
    assert req_id not in decode.finish_reasons
    assert decode.transport.buffer_size == 0, (
        "KV that a running request already loaded still counts against "
        "kv_buffer_size: later transfers spill to host memory"
    )

    completions = decode_all(decode, {late: prompts[late]})
    assert_decoded(decode, {late: prompts[late]}, completions, policy, {late})
    assert decode.transport.recv_dropped, "decode expects the late KV"
    prefill_all(prefill, {late: prompts[late]})
    # recv_dropped empties as the late KV arrives and is dropped.
    wait_for(lambda: not decode.transport.recv_dropped, "the late KV did not arrive")
    decode.run_until_idle()
    assert decode.transport.buffer_size == 0, "dropped KV still counted"
    assert_healthy(prefill, decode)
    assert decode.transport.buffer_size == 0


@pytest.mark.parametrize("send_type", ["GET"])
def test_async_scheduling_fails_what_core_cannot_recompute(
    network, tiny_model_dir, monkeypatch, randomization, send_type, policy
):
    """With async scheduling, vLLM core does not finish a recomputed request
    (#45138): the connector uses ``fail`` there, so under either policy a
    request whose KV did not arrive ends with an error and the others answer.
    """
    set_randomization(monkeypatch, randomization)
    prefill = make_engine(
        tiny_model_dir,
        "kv_producer",
        send_type,
        policy,
        kv_buffer_size=4 * TENSOR_BYTES,
    )
    decode = make_engine(
        tiny_model_dir, "kv_consumer", send_type, policy, async_scheduling=True
    )
    assert decode.vllm_config.scheduler_config.async_scheduling
    prompts = new_prompts(3)
    prefill_all(prefill, prompts)
    prefill.transport.buffer_size_threshold = 1e9

    completions = decode_all(decode, prompts)
    assert_decoded(decode, prompts, completions, "fail", missing=list(prompts)[:2])
    assert_healthy(prefill, decode)


@pytest.mark.parametrize("send_type", ["GET"])
def test_failed_load_leaves_a_shared_prefix_alone(
    network, tiny_model_dir, monkeypatch, randomization, send_type, policy
):
    """Only the blocks a request was to load are reported when its KV does not
    arrive: a running request that shares its prefix-cached blocks keeps them
    and answers (under ``fail`` it was failed with it)."""
    set_randomization(monkeypatch, randomization)
    prefill = make_engine(tiny_model_dir, "kv_producer", send_type, policy)
    decode = make_engine(tiny_model_dir, "kv_consumer", send_type, policy)
    prefix = make_prompt(7, 2 * BLOCK_SIZE)
    prompts = new_prompts(2)
    (first, prompt_a), (second, prompt_b) = [
        (external_id, prefix + prompt[:5]) for external_id, prompt in prompts.items()
    ]
    prefill_all(prefill, {first: prompt_a, second: prompt_b})
    (uuid_b,) = re.findall("[0-9a-f]{32}", second)
    with prefill.transport.send_store_cv:
        for tensor_id in [t for t in prefill.transport.send_store if uuid_b in t]:
            del prefill.transport.send_store[tensor_id]

    completion_a = decode.add_request(first, prompt_a, DECODE_MAX_TOKENS)
    decode.step()  # loads the first request's KV; it decodes from now on
    (req_a,) = completion_a.request_ids
    blocks_a = decode.scheduler.kv_cache_manager.get_block_ids(req_a)[0]
    completion_b = decode.add_request(second, prompt_b, DECODE_MAX_TOKENS)
    out = decode.step()  # the second hits the prefix cache; its load fails
    (new_b,) = out.scheduled_new_reqs
    assert new_b.block_ids[0][:2] == blocks_a[:2], "no shared prefix"
    decode.run_until_idle()
    assert_outcome(decode, completion_a, prompt_a, policy, kv_missing=False)
    assert_outcome(decode, completion_b, prompt_b, policy, kv_missing=True)
    assert_healthy(prefill, decode)
