"""Load models and Base/SFT pairs, and validate a pair: the one place every command loads from.

A model reference is a Hugging Face folder, a hub id, a GGUF file (or a folder holding exactly
one; dequantised by transformers, tokenizer from the same file) or a PEFT adapter folder (or a
tune run folder), applied in memory to its base: ``base`` when given, else the base the adapter
records. ``sources.check_model`` says which (torch-free); ``load_model``, ``load_config``,
``load_tokenizer`` and ``fingerprint`` follow it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError, first_line, quoted
from sftscope.io import atomic_dir
from sftscope.load.adapters import load_adapter
from sftscope.load.gguf import GGUF_MOE_SIZES, need_gguf, supported_by_transformers
from sftscope.load.identity import (  # noqa: F401  (re-exported: content identity)
    FINGERPRINT_SCHEME,
    DigestMemo,
    default_cache_dir,
    file_digest,
    fingerprint,
)
from sftscope.load.runtime import input_device, quiet_libraries, resolve_device, resolve_dtype
from sftscope.load.sources import (
    ModelSource,
    PairInfo,
    adapter_base,
    adapter_meta,
    check_model,
    check_pair,
    expand,
    is_local,
    looks_like_path,
    source_kind,
)

__all__ = ["LoadOptions", "ModelSource", "PairInfo", "check_adapter_base", "check_pair",
           "check_source",
           "input_device", "load_config", "load_model", "load_tokenizer", "pair_tokenizer",
           "check_vocab", "check_tokenizers", "fingerprint", "is_local", "resolve_dtype",
           "resolve_source", "save_model", "source_label"]


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: revision, dtype, device or accelerate ``device_map``."""

    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    # an adapter reference: the base it is applied to (default: the base it records), that
    # base's revision, and whether a base of the same shapes but other weights is accepted
    base: str | None = None
    base_revision: str | None = None
    allow_other_base: bool = False


def check_source(spec: str, what: str = "model") -> str:
    """A usable source: an existing local folder (with a causal-LM config), or a hub id."""
    src = check_model(spec, what)
    return src.path or src.spec


def resolve_source(spec: str, base: str | None = None) -> ModelSource:
    """What ``spec`` is (folder, hub id, GGUF or adapter with its base), checked torch-free."""
    return check_model(spec, base=base)


def source_label(spec: str, base: str | None = None) -> str:
    """A short name for a model in tables: an adapter's tune run (``adapter m00100 r64 s0``),
    else the folder or file name, else the hub id."""
    if source_kind(spec) == "adapter":
        return resolve_source(spec, base).label or "adapter"
    p = Path(spec).expanduser()
    return p.name if p.name and p.exists() else spec


def check_adapter_base(spec: str, base: str | None = None, revision: str | None = None, *,
                       base_revision: str | None = None, allow_other_base: bool = False,
                       memo_dir: str | Path | None = None) -> None:
    """Before any model runs: an adapter (or tune run) ``spec`` that recorded the fingerprint
    of the base it was trained on is refused on another base (the one it will be applied to:
    ``base`` or the one it records). Shapes are checked earlier (torch-free); this catches a
    base of the same shapes with other weights. ``allow_other_base`` skips it on purpose."""
    src = resolve_source(spec, base)
    if src.kind != "adapter" or allow_other_base or src.path is None:
        return
    fp = adapter_meta(Path(src.path)).get("base_fingerprint") or {}
    theirs = fp.get("hash") if isinstance(fp, dict) else None
    if not theirs:
        return
    b, rev = adapter_base(src, revision, base_revision)
    ours = fingerprint(b.spec, rev, memo_dir).get("hash")
    if ours and ours != theirs:
        made_for = fp.get("source") or "?"
        raise SftscopeError(
            f"adapter {spec} was trained on another base ({made_for}, fingerprint {theirs}) "
            f"than {b.spec} (fingerprint {ours}); pass the base it was made for, or "
            f"--allow-other-base if the weights are the same model")


def _gguf_error(src: ModelSource, err: Exception) -> SftscopeError:
    arch = str(src.config.get("gguf_architecture", "?"))
    ok, names = supported_by_transformers(arch)
    if not ok:
        import transformers

        return SftscopeError(
            f"{src.spec} is a GGUF of a {arch} model, which transformers "
            f"{transformers.__version__} cannot read (it reads {', '.join(names)}); convert the "
            f"model to a Hugging Face folder another way, or upgrade transformers")
    return SftscopeError(f"{src.spec}: the GGUF file could not be loaded ({quoted(err)})")


def _hub_error(spec: str, err: Exception) -> SftscopeError:
    return SftscopeError(f"could not load {spec!r}: not a local folder, and the hub did not "
                         f"provide it ({quoted(err, 160)}); pass a local folder or check the "
                         f"id/revision and your network")


