"""A tiny random-weight Llama with a locally trained tokenizer (no downloads).

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a
built-in corpus; its tokenizer_config.json carries a chat template, so vLLM
serves both /v1/completions and /v1/chat/completions. Weights come from a
fixed seed, so every build of the same parameters gives the same model.

    python tests/gpu/tiny_model.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
BOS, EOS = "<|bos|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORD_TEXT = """
the a of and to in is it that was for on are as with his they at be this from
have or by one had not but what all were when we there can an your which their
said if do will each about how up out them then she many some so these would
other into has more her two like him see time could no make than first been its
who now people my made over did down only way find use may water long little
very after words called just where most know get through back much before go
good new write our used me man too any day same right look think also around
another came come work three word must because does part even place well such
here take why things help put years different away again off went old number
great tell men say small every found still between name should home big give air
line set own under read last never us left end along while might next sound
below saw something thought both few those always looked show large often
together asked house world going want school important until form food keep
children feet land side without boy once animals life enough took sometimes four
head above kind began almost live page got earth need far hand high year mother
light parts country father let night following picture being study second eyes
soon times story boys since white days ever paper hard near sentence better best
across during today others however sure means knew try told young miles sun ways
thing whole hear example heard several change answer room sea against top turned
learn point city play toward five using himself usually river engine cache
tensor layer token prefill decode transfer memory
"""
WORDS = tuple(_WORD_TEXT.split())


def sentence(rng: random.Random, num_words: int) -> str:
    """Return ``num_words`` random words from WORDS as one lowercase string."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def corpus(num_lines: int = 3000, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        text = sentence(rng, rng.randint(4, 24))
        lines.append(text[0].upper() + text[1:] + rng.choice(".?!,;:"))
    return lines


def train_tokenizer(vocab_size: int = 1024, seed: int = SEED):
    """Train a byte-level BPE tokenizer and wrap it for transformers."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1024,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
    )


def build(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    dtype: str = "float16",
    seed: int = SEED,
) -> Path:
    """Build the model into ``out_dir`` (reused when already built alike)."""
    out = Path(out_dir)
    params = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "dtype": dtype,
        "seed": seed,
        "version": 1,
    }
    marker = out / "tiny_model.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return out

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(seed=seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=1024,
        # Larger than the usual 0.02: sharper attention and wider logit gaps,
        # so greedy outputs depend on the context but not on rounding noise.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Keep the chat template inside tokenizer_config.json (older readers
    # ignore chat_template.jinja).
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    marker.write_text(json.dumps(params) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    print(build(args.out_dir, dtype=args.dtype))


if __name__ == "__main__":
    main()
