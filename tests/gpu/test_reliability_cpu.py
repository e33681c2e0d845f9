"""ci/gpu/reliability.py against fake servers and the real proxy (CPU only).

Each scenario runs as it does on GPUs, with fake prefill/decode engines
behind tests/gpu/proxy.py: a healthy fake pair passes, and each failure the
scenario exists to catch (wrong text, a hang, an error where recompute was
asked for, a frozen decode after a retried id, a prefill that does not come
back) is reported as FAIL.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci" / "gpu"))

import proxy  # noqa: E402
import reliability as rel  # noqa: E402
import servers  # noqa: E402
import workload  # noqa: E402

pytestmark = pytest.mark.cpu

CFG = rel.Config(recv_timeout=0.2, margin=0.8, kill_after=0.15, spread=0.4)


def _prompt(body: dict) -> str:
    return body.get("prompt") or body["messages"][0]["content"]


def tokens_of(body: dict) -> list[int]:
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or 1
    return [(len(_prompt(body)) * 31 + i) % 97 for i in range(min(limit, 6))]


def answer(request: web.Request, body: dict, tokens: list[int]) -> web.Response:
    top = [{"a": -0.1, "b": -2.0} for _ in tokens]
    if request.path == workload.CHAT:
        content = [{"top_logprobs": [{"logprob": -0.1}, {"logprob": -2.0}]}]
        choice = {
            "message": {"content": "x"},
            "token_ids": tokens,
            "logprobs": {"content": content * len(tokens)},
        }
    else:
        choice = {"text": "x", "token_ids": tokens, "logprobs": {"top_logprobs": top}}
    choices = [dict(choice, index=k) for k in range(body.get("n", 1))]
    return web.json_response({"choices": choices, "usage": {}})


def engine(behaviour=lambda request, body: "ok", seen: list | None = None, delay=0.01):
    """A fake OpenAI server; behaviour (asked after ``delay`` s, the time it
    computes): "ok", "wrong", "error" or "hang"."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        if seen is not None:
            seen.append((request.headers.get("X-Request-Id"), _prompt(body)))
        await asyncio.sleep(delay)
        what = behaviour(request, body)
        if what == "hang":
            await asyncio.sleep(3600)
        if what == "error":
            return web.json_response(
                {"error": {"message": "kv load failed"}}, status=500
            )
        tokens = tokens_of(body)
        if what == "wrong":
            tokens = [t + 1 for t in tokens]
        return answer(request, body, tokens)

    async def health(_):
        return web.Response(text="ok")

    app = web.Application()
    for path in (workload.COMPLETIONS, workload.CHAT):
        app.router.add_post(path, handle)
    app.router.add_get("/health", health)
    return app


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


class FakePair:
    """Fake prefill + decode behind the real proxy; prefill can die and return."""

    def __init__(self, decode_behaviour, *, policy="recompute", restart_ok=True):
        self.decode_behaviour = decode_behaviour
        self.policy, self.restart_ok = policy, restart_ok
        self.killed = False
        self.seen: list = []

    async def __aenter__(self) -> rel.Handle:
        self.p_port, self.d_port = servers.free_ports(2)
        self.prefill_runner, prefill = await serve(engine(), self.p_port)
        self.decode_runner, decode = await serve(
            # Longer than kill_after: a request at decode when prefill dies is
            # answered after the kill, however loaded the machine is.
            engine(self._decode, self.seen, delay=0.3),
            self.d_port,
        )
        p = proxy.Instance(f"127.0.0.1:{self.p_port}", "127.0.0.1:21001")
        d = proxy.Instance(f"127.0.0.1:{self.d_port}", "127.0.0.1:22001")
        self.proxy_runner, proxy_url = await serve(proxy.build_app([p], [d], 5.0))

        async def kill():
            self.killed = True
            await self.prefill_runner.cleanup()

        async def restart():
            if not self.restart_ok:
                return False
            self.prefill_runner, _ = await serve(engine(), self.p_port)
            self.killed = False
            return True

        return rel.Handle(
            key=f"PUT:{self.policy}",
            send_type="PUT",
            policy=self.policy,
            scenarios=("retry", "kill"),
            proxy=proxy_url,
            prefill=prefill,
            decode=decode,
            prefill_kv=p.kv,
            decode_kv=d.kv,
            kill_prefill=kill,
            restart_prefill=restart,
        )

    def _decode(self, request, body):
        return self.decode_behaviour(self, request, body)

    async def __aexit__(self, *exc):
        for runner in (self.proxy_runner, self.decode_runner, self.prefill_runner):
            await runner.cleanup()


