"""The pure parts of ci/gpu/bench_pd.py and ci/gpu/nccl_bw.py, on CPU."""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci" / "gpu"))

import bench_pd  # noqa: E402
import nccl_bw  # noqa: E402
import servers  # noqa: E402

pytestmark = pytest.mark.cpu


def test_schedule_is_abba_with_one_prompt_set_per_pair():
    order = bench_pd.schedule(4)
    assert len(order) == 8
    trees = "".join("A" if tree == "stock" else "B" for _, tree in order)
    assert trees == "ABBAABBA"
    assert [pair for pair, _ in order] == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(4):  # each pair: both trees once
        assert {t for p, t in order if p == k} == {"stock", "patched"}


def test_round_prompts_same_per_pair_balanced_and_in_vocab():
    a = bench_pd.round_prompts(3, 8)
    assert a == bench_pd.round_prompts(3, 8)  # both rounds of a pair
    assert a != bench_pd.round_prompts(4, 8)
    lengths = sorted(len(p) for p in a)
    assert lengths == sorted(list(bench_pd.LENGTHS) * 2)
    ids = {i for p in a for i in p}
    assert min(ids) >= bench_pd.FIRST_WORD and max(ids) < 128256


def test_percentile_matches_linear_interpolation():
    assert bench_pd.percentile([], 50) is None
    assert bench_pd.percentile([3.0], 90) == 3.0
    assert bench_pd.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench_pd.percentile(list(range(11)), 90) == pytest.approx(9.0)
    assert bench_pd.percentile([10, 0, 5], 25) == 2.5


def test_bootstrap_ratio_brackets_the_ratio_and_narrows_with_pairs():
    rng = random.Random(1)
    few = [(100 + rng.gauss(0, 3), 99 + rng.gauss(0, 3)) for _ in range(4)]
    many = [(100 + rng.gauss(0, 3), 99 + rng.gauss(0, 3)) for _ in range(64)]
    r_few = bench_pd.bootstrap_ratio(few, resamples=2000)
    r_many = bench_pd.bootstrap_ratio(many, resamples=2000)
    for r in (r_few, r_many):
        lo, hi = r["ci95"]
        assert lo <= r["ratio"] <= hi
    assert r_many["half_width_pct"] < r_few["half_width_pct"]
    assert r_many["ci95"][0] < 0.99 < r_many["ci95"][1]  # the true ratio
    assert bench_pd.bootstrap_ratio([]) is None
    same = bench_pd.bootstrap_ratio([(10.0, 10.0)] * 5, resamples=100)
    assert same["ratio"] == 1.0 and same["ci95"] == [1.0, 1.0]
    # deterministic: same seed, same interval
    assert bench_pd.bootstrap_ratio(few, resamples=2000) == r_few


def _round(pair, tree, tps, ttft, failed=0):
    summary = {
        "tokens_per_s": tps,
        "ttft_p50_ms": ttft,
        "ttft_p90_ms": 2 * ttft,
        "itl_p50_ms": 10.0,
        "tpot_p50_ms": 10.0,
        "failed": failed,
        "requests": 8,
        "short": 0,
        "seconds": 1.0,
    }
    return {"pair": pair, "tree": tree, "summary": summary}


def test_paired_skips_failed_and_incomplete_pairs():
    rounds = [
        _round(0, "stock", 100.0, 50.0),
        _round(0, "patched", 98.0, 51.0),
        _round(1, "patched", 97.0, 52.0),
        _round(1, "stock", 101.0, 49.0, failed=1),
        _round(2, "stock", 102.0, 48.0),  # pair cut short
    ]
    assert bench_pd.paired(rounds, "tokens_per_s") == [(100.0, 98.0)]
    ratios = bench_pd.ratios(rounds, resamples=100)
    assert ratios["tokens_per_s"]["ratio"] == 0.98
    assert ratios["ttft_p50_ms"]["ratio"] == 1.02


