"""Where the engines of a cell run, with which environment and execution
mode (CPU only)."""

from __future__ import annotations

import argparse
import json

import pytest
import servers
from servers import RANDOMIZATION_OFF, plan_pd, plan_reference

pytestmark = pytest.mark.cpu

PORTS = (8100, 21001, 8200, 22001)


def test_one_gpu_two_nccl_hosts_over_loopback():
    prefill, decode = plan_pd(["0"], send_type="PUT", randomization=True, ports=PORTS)
    assert prefill.env == {
        "CUDA_VISIBLE_DEVICES": "0",
        "NCCL_NVLS_ENABLE": "0",
        RANDOMIZATION_OFF: None,
        "NCCL_HOSTID": "prefill0",
        "NCCL_SOCKET_IFNAME": "lo",
    }
    assert decode.env == {
        "CUDA_VISIBLE_DEVICES": "0",
        "NCCL_NVLS_ENABLE": "0",
        RANDOMIZATION_OFF: None,
        "NCCL_HOSTID": "decode0",
        "NCCL_SOCKET_IFNAME": "lo",
    }


@pytest.mark.parametrize("gpus", [["0", "1"], ["0", "1", "2", "3"]])
def test_two_gpus_one_engine_each(gpus):
    prefill, decode = plan_pd(
        gpus, send_type="GET", randomization=False, ports=PORTS, slot=2
    )
    assert prefill.env == {
        "CUDA_VISIBLE_DEVICES": "0",
        "NCCL_NVLS_ENABLE": "0",
        RANDOMIZATION_OFF: "1",
    }
    assert decode.env == dict(prefill.env, CUDA_VISIBLE_DEVICES="1")
    assert (prefill.name, decode.name) == ("prefill2", "decode2")
    assert plan_reference(gpus, 8300).env == {"CUDA_VISIBLE_DEVICES": "0"}


def test_slots_get_their_own_nccl_host_ids():
    prefill, decode = plan_pd(
        ["3"], send_type="PUT", randomization=True, ports=PORTS, slot=1
    )
    assert (prefill.env["NCCL_HOSTID"], decode.env["NCCL_HOSTID"]) == (
        "prefill1",
        "decode1",
    )
    assert prefill.env["CUDA_VISIBLE_DEVICES"] == decode.env["CUDA_VISIBLE_DEVICES"]


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC", "GET"])
def test_kv_transfer_config(send_type):
    prefill, decode = plan_pd(
        ["0"], send_type=send_type, randomization=True, ports=PORTS
    )
    args = prefill.args("/models/tiny")
    [kv_arg] = [a for a in args if a.startswith("--kv-transfer-config=")]
    config = json.loads(kv_arg.split("=", 1)[1])
    assert config == {
        "kv_connector": "P2pNcclConnector",
        "kv_role": "kv_producer",
        "kv_port": 21001,
        "kv_buffer_size": 1e9,
        "kv_connector_extra_config": {
            "send_type": send_type,
            "mem_pool_size_gb": "1",
            "nccl_num_channels": "2",
            "http_port": "8100",
        },
    }
    assert decode.kv_transfer_config()["kv_role"] == "kv_consumer"
    assert (prefill.kv_address, decode.kv_address) == (
        "127.0.0.1:21001",
        "127.0.0.1:22001",
    )
    for flag in (
        "--max-model-len=1024",
        "--kv-cache-memory-bytes=536870912",
        "--max-num-batched-tokens=256",
    ):
        assert flag in args


def test_reference_has_no_kv_transfer():
    spec = plan_reference(["0"], 8300)
    assert not any(a.startswith("--kv-transfer-config") for a in spec.args("/m"))


def test_bad_input():
    with pytest.raises(ValueError):
        plan_pd([], send_type="PUT", randomization=True, ports=PORTS)
    with pytest.raises(ValueError):
        plan_pd(["0"], send_type="PULL", randomization=True, ports=PORTS)


# ---- execution modes

MODE_FLAGS = ("--enforce-eager", "--compilation-config", "--async-scheduling")


def _engines(mode: str | None) -> list[servers.EngineSpec]:
    """Prefill, decode and reference, planned as the scripts plan them."""
    kw = {} if mode is None else {"mode": mode}
    prefill, decode = plan_pd(
        ["0", "1"], send_type="PUT", randomization=True, ports=PORTS, **kw
    )
    return [prefill, decode, plan_reference(["0", "1"], 8300, **kw)]


def test_default_mode_is_vllms_own_no_eager_no_graph_settings():
    assert "--enforce-eager" not in servers.ENGINE_ARGS
    for spec in _engines(None):
        assert spec.mode == servers.DEFAULT_MODE == "default"
        args = spec.args("/m")
        assert not [a for a in args if a.startswith(MODE_FLAGS)]
        assert "--no-async-scheduling" not in args
        assert "VLLM_USE_V2_MODEL_RUNNER" not in spec.environment()
        assert spec.environment() == {**servers.COMMON_ENV, **spec.env}
    assert servers.describe_mode("default") == "default (vLLM defaults)"


