"""What a model reference points at, checked without importing torch or transformers.

The CLI calls these before any heavy import: a wrong path, a model that is not a causal LM, or a
pair that cannot be compared layer by layer is refused in well under a second, with one line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError, quoted
from sftscope.load.gguf import GGUF_SUFFIX, check_gguf, gguf_files
from sftscope.segments import mask_text

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Encoder-only families: they load through AutoModelForCausalLM only as a deliberate decoder.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta",
                 "deberta-v2", "camembert", "mpnet", "ernie", "modernbert", "esm", "vit", "clip",
                 "big_bird", "longformer", "funnel", "layoutlm", "squeezebert", "mobilebert"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
BLOCK_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def expand(spec: str) -> str:
    """``~`` expanded; a ``tune --method full`` run folder (no ``config.json`` of its own, the
    model in ``RUN/model``) stands for its ``model/`` folder."""
    path = os.path.expanduser(str(spec))
    model = os.path.join(path, "model")
    if (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
            and os.path.isfile(os.path.join(model, "config.json"))
            and not os.path.isfile(os.path.join(path, "adapter", "adapter_config.json"))):
        return model
    return path


def is_local(spec: str) -> bool:
    """True when ``spec`` names an existing path (a folder or a file)."""
    return os.path.exists(expand(spec))


def looks_like_path(spec: str) -> bool:
    """Written as a path (``./x``, ``/x``, ``~/x``, ``x/y/z``, ``C:\\x``) rather than a hub id."""
    s = str(spec)
    return (s.startswith((".", "/", "~", "\\")) or s.count("/") > 1 or "\\" in s
            or not _HUB_ID.match(s))


def _json_object(path: Path, missing: str, repair: str) -> dict[str, Any]:
    """The JSON object in ``path``; one line naming the file otherwise: ``missing`` when it is
    not there, and what is wrong plus ``repair`` when it cannot be read or holds no object."""
    if not path.is_file():
        raise SftscopeError(missing)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SftscopeError(f"{path} could not be read ({quoted(e)}); "
                            f"{repair}") from e
    if not isinstance(cfg, dict):
        raise SftscopeError(f"{path} is not a JSON object; {repair}")
    return cfg


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict, with one clear error when it is unusable."""
    return _json_object(Path(expand(str(folder))) / "config.json",
                        f"model folder {folder} has no config.json; point at a Hugging Face "
                        f"model folder (save_pretrained output)", "repair or re-save the model")


def get_key(cfg: Any, keys: tuple[str, ...]) -> Any:
    """The first of ``keys`` present in a config (a dict or a transformers config object)."""
    for k in keys:
        v = cfg.get(k) if isinstance(cfg, dict) else getattr(cfg, k, None)
        if v is not None:
            return v
    text = cfg.get("text_config") if isinstance(cfg, dict) else getattr(cfg, "text_config", None)
    if text is not None and text is not cfg:
        return get_key(text, keys)
    return None


def model_class(cfg: dict[str, Any]) -> str:
    """The class the checkpoint was saved from (or its model_type)."""
    archs = cfg.get("architectures") or []
    return str(archs[0]) if archs else f"model_type {cfg.get('model_type', '?')!r}"


def check_causal(cfg: dict[str, Any], spec: str) -> None:
    """Refuse a checkpoint that is not a decoder-only causal language model, naming its class."""
    archs = [str(a) for a in (cfg.get("architectures") or [])]
    mtype = str(cfg.get("model_type", ""))
    if cfg.get("is_encoder_decoder"):
        raise SftscopeError(f"{spec} is an encoder-decoder model ({model_class(cfg)}); sftscope "
                            f"analyses decoder-only causal language models")
    if archs and not any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        raise SftscopeError(f"{spec} is a {archs[0]}, not a causal language model "
                            f"(*ForCausalLM); point at a decoder-only LM checkpoint")
    if mtype in ENCODER_TYPES and not cfg.get("is_decoder"):
        raise SftscopeError(f"{spec} is an encoder model ({model_class(cfg)}), not a causal "
                            f"language model; point at a decoder-only LM checkpoint")


# ----------------------------------------------------------------------------- weight files