def test_summarize_round():
    ok = bench_pd.Sample(1024, ok=True, ttft=0.1, latency=1.37, output_tokens=128)
    ok.itls = [0.01] * 127
    short = bench_pd.Sample(2048, ok=True, ttft=0.3, output_tokens=100)
    short.detail = "100 output tokens"
    failed = bench_pd.Sample(4096, detail="no answer in 120 s")
    s = bench_pd.summarize_round([ok, short, failed], 2.0)
    assert s["requests"] == 3 and s["failed"] == 1 and s["short"] == 1
    assert s["output_tokens"] == 228 and s["tokens_per_s"] == 114.0
    assert s["ttft_p50_ms"] == 200.0 and s["itl_p50_ms"] == 10.0
    assert s["tpot_p50_ms"] == 10.0  # (1.37 - 0.1) / 127; short has no latency
    assert s["prompt_tokens"] == 1024 + 2048 + 4096
    assert "no answer in 120 s" in s["errors"]


def test_request_body_forces_exactly_128_tokens():
    body = bench_pd.request_body([5, 6, 7])
    assert body["max_tokens"] == body["min_tokens"] == 128
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "stream" not in bench_pd.request_body([5], 1, stream=False)


def test_model_config_has_the_8b_shape():
    c = bench_pd.model_config()
    assert (
        c["num_hidden_layers"],
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
        c["intermediate_size"],
        c["vocab_size"],
        c["torch_dtype"],
    ) == (32, 4096, 32, 8, 128, 14336, 128256, "bfloat16")
    assert c["max_position_embeddings"] >= 16384
    assert bench_pd.kv_bytes_per_token(c) == 128 * 1024
    assert bench_pd.kv_bytes(c, 1024) == 128 * 1024**2
    assert bench_pd.kv_bytes(c, 1000) == 1008 * 128 * 1024  # whole blocks
    # nccl_bw sends the same bytes per layer
    assert nccl_bw.layer_bytes(1000) * 32 == bench_pd.kv_bytes(c, 1000)
    assert nccl_bw.layer_shape(1000, 16, 8, 128) == (63, 2, 16, 8, 128)


def test_engine_plan_and_pairs():
    plan = bench_pd.EnginePlan()
    specs = bench_pd.plan_pairs(["0", "1"], list(range(9000, 9008)))
    assert set(specs) == {"stock", "patched"}
    for tree, (prefill, decode) in specs.items():
        assert prefill.env["CUDA_VISIBLE_DEVICES"] == "0"
        assert decode.env["CUDA_VISIBLE_DEVICES"] == "1"
        for spec in (prefill, decode):
            env = spec.env
            assert env["NCCL_NVLS_ENABLE"] == "0"
            assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
            assert env["NVSHMEM_DISABLE_NVLS"] == "1"
            assert env["NCCL_HOSTID"] is None  # removed: two GPUs
            off = env["VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"]
            assert off == ("1" if tree == "stock" else None)
            cmd = bench_pd.engine_command(spec, plan, Path("/m"))
            assert "--load-format=dummy" in cmd
            assert "--no-enable-chunked-prefill" in cmd
            assert "--no-enable-prefix-caching" in cmd
            # vLLM's default execution mode: no eager, no graph settings
            assert plan.mode == "default"
            assert not [a for a in cmd if "eager" in a or "compilation" in a]
            env = plan.env(spec, "/site")
            assert env == {**servers.COMMON_ENV, **spec.env, "PYTHONPATH": "/site"}
            kv = json.loads(cmd[-1].split("=", 1)[1])
            assert kv["kv_connector_extra_config"]["send_type"] == "PUT_ASYNC"
            assert kv["kv_port"] == spec.kv_port
    ports = [s.port for p in specs.values() for s in p]
    ports += [s.kv_port for p in specs.values() for s in p]
    assert len(set(ports)) == 8
    with pytest.raises(ValueError):
        bench_pd.plan_pairs(["0"], list(range(8)))


