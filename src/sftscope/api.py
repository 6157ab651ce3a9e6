"""The Python API on models already loaded: states and the metrics table without folders.

For users of TransformerLens-, nnsight- or plain-transformers notebooks: pass the model
objects, a tokenizer and a list of texts.

- :func:`capture_states` -> :class:`States`: every hidden state ``j = 0..L`` pooled per text
  (mean over real tokens and last real token), and the token-level states of one text.
- :func:`analyze_pair` -> the same tidy table as ``sftscope analyze``'s ``metrics.csv`` (the
  same numbers: the same capture and metric code), options as keywords named like the analyze
  config's fields (``n_token=8``, ``bootstrap=200``, ``pooling="last"``, ...).
- :func:`register_metric` adds a metric of your own to that table in one call.

Errors are :class:`sftscope.SftscopeError` naming the keyword argument (``n_token``), not a
command-line flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from sftscope import metrics as _metrics  # noqa: F401  (the built-ins first: their names are taken)
from sftscope.errors import SftscopeError
from sftscope.load.runtime import pad_id
from sftscope.metric_registry import register_metric, unregister_metric

# analyze options that mean something for models already in memory; the rest (paths, output,
# devices, caching, data sources) belong to the command
API_OPTIONS = ("limit", "seed", "n_token", "bootstrap", "preset", "entropy_alpha",
               "normalisation", "entropy_normalisations", "pooling", "cka_unbiased",
               "max_length", "batch_size", "chat_template")


@dataclass
class States:
    """Hidden states of one model over texts (``j = 0`` embeddings, ``j = b + 1`` after block
    ``b``, before the final norm), in the order the texts were given."""

    mean: torch.Tensor                 # [L+1, N, D] mean over each text's real tokens
    last: torch.Tensor                 # [L+1, N, D] each text's last real token
    n_tokens: torch.Tensor             # [N] tokens per text (after truncation)
    tokens: torch.Tensor | None        # [L+1, T, D] every token of text ``sample``
    sample: int | None
    info: dict[str, Any] = field(default_factory=dict)

    def pooled(self, how: str = "mean") -> torch.Tensor:
        """``mean`` or ``last`` pooled states ``[L+1, N, D]``."""
        return self.last if how == "last" else self.mean

    def norms(self, how: str = "mean") -> pd.DataFrame:
        """Tidy L2 norms of the pooled states: layer, sample, norm (a clean 0..n-1 index)."""
        z = self.pooled(how).norm(dim=-1)
        layers, samples = torch.meshgrid(torch.arange(z.shape[0]), torch.arange(z.shape[1]),
                                         indexing="ij")
        return pd.DataFrame({"layer": layers.flatten().numpy(),
                             "sample": samples.flatten().numpy(),
                             "norm": z.flatten().double().numpy()})


def _api_error(e: SftscopeError, names: tuple[str, ...]) -> SftscopeError:
    """The message with ``--flag-name`` spelled as the keyword ``flag_name`` it stands for."""

    def spell(m: re.Match) -> str:
        key = m.group(1).replace("-", "_")
        return key if key in names else m.group(0)

    return SftscopeError(re.sub(r"--([a-z][a-z0-9-]*)", spell, str(e)))


def options(**kwargs: Any) -> SimpleNamespace:
    """The analyze options for the API: defaults of ``AnalyzeConfig`` (``limit``: all texts),
    overridden by ``kwargs``, each checked as the command checks it."""
    from sftscope.config.commands import AnalyzeConfig
    from sftscope.config.core import check_fields, defaults, did_you_mean

    for key in kwargs:
        if key not in API_OPTIONS:
            fields = set(defaults(AnalyzeConfig)) | {"base", "sft", "data", "out"}
            hint = did_you_mean(key, API_OPTIONS)
            raise SftscopeError(
                f"{key} is not an option here" + (
                    " (models and texts are arguments; nothing is written)"
                    if key in fields else hint) + f"; options: {', '.join(API_OPTIONS)}")
    try:
        given = check_fields(AnalyzeConfig, kwargs)
    except SftscopeError as e:
        raise _api_error(e, API_OPTIONS) from None
    values = {k: v for k, v in defaults(AnalyzeConfig).items() if k in API_OPTIONS}
    values.update(limit=None, checkpoint_every=0.0)
    values.update(given)
    return SimpleNamespace(**values)


def _tokenized(tokenizer, texts: list[str] | tuple[str, ...], opt: SimpleNamespace, *,
               select: bool):
    """Texts -> token ids as analyze makes them from a ``--text-field`` file (``select``:
    shuffled with ``seed`` and the first ``limit`` kept, as ``--data``/``--limit`` do)."""
    import random

    from sftscope.load.data import Sample, tokenize

    if isinstance(texts, str) or not hasattr(texts, "__len__"):
        raise SftscopeError("texts: give a list of strings")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        what = "empty" if isinstance(texts[bad[0]], str) else "not a string"
        raise SftscopeError(f"texts[{bad[0]}] is {what}; give non-empty strings")
    if not texts:
        raise SftscopeError("texts is empty; give at least one text")
    samples = [Sample(text=t, meta={"index": i}) for i, t in enumerate(texts)]
    if select:
        random.Random(opt.seed).shuffle(samples)
        samples = samples[:opt.limit] if opt.limit else samples
    return tokenize(samples, tokenizer, opt.max_length, chat_template=opt.chat_template)


def _check_model(model: Any, name: str) -> None:
    from sftscope.load.arch import arch_for

    if not isinstance(model, torch.nn.Module):
        raise SftscopeError(f"{name} is a {type(model).__name__}, not a loaded model; load one "
                            f"(e.g. AutoModelForCausalLM.from_pretrained) or use the command "
                            f"line for folders")
    try:
        arch_for(model)
    except SftscopeError as e:
        raise SftscopeError(f"{name}: {e}") from None


def _capture(model, tok, opt: SimpleNamespace, name: str, pad: int):
    from sftscope.capture.stream import capture
    from sftscope.experiments.analyze import _options, capture_config
    from sftscope.load.models import check_vocab

    check_vocab(model, tok.input_ids, name)
    was_training = model.training
    model.eval()
    try:
        return capture(model, tok, capture_config(opt, _options(opt)), pad, label=name)
    finally:
        model.train(was_training)


def _token_states(model, ids: list[int]) -> torch.Tensor:
    """Every hidden state of one text's tokens ``[L+1, T, D]`` (float32, CPU)."""
    from sftscope.capture.hooks import hidden_state_hooks, inner_model
    from sftscope.load.runtime import input_device

    got: dict[int, torch.Tensor] = {}

    def keep(j: int, h: torch.Tensor) -> None:
        got[j] = h[0].detach().float().cpu()

    x = torch.tensor([ids], device=input_device(model))
    with torch.inference_mode(), hidden_state_hooks(model, keep):
        inner_model(model)(input_ids=x, attention_mask=torch.ones_like(x))
    return torch.stack([got[j] for j in sorted(got)])


