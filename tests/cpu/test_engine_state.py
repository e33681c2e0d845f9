"""What a P2P engine keeps for a request goes when the request is done.

On vLLM's real ``P2pNcclEngine`` (``zmq_wire``): the engine recorded the id
of every tensor a producer sent with PUT_ASYNC or GET in a map that nothing
read and only a consumer cleared, about 150 bytes a layer a request for as
long as the prefill engine ran. The check is generic: no dict, set or list
attribute of either engine may still name a finished request (nested
containers, the connectors' and the scheduler's state are not looked at).
"""

from __future__ import annotations

import pytest

from .pd import (
    DECODE_KV_PORT,
    PREFILL_KV_PORT,
    PDEngine,
    proxy_request_id,
    set_randomization,
)
from .test_load_failures import PROMPT_LEN, assert_outcome, wait_for
from .test_reliability import assert_loaded
from .test_two_engine import DECODE_MAX_TOKENS, make_prompt
from .zmq_wire import zmq_wire  # noqa: F401

# Far above the time a step takes: PUT_ASYNC's sender may still be busy.
STUCK_S = 10.0
# Not per-request state: the harness's record of the sends (zmq_wire), and
# GET's send store, a cache kept under kv_buffer_size (it drops the oldest)
# so that a consumer can ask again.
NOT_STATE = {"send_results", "send_store"}

pytestmark = pytest.mark.timeout(90)


def state_naming(engine, external_ids: list[str]) -> dict[str, list[str]]:
    """The engine's containers (attribute: entries) that name a request."""
    found: dict[str, list[str]] = {}
    for name, value in vars(engine).items():
        if name in NOT_STATE or not isinstance(value, (dict, set, list)):
            continue
        entries = [
            str(entry)
            for entry in value
            if any(external_id in str(entry) for external_id in external_ids)
        ]
        if entries:
            found[name] = entries
    return found


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"])
def test_finished_requests_leave_no_state(
    zmq_wire,  # noqa: F811
    tiny_model_dir,
    monkeypatch,
    send_type,
):
    set_randomization(monkeypatch, "on")
    prefill = PDEngine(tiny_model_dir, "kv_producer", PREFILL_KV_PORT, send_type)
    decode = PDEngine(tiny_model_dir, "kv_consumer", DECODE_KV_PORT, send_type)
    external_ids = []
    for index in range(2):
        external_id = f"cmpl-{proxy_request_id()}-0"
        prompt = make_prompt(index, PROMPT_LEN)
        prefill.add_request(external_id, prompt, 1)
        prefill.run_until_idle()
        if send_type != "GET":  # the check sees what decode holds for it
            wait_for(
                lambda ids=[external_id]: state_naming(decode.transport, ids),
                "decode did not receive the KV",
                timeout=STUCK_S,
            )
        completion = decode.add_request(external_id, prompt, DECODE_MAX_TOKENS)
        decode.run_until_idle()
        assert_loaded(decode, completion.request_ids[0], prompt)
        assert_outcome(decode, completion, prompt, "fail", kv_missing=False)
        external_ids.append(external_id)

    for engine in (prefill, decode):
        wait_for(
            lambda engine=engine: not state_naming(engine.transport, external_ids),
            f"{engine.kv_role} keeps state of finished requests: "
            f"{state_naming(engine.transport, external_ids)}",
            timeout=STUCK_S,
        )
