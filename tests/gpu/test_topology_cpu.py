"""Where the engines of a cell run, and with which environment (CPU only)."""

from __future__ import annotations

import json

import pytest
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
        "--enforce-eager",
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