def capture_states(model, tokenizer, texts: list[str], *, max_length: int = 512,
                   batch_size: int = 8, chat_template: bool = False,
                   sample: int | None = 0) -> States:
    """Per-layer pooled states of ``model`` over ``texts`` (in the order given) and the
    token-level states of ``texts[sample]`` (``sample=None``: none)."""
    opt = options(max_length=max_length, batch_size=batch_size, chat_template=chat_template,
                  n_token=0)
    _check_model(model, "model")
    tok = _tokenized(tokenizer, texts, opt, select=False)
    if sample is not None and not 0 <= sample < len(tok):
        raise SftscopeError(f"sample {sample} is outside texts (0..{len(tok) - 1})")
    res = _capture(model, tok, opt, "model", pad_id(tokenizer))
    tokens = _token_states(model, tok.input_ids[sample]) if sample is not None else None
    return States(res.pooled_mean, res.pooled_last, res.n_tokens, tokens, sample,
                  {**res.info, "n_truncated": tok.n_truncated})


def analyze_pair(base_model, sft_model, tokenizer, texts: list[str],
                 **kwargs: Any) -> pd.DataFrame:
    """The ``metrics.csv`` table of a Base/SFT pair on ``texts``: columns layer, metric, model
    (base / sft / pair), value, ci_low, ci_high; sorted as analyze writes it, index 0..n-1.

    ``kwargs``: analyze's options by field name (``API_OPTIONS``). The texts are selected as
    ``--data FILE --n-samples N --seed S`` selects a file's records (shuffled with ``seed``, the
    first ``limit`` kept; ``limit`` None keeps all), so the numbers equal those of ``sftscope
    analyze`` on the same models saved to folders and the texts in a ``--text-field`` file.
    """
    from sftscope.experiments.analyze import _options, pair_table, single_model_table, tidy

    opt = options(**kwargs)
    _check_model(base_model, "base_model")
    _check_model(sft_model, "sft_model")
    _check_pair(base_model, sft_model)
    tok = _tokenized(tokenizer, texts, opt, select=True)
    mopts = _options(opt)
    rb = _capture(base_model, tok, opt, "base_model", pad_id(tokenizer))
    rs = _capture(sft_model, tok, opt, "sft_model", pad_id(tokenizer))
    single = [single_model_table(rb, mopts, "base", opt.bootstrap, opt.seed),
              single_model_table(rs, mopts, "sft", opt.bootstrap, opt.seed)]
    pair = pair_table(rb, rs, mopts, pd.concat(single), opt.bootstrap, opt.seed)
    table = tidy([*single, pair], reference=opt.preset == "reference",
                 n_blocks=rb.n_states - 1)
    table.attrs["n_truncated"] = tok.n_truncated
    return table


def _check_pair(base_model, sft_model) -> None:
    """Same depth and width: the layer-wise comparison needs both (before any forward pass)."""
    from sftscope.load.arch import get_blocks

    nb, ns = len(get_blocks(base_model)), len(get_blocks(sft_model))
    db = int(base_model.get_input_embeddings().weight.shape[1])
    ds = int(sft_model.get_input_embeddings().weight.shape[1])
    if (nb, db) != (ns, ds):
        raise SftscopeError(f"base_model and sft_model differ ({nb} blocks x {db} wide vs "
                            f"{ns} x {ds}); give a model and its fine-tune")


__all__ = ["API_OPTIONS", "States", "analyze_pair", "capture_states", "options",
           "register_metric", "unregister_metric"]