def test_a_mode_reaches_every_engine_of_both_trees():
    plan = bench_pd.EnginePlan(mode="v1-eager", extra_args=["--async-scheduling"])
    specs = bench_pd.plan_pairs(["0", "1"], list(range(9000, 9008)))
    for spec in (s for pair in specs.values() for s in pair):
        cmd = bench_pd.engine_command(spec, plan, Path("/m"))
        i = cmd.index("--enforce-eager")
        assert cmd[i + 1] == "--async-scheduling"  # --engine-arg comes last
        assert plan.env(spec, "/site")["VLLM_USE_V2_MODEL_RUNNER"] == "0"
        assert plan.env(spec, "/site")["CUDA_VISIBLE_DEVICES"] in ("0", "1")


def test_parse_args_quick_and_defaults():
    base = ["--stock-site", "/s", "--patched-site", "/p", "--out", "/o"]
    full = bench_pd.parse_args(base)
    quick = bench_pd.parse_args([*base, "--quick"])
    assert (full.pairs, full.requests, full.concurrency) == (16, 48, 12)
    assert full.mode == "default"
    assert bench_pd.parse_args([*base, "--mode", "piecewise"]).mode == "piecewise"
    for bad in ("eager,default", "turbo"):
        with pytest.raises(SystemExit):
            bench_pd.parse_args([*base, "--mode", bad])
    assert quick.pairs < full.pairs and quick.requests < full.requests
    assert bench_pd.parse_args([*base, "--quick", "--pairs", "5"]).pairs == 5


def test_save_writes_json_and_markdown(tmp_path):
    data = {
        "machine": {"gpu": "H100, H100"},
        "topology": "GPU0 X NV18",
        "trees": {},
        "rounds": [
            _round(k, t, 100.0 + k, 50.0)
            for k in range(3)
            for t in ("stock", "patched")
        ],
        "nccl_bw": {
            "nccl": "2.28.9",
            "nccl_num_channels": "8",
            "rows": [
                {
                    "tokens": 1024,
                    "bytes": 134217728,
                    "plain_s": 0.001,
                    "plain_GBps": 134.2,
                    "per_layer_s": 0.002,
                    "per_layer_GBps": 67.1,
                    "connector_s": 0.004,
                    "connector_GBps": 33.6,
                }
            ],
        },
        "transfer_probe": {
            "method": "m",
            "rows": [
                {
                    "tokens": 1024,
                    "prefill_alone_ms": 50.0,
                    "stock": {"prefill_with_transfer_ms": 52.0, "ttft_ms": 70.0},
                }
            ],
        },
        "notes": ["a note"],
    }
    bench_pd.save(tmp_path, data, resamples=200)
    saved = json.loads((tmp_path / "bench_pd.json").read_text())
    assert saved["ratios"]["tokens_per_s"]["ratio"] == 1.0
    md = (tmp_path / "bench_pd.md").read_text()
    assert "| execution mode | eager |" in md  # saved before modes: eager
    assert "| execution mode | default |" in bench_pd.render(dict(data, mode="default"))
    assert "| output tokens/s | 101.0 | 101.0 | 1.0000 |" in md
    assert "| 1024 | 134217728 | 134.2 (1.00) |" in md
    assert "GPU0 X NV18" in md and "a note" in md
    assert not list(tmp_path.glob("*.tmp"))


