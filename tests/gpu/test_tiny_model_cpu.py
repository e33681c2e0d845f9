"""The tiny model and the workload's prompts, checked with transformers on CPU."""

from __future__ import annotations

import hashlib

import pytest
import tiny_model
import workload
from servers import MAX_NUM_BATCHED_TOKENS

pytestmark = pytest.mark.cpu

transformers = pytest.importorskip("transformers")


def digest(path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model.build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_build_is_deterministic(model_dir, tmp_path):
    assert digest(tiny_model.build(tmp_path / "again")) == digest(model_dir)


def test_tokenizer_and_chat_template(tokenizer, model_dir):
    assert (model_dir / "tokenizer.json").exists()
    assert '"chat_template"' in (model_dir / "tokenizer_config.json").read_text()
    text = "the engine cache of the tensor"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) < 10
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_model_generates_context_dependent_text(model_dir, tokenizer):
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    assert model.config.vocab_size == len(tokenizer)

    def greedy(text: str) -> list[int]:
        enc = tokenizer(text, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        return out[0, enc.input_ids.shape[1] :].tolist()

    tail = " the engine cache of the tensor"
    first = greedy("water long little very after" + tail)
    assert first == greedy("water long little very after" + tail)
    assert first != greedy("sun ways thing whole hear" + tail)  # not the tail alone


def test_workload_prompt_lengths(tokenizer):
    requests = workload.build_requests(16)
    assert len(requests) == 16
    lengths = {}
    for req in requests:
        if req.path == workload.CHAT:
            ids = tokenizer.apply_chat_template(
                req.body["messages"], add_generation_prompt=True
            )
        else:
            ids = tokenizer(req.body["prompt"]).input_ids
        limit = req.body.get("max_tokens") or req.body["max_completion_tokens"]
        assert len(ids) + limit <= 1024, req.name
        lengths[req.name] = len(ids)
    assert max(lengths.values()) > MAX_NUM_BATCHED_TOKENS  # one is chunked
    assert min(lengths.values()) < 16
    assert {r.path for r in requests} == {workload.COMPLETIONS, workload.CHAT}
    assert [r.body.get("n", 1) for r in requests].count(2) == 1
