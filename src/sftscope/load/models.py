"""Load models and Base/SFT pairs from hub ids or local folders, and validate a pair."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError
from sftscope.load.runtime import input_device, resolve_device, resolve_dtype
from sftscope.load.sources import PairInfo, check_model, check_pair, is_local, looks_like_path

__all__ = ["LoadOptions", "PairInfo", "check_pair", "check_source", "input_device",
           "load_config", "load_model", "load_tokenizer", "pair_tokenizer", "check_vocab",
           "check_tokenizers", "fingerprint", "is_local", "resolve_dtype"]


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: revision, dtype, device or accelerate ``device_map``."""

    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False


def check_source(spec: str, what: str = "model") -> str:
    """A usable source: an existing local folder (with a causal-LM config), or a hub id."""
    src = check_model(spec, what)
    return src.path or src.spec


def _hub_error(spec: str, err: Exception) -> SftscopeError:
    return SftscopeError(
        f"could not load {spec!r}: not a local folder, and the hub did not provide it "
        f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); pass a local folder "
        f"or check the id/revision and your network"
    )


def load_config(spec: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model config alone (cheap): used to validate a pair before loading weights."""
    from transformers import AutoConfig

    src = check_source(spec)
    try:
        return AutoConfig.from_pretrained(src, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if is_local(spec):
            raise SftscopeError(f"{spec}: config.json could not be read ({e})") from e
        raise _hub_error(spec, e) from e


def load_tokenizer(spec: str, revision: str | None = None, padding_side: str = "right"):
    """The tokenizer of a model folder or hub id, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    src = os.path.expanduser(spec)
    if not os.path.isdir(src):
        if os.path.exists(src):
            raise SftscopeError(f"tokenizer {spec} is a file; give a folder or a hub id")
        if looks_like_path(spec):
            raise SftscopeError(f"tokenizer folder {spec} does not exist; check the path")
        src = spec
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=revision)
    except (OSError, ValueError) as e:
        if is_local(spec):
            raise SftscopeError(
                f"{spec} has no usable tokenizer ({str(e).splitlines()[0][:160]}); "
                f"save one with tokenizer.save_pretrained or pass --tokenizer"
            ) from e
        raise _hub_error(spec, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = padding_side
    return tok


def load_model(spec: str, opts: LoadOptions | None = None):
    """Load a ``*ForCausalLM`` in eval mode on ``opts.device`` (or sharded by ``device_map``)."""
    from transformers import AutoModelForCausalLM

    opts = opts or LoadOptions()
    src = check_source(spec)
    device = resolve_device(opts.device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(opts.dtype, device),
                              "revision": opts.revision,
                              "trust_remote_code": opts.trust_remote_code}
    if opts.attn_implementation:
        kwargs["attn_implementation"] = opts.attn_implementation
    if opts.device_map:
        kwargs["device_map"] = opts.device_map
    from sftscope.progress import quiet_libraries

    try:
        with quiet_libraries():
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        if is_local(spec):
            raise SftscopeError(f"{spec}: the model could not be loaded "
                                f"({str(e).splitlines()[0][:200]})") from e
        raise _hub_error(spec, e) from e
    if not opts.device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def fingerprint(spec: str, revision: str | None = None) -> dict[str, Any]:
    """Identify a model for run records and cache keys without hashing gigabytes.

    Local folders: SHA-256 of config.json plus, per weight file, its size and a hash of its
    first and last MiB. Hub ids: the id and revision.
    """
    path = Path(os.path.expanduser(spec))
    if not path.is_dir():
        return {"source": spec, "revision": revision, "local": False}
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir()
                   if p.suffix in (".json", ".safetensors", ".bin") and p.is_file())
    for p in files:
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return {"source": str(path.resolve()), "revision": revision, "local": True,
            "hash": h.hexdigest()[:24]}


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
    ts = load_tokenizer(sft, revision=revs.get("sft"))
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