def test_built_model_folder(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    out = bench_pd.build_model(tmp_path / "m", num_layers=2)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 128256
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 128256
    assert tok("w5 w128255 w7").input_ids == [5, 128255, 7]  # a word a token
    assert tok.decode([5, 128255]) == "w5 w128255"
    assert tok.eos_token_id == config["eos_token_id"]
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    bench_pd.build_model(out, num_layers=2)  # reused, not rebuilt
    assert (out / "tokenizer.json").stat().st_mtime_ns == mtime


def test_arrival_offsets_one_poisson_schedule_per_pair():
    first = bench_pd.arrival_offsets(0, 2000, rate=4.0)
    assert first == bench_pd.arrival_offsets(0, 2000, rate=4.0)
    assert first != bench_pd.arrival_offsets(1, 2000, rate=4.0)
    assert first[0] == 0.0
    assert all(b > a for a, b in zip(first, first[1:], strict=False))
    # Mean gap 1/rate (sd of the mean of 1999 gaps: 0.25/sqrt(1999) = 0.006).
    assert abs(first[-1] / 1999 - 0.25) < 0.03


def test_open_loop_round_sends_at_the_offsets():
    """Each request leaves at its offset, whether earlier ones are done or not."""
    from aiohttp import web

    started: list[float] = []
    finished: list[float] = []

    async def completions(request):
        started.append(time.perf_counter())
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(bench_pd.OUTPUT_TOKENS):
            choice = {"text": f"w{i}", "index": 0}
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"completion_tokens": bench_pd.OUTPUT_TOKENS}
        await resp.write(
            f"data: {json.dumps({'usage': usage, 'choices': []})}\n\n".encode()
        )
        await asyncio.sleep(0.5)  # a slow request: the next one must not wait
        await resp.write(b"data: [DONE]\n\n")
        finished.append(time.perf_counter())
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            t0 = time.perf_counter()
            samples, seconds = await bench_pd._open_loop(
                f"http://127.0.0.1:{port}", [[1], [2], [3]], [0.0, 0.1, 0.2], 10.0
            )
            return t0, samples, seconds
        finally:
            await runner.cleanup()

    t0, samples, seconds = asyncio.run(main())
    assert [s.ok for s in samples] == [True] * 3
    assert [s.output_tokens for s in samples] == [bench_pd.OUTPUT_TOKENS] * 3
    # Never before its offset; the later ones left while the first still ran.
    for got, want in zip(sorted(started), [0.0, 0.1, 0.2], strict=True):
        assert got - t0 >= want - 0.005
    assert max(started) < min(finished)
    assert seconds >= max(finished) - t0 - 0.05


def test_bench_combine_keeps_pairs_apart_and_refuses_other_workloads():
    import bench_combine

    def run(workload, values):
        rounds = []
        for pair, (stock, patched) in enumerate(values):
            for tree, v in (("stock", stock), ("patched", patched)):
                summary = {"tokens_per_s": v, "failed": 0}
                rounds.append({"pair": pair, "tree": tree, "summary": summary})
        return {"workload": workload, "rounds": rounds}

    a = run("w", [(100.0, 101.0), (90.0, 91.0)])
    b = run("w", [(110.0, 108.0)])
    rounds = bench_combine.pooled_rounds([a, b])
    assert sorted({r["pair"] for r in rounds}) == [0, 1, 1000]
    pairs = bench_pd.paired(rounds, "tokens_per_s")
    assert sorted(pairs) == [(90.0, 91.0), (100.0, 101.0), (110.0, 108.0)]
    with pytest.raises(SystemExit, match="workload"):
        bench_combine.pooled_rounds([a, run("other", [(1.0, 1.0)])])
    # runs from before execution modes ran eager: they pool with eager runs only
    assert bench_combine.pooled_rounds([a, dict(b, mode="eager")])
    with pytest.raises(SystemExit, match="execution mode"):
        bench_combine.pooled_rounds([a, dict(b, mode="default")])


