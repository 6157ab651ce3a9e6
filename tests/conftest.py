"""Shared fixtures: tiny tokenizer and tiny saved models of real families (no network)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# commands run without --out write to a new folder under $SFTSCOPE_RUNS: never the checkout
os.environ.setdefault("SFTSCOPE_RUNS", tempfile.mkdtemp(prefix="sftscope-runs-"))


def pytest_configure(config) -> None:
    """Tiny models run fastest on one thread (no OpenMP spin-waits on a busy 2-core box)."""
    import torch

    torch.set_num_threads(1)


# Test tiers (select with -m): unit = pure functions and the CLI frame, no model; integration
# = tiny models through one component; e2e = whole commands and the demo. `gpu` tests skip
# without CUDA.
UNIT = {"test_metrics.py", "test_cli.py", "test_layers.py", "test_tasks.py", "test_data.py",
        "test_report_rules.py", "test_registry_masks.py", "test_lm_eval_diff.py",
        "test_intervals.py", "test_paired.py"}
E2E = {"test_demo.py", "test_demo_pair.py", "test_faults.py", "test_real_model.py"}


def pytest_collection_modifyitems(config, items) -> None:
    import pytest

    for item in items:
        name = item.path.name
        tier = "unit" if name in UNIT else "e2e" if name in E2E else "integration"
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tokenizer():
    from sftscope.load.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """Factory: ``model_dir(family, seed=0, **config)`` -> a saved tiny model folder (cached)."""
    from sftscope.load.tiny import save_tiny_model

    made: dict[tuple, Path] = {}

    def make(family: str = "llama", seed: int = 0, **cfg) -> Path:
        key = (family, seed, tuple(sorted(cfg.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{family}-{seed}")
            made[key] = save_tiny_model(out, family, seed=seed, tokenizer=tokenizer, **cfg)
        return made[key]

    return make


@pytest.fixture(scope="session")
def llama10(model_dir) -> Path:
    """A saved tiny llama of 10 blocks (tune, objectives and dynamics tests)."""
    return model_dir("llama", n_layers=10)


@pytest.fixture(scope="session")
def kill_at_step():
    """``kill_at_step(n)``: a Trainer callback that raises KeyboardInterrupt at the end of step
    ``n`` (a run killed mid-way, for the resume tests)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == self.step:
                raise KeyboardInterrupt

    return Kill


@pytest.fixture()
def gsm8k_file(tmp_path) -> Path:
    """A small local file in GSM8K's fields."""
    import json

    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
            for a, b in [(3, 4), (12, 7), (5, 5), (20, 1), (9, 8), (6, 2), (11, 3), (4, 4)]]
    p = tmp_path / "gsm8k.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


LETTER_TEXT = [f"Question: What is {a} plus {b}?\nA. {a + b}\nB. {a}\nC. {b}\nD. 0\nAnswer: {x}"
               for a, b, x in [(1, 2, "A"), (3, 4, "B"), (5, 6, "C"), (7, 8, "D")]] * 6


@pytest.fixture(scope="session")
def letter_pair(tmp_path_factory):
    """A tiny llama Base/SFT pair sharing embeddings (SFT = base with every block, the final
    norm and the head perturbed), a tokenizer with single-token letters, and an MMLU file:
    ``(base, sft, mmlu_path, tokenizer)``. Read-only: tests write elsewhere."""
    import json

    import torch

    from sftscope.load.models import load_model
    from sftscope.load.tiny import save_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("letter-pair")
    tok = train_tokenizer(LETTER_TEXT)
    base = save_tiny_model(root / "base", "llama", seed=0, tokenizer=tok)
    model = load_model(str(base))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    sft = root / "sft"
    model.save_pretrained(sft)
    tok.save_pretrained(sft)
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a), str(b), "0"],
             "answer": i % 4} for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8),
                                                           (2, 2), (9, 1)])]
    mmlu = root / "mmlu.jsonl"
    mmlu.write_text("\n".join(json.dumps(r) for r in rows))
    return base, sft, mmlu, tok