def pickle_error(folder: Path, name: str) -> SftscopeError:
    """The error for a folder that holds only pickle weights (never unpickled)."""
    return SftscopeError(
        f"{folder} holds only pickle weights ({name}); sftscope never unpickles checkpoints. "
        f"Convert once: AutoModelForCausalLM.from_pretrained('{folder}')"
        f".save_pretrained(OUT, safe_serialization=True), then pass OUT"
    )


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, name in the file, safetensors dtype, shape, bytes."""

    file: Path
    raw: str  # name inside the file
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte range in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte length + JSON) and check it against the file size, so
    that a truncated or corrupt file fails before any work is done."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > size - 8 or n > 1 << 30:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise SftscopeError(f"checkpoint file {path} is missing; re-download the checkpoint") from e
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise SftscopeError(
            f"checkpoint file {path} is corrupt or truncated ({e}); re-download or re-save it"
        ) from e
    if not isinstance(header, dict):
        raise SftscopeError(f"checkpoint file {path} has a corrupt header; re-download it")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    try:
        end = 0
        for name, meta in header.items():
            lo, hi = (int(x) for x in meta["data_offsets"])
            end = max(end, hi)
            out[name] = TensorInfo(path, name, str(meta["dtype"]),
                                    tuple(int(s) for s in meta["shape"]), 8 + n + lo, 8 + n + hi)
    except (KeyError, TypeError, ValueError) as e:
        raise SftscopeError(f"checkpoint file {path} has a corrupt header ({e}); "
                            f"re-download it") from e
    if end != data_len:
        raise SftscopeError(
            f"checkpoint file {path} is truncated or corrupt: its header describes {end} bytes "
            f"of tensor data but the file holds {data_len}; re-download or re-save it"
        )
    return out


def weight_files(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a Hugging Face folder: ``model.safetensors``, the shards named by
    ``model.safetensors.index.json``, or (no index) every ``*.safetensors`` file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SftscopeError(f"{index} is corrupt ({e}); re-download the checkpoint") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise SftscopeError(
                f"{index} names {len(missing)} missing shard(s) ({', '.join(missing[:3])}); "
                f"re-download the checkpoint"
            )
        headers = {f: read_header(folder / f) for f in files}
        out = {}
        for name, f in weight_map.items():
            if name not in headers[f]:
                raise SftscopeError(f"{index} says {name} is in {f}, but that shard does not "
                                    f"hold it; re-download the checkpoint")
            out[name] = headers[f][name]
        return out
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(
        p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_error(folder, pickles[0])
        raise SftscopeError(f"{folder} has no model.safetensors (or index); point at a Hugging "
                            f"Face model folder")
    out = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in out:
                raise SftscopeError(f"tensor {name} is in both {out[name].file.name} and "
                                    f"{f.name}; the folder mixes two checkpoints")
            out[name] = info
    return out


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSource:
    """A checked model reference.

    ``kind``: ``folder`` (a Hugging Face folder, ``config`` read), ``hub`` (an id, checked
    later), ``gguf`` (``path`` is the ``.gguf`` file, ``config`` from its header) or
    ``adapter`` (``path`` is the PEFT folder, ``base`` the checked model it applies to,
    ``config`` the base's, ``label`` names the tune run it came from).
    """

    spec: str
    kind: str  # "folder" | "hub" | "gguf" | "adapter"
    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    base: ModelSource | None = None
    label: str | None = None

    @property
    def n_blocks(self) -> int | None:
        v = get_key(self.config, BLOCK_KEYS)
        return int(v) if isinstance(v, int) else None

    @property
    def load_path(self) -> str:
        """What ``from_pretrained`` takes: the folder (a GGUF's folder) or the hub id."""
        if self.kind == "gguf" and self.path:
            return os.path.dirname(self.path)
        return self.path or self.spec

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file name (``from_pretrained(..., gguf_file=...)``), or None."""
        return os.path.basename(self.path) if self.kind == "gguf" and self.path else None


def source_kind(spec: str) -> str:
    """What a reference points at, cheaply and without checking it: ``adapter`` (a folder with
    ``adapter_config.json``, or a tune run folder), ``folder`` (with ``config.json``), ``gguf``
    (a ``.gguf`` file, or a folder without ``config.json`` holding ``.gguf`` files), ``hub``
    (not a path), ``missing`` or ``other`` (a folder or file of none of these)."""
    path = expand(spec)
    if os.path.isdir(path):
        p = Path(path)
        if (p / "config.json").is_file() and (find_adapter(p) != p or _has_model_weights(p)):
            return "folder"  # (some trainers save the base's config.json next to an adapter)
        if find_adapter(p) is not None:
            return "adapter"
        if gguf_files(p):
            return "gguf"
        return "other"
    if os.path.exists(path):
        return "gguf" if path.lower().endswith(GGUF_SUFFIX) else "other"
    return "missing" if looks_like_path(spec) else "hub"


def _has_model_weights(folder: Path) -> bool:
    """Full-model weight files (``model*.safetensors``, ``pytorch_model*.bin``, an index), not
    an adapter's or a trainer's (``training_args.bin``)."""
    return any(f.name.startswith(("model", "pytorch_model", "consolidated"))
               and (f.suffix == ".safetensors" or f.suffix in PICKLE_SUFFIXES
                    or f.name.endswith(".index.json"))
               for f in folder.iterdir() if f.is_file())


def check_model(spec: str, what: str = "model", *, base: str | None = None) -> ModelSource:
    """A model folder (with a causal-LM config.json), a GGUF file (or a folder holding exactly
    one), a PEFT adapter folder (or a tune run folder) with a usable base, or something shaped
    like a hub id. ``base``: the model an adapter applies to (default: the one it records)."""
    spec = str(spec)
    path = expand(spec)
    kind = source_kind(spec)
    if kind == "adapter":
        return check_adapter_source(spec, what, base=base)
    if kind == "gguf":
        return check_gguf_source(spec, what)
    if os.path.isdir(path):
        if kind == "other" and not (Path(path) / "config.json").exists():
            raise SftscopeError(f"model folder {spec} has no config.json; point at a Hugging "
                                f"Face model folder (save_pretrained output), a PEFT adapter "
                                f"folder or a .gguf file")
        cfg = read_config_json(path)
        check_causal(cfg, spec)
        check_weights(Path(path))
        return ModelSource(spec, "folder", path, cfg)
    if os.path.exists(path):
        raise SftscopeError(f"{what} {spec} is a file; give a model folder, a .gguf file or a "
                            f"hub id")
    if looks_like_path(spec):
        raise SftscopeError(f"{what} folder {spec} does not exist; check the path")
    return ModelSource(spec, "hub")


def check_gguf_source(spec: str, what: str = "model") -> ModelSource:
    """A ``.gguf`` file, or a folder holding exactly one, checked from its header."""
    path = expand(spec)
    if os.path.isdir(path):
        files = gguf_files(path)
        if len(files) > 1:
            names = ", ".join(p.name for p in files[:4])
            raise SftscopeError(f"{what} folder {spec} holds {len(files)} GGUF files ({names}"
                                f"{', ...' if len(files) > 4 else ''}); give the one to load "
                                f"as {os.path.join(spec, files[0].name)}")
        path = str(files[0])
    info = check_gguf(path, spec)
    return ModelSource(spec, "gguf", os.path.abspath(path), info.config())


# ----------------------------------------------------------------------------- adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "sftscope.json"  # written by ``tune`` next to the adapter: base fingerprint, ...


def find_adapter(folder: str | Path) -> Path | None:
    """The PEFT folder of ``folder``: itself, or ``folder/adapter`` (a tune run); else None."""
    p = Path(expand(str(folder)))
    for cand in (p, p / "adapter"):
        if (cand / ADAPTER_CONFIG).is_file():
            return cand
    return None


def adapter_folder(adapter: str | Path) -> Path:
    """The PEFT folder: ``adapter`` itself or ``adapter/adapter`` (a tune run folder)."""
    p = Path(expand(str(adapter)))
    if not p.exists():
        raise SftscopeError(f"adapter {adapter} does not exist; give the adapter folder "
                            f"(RUN/adapter of a tune run)")
    found = find_adapter(p)
    if found is None:
        raise SftscopeError(f"adapter {adapter} has no {ADAPTER_CONFIG}; give a PEFT adapter "
                            f"folder (RUN/adapter of a tune run)")
    return found


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict (one clear error when missing or not JSON)."""
    return _json_object(Path(folder) / ADAPTER_CONFIG,
                        f"adapter folder {folder} has no {ADAPTER_CONFIG}; point --adapter at a "
                        f"PEFT LoRA folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})",
                        "re-save the adapter")


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def adapter_meta(folder: Path) -> dict[str, Any]:
    """What ``tune`` recorded about an adapter (``sftscope.json``; ``{}`` for other adapters)."""
    return _read_json_or_empty(Path(folder) / ADAPTER_META)


def adapter_run(folder: Path) -> dict[str, Any]:
    """The ``run.json`` of the tune run an adapter belongs to (``RUN/adapter``), or ``{}``."""
    folder = Path(folder)
    return _read_json_or_empty(folder.parent / "run.json") if folder.name == "adapter" else {}


def adapter_label(folder: str | Path) -> str:
    """A short name for an adapter, from the tune run that made it: ``adapter m00100 r64 s0``
    (mask, full-depth rank budget, seed), ``adapter b6-11 r64 s0`` for explicit blocks; an
    adapter of another origin is named by its folder and rank."""
    folder = Path(expand(str(folder)))
    meta, run = adapter_meta(folder), adapter_run(folder)
    rcfg = run.get("config") if isinstance(run.get("config"), dict) else {}
    mask = rcfg.get("mask") or meta.get("mask")
    blocks = rcfg.get("blocks")
    rank = rcfg.get("rank", meta.get("full_rank"))
    seed = rcfg.get("seed", meta.get("seed"))
    if not (mask or blocks or meta):
        name = folder.parent.name if folder.name == "adapter" else folder.name
        r = read_adapter_config(folder).get("r")
        return f"adapter {name}" + (f" r{r}" if r is not None else "")
    parts = ["adapter"]
    if mask:
        parts.append(mask_text(str(mask)))
    elif blocks:
        parts.append(f"b{blocks}")
    elif meta.get("blocks"):
        b = meta["blocks"]
        parts.append(f"b{b[0]}-{b[-1]}" if isinstance(b, list) and b else f"b{b}")
    if rank is not None:
        parts.append(f"r{float(rank):g}")
    if seed is not None:
        parts.append(f"s{seed}")
    return " ".join(parts)


def adapter_base(src: ModelSource, revision: str | None,
                  base_revision: str | None) -> tuple[ModelSource, str | None]:
    """An adapter's base and the revision to load it at: the given base revision, else the
    adapter's own revision option, else the commit the adapter recorded for a hub base."""
    assert src.base is not None
    rev = base_revision or revision
    if rev is None and src.base.kind == "hub" and src.path is not None:
        fp = adapter_meta(Path(src.path)).get("base_fingerprint") or {}
        if isinstance(fp, dict) and fp.get("source") == src.base.spec:
            rev = fp.get("commit")
    return src.base, rev


def recorded_base(folder: Path) -> tuple[str | None, str | None, str]:
    """The base an adapter says it was made for: ``(spec, revision, what was tried)``.

    ``tune``'s record first (the resolved path of a local base, or the hub id and commit), then
    PEFT's ``base_model_name_or_path``. A path that no longer exists does not count.
    """
    meta = adapter_meta(folder)
    fp = meta.get("base_fingerprint") if isinstance(meta.get("base_fingerprint"), dict) else {}
    tried: list[str] = []
    cands: list[tuple[Any, Any]] = [(fp.get("source"), fp.get("commit")),
                                    (meta.get("base"), fp.get("commit")),
                                    (read_adapter_config(folder).get("base_model_name_or_path"),
                                     None)]
    for spec, rev in cands:
        if not spec or not isinstance(spec, str):
            continue
        if os.path.exists(expand(spec)):
            return spec, None, ""
        if looks_like_path(spec):
            tried.append(f"{spec!r} does not exist")
            continue
        return spec, rev if isinstance(rev, str) else None, ""
    return None, None, "; ".join(dict.fromkeys(tried)) or "it names none"


def _lora_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """Adapted module -> (in, out) from the adapter's safetensors header (torch-free)."""
    wfile = folder / ADAPTER_WEIGHTS
    if not wfile.is_file():
        if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
            return {}  # a .bin adapter: shapes are checked once loaded
        raise SftscopeError(f"adapter folder {folder} has no {ADAPTER_WEIGHTS}; re-save the "
                            f"adapter")
    out: dict[str, list[int]] = {}
    for name, info in read_header(wfile).items():
        m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_(A|B)(?:\.[^.]+)?\.weight$", name)
        if not m or len(info.shape) != 2:
            continue
        io = out.setdefault(m.group(1), [0, 0])
        if m.group(2) == "A":
            io[0] = info.shape[1]
        else:
            io[1] = info.shape[0]
    return {k: (v[0], v[1]) for k, v in out.items() if v[0] and v[1]}


def fused_targets(adapter_config: dict[str, Any]) -> dict[str, list[str]]:
    """Module path -> the parameters of it that PEFT adapts directly (``target_parameters``:
    an MoE's fused expert weights, one LoRA pair per expert)."""
    out: dict[str, list[str]] = {}
    for t in adapter_config.get("target_parameters") or ():
        mod, _, name = str(t).rpartition(".")
        out.setdefault(mod, []).append(name)
    return out


def check_adapter_shapes(folder: Path, spec: str, base: ModelSource) -> None:
    """Refuse an adapter whose LoRA factors do not fit the base's weights (safetensors headers
    only; a GGUF or hub base is checked once loaded)."""
    if base.kind != "folder" or base.path is None:
        return
    shapes = _lora_shapes(folder)
    if not shapes:
        return
    try:
        weights = {n: i.shape for n, i in weight_files(Path(base.path)).items()}
    except SftscopeError:
        return  # pickle-only base: checked once loaded
    acfg = read_adapter_config(folder)
    made_for = acfg.get("base_model_name_or_path")
    fused = fused_targets(acfg)
    for module, (fin, fout) in sorted(shapes.items()):
        if module.replace(".base_layer", "") in fused:
            continue  # fused expert parameters (per-expert tensors on disk): checked loaded
        w = weights.get(module + ".weight")
        if w is None:  # another naming of the root: match on the path below it
            tail = module.split(".", 1)[-1] + ".weight"
            w = next((s for n, s in weights.items() if n.endswith(tail)), None)
        if w is None:
            raise SftscopeError(
                f"adapter {spec} does not fit base {base.spec}: it adapts {module}, which the "
                f"base does not have (made for {made_for}); pass the base it was made for")
        if len(w) != 2 or tuple(w) not in ((fout, fin), (fin, fout)):
            raise SftscopeError(
                f"adapter {spec} does not fit base {base.spec}: {module} is {list(w)} in the "
                f"base but the adapter was made for in {fin} / out {fout} (made for "
                f"{made_for}); pass the base it was made for")


def check_adapter_source(spec: str, what: str = "model", *,
                         base: str | None = None) -> ModelSource:
    """A PEFT adapter folder (or tune run folder) and the base it applies to: ``base`` when
    given (an adapter given as ``base`` stands for its own base), else the base the adapter
    records. Refuses an adapter without a usable base or with factors that do not fit it."""
    folder = adapter_folder(spec)
    read_adapter_config(folder)
    if base is not None:
        b = check_model(base, "base model")
        if b.kind == "adapter":
            b = b.base
        assert b is not None
        rec, _, _ = recorded_base(folder)
        if rec is not None and os.path.exists(expand(rec)):
            made = check_model(rec, "recorded base")
            made = made.base if made.kind == "adapter" and made.base else made
            for keys, say in ((BLOCK_KEYS, "{} blocks"), (HIDDEN_KEYS, "hidden size {}")):
                x, y = get_key(made.config, keys), get_key(b.config, keys)
                if x is not None and y is not None and x != y:
                    raise SftscopeError(
                        f"adapter {spec} was made for {rec} ({say.format(x)}) but --base "
                        f"{base} has {say.format(y)}; pass the base it was made for")
    else:
        rec, _, why = recorded_base(folder)
        if rec is None:
            raise SftscopeError(f"adapter {spec} names no usable base model "
                                f"(base_model_name_or_path: {why}); pass --base")
        b = check_model(rec, f"base model of adapter {spec}")
        if b.kind == "adapter":
            raise SftscopeError(f"adapter {spec} records another adapter ({rec}) as its base; "
                                f"pass --base")
    check_adapter_shapes(folder, spec, b)
    return ModelSource(spec, "adapter", str(folder), b.config, base=b,
                       label=adapter_label(folder))


def check_weights(folder: Path) -> None:
    """The folder's safetensors weights are all there and whole (headers against file sizes);
    a folder with only pickle weights (``.bin``) is left to transformers to load."""
    has_st = (folder / "model.safetensors.index.json").is_file() or any(
        not p.name.startswith("adapter_model") for p in folder.glob("*.safetensors"))
    if has_st:
        weight_files(folder)
        return
    if not any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise SftscopeError(f"model folder {folder} has no weights (model.safetensors or "
                            f"shards); re-save or re-download the model")


def check_folder(spec: str, what: str) -> str:
    """An existing local folder (e.g. an adapter), or one clear error."""
    path = expand(spec)
    if not os.path.exists(path):
        raise SftscopeError(f"{what} {spec} does not exist; check the path")
    if not os.path.isdir(path):
        raise SftscopeError(f"{what} {spec} is a file; give a folder")
    return path


@dataclass
class PairInfo:
    """What was checked about a Base/SFT pair before any compute."""

    n_blocks: int
    hidden_size: int
    model_type: str
    vocab_base: int
    vocab_sft: int
    notes: list[str] = field(default_factory=list)

    @property
    def added_vocab(self) -> int:
        return max(0, self.vocab_sft - self.vocab_base)


def check_pair(base_cfg: Any, sft_cfg: Any, base: str = "base", sft: str = "sft", *,
               allow_mixed: bool = False) -> PairInfo:
    """Refuse pairs that cannot be compared layer by layer; report a larger SFT vocabulary.

    Configs may be dicts (config.json) or transformers config objects.
    """
    def mtype(c: Any) -> str:
        return str((c.get("model_type") if isinstance(c, dict) else getattr(c, "model_type", ""))
                   or "")

    lb, ls = get_key(base_cfg, BLOCK_KEYS), get_key(sft_cfg, BLOCK_KEYS)
    db, ds = get_key(base_cfg, HIDDEN_KEYS), get_key(sft_cfg, HIDDEN_KEYS)
    tb, ts = mtype(base_cfg), mtype(sft_cfg)
    notes: list[str] = []
    if tb != ts:
        if not allow_mixed:
            raise SftscopeError(
                f"the pair does not match: {base} is a {tb or '?'} model, {sft} a {ts or '?'} "
                f"model; compare a model with its own fine-tuned version (--allow-mixed-pair "
                f"compares different architectures of equal depth and width on purpose)")
        notes.append(f"model types differ: {tb} vs {ts} (--allow-mixed-pair)")
    if lb is None or db is None:
        raise SftscopeError(f"{base}: its config names no block count or hidden size")
    if lb != ls:
        raise SftscopeError(f"the pair does not match: {base} has {lb} blocks, {sft} has {ls}; "
                            f"compare a model with its own fine-tuned version")
    if db != ds:
        raise SftscopeError(f"the pair does not match: hidden size {db} ({base}) vs {ds} ({sft})")
    vb = get_key(base_cfg, ("vocab_size",))
    vs = get_key(sft_cfg, ("vocab_size",))
    vb, vs = int(vb or 0), int(vs or 0)
    if vs > vb:
        notes.append(f"SFT vocabulary has {vs - vb} added tokens ({vb} -> {vs})")
    elif vs < vb:
        raise SftscopeError(f"the SFT vocabulary ({vs}) is smaller than the base's ({vb}); "
                            f"the pair does not share token ids")
    return PairInfo(int(lb), int(db), tb, vb, vs, notes)