def test_request_records_one_per_prompt_in_prompt_order():
    ok = bench_pd.Sample(1024, ok=True, ttft=0.1, latency=1.37, output_tokens=128)
    ok.itls = [0.01] * 100 + [0.03] * 27
    failed = bench_pd.Sample(8192, ttft=0.25, detail="no answer in 120 s")
    one = bench_pd.Sample(2048, ok=True, ttft=0.2, latency=0.2, output_tokens=1)
    records = bench_pd.request_records([ok, failed, one], [0.0, 0.123456, 1.5])
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["prompt_tokens"] for r in records] == [1024, 8192, 2048]
    assert [r["offset_s"] for r in records] == [0.0, 0.123, 1.5]
    assert records[0] == {
        "index": 0,
        "prompt_tokens": 1024,
        "offset_s": 0.0,
        "ok": True,
        "ttft_ms": 100.0,
        "latency_ms": 1370.0,
        "output_tokens": 128,
        "itl_p50_ms": 10.0,
        "tpot_ms": 10.0,  # (1.37 - 0.1) / 127, as in the round's TPOT p50
    }
    assert records[1]["ok"] is False and records[1]["ttft_ms"] == 250.0
    assert records[1]["latency_ms"] is None and records[1]["tpot_ms"] is None
    assert records[1]["detail"] == "no answer in 120 s"
    assert records[2]["itl_p50_ms"] is None and records[2]["tpot_ms"] is None
    closed = bench_pd.request_records([ok])  # closed loop: no schedule
    assert closed[0]["offset_s"] is None


def test_to_json_one_line_per_request_and_gpu_and_round_trips():
    request = {"index": 0, "ttft_ms": 1.5, "ok": True, "detail": 'a "quote"'}
    gpu = {"index": 0, "sm_mhz": 1980, "throttle": "0x0000000000000000"}
    data = {
        "rounds": [
            {
                "pair": 0,
                "summary": {"requests": 2, "errors": ["x"]},
                "gpu_before": {"unix_s": 1.0, "gpus": [gpu, dict(gpu, index=1)]},
                "requests": [request, dict(request, index=1)],
            }
        ],
        "ratios": {"tokens_per_s": {"ci95": [0.99, 1.01]}},
    }
    text = bench_pd.to_json(data)
    assert json.loads(text) == data
    lines = text.splitlines()
    assert sum(json.dumps(request) in line for line in lines) == 1
    assert sum(json.dumps(gpu) in line for line in lines) == 1
    assert '"requests": 2,' in text  # the summary's count stays as it was
    assert "\\u0000" not in text


def test_gpu_query_fields_take_what_this_driver_lists():
    new_driver = """
"index"
Zero based index of the GPU.
"clocks.current.sm" or "clocks.sm"
"clocks.current.memory" or "clocks.mem"
"power.draw"
"power.draw.instant"
"temperature.gpu"
"pstate"
"clocks_event_reasons.active"
Bitmask of active clock event reasons.
"""
    fields = bench_pd.gpu_query_fields(new_driver)
    assert fields == {
        "index": "index",
        "sm_mhz": "clocks.sm",
        "mem_mhz": "clocks.mem",
        "power_w": "power.draw",
        "temp_c": "temperature.gpu",
        "pstate": "pstate",
        "throttle": "clocks_event_reasons.active",
    }
    old_driver = new_driver.replace("clocks_event", "clocks_throttle").replace(
        '"power.draw"\n', ""
    )
    fields = bench_pd.gpu_query_fields(old_driver)
    assert fields["throttle"] == "clocks_throttle_reasons.active"
    assert fields["power_w"] == "power.draw.instant"
    no_temp = bench_pd.gpu_query_fields(new_driver.replace("temperature", "t"))
    assert "temp_c" not in no_temp and len(no_temp) == 6
    assert bench_pd.gpu_query_fields("nvidia-smi: [Errno 2] No such file") == {}


def test_parse_gpu_csv_numbers_strings_and_not_available():
    names = ["index", "sm_mhz", "power_w", "pstate", "throttle"]
    text = "0, 1980, 345.67, P0, 0x0000000000000000\n1, [N/A], 70.1, P0, 0x4\n\n"
    assert bench_pd.parse_gpu_csv(names, text) == [
        {
            "index": 0,
            "sm_mhz": 1980,
            "power_w": 345.67,
            "pstate": "P0",
            "throttle": "0x0000000000000000",
        },
        {
            "index": 1,
            "sm_mhz": None,
            "power_w": 70.1,
            "pstate": "P0",
            "throttle": "0x4",
        },
    ]


