"""Tiny models and tokenizers built locally: for tests, benchmarks and the demo (no hub).

``train_tokenizer`` makes a byte-level BPE tokenizer (digits split into single tokens, which
arithmetic needs) in well under a second. ``tiny_config`` / ``save_tiny_model`` make a random
model of a real family and save it as an ordinary Hugging Face folder. The mixture-of-experts
families (``MOE_FAMILIES``: Mixtral, Qwen2-MoE with a shared expert and its gate, Qwen3-MoE,
OLMoE) get 4 experts, top-2 routing and experts as wide as the hidden size unless overridden
(``n_experts``, ``top_k``); ``save_pretrained`` writes them in the hub's per-expert layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "olmo2", "qwen2", "qwen3", "gemma2", "gpt2", "gpt_neox", "phi")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
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
        if family in ("gemma2", "qwen3", "qwen3_moe"):
            kw["head_dim"] = hidden // n_heads
        if family == "phi":
            kw.pop("num_key_value_heads")
        if family in MOE_FAMILIES:
            kw.update(_moe_config(family, intermediate, overrides))
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def _moe_config(family: str, intermediate: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Expert settings of a tiny MoE config (``n_experts`` and ``top_k`` are popped from
    ``overrides``): every block sparse, the router's auxiliary loss off by default."""
    n = int(overrides.pop("n_experts", 4))
    k = int(overrides.pop("top_k", 2))
    kw: dict[str, Any] = {"num_experts_per_tok": k, "output_router_logits": False}
    kw["num_local_experts" if family == "mixtral" else "num_experts"] = n
    if family in ("qwen2_moe", "qwen3_moe"):
        kw.update(moe_intermediate_size=intermediate, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen3_moe":
        kw["norm_topk_prob"] = True  # as the released Qwen3-MoE models (and llama.cpp)
    if family == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = intermediate
    return kw


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


_GGUF_ARCH = {"llama": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
               "mlp.shared_expert.up_proj": "ffn_up_shexp",
               "mlp.shared_expert.down_proj": "ffn_down_shexp",
               "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def save_tiny_gguf(folder: str | Path, out: str | Path) -> Path:
    """Write a tiny Hugging Face folder (``save_tiny_model``) of the Llama, Qwen2-MoE or
    Qwen3-MoE family as a float32 GGUF file, the way llama.cpp's converter does (llama.cpp
    tensor names, Llama q/k rows permuted, each block's experts stacked into
    ``ffn_{gate,up,down}_exps`` ``[E, ...]``, the byte-level BPE vocabulary and merges): a GGUF
    for tests that need no network. Needs the ``gguf`` package."""
    import json

    import gguf
    from safetensors.torch import load_file

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text())
    family = cfg.get("model_type")
    if family not in _GGUF_ARCH:
        raise ValueError(f"save_tiny_gguf writes {', '.join(_GGUF_ARCH)} models only")
    w = gguf.GGUFWriter(str(out), _GGUF_ARCH[family])
    _gguf_metadata(w, cfg)
    _gguf_tokenizer(w, folder)
    for name, t in _gguf_tensors(load_file(str(folder / "model.safetensors")), cfg):
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _gguf_metadata(w: Any, cfg: dict[str, Any]) -> None:
    n_head = cfg["num_attention_heads"]
    w.add_name("sftscope-tiny")
    w.add_context_length(cfg.get("max_position_embeddings", 256))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 1e4)
    w.add_rope_freq_base(float(rope))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    from sftscope.load.arch import moe_info

    info = moe_info(cfg)
    if info is not None:
        w.add_expert_count(info.n_experts)
        w.add_expert_used_count(info.top_k)
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(0)  # all float32


def _gguf_tokenizer(w: Any, folder: Path) -> None:
    import json

    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    for name, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                      ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
        if tcfg.get(name) in vocab:
            add(vocab[tcfg[name]])


def _gguf_tensors(sd: dict[str, torch.Tensor], cfg: dict[str, Any]):
    """``(gguf name, tensor)`` pairs: blocks' tensors renamed, per-expert tensors stacked."""
    import re

    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    llama = cfg["model_type"] == "llama"

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:
        return (t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
                .swapaxes(1, 2).reshape(t.shape))

    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in sd.items():
        if key in _GGUF_TOP:
            yield _GGUF_TOP[key], t
            continue
        _, _, i, rest = key.split(".", 3)
        mod, param = rest.rsplit(".", 1)
        if m := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj", mod):
            experts.setdefault((i, m.group(2)), {})[int(m.group(1))] = t
            continue
        if llama and mod in ("self_attn.q_proj", "self_attn.k_proj"):
            t = permute(t, n_head if mod.endswith("q_proj") else n_kv)
        if mod == "mlp.shared_expert_gate":
            t = t.reshape(-1)  # llama.cpp stores the [1, H] gate as a vector
        yield f"blk.{i}.{_GGUF_BLOCK[mod]}.{param}", t
    for (i, proj), per in experts.items():
        yield f"blk.{i}.ffn_{proj}_exps.weight", torch.stack([per[e] for e in sorted(per)])