PIECEWISE = '--compilation-config={"cudagraph_mode": "PIECEWISE"}'
V1 = {"VLLM_USE_V2_MODEL_RUNNER": "0"}


@pytest.mark.parametrize(
    "mode, args, env",
    [
        ("eager", ["--enforce-eager"], {}),
        ("piecewise", [PIECEWISE], {}),
        ("full", ['--compilation-config={"cudagraph_mode": "FULL"}'], {}),
        (
            "full_decode_only",
            ['--compilation-config={"cudagraph_mode": "FULL_DECODE_ONLY"}'],
            {},
        ),
        ("v1", [], V1),
        ("sync", ["--no-async-scheduling"], {}),
        ("async", ["--async-scheduling"], {}),
        ("v1-eager", ["--enforce-eager"], V1),
        ("piecewise-sync", [PIECEWISE, "--no-async-scheduling"], {}),
    ],
)
def test_a_variant_adds_its_args_and_env_to_the_pair_and_the_reference(mode, args, env):
    assert servers.mode_settings(mode) == (args, env)
    for spec in _engines(mode):
        assert spec.mode == mode
        spec_args = spec.args("/m")
        # after the tier's own arguments, before the KV transfer config
        start = spec_args.index(servers.ENGINE_ARGS[-1]) + 1
        end = start + len(args)
        assert spec_args[start:end] == args
        last = [a.split("=", 1)[0] for a in spec_args[end:]]
        assert last == (["--kv-transfer-config"] if spec.kv_role else [])
        assert spec.environment() == {**servers.COMMON_ENV, **env, **spec.env}


def test_extra_args_and_env_of_a_spec_win_over_the_mode():
    spec = servers.EngineSpec(
        "e", 8000, dict(V1, VLLM_USE_V2_MODEL_RUNNER="1"), mode="v1-eager"
    )
    spec.extra_args = ["--no-async-scheduling"]
    assert spec.args("/m")[-2:] == ["--enforce-eager", "--no-async-scheduling"]
    assert spec.environment()["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_stacks_give_the_pair_and_the_reference_the_same_mode(monkeypatch, tmp_path):
    """Nothing is started: start_engine records what it was given."""
    started = []

    def fake_start_engine(spec, model_dir, log_dir, **kw):
        started.append((spec.name, spec.mode, spec.args(model_dir)))
        return servers.Server(spec.name, servers.url(spec), None, tmp_path / "log")

    def fake_start_proxy(*args, **kw):
        return servers.Server("proxy", "http://127.0.0.1:1", None, tmp_path / "log")

    monkeypatch.setattr(servers, "start_engine", fake_start_engine)
    monkeypatch.setattr(servers, "start_proxy", fake_start_proxy)
    monkeypatch.setattr(servers.ServerGroup, "wait_healthy", lambda self: None)
    monkeypatch.setattr(servers.ServerGroup, "__exit__", lambda self, *exc: None)
    with servers.reference_stack("/m", ["0"], tmp_path, mode="v1-eager"):
        pass
    with servers.pd_stack(
        "/m", ["0"], tmp_path, send_type="GET", randomization=True, mode="v1-eager"
    ):
        pass
    assert [(name, mode) for name, mode, _ in started] == [
        ("reference", "v1-eager"),
        ("prefill0", "v1-eager"),
        ("decode0", "v1-eager"),
    ]
    assert all("--enforce-eager" in args for _, _, args in started)


@pytest.mark.parametrize(
    "bad", ["turbo", "eager-piecewise", "full-eager", "sync-async"]
)
def test_unknown_or_contradicting_modes_are_refused(bad):
    with pytest.raises(ValueError):
        servers.mode_settings(bad)
    with pytest.raises(ValueError):
        plan_reference(["0"], 8300, mode=bad)
    with pytest.raises(argparse.ArgumentTypeError):
        servers.parse_modes(f"default,{bad}")


def test_mode_options():
    assert servers.parse_modes("default") == ["default"]
    assert servers.parse_modes(" default, v1-eager,default,") == ["default", "v1-eager"]
    assert servers.parse_mode("piecewise") == "piecewise"
    for bad in ("", ",", "default,eager"):
        with pytest.raises(argparse.ArgumentTypeError):
            servers.parse_mode(bad)
    assert servers.describe_mode("v1-eager") == (
        "v1-eager (--enforce-eager VLLM_USE_V2_MODEL_RUNNER=0)"
    )


def test_free_ports_never_hands_out_a_port_twice():
    """Engines of one run start after all their ports were chosen: a port
    handed out twice puts two servers on it (one fails to start)."""
    ports = [p for _ in range(200) for p in servers.free_ports(5)]
    assert len(set(ports)) == len(ports)