def test_sample_gpus_one_call_and_never_raises(tmp_path, monkeypatch):
    fields = {"index": "index", "sm_mhz": "clocks.sm", "pstate": "pstate"}
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    missing = bench_pd.sample_gpus(["0", "1"], fields)
    assert "gpus" not in missing and "nvidia-smi" in missing["error"]
    assert abs(missing["unix_s"] - time.time()) < 60
    assert "error" in bench_pd.sample_gpus(["0"], {})
    # A stand-in for the driver's CLI: logs its arguments, prints two GPUs.
    calls = tmp_path / "calls"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        'case "$*" in *clocks.sm*) printf "0, 1755, P0\\n1, 1980, P0\\n";; '
        '*) echo "bad field" >&2; exit 2;; esac\n'
    )
    smi.chmod(0o755)
    sample = bench_pd.sample_gpus(["0", "1"], fields)
    assert sample["gpus"] == [
        {"index": 0, "sm_mhz": 1755, "pstate": "P0"},
        {"index": 1, "sm_mhz": 1980, "pstate": "P0"},
    ]
    assert calls.read_text().splitlines() == [
        "--id=0,1 --query-gpu=index,clocks.sm,pstate --format=csv,noheader,nounits"
    ]
    failed = bench_pd.sample_gpus(["0"], {"pstate": "pstate"})
    assert failed["error"] == "bad field" and "gpus" not in failed


def _req(index, ttft, tpot=10.0, ok=True, prompt_tokens=1024):
    return {
        "index": index,
        "prompt_tokens": prompt_tokens,
        "offset_s": 0.1 * index,
        "ok": ok,
        "ttft_ms": ttft,
        "latency_ms": None if tpot is None else ttft + 127 * tpot,
        "output_tokens": 128,
        "itl_p50_ms": tpot,
        "tpot_ms": tpot,
    }


def _round_with_requests(pair, tree, requests):
    r = _round(pair, tree, 100.0, 50.0)
    r["requests"] = requests
    return r


def test_request_pairs_match_by_index_and_drop_failures():
    rounds = [
        _round_with_requests(
            0,
            "stock",
            [_req(0, 100.0), _req(1, 110.0, ok=False), _req(2, 120.0), _req(3, 130.0)],
        ),
        _round_with_requests(  # listed in another order: matched by index
            0,
            "patched",
            [
                _req(3, 131.0, tpot=None),
                _req(2, 122.0, ok=False),
                _req(1, 111.0),
                _req(0, 101.0),
            ],
        ),
        _round(1, "stock", 100.0, 50.0),  # an old-style pair: no requests
        _round(1, "patched", 100.0, 50.0),
        _round_with_requests(2, "patched", [_req(0, 90.0)]),  # cut short
        _round_with_requests(3, "stock", [_req(0, 80.0, ok=False)]),
        _round_with_requests(3, "patched", [_req(0, 81.0)]),  # nothing left
    ]
    assert bench_pd.request_pairs(rounds, "ttft_ms") == [
        [(100.0, 101.0), (130.0, 131.0)]
    ]
    assert bench_pd.request_pairs(rounds, "tpot_ms") == [[(10.0, 10.0)]]
    other = [
        _round_with_requests(0, "stock", [_req(0, 100.0, prompt_tokens=1024)]),
        _round_with_requests(0, "patched", [_req(0, 100.0, prompt_tokens=2048)]),
    ]
    with pytest.raises(ValueError, match="prompt tokens"):
        bench_pd.request_pairs(other, "ttft_ms")


