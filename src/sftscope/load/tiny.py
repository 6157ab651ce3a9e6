"""Tiny models and tokenizers built locally: for tests, benchmarks and the demo (no hub).

``train_tokenizer`` makes a byte-level BPE tokenizer (digits split into single tokens, which
arithmetic needs) in well under a second. ``tiny_config`` / ``save_tiny_model`` make a random
model of a real family and save it as an ordinary Hugging Face folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "olmo2", "qwen2", "qwen3", "gemma2", "gpt2", "gpt_neox", "phi")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]

_DEFAULT_TEXT = [
    "The quick brown fox jumps over the lazy dog. Question: What is 12 plus 7? Answer: 19.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "#### 72 The sum of 3 and 4 is 7. A train travels 60 miles in 1 hour.",
]


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512,
                    chat_template: str | None = None):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts) if texts is not None else _DEFAULT_TEXT * 4,
                            trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        unk_token="<|unk|>",
    )
    fast.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
    return fast


DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_config(family: str, vocab_size: int, n_layers: int = 4, hidden: int = 32,
                n_heads: int = 4, n_kv_heads: int | None = None, intermediate: int | None = None,
                max_positions: int = 256, **overrides: Any):
    """A small config of a real family (random weights when instantiated)."""
    from transformers import AutoConfig

    intermediate = intermediate or 2 * hidden
    n_kv_heads = n_kv_heads or max(1, n_heads // 2)
    if family == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=hidden, n_layer=n_layers, n_head=n_heads,
                  n_positions=max_positions, n_inner=intermediate, bos_token_id=1,
                  eos_token_id=2)
    elif family == "gpt_neox":
        kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, intermediate_size=intermediate,
                  max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2)
    else:
        kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                  intermediate_size=intermediate, max_position_embeddings=max_positions,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        if family in ("gemma2", "qwen3"):
            kw["head_dim"] = hidden // n_heads
        if family == "phi":
            kw.pop("num_key_value_heads")
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def build_tiny_model(family: str, vocab_size: int, seed: int = 0, **config_kw: Any):
    """A random ``*ForCausalLM`` of ``family``, deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size, **config_kw)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def save_tiny_model(out: str | Path, family: str = "llama", seed: int = 0, tokenizer=None,
                    **config_kw: Any) -> Path:
    """Build a tiny model + tokenizer and save both as a Hugging Face folder."""
    tok = tokenizer or train_tokenizer()
    model = build_tiny_model(family, vocab_size=len(tok), seed=seed, **config_kw)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