def load_config(spec: str, revision: str | None = None, trust_remote_code: bool = False, *,
                base: str | None = None, base_revision: str | None = None):
    """The model config alone (cheap): used to validate a pair before loading weights. An
    adapter's config is its base's; a GGUF's is read from its header."""
    from transformers import AutoConfig

    src = resolve_source(spec, base)
    if src.kind == "adapter":
        b, rev = adapter_base(src, revision, base_revision)
        return load_config(b.spec, rev, trust_remote_code)
    if src.kind == "gguf":
        need_gguf()
        try:
            with quiet_libraries():
                return AutoConfig.from_pretrained(src.load_path, gguf_file=src.gguf_file)
        except (OSError, ValueError, KeyError) as e:
            raise _gguf_error(src, e) from e
    try:
        return AutoConfig.from_pretrained(src.path or src.spec, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if is_local(spec):
            raise SftscopeError(f"{spec}: config.json could not be read ({e})") from e
        raise _hub_error(spec, e) from e


def load_tokenizer(spec: str, revision: str | None = None, padding_side: str = "right", *,
                   base: str | None = None, base_revision: str | None = None):
    """The tokenizer of a model folder, hub id, GGUF file (its own vocabulary) or adapter (the
    adapter folder's tokenizer when it saved one, else its base's), with a pad token."""
    from transformers import AutoTokenizer

    kind = source_kind(spec)
    gguf_file = None
    if kind == "adapter":
        src = resolve_source(spec, base)
        if not (Path(str(src.path)) / "tokenizer_config.json").is_file():
            b, rev = adapter_base(src, revision, base_revision)
            return load_tokenizer(b.spec, rev, padding_side)
        src_path = str(src.path)
    elif kind == "gguf":
        src = resolve_source(spec)
        need_gguf()
        src_path, gguf_file = src.load_path, src.gguf_file
    else:
        src_path = expand(spec)
        if not os.path.isdir(src_path):
            if os.path.exists(src_path):
                raise SftscopeError(f"tokenizer {spec} is a file; give a folder, a .gguf file "
                                    f"or a hub id")
            if looks_like_path(spec):
                raise SftscopeError(f"tokenizer folder {spec} does not exist; check the path")
            src_path = spec
    try:
        with quiet_libraries():
            if gguf_file is not None:
                tok = AutoTokenizer.from_pretrained(src_path, gguf_file=gguf_file)
            else:
                tok = AutoTokenizer.from_pretrained(src_path, revision=revision)
    except (OSError, ValueError, KeyError) as e:
        if is_local(spec):
            raise SftscopeError(
                f"{spec} has no usable tokenizer ({first_line(e, 160)}); "
                f"save one with tokenizer.save_pretrained or pass --tokenizer"
            ) from e
        raise _hub_error(spec, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = padding_side
    return tok


def _device_map(value: str) -> Any:
    """An accelerate strategy name, or a .json file mapping module names to devices."""
    if not value.endswith(".json"):
        return value
    import json

    try:
        mapping = json.loads(Path(os.path.expanduser(value)).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SftscopeError(f"--device-map {value} could not be read ({e}); give a JSON "
                            f"object of module name -> device") from e
    if not isinstance(mapping, dict):
        raise SftscopeError(f"--device-map {value} must hold a JSON object of module name -> "
                            f"device")
    return mapping


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws its own tqdm bar (not covered by its progress switch)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def _from_pretrained(src: ModelSource, opts: LoadOptions):
    """A dense ``*ForCausalLM`` of a folder, hub id or GGUF (dequantised), not yet placed."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(opts.device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(opts.dtype, device),
                              "trust_remote_code": opts.trust_remote_code}
    if opts.attn_implementation:
        kwargs["attn_implementation"] = opts.attn_implementation
    if opts.device_map:
        kwargs["device_map"] = _device_map(opts.device_map)
    if src.kind == "gguf":
        need_gguf()
        kwargs["gguf_file"] = src.gguf_file
        # transformers' GGUF reader leaves an MoE's expert widths at the config defaults
        kwargs.update({k: src.config[k] for k in GGUF_MOE_SIZES if k in src.config})
        try:  # dense weights: sftscope hooks, swaps and adapts plain linear layers
            from transformers.utils.quantization_config import GgufConfig

            kwargs["quantization_config"] = GgufConfig(gguf_file=src.gguf_file, dequantize=True)
        except (ImportError, TypeError):
            pass  # older transformers always dequantise
    else:
        kwargs["revision"] = opts.revision
    try:
        with quiet_libraries(), _quiet_gguf():
            model = AutoModelForCausalLM.from_pretrained(src.load_path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if src.kind == "gguf":
            raise _gguf_error(src, e) from e
        if src.kind == "folder":
            raise SftscopeError(f"{src.spec}: the model could not be loaded "
                                f"({first_line(e, 200)})") from e
        raise _hub_error(src.spec, e) from e
    if src.kind == "gguf":  # dequantised: a plain model from here on (trainable, savable)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model


def _load_peft(src: ModelSource, opts: LoadOptions):
    """An adapter reference as a ``PeftModel``: its base loaded, the adapter checked against it
    and applied in memory (never merged)."""
    b, rev = adapter_base(src, opts.revision, opts.base_revision)
    base_opts = LoadOptions(revision=rev, dtype=opts.dtype, device=opts.device,
                            device_map=opts.device_map,
                            attn_implementation=opts.attn_implementation,
                            trust_remote_code=opts.trust_remote_code)
    model = load_model(b.spec, base_opts)
    return load_adapter(model, str(src.path), b.spec, revision=rev,
                        allow_other_base=opts.allow_other_base)


def load_model(spec: str, opts: LoadOptions | None = None):
    """Load a ``*ForCausalLM`` in eval mode on ``opts.device`` (or sharded by ``device_map``).

    A GGUF is dequantised into a dense model. An adapter is applied in memory with PEFT to its
    base (``opts.base``, else the base it records) and left unmerged: the model returned is the
    base ``*ForCausalLM`` with LoRA layers in the adapted modules, so every block the adapter
    does not touch computes exactly what the base computes.
    """
    opts = opts or LoadOptions()
    src = resolve_source(spec, opts.base)
    if src.kind == "adapter":
        model = _load_peft(src, opts).get_base_model()
    else:
        model = _from_pretrained(src, opts)
        if not opts.device_map:
            model.to(resolve_device(opts.device))
    model.eval()
    model.requires_grad_(False)
    check_finite(model, src.spec)
    return model


def check_finite(model, label: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor (a broken checkpoint
    would otherwise give NaN metrics, or garbage generations, without a word)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise SftscopeError(f"{label}: weight {name} holds NaN or Inf values; the "
                                    f"checkpoint is broken (re-save or re-download it)")


def save_model(spec: str, out: str | Path, opts: LoadOptions | None = None) -> Path:
    """Write any model reference as a plain Hugging Face folder (safetensors, config and
    tokenizer): a GGUF dequantised, an adapter merged into its base (``merge_and_unload``).
    Written to a temporary folder first, so ``out`` is either whole or absent."""
    opts = opts or LoadOptions()
    src = resolve_source(spec, opts.base)
    out = Path(out).expanduser()
    if src.kind == "adapter":
        model = _load_peft(src, opts).merge_and_unload()
    else:
        model = _from_pretrained(src, opts)
    tok = load_tokenizer(spec, opts.revision, base=opts.base, base_revision=opts.base_revision)
    with atomic_dir(out) as tmp, quiet_libraries():
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return out


def check_tokenizers(tok_base, tok_sft, sample: int | None = None) -> list[str]:
    """Refuse tokenizers that map a shared id to different tokens; return notes."""
    n = min(len(tok_base), len(tok_sft))
    ids = range(n) if sample is None or sample >= n else range(0, n, max(1, n // sample))
    a = tok_base.convert_ids_to_tokens(list(ids))
    b = tok_sft.convert_ids_to_tokens(list(ids))
    bad = [(i, x, y) for i, x, y in zip(ids, a, b) if x != y]
    if bad:
        i, x, y = bad[0]
        raise SftscopeError(
            f"the base and SFT tokenizers disagree on {len(bad)} shared ids (first: id {i} is "
            f"{x!r} vs {y!r}); the pair must share a tokenizer (choose one with --tokenizer)"
        )
    notes = []
    if len(tok_sft) != len(tok_base):
        notes.append(f"tokenizers differ in size ({len(tok_base)} vs {len(tok_sft)}); "
                     f"shared ids agree")
    return notes


def pair_tokenizer(base: str, sft: str, choice: str | None = None, *,
                   revisions: dict[str, str | None] | None = None,
                   chat_template: bool = False) -> tuple[Any, list[str]]:
    """The one tokenizer both models of a pair see, after checking the pair's tokenizers agree.

    ``choice``: ``base``, ``sft``, a path, or None (base's; SFT's with a chat template, whose
    added tokens only the SFT model knows). A tokenizer from a path is checked against base's.
    """
    revs = revisions or {}
    tb = load_tokenizer(base, revision=revs.get("base"))
    ts = load_tokenizer(sft, revision=revs.get("sft"), base=base,
                        base_revision=revs.get("base"))
    notes = check_tokenizers(tb, ts)
    if choice is None:
        return (ts if chat_template else tb), notes
    if choice == "base":
        return tb, notes
    if choice == "sft":
        return ts, notes
    tok = load_tokenizer(choice)
    return tok, notes + check_tokenizers(tb, tok)


def check_vocab(model, input_ids: list[list[int]], label: str) -> None:
    """Refuse token ids the model has no embedding row for."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = max((max(ids) for ids in input_ids if ids), default=0)
    if top >= rows:
        raise SftscopeError(
            f"the data uses token id {top} but {label} has only {rows} embedding rows (added "
            f"tokens of another tokenizer?); use the tokenizer of {label} or drop --chat-template"
        )
