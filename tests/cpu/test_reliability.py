"""Requests the P2P protocol cannot serve must not kill an engine.

A request whose id carries no ``___prefill_addr_…___decode_addr_…`` (a health
probe, a user calling a server directly) is served as a plain request: the
producer sends nothing, the consumer computes the prompt. Requests that share
an X-Request-Id are in test_same_id.py.
"""

import pytest

from .pd import (
    DECODE_KV_PORT,
    LAYERS,
    PREFILL_KV_PORT,
    PDEngine,
    expected_kv,
    proxy_request_id,
    reference_tokens,
    set_randomization,
)
from .test_two_engine import DECODE_MAX_TOKENS, HANG_TIMEOUT_S, make_prompt

pytestmark = [
    pytest.mark.timeout(HANG_TIMEOUT_S),
    pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"]),
]


@pytest.fixture
def pair(network, tiny_model_dir, monkeypatch, send_type, randomization):
    set_randomization(monkeypatch, randomization)
    prefill = PDEngine(tiny_model_dir, "kv_producer", PREFILL_KV_PORT, send_type)
    decode = PDEngine(tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type)
    return prefill, decode


def assert_loaded(decode, req_id, prompt):
    loaded = decode.loaded_kv.get(req_id)
    assert loaded is not None, f"decode never loaded KV for {req_id}"
    for i, layer in enumerate(LAYERS):
        assert loaded[layer].equal(expected_kv(prompt[:-1], i)), (
            f"decode computes {req_id} on KV that prefill did not send: wrong text"
        )


def assert_reference_text(completion, prompt):
    for req_id in completion.request_ids:
        assert completion.outputs[req_id] == reference_tokens(
            prompt, DECODE_MAX_TOKENS
        ), f"{req_id}: decode text differs from a plain engine's"


@pytest.mark.parametrize("randomization", ["on", "off"])
def test_request_without_p2p_address_is_served_plainly(pair):
    prefill, decode = pair
    plain_prompt, proxied_prompt = make_prompt(1, 21), make_prompt(2, 26)
    proxied_id = f"cmpl-{proxy_request_id()}-0"
    # A direct call to each server, next to a request routed by the proxy.
    plain = {}
    for engine, max_tokens in ((prefill, 1), (decode, DECODE_MAX_TOKENS)):
        plain[engine] = engine.add_request("cmpl-probe-0", plain_prompt, max_tokens)
        proxied = engine.add_request(proxied_id, proxied_prompt, max_tokens)
        engine.run_until_idle()

    # Decode computed the plain prompt itself and loaded the proxied one.
    for engine in (prefill, decode):
        assert not set(plain[engine].request_ids) & engine.connector_requests
    assert_reference_text(plain[decode], plain_prompt)
    (proxied_req_id,) = proxied.request_ids
    assert_loaded(decode, proxied_req_id, proxied_prompt)
    assert_reference_text(proxied, proxied_prompt)
    assert decode.transport.held_tensor_ids() == set(), "received KV leaked"

    # Both engines keep serving proxied requests.
    again_id, again_prompt = f"cmpl-{proxy_request_id()}-0", make_prompt(3, 40)
    prefill.add_request(again_id, again_prompt, 1)
    prefill.run_until_idle()
    again = decode.add_request(again_id, again_prompt, DECODE_MAX_TOKENS)
    decode.run_until_idle()
    assert_loaded(decode, again.request_ids[0], again_prompt)
    assert_reference_text(again, again_prompt)
