"""``sftscope demo --stages``: the demo pair continued through DPO and GRPO (needs TRL).

The chain base -> SFT -> DPO -> GRPO, each stage an ordinary ``tune`` run folder:

- **DPO** (``tune --objective dpo``) from the SFT model, on preference pairs generated from
  the corpus's GSM8K-style training records: the prompt ``Question: ...\\nAnswer:``, ``chosen``
  the correct worked answer, ``rejected`` the same answer with a wrong final number
  (``#### N`` -> ``#### N +- d``, ``d`` in 1..9, seeded);
- **GRPO** (``tune --objective grpo --reward gsm8k``) from the DPO model on the same records'
  questions: the arithmetic answers give exact rewards (lm-eval's flexible extraction equal to
  the gold).

Both fine-tune every weight of every block (``--method full``, mask ``11111``), so ``weights``
shows where each stage changed the model and how many entries it left bit-identical
(``unchanged_frac``). Finished stage runs are reused (``tune --resume``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from sftscope.io import write_text
from sftscope.load.data import read_local

PREFERENCE_FILE = "preference.jsonl"
SIZES = {  # quick: what the tests run; full: about three extra minutes on two cores
    True: {"n_train": 32, "dpo_steps": 4, "grpo_steps": 2, "completion": 24},
    False: {"n_train": 256, "dpo_steps": 40, "grpo_steps": 12, "completion": 48},
}


def corrupt(answer: str, rng: random.Random) -> str:
    """The answer with a wrong final number after its last ``#### ``."""
    head, sep, tail = answer.rpartition("#### ")
    try:
        n = int(tail.strip())
    except ValueError:
        return answer + " 1"  # not the demo's layout: still a different answer
    d = rng.randint(1, 9) * rng.choice((-1, 1))
    return f"{head}{sep}{n + d}"


def preference_pairs(records: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """One preference pair per GSM8K-style record: correct vs corrupted final answer."""
    from sftscope.demo.corpus import format_prompt

    rng = random.Random(seed)
    return [{"prompt": format_prompt(r["question"]), "chosen": f" {r['answer']}",
             "rejected": f" {corrupt(r['answer'], rng)}"} for r in records]


def build_stages(out: Path, sft: str, train_file: Path, *, seed: int, quick: bool
                 ) -> dict[str, Any]:
    """Train DPO then GRPO after ``sft``; returns the stage folders and their runs."""
    from sftscope.config.commands import TuneConfig
    from sftscope.experiments.tune import tune

    size = SIZES[quick]
    out.mkdir(parents=True, exist_ok=True)
    pairs = preference_pairs(read_local(train_file), seed)
    pref = write_text(out / PREFERENCE_FILE,
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    common = {"method": "full", "mask": "11111", "n_train": size["n_train"], "seed": seed,
              "data_seed": seed, "save_steps": 1000, "logging_steps": 1, "run_eval": False,
              "resume": True}
    dpo = tune(TuneConfig(model=sft, train=f"preference:{pref}", out=str(out / "dpo"),
                          objective="dpo", lr=1e-4, max_steps=size["dpo_steps"], max_length=256,
                          batch_size=8, micro_batch_size=8, **common))
    grpo = tune(TuneConfig(model=str(dpo.model_dir), train=f"gsm8k:{train_file}",
                           out=str(out / "grpo"), objective="grpo", reward="gsm8k", lr=5e-5,
                           max_steps=size["grpo_steps"], num_generations=4,
                           max_completion_length=size["completion"], batch_size=16,
                           micro_batch_size=16, **common))
    return {"dpo": str(dpo.model_dir), "grpo": str(grpo.model_dir), "preference": str(pref),
            "runs": {"dpo": dpo.out, "grpo": grpo.out},
            "rewards": (grpo.trl or {}).get("history", {}).get("reward", []),
            "margins": (dpo.trl or {}).get("history", {}).get("rewards/margins", [])}


def chain_stages(stages: dict[str, Any]) -> tuple[str, ...]:
    """``--stages`` of analyze, weights and probe: ``dpo=PATH grpo=PATH``."""
    return (f"dpo={stages['dpo']}", f"grpo={stages['grpo']}")