def test_per_request_ratio_is_exp_of_mean_log_ratio_per_pair():
    rounds = [
        # pair 0: ratios 2 and 1/2 -> mean log 0
        _round_with_requests(0, "stock", [_req(0, 100.0, 10.0), _req(1, 100.0, 10.0)]),
        _round_with_requests(0, "patched", [_req(0, 200.0, 10.0), _req(1, 50.0, 10.0)]),
        # pair 1: three requests of ratio 1.1 -> mean log = log 1.1; TPOT x1.21
        _round_with_requests(
            1, "patched", [_req(i, 110.0 + 11 * i, 12.1) for i in range(3)]
        ),
        _round_with_requests(
            1, "stock", [_req(i, 100.0 + 10 * i, 10.0) for i in range(3)]
        ),
    ]
    r = bench_pd.ratios(rounds, resamples=200)
    ttft = r["ttft_per_request"]
    # Each pair weighs alike: exp((0 + log 1.1) / 2), not 1.1 ** (3 / 5) as
    # with each request alike, nor the ratio of means (1.16).
    assert ttft["ratio"] == round(1.1**0.5, 4)
    assert (ttft["pairs"], ttft["requests"], ttft["resamples"]) == (2, 5, 200)
    assert r["tpot_per_request"]["ratio"] == 1.1  # exp((0 + log 1.21) / 2)
    assert r["ttft_p50_ms"]["ratio"] == 1.0  # the summaries (all alike) stay apart
    lo, hi = ttft["ci95"]
    assert lo == 1.0 and hi == 1.1  # a resample of two pairs: m0 twice or m1 twice


def test_per_request_ci_brackets_the_ratio_narrows_with_pairs_resamples_pairs():
    rng = random.Random(2)

    def groups(pairs, requests=16):
        out = []
        for _ in range(pairs):
            drift = rng.gauss(0, 0.02)  # the pair's own state, both trees alike
            out.append(
                [
                    (s, s * 0.97 * math.exp(drift + rng.gauss(0, 0.05)))
                    for s in (rng.choice([100.0, 800.0]) for _ in range(requests))
                ]
            )
        return out

    few, many = groups(4), groups(64)
    r_few = bench_pd.bootstrap_log_ratio(few, resamples=2000)
    r_many = bench_pd.bootstrap_log_ratio(many, resamples=2000)
    for r in (r_few, r_many):
        lo, hi = r["ci95"]
        assert lo <= r["ratio"] <= hi
    assert r_many["half_width_pct"] < r_few["half_width_pct"]
    assert r_many["ci95"][0] < 0.97 < r_many["ci95"][1]  # the true ratio
    assert bench_pd.bootstrap_log_ratio(few, resamples=2000) == r_few
    assert bench_pd.bootstrap_log_ratio([]) is None
    same = bench_pd.bootstrap_log_ratio([[(10.0, 10.0)] * 3] * 5, resamples=100)
    assert same["ratio"] == 1.0 and same["ci95"] == [1.0, 1.0]
    # Pairs, not requests, are resampled: ten copies of each request add no
    # information about drift between rounds and leave the interval as it is.
    tenfold = [g * 10 for g in few]
    r_ten = bench_pd.bootstrap_log_ratio(tenfold, resamples=2000)
    assert r_ten["ci95"] == r_few["ci95"] and r_ten["requests"] == 10 * 64


def test_per_request_ci_covers_the_true_ratio_about_95_percent():
    """Fixed seeds: 300 simulated runs of 16 pairs with pair-level drift."""
    rng = random.Random(3)
    covered = 0
    for _ in range(300):
        groups = []
        for _ in range(16):
            drift = rng.gauss(0, 0.02)
            groups.append(
                [(100.0, 100.0 * 0.98 * math.exp(drift + rng.gauss(0, 0.03)))] * 4
            )
        lo, hi = bench_pd.bootstrap_log_ratio(groups, resamples=400)["ci95"]
        covered += lo <= 0.98 <= hi
    # A percentile bootstrap of 16 pairs covers a bit under 95%; an 80%
    # interval would cover about 80%.
    assert 0.88 <= covered / 300 <= 0.99


def _write_run(path, rounds, workload="w"):
    path.write_text(json.dumps({"workload": workload, "rounds": rounds}))
    return path


