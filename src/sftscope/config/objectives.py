"""TRL objectives' option checks (``tune --objective dpo|grpo``; ``demo --stages``): TRL's
presence and version, its loss types, the reward functions. Here, below ``config``, because the
configs check them before any model is loaded; ``experiments.objectives`` trains with them.

Nothing here imports TRL or torch at module level: without TRL one line names the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError, quoted

TRL_MIN = "1.16"
RL_EXTRA = "pip install 'sftscope[rl]'"
BUILTIN_REWARDS = ("gsm8k", "mmlu")
TRAINERS = {"dpo": ("DPOConfig", "DPOTrainer"), "grpo": ("GRPOConfig", "GRPOTrainer")}

# ------------------------------------------------------------------ TRL and its settings

def trl_version() -> str:
    """TRL's version; one line naming the package when it is missing or too old."""
    if importlib.util.find_spec("trl") is None:
        raise SftscopeError(f"--objective dpo/grpo needs the trl package (>= {TRL_MIN}): "
                            f"{RL_EXTRA}")
    from importlib.metadata import version

    from packaging.version import Version

    v = version("trl")
    if Version(v) < Version(TRL_MIN):
        raise SftscopeError(f"--objective dpo/grpo needs trl >= {TRL_MIN}, found {v}: "
                            f"{RL_EXTRA}")
    return v


def trl_classes(objective: str) -> tuple[type, type]:
    """TRL's (config class, trainer class) of an objective."""
    trl_version()
    import trl

    conf, trainer = TRAINERS[objective]
    return getattr(trl, conf), getattr(trl, trainer)


def field_default(cls: type, name: str) -> Any:
    import dataclasses

    f = cls.__dataclass_fields__[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def loss_types(objective: str) -> tuple[str, ...]:
    """The ``loss_type`` values TRL's config documents for ``objective`` (its help text: the
    one list TRL states; TRL itself still validates at construction)."""
    conf, _ = trl_classes(objective)
    text = conf.__dataclass_fields__["loss_type"].metadata.get("help", "")
    m = re.search(r"(?:Possible|Supported) values are:?(.*?)(?:\.\s|$)", text, re.S)
    return tuple(dict.fromkeys(re.findall(r"'([a-z_]+)'", m.group(1)))) if m else ()


def check_objective(cfg) -> None:
    """DPO/GRPO options before any model is loaded: TRL present, TRL's loss types, the data
    kind, the reward, and the batch against ``--num-generations``."""
    conf, _ = trl_classes(cfg.objective)
    if cfg.loss_type is not None:
        allowed = loss_types(cfg.objective)
        if allowed and cfg.loss_type not in allowed:
            raise SftscopeError(f"--loss-type {cfg.loss_type!r} is not one of TRL's "
                                f"{cfg.objective.upper()} losses ({', '.join(allowed)})")
    preference = cfg.train.partition(":")[0] == "preference"
    if cfg.objective == "dpo" and not preference:
        from sftscope.load.data import SETS

        sets = ", ".join(f"preference:{n}" for n in SETS["preference"])
        raise SftscopeError(f"--objective dpo trains on preference pairs: give --train "
                            f"preference:FILE (fields prompt, chosen, rejected) or a hub set "
                            f"({sets})")
    if cfg.objective == "grpo":
        if cfg.reward is None:
            raise SftscopeError("--objective grpo needs --reward gsm8k, mmlu or "
                                "python:MODULE:FUNCTION")
        reward_function(cfg.reward)
        g = cfg.num_generations or field_default(conf, "num_generations")
        if cfg.batch_size % g:
            raise SftscopeError(f"--batch-size {cfg.batch_size} (completions per step) is not a "
                                f"multiple of --num-generations {g}; change one")


# ------------------------------------------------------------------ rewards

def completion_text(completion: Any) -> str:
    """A completion's text (conversational completions are a list of messages)."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def gsm8k_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion, cut at the task's stop strings, has lm-eval's
    ``flexible_extract`` answer equal to the gold (the evaluation's own scorer), else 0.0."""
    from sftscope.tasks.base import trim_at_stop
    from sftscope.tasks.gsm8k import STOPS, score

    return [float(score(trim_at_stop(completion_text(c), STOPS),
                        {"answer": a})["flexible_extract"])
            for c, a in zip(completions, answer)]


def mmlu_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion starts with the gold option letter, else 0.0."""
    from sftscope.tasks.mmlu import answer_letter

    return [float(answer_letter(completion_text(c)) == a.strip())
            for c, a in zip(completions, answer)]


def reward_function(spec: str) -> Callable[..., list[float]]:
    """``gsm8k``, ``mmlu`` or ``python:MODULE:FUNCTION`` (MODULE importable from the working
    directory or the path; FUNCTION called as TRL calls rewards: ``prompts``, ``completions``
    and the data's columns (``answer``) as keywords, one float per completion)."""
    if spec == "gsm8k":
        return gsm8k_reward
    if spec == "mmlu":
        return mmlu_reward
    kind, _, rest = spec.partition(":")
    module, _, name = rest.rpartition(":")
    if kind != "python" or not module or not name:
        raise SftscopeError(f"--reward {spec!r}: use gsm8k, mmlu or python:MODULE:FUNCTION")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # the user's module: any import error is theirs to fix
        raise SftscopeError(f"--reward {spec!r}: module {module!r} could not be imported "
                            f"({quoted(e, 120)})") from e
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise SftscopeError(f"--reward {spec!r}: {module} has no function {name!r}")
    return fn