def references(requests) -> dict:
    return {
        r.name: {
            "tokens": [tokens_of(r.body)] * r.body.get("n", 1),
            "texts": ["x"] * r.body.get("n", 1),
            "gaps": [[1.9] * len(tokens_of(r.body))] * r.body.get("n", 1),
        }
        for r in requests
    }


SETS = rel.build_sets(kill=12, fresh=4, overflow=8)
REFS = references(SETS.all())


def ok(pair, request, body):
    return "ok"


# ---- plan and sizes


def test_plan_pairs_two_gpus_policies_timeout_small_buffer_on_get_small_only():
    pairs = rel.plan_pairs(["0", "1"], recv_timeout=5, small_buffer=123456)
    assert [p.key for p in pairs] == [
        f"{s}:{p}" for s in servers.SEND_TYPES for p in rel.POLICIES
    ] + ["GET-small:recompute", "GET-small:fail"]
    ports = [
        x for p in pairs for s in (p.prefill, p.decode) for x in (s.port, s.kv_port)
    ]
    assert len(set(ports + [p.proxy_port for p in pairs])) == 5 * len(pairs)
    for p in pairs:
        for spec, gpu in ((p.prefill, "0"), (p.decode, "1")):
            env = {**servers.COMMON_ENV, **spec.env}
            assert env["CUDA_VISIBLE_DEVICES"] == gpu and "NCCL_HOSTID" not in env
            assert env["NCCL_NVLS_ENABLE"] == "0"
            assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
            assert env["NVSHMEM_DISABLE_NVLS"] == "1"
            assert env[servers.RANDOMIZATION_OFF] is None  # randomization on
            config = spec.kv_transfer_config()
            assert config["kv_load_failure_policy"] == p.policy
            extra = config["kv_connector_extra_config"]
            assert extra["recv_timeout_s"] == "5" and extra["send_type"] == p.send_type
            small = spec is p.prefill and p.key.startswith("GET-small")
            assert config["kv_buffer_size"] == (123456 if small else 1e9)
            batched = [a for a in spec.args("/m") if "batched" in a]
            tokens = 8192 if small else servers.MAX_NUM_BATCHED_TOKENS
            assert batched == [f"--max-num-batched-tokens={tokens}"]
        assert p.scenarios == (
            ("overflow",) if p.key.startswith("GET-small") else ("retry", "kill")
        )
    assert len(rel.plan_pairs(["0", "1"], small_buffer=0)) == 6


@pytest.mark.parametrize("mode", ["default", "v1-eager"])
def test_plan_pairs_every_engine_in_the_mode_policies_on_top(mode):
    pairs = rel.plan_pairs(["0", "1"], small_buffer=1, v1_recompute=True, mode=mode)
    assert {p.policy for p in pairs} >= {rel.V1_RECOMPUTE, rel.SYNC_RECOMPUTE}
    for p in pairs:
        for spec in (p.prefill, p.decode):
            assert spec.mode == mode
            args = spec.args("/m")
            assert ("--enforce-eager" in args) == (mode == "v1-eager")
            sync = p.policy == rel.SYNC_RECOMPUTE
            assert ("--no-async-scheduling" in args) == sync
            runner = spec.environment().get("VLLM_USE_V2_MODEL_RUNNER")
            v1 = mode == "v1-eager" or p.policy == rel.V1_RECOMPUTE
            assert runner == ("0" if v1 else None)