def test_bench_combine_old_runs_without_requests_and_mixed_with_new(tmp_path, capsys):
    import bench_combine

    old = [
        _round(k, t, 100.0 + k, 50.0) for k in range(3) for t in ("stock", "patched")
    ]
    a = _write_run(tmp_path / "a.json", old)
    b = _write_run(tmp_path / "b.json", old)
    assert bench_combine.main([str(a), str(b), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "| output tokens/s | 1.0000 | 1.0000-1.0000 | 0.00 | 6 |" in out
    assert "| TTFT p50 (ms) | 1.0000 |" in out
    assert "per-request" not in out
    new = [
        _round_with_requests(k, t, [_req(0, 100.0 if t == "stock" else 105.0)])
        for k in range(2)
        for t in ("stock", "patched")
    ]
    c = _write_run(tmp_path / "c.json", new)
    assert bench_combine.main([str(a), str(c), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "| output tokens/s | 1.0000 | 1.0000-1.0000 | 0.00 | 5 |" in out
    assert "| TTFT (per-request paired) | 1.0500 | 1.0500-1.0500 | 0.00 | 2 |" in out
    assert "| TPOT (per-request paired) | 1.0000 |" in out


def test_report_shows_per_request_and_gpu_state_only_when_recorded(tmp_path):
    old = {"rounds": [_round(0, t, 100.0, 50.0) for t in ("stock", "patched")]}
    bench_pd.save(tmp_path, old, resamples=100)
    md = (tmp_path / "bench_pd.md").read_text()
    saved = json.loads((tmp_path / "bench_pd.json").read_text())
    assert "per-request" not in md.lower() and "GPU state" not in md
    assert "ttft_per_request" not in saved["ratios"]
    gpu = {"index": 0, "sm_mhz": 1980, "mem_mhz": 3201, "pstate": "P0"}
    rounds = []
    for tree, ttft in (("stock", 100.0), ("patched", 102.0)):
        r = _round_with_requests(0, tree, [_req(0, ttft)])
        r["start_unix_s"] = 86400.0 + 61  # 00:01:01 UTC
        r["gpu_before"] = {"unix_s": 1.0, "gpus": [dict(gpu, throttle="0x1")]}
        r["gpu_after"] = {
            "unix_s": 2.0,
            "gpus": [dict(gpu, sm_mhz=1755, throttle="0x24")],
        }
        rounds.append(r)
    rounds[1]["gpu_after"] = {"unix_s": 2.0, "error": "nvidia-smi: gone"}
    bench_pd.save(tmp_path, {"rounds": rounds}, resamples=100)
    md = (tmp_path / "bench_pd.md").read_text()
    saved = json.loads((tmp_path / "bench_pd.json").read_text())
    assert saved["ratios"]["ttft_per_request"]["ratio"] == 1.02
    assert saved["rounds"][0]["requests"] == rounds[0]["requests"]
    assert "| TTFT (per-request paired) | 1.0200 | 1.0200-1.0200 | 0.00 | 1 | 1 |" in md
    assert (
        "| 0 | stock | 00:01:01 | 10.0 | 0 | 1980 -> 1755 | 3201 -> 3201 | - -> - "
        "| - -> - | P0 -> P0 | idle -> sw-power-cap+sw-thermal |"
    ) in md
    assert "| 1 | patched | 00:01:01 | 10.0 | error: nvidia-smi: gone |" in md


def test_bench_combine_runs_without_the_gpu_client(tmp_path):
    """Pooling result files needs no aiohttp (a bare python3 elsewhere)."""
    import subprocess

    rounds = [_round(k, t, 100.0, 50.0) for k in range(2) for t in ("stock", "patched")]
    run = _write_run(tmp_path / "a.json", rounds)
    code = (
        "import sys; sys.modules['aiohttp'] = None; "  # import aiohttp fails
        f"sys.path.insert(0, {str(ROOT / 'ci' / 'gpu')!r}); "
        f"import bench_combine; sys.exit(bench_combine.main([{str(run)!r}]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| output tokens/s | 1.0000 |" in proc.stdout
