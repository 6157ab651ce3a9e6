"""Train the demo Base/SFT pair on a CPU in minutes: a real pair with real training dynamics.

``build_demo_pair`` generates the corpus (``demo.corpus``), trains a byte-level BPE tokenizer
(digits split), pre-trains a small decoder of a real family (Llama by default, 10 blocks) as the
BASE on the pre-training text, then fully fine-tunes a copy as the SFT model on
``Question: ...\\nAnswer: <worked solution>\\n#### N`` records (loss on the completion only) with
25 % pre-training text mixed in. Both are saved as ordinary Hugging Face folders with the same
tokenizer, and cached: a second call with the same settings reads ``manifest.json`` and returns
at once; ``force=True`` retrains.

Training goes through ``transformers.Trainer`` (no checkpoints written; progress bars unless
``SFTSCOPE_NO_PROGRESS`` is set); it costs ~3 % over a bare loop at the full size, ~15 % at the
quick size. ``FULL`` trains data parallel in two worker processes of one thread each
(``demo.training``: the same batches as one process, gradients summed across the two), started
while the corpus and tokenizer are made; ``QUICK`` trains in this process. Fixed seed, fixed step
counts and fixed rank and thread counts make the pair reproducible (byte-identical).

``FULL``: 10 blocks, hidden 64 (0.71M parameters), numbers up to 30, 1800 base steps of
8 x 128 tokens, 400 SFT steps; about 3.5 minutes on two idle cores (197 s on 2026-12-07: base
151 s, SFT 34 s). The base learns some arithmetic and answers ``The answer is 14.``; the SFT
writes the worked solution and ``#### N`` (format 0 % -> 100 %, held-out accuracy 10 % -> 60 %
for seed 0). The base is what costs: with 1500 base steps the SFT reached 22-43 % whatever the
rates tried, with 2000 54-57 % (``bench/README.md``). Small batches matter: the same tokens in
16-sequence batches (half the steps) left seed 1 without arithmetic (30 %, numbers up to 50).
``QUICK`` (~17 s, hidden 32): learns the format, not the arithmetic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftscope.demo.corpus import (
    DOC_MIX,
    FILES,
    Corpus,
    format_prompt,
    make_corpus,
    write_corpus,
)
from sftscope.demo.training import THREADS, Blocks, Phase, Ranks, train
from sftscope.errors import SftscopeError
from sftscope.io import Timer, read_json, run_record, stable_hash, write_json
from sftscope.load.data import pad_batch
from sftscope.load.runtime import cpu_cores, torch_threads
from sftscope.process import cpu_seconds
from sftscope.progress import enabled as progress_enabled
from sftscope.progress import say
from sftscope.tasks.base import trim_at_stop
from sftscope.tasks.gsm8k import extract_flexible, extract_strict
from sftscope.version import __version__

DEMO_FAMILIES = ("llama", "olmo2")
MOE_DEMO_FAMILY = "mixtral"  # ``sftscope demo --moe``: a mixture of experts, every block sparse
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PairConfig:
    """Sizes and steps of the demo pair (``FULL`` and ``QUICK`` are the two presets).

    Steps are fixed (not time-based) so the pair is reproducible; tokens per step are
    ``batch_size * seq_len``.
    """

    n_layers: int = 10
    hidden: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate: int = 256
    vocab_size: int = 768
    seq_len: int = 128
    batch_size: int = 8
    base_steps: int = 1800
    base_lr: float = 3e-3
    sft_steps: int = 400
    sft_lr: float = 1.25e-3
    sft_pretrain_mix: float = 0.25
    warmup_frac: float = 0.05
    n_pretrain: int = 30_000
    n_sft: int = 3_000
    n_test: int = 200
    n_train: int = 500
    n_general: int = 200
    max_number: int = 30
    eval_items: int = 50
    eval_new_tokens: int = 64
    n_experts: int = 0  # routed experts per block (0: a dense MLP)
    top_k: int = 0      # experts per token
    base_seq_len: int = 0
    """block length of the base phase (0: ``seq_len``), with ``batch_size * seq_len //
    base_seq_len`` blocks a step: the same tokens a step in shorter blocks cost less attention.
    The SFT phase keeps ``seq_len`` (its examples are up to ~80 tokens)."""
    optim: str = "adamw_torch"
    """the optimizer (a ``transformers`` ``optim`` name)"""
    doc_mix: tuple[tuple[str, float], ...] = tuple(DOC_MIX.items())
    """shares of the pre-training document kinds (``demo.corpus.DOC_MIX``)"""
    ranks: int = 2
    """processes that train each phase, data parallel (``demo.training``): each step trains on
    the same examples as one process would, but the gradient sums round differently, so it is
    part of the cache key. Two ranks of one thread each train ``FULL``'s base step in 87-93 ms
    against 125 ms for one process of one thread (idle 2-core box, in the demo)."""
    threads: int = 1
    """torch threads of each training process (0: the cores this process may use, shared by the
    ranks). Fixed when training starts and never adapted to the machine's load, so that one
    seed gives the same weights however busy the machine is (a count chosen from the load gave
    two runs of one commit different checkpoints). Not part of the cache key. One thread is
    faster than two for these tiny matrices: the CLI's OpenMP threads sleep between operations
    (``process.py``), and a training step is thousands of small ones (idle 2-core box,
    ``FULL``'s base step in ``transformers.Trainer``: 118 ms on one thread, 164 ms on two;
    87 ms on two spinning threads, which a busy machine punishes)."""


FULL = PairConfig()
QUICK = PairConfig(
    hidden=32, intermediate=64, vocab_size=512, seq_len=96, batch_size=8, base_steps=250,
    sft_steps=120, sft_lr=2e-3, n_pretrain=1_500, n_sft=300, n_test=40, n_train=60,
    n_general=40, eval_items=16, eval_new_tokens=32, threads=1, ranks=1, max_number=50,
)
# ``--moe``: 4 experts of width 64, top-2, in every block; an MoE step costs about 2.3x a
# dense one of the same width, so fewer steps than FULL keep the pair short (117 s on two
# idle cores, 2026-12-07). Its numbers (up to 50) and SFT rate are the recipe it was measured
# with, pinned here so that a change of FULL's leaves the MoE pair as it is.
MOE_FULL = dataclasses.replace(FULL, intermediate=64, n_experts=4, top_k=2, base_steps=900,
                               sft_steps=250, sft_lr=1e-3, n_pretrain=12_000, n_sft=1_500,
                               threads=0, max_number=50)
MOE_QUICK = dataclasses.replace(QUICK, intermediate=32, n_experts=4, top_k=2, base_steps=120,
                                sft_steps=60)


@dataclass
class DemoPair:
    """Where the demo pair lies and how it was made (``cached`` says it was found, not trained).

    ``metrics`` holds, for ``base`` and ``sft``: mean completion loss on the held-out test items
    (``test_loss_*``), token loss on held-out general text (``general_loss_*``), and on
    ``eval_items`` test items by greedy generation: ``format_*`` (share with a ``#### N``
    line), ``strict_acc_*`` (``#### N`` correct) and ``flex_acc_*`` (last number correct).
    """

    out_dir: Path
    base_dir: Path
    sft_dir: Path
    data_dir: Path
    data_files: dict[str, Path]
    seed: int
    family: str
    quick: bool
    key: str
    cached: bool
    config: dict[str, Any]
    n_blocks: int
    n_params: int
    tokenizer: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    loss_history: dict[str, list[list[float]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- datasets


def _encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, padding or truncation (fast, batched)."""
    bt = tok.backend_tokenizer
    if bt.padding is not None or bt.truncation is not None:
        # a padded ``tok(...)`` call leaves padding switched on in the backend: use a clean copy
        from tokenizers import Tokenizer

        bt = Tokenizer.from_str(bt.to_str())
        bt.no_padding()
        bt.no_truncation()
    return [e.ids for e in bt.encode_batch(texts, add_special_tokens=False)]


def _pack_stream(docs: list[list[int]], eos: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents (each ending in EOS) and cut into ``seq_len`` blocks."""
    flat = [t for d in docs for t in (*d, eos)]
    n = len(flat) // seq_len
    if n == 0:
        raise SftscopeError("the demo pre-training text is shorter than one block; raise "
                            "n_pretrain")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _sft_examples(tok, records: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of SFT records: no loss on the prompt, loss on answer + EOS.

    Prompt and completion are encoded apart and joined, exactly the split a caller sees when it
    tokenizes ``Question: ...\nAnswer:`` and then generates (the completion starts with a space).
    """
    prompts = _encode(tok, [format_prompt(r["question"]) for r in records])
    comps = _encode(tok, [" " + r["answer"] for r in records])
    return [(p + c + [tok.eos_token_id], [-100] * len(p) + c + [tok.eos_token_id])
            for p, c in zip(prompts, comps)]


def _pack_sft(examples: list[tuple[list[int], list[int]]], pad: int,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy packing of whole examples into blocks; the tail of a block is padding (no loss).

    Right padding under causal attention changes nothing before it, so no mask is needed.
    """
    blocks: list[tuple[list[int], list[int]]] = []
    cur_i: list[int] = []
    cur_l: list[int] = []
    for ids, lab in examples:
        ids, lab = ids[:seq_len], lab[:seq_len]
        if len(cur_i) + len(ids) > seq_len:
            blocks.append((cur_i, cur_l))
            cur_i, cur_l = [], []
        cur_i, cur_l = cur_i + ids, cur_l + lab
    if cur_i:
        blocks.append((cur_i, cur_l))
    ids_t = torch.full((len(blocks), seq_len), pad, dtype=torch.long)
    lab_t = torch.full((len(blocks), seq_len), -100, dtype=torch.long)
    for i, (a, b) in enumerate(blocks):
        ids_t[i, : len(a)] = torch.tensor(a)
        lab_t[i, : len(b)] = torch.tensor(b)
    return ids_t, lab_t


# ----------------------------------------------------------------------------- training


def _new_model(family: str, vocab_size: int, cfg: PairConfig, seed: int):
    from sftscope.load.tiny import build_tiny_model

    moe = {"n_experts": cfg.n_experts, "top_k": cfg.top_k} if cfg.n_experts else {}
    return build_tiny_model(
        family, vocab_size, seed=seed, n_layers=cfg.n_layers, hidden=cfg.hidden,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, intermediate=cfg.intermediate,
        max_positions=_max_positions(cfg), **moe,
    )


def _training(name: str, cfg: PairConfig, seed: int) -> Phase:
    """The training settings of the ``base`` or the ``sft`` phase."""
    base = name == "base"
    threads = cfg.threads or max(1, cpu_cores() // cfg.ranks)
    return Phase(name=name, steps=cfg.base_steps if base else cfg.sft_steps,
                 lr=cfg.base_lr if base else cfg.sft_lr,
                 batch_size=_base_batch(cfg) if base else cfg.batch_size, seed=seed,
                 warmup_frac=cfg.warmup_frac, optim=cfg.optim, threads=threads,
                 ranks=cfg.ranks)


def _workers(cfg: PairConfig, seed: int, work: Path):
    """The training worker processes (``demo.training.Ranks``), or a no-op for one rank."""
    if cfg.ranks == 1:
        return contextlib.nullcontext()
    return Ranks(cfg.ranks, _training("base", cfg, seed).threads, work)


def _base_seq_len(cfg: PairConfig) -> int:
    return cfg.base_seq_len or cfg.seq_len


def _base_batch(cfg: PairConfig) -> int:
    """Blocks a base step: the tokens of ``batch_size`` blocks of ``seq_len``."""
    return max(1, cfg.batch_size * cfg.seq_len // _base_seq_len(cfg))


def _max_positions(cfg: PairConfig) -> int:
    return max(256, cfg.seq_len * 2)


def _save(model, tok, target: Path) -> None:
    """Save model + tokenizer as a Hugging Face folder, replacing ``target`` only when done."""
    from transformers import GenerationConfig

    model.config.use_cache = True  # training turned it off; generation wants the KV cache
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        target.chmod(0o755)  # mkdtemp makes it private; a model folder is for everyone to read
        for f in target.iterdir():
            f.chmod(0o644)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- evaluation

# A generated answer ends where a new question or a blank line would start.
DEMO_STOP = ("\n\n", "Question:")


@torch.no_grad()
def _mean_loss(model, pad_id: int, examples: list[tuple[list[int], list[int]]],
               batch_size: int) -> float:
    """Mean next-token loss over the labelled tokens of ``(ids, labels)`` pairs (-100 = skip)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        ids, _ = pad_batch([a for a, _ in chunk], pad_id)
        lab, _ = pad_batch([b for _, b in chunk], -100)
        logits = model(input_ids=ids).logits[:, :-1].float()
        tgt = lab[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
            reduction="sum").item()
        count += int((tgt != -100).sum())
    return total / max(count, 1)


def completion_loss(model, tok, records: list[dict[str, str]], batch_size: int = 32) -> float:
    """Mean loss per answer token (prompt not scored) of ``question``/``answer`` records."""
    return _mean_loss(model, tok.pad_token_id, _sft_examples(tok, records), batch_size)


def text_loss(model, tok, texts: list[str], batch_size: int = 32) -> float:
    """Mean next-token loss over plain texts (each scored on its own)."""
    return _mean_loss(model, tok.pad_token_id, [(e, e) for e in _encode(tok, texts)],
                      batch_size)


@torch.no_grad()
def generate_answers(model, tok, questions: list[str], max_new_tokens: int = 40,
                     batch_size: int = 50) -> list[str]:
    """Greedy completions of ``Question: ...\\nAnswer:`` prompts, cut at a new question."""
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        enc = _encode(tok, [format_prompt(q) for q in questions[i: i + batch_size]])
        # left padding, so every prompt ends where generation starts
        ids, mask = pad_batch(enc, tok.pad_token_id, side="left")
        n = ids.shape[1]
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        texts = tok.batch_decode(gen[:, n:], skip_special_tokens=True)
        out += [trim_at_stop(t, DEMO_STOP) for t in texts]
    return out


def answer_scores(completions: list[str], records: list[dict[str, str]]) -> dict[str, float]:
    """Shares: ``format`` (has ``#### N``), ``strict_acc`` (it is right), ``flex_acc`` (the last
    number is right)."""
    n = max(len(records), 1)
    gold = [extract_strict(r["answer"]) for r in records]
    hashed = [extract_strict(c) for c in completions]
    last = [extract_flexible(c) for c in completions]
    return {
        "format": sum(h is not None for h in hashed) / n,
        "strict_acc": sum(h == g for h, g in zip(hashed, gold)) / n,
        "flex_acc": sum(x == g for x, g in zip(last, gold)) / n,
    }


def evaluate_pair(base, sft, tok, corpus: Corpus, cfg: PairConfig) -> dict[str, float]:
    """Held-out losses and (cheap) greedy-generation accuracy of both models."""
    metrics: dict[str, float] = {}
    items = corpus.gsm8k_test[: cfg.eval_items]
    for name, model in (("base", base), ("sft", sft)):
        model.eval()
        metrics[f"test_loss_{name}"] = completion_loss(model, tok, corpus.gsm8k_test)
        metrics[f"general_loss_{name}"] = text_loss(model, tok, [r["text"] for r in corpus.general])
        if items:
            comps = generate_answers(model, tok, [r["question"] for r in items],
                                     cfg.eval_new_tokens)
            for k, v in answer_scores(comps, items).items():
                metrics[f"{k}_{name}"] = v
    metrics["eval_items"] = len(items)
    return metrics


# ----------------------------------------------------------------------------- the pair


def pair_settings(seed: int, family: str, cfg: PairConfig) -> dict[str, Any]:
    """Everything that decides the pair (hashed into the cache key with the package version)."""
    config = dataclasses.asdict(cfg)
    config.pop("threads")
    return {"seed": seed, "family": family, "config": config, "sftscope": __version__}


def _cached(out_dir: Path, key: str) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        man = read_json(path)
    except SftscopeError:
        return None
    if man.get("key") != key:
        return None
    need = [out_dir / "base" / "config.json", out_dir / "sft" / "config.json",
            out_dir / "base" / "model.safetensors", out_dir / "sft" / "model.safetensors"]
    need += [out_dir / "data" / f for f in FILES.values()]
    return man if all(p.exists() for p in need) else None


def _pair_from_manifest(out_dir: Path, man: dict[str, Any], cached: bool) -> DemoPair:
    data_dir = out_dir / "data"
    return DemoPair(
        out_dir=out_dir, base_dir=out_dir / "base", sft_dir=out_dir / "sft", data_dir=data_dir,
        data_files={k: data_dir / f for k, f in FILES.items()}, seed=man["config"]["seed"],
        family=man["config"]["family"], quick=man["quick"], key=man["key"], cached=cached,
        config=man["config"]["config"], n_blocks=man["n_blocks"], n_params=man["n_params"],
        tokenizer=man["tokenizer"], tokens=man["tokens"], timings=man["timings"],
        cpu_seconds=man.get("cpu_seconds", {}), metrics=man["metrics"],
        loss_history=man.get("loss_history", {}),
    )


def build_demo_pair(out_dir: str | Path, *, seed: int = 0, quick: bool = False,
                    family: str = "llama", force: bool = False,
                    config: PairConfig | None = None, threads: int | None = None,
                    moe: bool = False) -> DemoPair:
    """Train (or find cached) the demo Base/SFT pair under ``out_dir``.

    Layout: ``base/`` and ``sft/`` (Hugging Face folders, same tokenizer), ``data/`` (the corpus
    as JSONL, see ``demo.corpus.FILES``) and ``manifest.json`` (run record + cache key).
    ``quick`` picks the CI-sized preset (~30 s); ``config`` overrides the preset entirely;
    ``threads`` overrides ``config.threads`` (torch threads while training; not in the cache key).
    ``moe``: a Mixtral pair (``MOE_FULL`` / ``MOE_QUICK``: 4 experts, top-2, every block).
    """
    if moe:
        family = MOE_DEMO_FAMILY
    elif family not in DEMO_FAMILIES:
        raise SftscopeError(f"demo family {family!r} is not supported; use one of "
                            f"{', '.join(DEMO_FAMILIES)}")
    cfg = config or ((MOE_QUICK if quick else MOE_FULL) if moe else (QUICK if quick else FULL))
    if threads is not None:
        cfg = dataclasses.replace(cfg, threads=threads)
    if cfg.n_layers < 10:
        raise SftscopeError(f"the demo pair needs >= 10 blocks (five segments), got "
                            f"n_layers={cfg.n_layers}")
    for name in ("base", "sft"):  # each phase's batch must split over the ranks
        _training(name, cfg, seed)
    out_dir = Path(out_dir)
    settings = pair_settings(seed, family, cfg)
    key = stable_hash(settings)
    if not force and (man := _cached(out_dir, key)) is not None:
        if progress_enabled():
            say(f"[bold]demo pair[/]: found in {out_dir} (cached; force=True retrains)")
        return _pair_from_manifest(out_dir, man, cached=True)
    if not force and not (out_dir / MANIFEST).exists() and any(
            (out_dir / d).exists() for d in ("base", "sft")):
        raise SftscopeError(f"{out_dir} has base/ or sft/ folders but no demo manifest; choose "
                            "an empty folder or pass force=True to overwrite them")
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out_dir / MANIFEST).unlink()  # stale from now on; written again when done
    with torch_threads(cfg.threads or cpu_cores()), _hf_bars(progress_enabled()):
        return _train_pair(out_dir, seed=seed, family=family, cfg=cfg, quick=quick,
                           settings=settings, key=key)


@contextlib.contextmanager
def _hf_bars(show: bool):
    """Hide transformers' own progress bars (loading, saving) when sftscope's are off."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


class _Phases:
    """Wall and CPU seconds of each build phase (a phase may be entered more than once)."""

    def __init__(self) -> None:
        self.timer = Timer()
        self.cpu: dict[str, float] = {}
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()

    @contextlib.contextmanager
    def __call__(self, name: str):
        c0 = cpu_seconds()
        with self.timer(name):
            yield
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - c0

    def add_cpu(self, cpu: dict[str, float]) -> None:
        """Count CPU seconds spent for a phase in other processes (the training ranks)."""
        for name, seconds in cpu.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + seconds

    def close(self) -> None:
        """Record the totals."""
        self.timer.seconds["total"] = time.perf_counter() - self.t0
        self.cpu["total"] = cpu_seconds() - self.c0


@dataclass
class _Data:
    """The pair's corpus, tokenizer and training blocks."""

    corpus: Corpus
    files: dict[str, Path]
    tok: Any
    pre_ids: list[list[int]]
    base_blocks: torch.Tensor
    sft_set: Blocks
    n_sft_blocks: int
    n_mix: int


def _prepare(out_dir: Path, seed: int, cfg: PairConfig, phase: _Phases) -> _Data:
    """Write the corpus, train the tokenizer and cut the base and SFT training blocks."""
    from sftscope.load.tiny import train_tokenizer

    with phase("corpus"):
        corpus = make_corpus(seed, n_pretrain=cfg.n_pretrain, n_sft=cfg.n_sft,
                             n_test=cfg.n_test, n_train=cfg.n_train, n_general=cfg.n_general,
                             max_number=cfg.max_number, doc_mix=dict(cfg.doc_mix))
        files = write_corpus(corpus, out_dir / "data")
    with phase("tokenizer"):
        sample = corpus.pretrain[:5000] + [f"{format_prompt(r['question'])} {r['answer']}"
                                           for r in corpus.sft[:1000]]
        tok = train_tokenizer(sample, vocab_size=cfg.vocab_size)
        tok.model_max_length = _max_positions(cfg)
        pre_ids = _encode(tok, corpus.pretrain)
        base_blocks = _pack_stream(pre_ids, tok.eos_token_id, _base_seq_len(cfg))
        sft_ids, sft_lab = _pack_sft(_sft_examples(tok, corpus.sft), tok.pad_token_id,
                                     cfg.seq_len)
        n_mix = _mix_blocks(sft_lab, cfg)
        mix_from = (base_blocks if _base_seq_len(cfg) == cfg.seq_len
                    else _pack_stream(pre_ids, tok.eos_token_id, cfg.seq_len))
        mix = mix_from[torch.randperm(len(mix_from),
                                      generator=torch.Generator().manual_seed(seed))[:n_mix]]
        sft_set = Blocks(torch.cat([sft_ids, mix]), torch.cat([sft_lab, mix]))
    return _Data(corpus=corpus, files=files, tok=tok, pre_ids=pre_ids, base_blocks=base_blocks,
                 sft_set=sft_set, n_sft_blocks=int(len(sft_ids)), n_mix=int(n_mix))


def _train_pair(out_dir: Path, *, seed: int, family: str, cfg: PairConfig, quick: bool,
                settings: dict[str, Any], key: str) -> DemoPair:
    """Build the pair (data, base, SFT, held-out evaluation) and write its manifest."""
    from transformers import AutoModelForCausalLM

    phase = _Phases()
    work = Path(tempfile.mkdtemp(prefix=".train.", dir=out_dir))
    try:
        with _workers(cfg, seed, work) as ranks:  # they start while the data is prepared
            data = _prepare(out_dir, seed, cfg, phase)
            tok = data.tok
            random.seed(seed)
            model = _new_model(family, len(tok), cfg, seed)
            n_params = sum(p.numel() for p in model.parameters())
            with phase("base"):
                model, base_hist = train(model, Blocks(data.base_blocks, data.base_blocks),
                                         _training("base", cfg, seed), work, ranks)
            with phase("save"):
                _save(model, tok, out_dir / "base")
            base = AutoModelForCausalLM.from_pretrained(out_dir / "base")
            sft = AutoModelForCausalLM.from_pretrained(out_dir / "base")
            with phase("sft"):
                sft, sft_hist = train(sft, data.sft_set, _training("sft", cfg, seed), work, ranks)
            with phase("save"):
                _save(sft, tok, out_dir / "sft")
            if ranks is not None:
                phase.add_cpu(ranks.cpu)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with phase("eval"):
        metrics = evaluate_pair(base, sft, tok, data.corpus, cfg)
    phase.close()
    man = run_record(
        "demo_pair", settings, key=key, quick=quick, n_blocks=cfg.n_layers, n_params=n_params,
        tokenizer={"vocab_size": len(tok), "kind": "byte-level BPE, digits split",
                   "prompt_format": format_prompt("{question}"),
                   "eos_token": tok.eos_token, "pad_token": tok.pad_token},
        tokens=_token_counts(cfg, data, phase.timer.seconds),
        timings={k: round(v, 2) for k, v in phase.timer.seconds.items()},
        cpu_seconds={k: round(v, 2) for k, v in phase.cpu.items()}, torch_threads=dict(THREADS),
        metrics={k: round(v, 4) for k, v in metrics.items()},
        loss_history={"base": base_hist, "sft": sft_hist},
        files={k: str(p.relative_to(out_dir)) for k, p in data.files.items()},
    )
    write_json(out_dir / MANIFEST, man)
    if progress_enabled():
        m = metrics
        say(f"[bold]demo pair[/]: base/ and sft/ saved in {out_dir} "
            f"({phase.timer.seconds['total']:.0f} s; answer format base "
            f"{m.get('format_base', 0):.0%} -> sft {m.get('format_sft', 0):.0%}, accuracy "
            f"{m.get('flex_acc_base', 0):.0%} -> {m.get('strict_acc_sft', 0):.0%})")
    return _pair_from_manifest(out_dir, read_json(out_dir / MANIFEST), cached=False)


def _token_counts(cfg: PairConfig, data: _Data, seconds: dict[str, float]) -> dict[str, int]:
    """Tokens trained in each phase and per second, and the sizes of the training data."""
    tokens = {
        "base_trained": cfg.base_steps * _base_batch(cfg) * _base_seq_len(cfg),
        "sft_trained": cfg.sft_steps * cfg.batch_size * cfg.seq_len,
        "pretrain_corpus": sum(len(d) + 1 for d in data.pre_ids),
        "sft_blocks": data.n_sft_blocks, "sft_mix_blocks": data.n_mix,
    }
    for name in ("base", "sft"):
        tokens[f"{name}_tokens_per_s"] = round(tokens[f"{name}_trained"]
                                               / max(seconds[name], 1e-9))
    return tokens


def _mix_blocks(sft_labels: torch.Tensor, cfg: PairConfig) -> int:
    """Pre-training blocks to add so they are ``sft_pretrain_mix`` of the SFT phase's blocks."""
    if cfg.sft_pretrain_mix <= 0:
        return 0
    f = min(cfg.sft_pretrain_mix, 0.9)
    return int(math.ceil(len(sft_labels) * f / (1 - f)))