def test_kv_bytes_per_token_from_the_model_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 64,
                "hidden_size": 128,
            }
        )
    )
    assert rel.kv_bytes_per_token(tmp_path, "float16") == 2 * 2 * 2 * 64 * 2
    assert rel.kv_bytes_per_token(tmp_path, "float32") == 2048
    # 2.5 prompts of the longest kind (420 words, chat template, whole blocks)
    assert rel.small_buffer_bytes(2048) == int(2.5 * 448 * 2048)


def test_request_names_are_unique_across_sets():
    names = [r.name for r in SETS.all()]
    assert len(names) == len(set(names))


# ---- kill


def test_kill_recompute_healthy_pair_passes_and_prefill_errors_are_apart():
    async def go():
        async with FakePair(ok) as h:
            return await rel.scenario_kill(h, SETS.kill, SETS.fresh, REFS, CFG)

    parts = asyncio.run(go())
    verdict, reasons = rel.judged("kill", "recompute", parts)
    assert verdict == "pass", reasons
    w = parts["workload"]["counts"]
    # Requests sent after the kill fail at the proxy's prefill stage.
    assert w["prefill_error"] > 0 and w["error"] == 0
    assert w["correct"] + w["prefill_error"] == len(SETS.kill)
    assert 0 < parts["sent_before_kill"] < len(SETS.kill)
    assert parts["decode_healthy_after_kill"] and parts["prefill_restarted"]
    assert rel.all_correct(parts["fresh"])


@pytest.mark.parametrize(
    "after_kill, policy, verdict",
    [
        ("error", "recompute", "FAIL"),  # recompute asked: no decode errors
        ("error", "fail", "pass"),
        ("wrong", "fail", "FAIL"),  # computed on KV that did not arrive
        ("hang", "fail", "FAIL"),  # an unbounded wait
    ],
)
def test_kill_finds_decode_errors_wrong_text_and_hangs(after_kill, policy, verdict):
    def decode(pair, request, body):
        return after_kill if pair.killed else "ok"

    async def go():
        async with FakePair(decode, policy=policy) as h:
            return await rel.scenario_kill(h, SETS.kill, SETS.fresh, REFS, CFG)

    parts = asyncio.run(go())
    got, reasons = rel.judged("kill", policy, parts)
    assert got == verdict, reasons
    assert parts["workload"]["max_seconds"] <= CFG.request_timeout + 0.5


def test_kill_prefill_that_does_not_come_back_fails():
    async def go():
        async with FakePair(ok, restart_ok=False) as h:
            return await rel.scenario_kill(h, SETS.kill, SETS.fresh, REFS, CFG)

    parts = asyncio.run(go())
    assert rel.judged("kill", "recompute", parts) == (
        "FAIL",
        ["prefill did not come back on the same ports"],
    )


# ---- retry


def test_retry_correct_pair_passes_with_one_id_per_case_and_prefill_max_tokens_1():
    async def go():
        pair = FakePair(ok)
        async with pair as h:
            parts = await rel.scenario_retry(h, SETS.retry, SETS.fresh[0], REFS, CFG)
        return pair, parts

    pair, parts = asyncio.run(go())
    assert rel.judged("retry", "recompute", parts) == ("pass", [])
    assert len(parts["cases"]) == 5
    ids = [c["id"] for c in parts["cases"].values()]
    assert len(set(ids)) == 5
    for rid in ids:  # parsed by P2pNcclConnector on both sides
        assert rid.startswith("___prefill_addr_127.0.0.1:21001___decode_addr_")
        # A and B decode with this id (the last decode request is the fresh one)
        assert sum(1 for seen_id, _ in pair.seen if seen_id == rid) == 2
    other = parts["cases"]["other prompt, same id"]["id"]
    prompts = {p for seen_id, p in pair.seen if seen_id == other}
    assert len(prompts) == 2


