"""Two requests with one X-Request-Id, in every order the two engines can see them.

A client or router that retries with the same X-Request-Id sends two requests
A and B that share the transfer id (same prompt) or only the external id
(another prompt). Each request is prefilled (P) and decoded (D); the engines
see the events in any order: one after the other, or both requests in flight
together at one engine (``PAB``/``DAB``), and a decode may even come before
its own prefill (a router that retried only one step).

Every schedule is enumerated, not hand-picked. For each one, decode must:
- never hang, never load another prompt's KV: every answer equals a plain
  engine's (``recompute``), or, only where no KV for it can be there, ends with
  an error and no token (``fail``);
- load the KV whenever it can be there: more prefills than finished decodes
  of the same transfer id before the decode starts (nothing another request
  still needs is freed);
- hold no received KV at the end.
"""

from __future__ import annotations

import itertools

import pytest
from vllm.v1.engine import FinishReason

from .pd import (
    DECODE_KV_PORT,
    PREFILL_KV_PORT,
    PDEngine,
    proxy_request_id,
    reference_tokens,
    set_randomization,
)
from .test_load_failures import RECV_TIMEOUT_S
from .test_reliability import assert_loaded
from .test_two_engine import DECODE_MAX_TOKENS, HANG_TIMEOUT_S, make_prompt


def schedules() -> list[tuple[str, ...]]:
    """Every order of the four events, with and without overlap per engine.

    A and B differ only in their name, so of two schedules that swap them
    only the one where A comes first is run.
    """
    found = []
    for prefill_events, decode_events in itertools.product(
        (("PA", "PB"), ("PAB",)), (("DA", "DB"), ("DAB",))
    ):
        for order in itertools.permutations(prefill_events + decode_events):
            swapped = tuple(
                e if len(e) == 3 else e[0] + {"A": "B", "B": "A"}[e[1]] for e in order
            )
            if order <= swapped:
                found.append(order)
    return found


SCHEDULES = schedules()
# 24 + 6 + 6 + 2 orders, halved by the A/B symmetry (PAB-DAB: both kept).
assert len(SCHEDULES) == 12 + 3 + 3 + 2


def kv_can_be_there(schedule, prompts, send_type) -> dict[str, bool]:
    """Per decode: did more prefills than decodes of its transfer id finish?

    With GET the producer keeps what it sent (until its store is full), so
    any finished prefill of the transfer id will do.
    """
    done_prefills = {name: 0 for name in "AB"}
    done_decodes = {name: 0 for name in "AB"}
    available = {}

    def same_transfer(a, b):
        return a == b or prompts[a] == prompts[b]

    for event in schedule:
        names = event[1:]
        if event[0] == "D":
            for name in names:
                twins = [n for n in "AB" if same_transfer(name, n)]
                used = 0 if send_type == "GET" else sum(done_decodes[n] for n in twins)
                available[name] = sum(done_prefills[n] for n in twins) > used
        for name in names:
            (done_prefills if event[0] == "P" else done_decodes)[name] += 1
    return available


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize("randomization", ["on"])
@pytest.mark.parametrize("policy", ["recompute", "fail"])
@pytest.mark.parametrize("prompt", ["same-prompt", "other-prompt"])
@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids="-".join)
def test_requests_sharing_an_id(
    network,
    tiny_model_dir,
    monkeypatch,
    randomization,
    policy,
    prompt,
    send_type,
    schedule,
):
    set_randomization(monkeypatch, randomization)
    engines = {
        "P": PDEngine(
            tiny_model_dir,
            "kv_producer",
            PREFILL_KV_PORT,
            send_type,
            kv_load_failure_policy=policy,
        ),
        "D": PDEngine(
            tiny_model_dir,
            "kv_consumer",
            DECODE_KV_PORT,
            send_type,
            kv_load_failure_policy=policy,
            recv_timeout_s=RECV_TIMEOUT_S,
        ),
    }
    external_id = f"cmpl-{proxy_request_id()}-0"
    prompts = {"A": make_prompt(7, 35)}
    prompts["B"] = prompts["A"] if prompt == "same-prompt" else make_prompt(8, 35)
    available = kv_can_be_there(schedule, prompts, send_type)

    completions = {}
    for event in schedule:
        engine = engines[event[0]]
        max_tokens = 1 if event[0] == "P" else DECODE_MAX_TOKENS
        for name in event[1:]:
            completion = engine.add_request(external_id, prompts[name], max_tokens)
            if event[0] == "D":
                completions[name] = completion
        engine.run_until_idle()

    decode = engines["D"]
    for name, completion in completions.items():
        (req_id,) = completion.request_ids
        outputs = completion.outputs.get(req_id, [])
        if available[name]:
            assert_loaded(decode, req_id, prompts[name])
        elif policy == "fail":
            assert decode.finish_reasons[req_id] == FinishReason.ERROR
            assert outputs == [], f"{name}: tokens computed on KV it never received"
            continue
        assert outputs == reference_tokens(prompts[name], DECODE_MAX_TOKENS), (
            f"{name}: decode text differs from a plain engine's (wrong text)"
        )
    assert decode.transport.held_tensor_ids() == set(), "received KV leaked"