def test_retry_finds_the_frozen_decode_and_stops_early():
    """Issue 9: B's decode after A's decode finished waits forever."""

    def decode(pair, request, body):
        rid = request.headers.get("X-Request-Id")
        done = pair.__dict__.setdefault("done", set())
        if rid in done:
            pair.frozen = True
        if getattr(pair, "frozen", False):
            return "hang"
        done.add(rid)
        return "ok"

    async def go():
        async with FakePair(decode) as h:
            return await rel.scenario_retry(h, SETS.retry, SETS.fresh[0], REFS, CFG)

    parts = asyncio.run(go())
    verdict, reasons = rel.judged("retry", "fail", parts)
    assert verdict == "FAIL"
    cases = [c["verdict"] for c in parts["cases"].values()]
    assert cases[0] == "hang" and set(cases[1:]) == {"not run"}
    assert parts["fresh_correct"] is False
    assert rel.cell_counts("retry", {**parts, "verdict": verdict})["hang"] == 1


def test_retry_wrong_answer_of_the_other_prompt_is_wrong():
    def decode(pair, request, body):
        n = pair.__dict__.setdefault("ids", {})
        rid = request.headers.get("X-Request-Id")
        n[rid] = n.get(rid, 0) + 1
        # the second request of an id gets the first one's KV: wrong text
        return "wrong" if n[rid] == 2 and "other" in pair.__dict__ else "ok"

    async def go():
        pair = FakePair(decode)
        pair.other = True
        async with pair as h:
            return await rel.scenario_retry(h, SETS.retry, SETS.fresh[0], REFS, CFG)

    parts = asyncio.run(go())
    assert "wrong" in {c["verdict"] for c in parts["cases"].values()}
    assert rel.judged("retry", "recompute", parts)[0] == "FAIL"


# ---- overflow


@pytest.mark.parametrize(
    "mode, policy, verdict",
    [
        ("ok", "recompute", "pass"),
        ("error", "recompute", "FAIL"),
        ("error", "fail", "pass"),
        ("wrong", "fail", "FAIL"),
        ("hang", "recompute", "FAIL"),
    ],
)
def test_overflow_verdicts(mode, policy, verdict, tmp_path):
    log = tmp_path / "decode.log"
    log.write_text("")

    def decode(pair, request, body):
        pair.n = getattr(pair, "n", 0) + 1
        if pair.n % 3 == 0 and pair.n <= len(SETS.overflow):
            with open(log, "a") as f:
                f.write("KV of request x (y) was not received; reporting its blocks\n")
            return mode
        return "ok"

    async def go():
        async with FakePair(decode, policy=policy) as h:
            h.decode_log = log
            return await rel.scenario_overflow(
                h, SETS.overflow, SETS.overflow_fresh, REFS, CFG
            )

    parts = asyncio.run(go())
    got, reasons = rel.judged("overflow", policy, parts)
    assert got == verdict, reasons
    assert parts["decode_load_error_lines"] == len(SETS.overflow) // 3
    assert rel.all_correct(parts["fresh"])


# ---- the whole flow and the report


def test_run_pair_and_render(tmp_path):
    async def go():
        sink: dict = {}
        async with FakePair(ok, policy="fail") as h:
            await rel.run_pair(h, SETS, REFS, CFG, sink)
        return sink

    sink = asyncio.run(go())
    assert list(sink) == ["retry", "kill"]
    assert all(s["verdict"] == "pass" for s in sink.values())
    data = {
        "settings": {"tie_gap": 0.02},
        "modes": {"default": {"startup_seconds": 80.0}},
        "pairs": {"default:PUT:fail": sink},
    }
    out = tmp_path / "rel"
    rel.write(out, data)
    md = out.with_suffix(".md").read_text()
    assert "| mode default (vLLM defaults) | engines up after 80.0 s |" in md
    assert "| default | retry | PUT | fail | pass | 5 | 0 | **0** | **0** |" in md
    assert "| default | kill | PUT | fail | pass |" in md
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["pairs"]["default:PUT:fail"]


def test_reference_noise_floor_counts_a_second_pass_that_differs():
    calls = {"n": 0}

    def behaviour(request, body):
        calls["n"] += 1
        return "wrong" if calls["n"] == len(SETS.retry) + 1 else "ok"

    async def go():
        runner, url = await serve(engine(behaviour))
        try:
            return await rel.reference_answers(url, SETS.retry)
        finally:
            await runner.cleanup()

    refs, noise = asyncio.run(go())
    assert len(refs) == len(SETS.retry) and noise["failed_first_pass"] == 0
    assert noise["counts"]["wrong"] == 1


def test_scenario_that_raises_is_recorded_as_fail():
    async def boom():
        raise RuntimeError("no")

    h = rel.Handle(
        "GET-small:fail",
        "GET",
        "fail",
        ("overflow",),
        "http://127.0.0.1:9",
        "",
        "http://127.0.0.1:9",
        "",
        "",
        boom,
        boom,
    )
    sink: dict = {}
    asyncio.run(rel.run_pair(h, SETS, REFS, CFG, sink))
    assert sink["overflow"]["verdict"] == "FAIL"
    assert rel.render({"pairs": {f"eager:{h.key}": sink}}).count(
        "| eager | overflow | GET-small | fail | FAIL"
    )


# ---- main() end to end, with fake engine processes instead of vLLM


def serve_forever(port: int) -> None:
    """A fake engine process (what main() starts instead of vLLM)."""

    async def go():
        await serve(engine(), port)
        await asyncio.Event().wait()

    asyncio.run(go())


def test_main_with_fake_engine_processes(tmp_path, monkeypatch):
    """Real processes, process groups, SIGKILL, restart on the same ports;
    two execution modes, one after the other."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {"num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 64}
            | {"hidden_size": 128, "num_key_value_heads": 2}
        )
    )
    started = []

    def fake_start_engine(spec, model_dir, log_dir, *, site=None, dtype="float16"):
        started.append((spec.name, spec.mode))
        cmd = [sys.executable, __file__, str(spec.port)]
        env = {"PYTHONPATH": str(ROOT / "tests" / "gpu")}
        return servers.start(spec.name, cmd, env, log_dir, servers.url(spec))

    monkeypatch.setattr(servers, "start_engine", fake_start_engine)
    monkeypatch.setattr(rel.tiny_model, "build", lambda out: model)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = tmp_path / "out" / "rel"
    argv = [
        "--site", str(tmp_path), "--out", str(out), "--send-types", "PUT",
        "--recv-timeout", "0.5", "--margin", "3", "--kill-after", "0.3",
        "--spread", "0.6", "--kill-requests", "12", "--overflow-requests", "8",
        "--log-dir", str(tmp_path / "logs"), "--budget", "120",
        "--logs-tar", str(tmp_path / "out" / "logs.tar.gz"),
        "--mode", "default,eager",
    ]  # fmt: skip
    try:
        assert rel.main(argv) == 0
    finally:
        servers._STOPPING.clear()  # main() ends with stop_all()
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["pairs"]) == [
        f"{mode}:{pair}"
        for mode in ("default", "eager")
        for pair in ("PUT:recompute", "PUT:fail", "GET-small:recompute",
                     "GET-small:fail")
    ]  # fmt: skip
    for key, per in data["pairs"].items():
        for scenario, parts in per.items():
            assert parts["verdict"] == "pass", (key, scenario, parts["reasons"])
    # the reference runs in the mode of the pairs it judges
    modes_of = {
        name: [m for n, m in started if n == name]
        for name in ("reference", "GET-small-fail-decode3")
    }
    assert modes_of == {
        "reference": ["default", "eager"],
        "GET-small-fail-decode3": ["default", "eager"],
    }
    # each PUT prefill was started twice (the restart), on the same port
    assert [m for n, m in started if n == "PUT-recompute-prefill0"] == [
        "default", "default", "eager", "eager"
    ]  # fmt: skip
    for facts in data["modes"].values():
        assert facts["noise"]["counts"]["correct"] == facts["noise"]["n"]
    assert data["settings"]["small_kv_buffer_size"] == rel.small_buffer_bytes(2048)
    md = out.with_suffix(".md").read_text()
    assert "| default | kill | PUT | recompute | pass |" in md
    assert "| eager | kill | PUT | recompute | pass |" in md
    assert "| mode eager (--enforce-eager) | engines up after" in md
    assert (tmp_path / "logs" / "eager" / "PUT-recompute" / "restarted").is_dir()
    assert (tmp_path / "out" / "logs.tar.gz").stat().st_size > 0


if __name__ == "__main__":
    serve_forever(int(sys.argv[1]))
