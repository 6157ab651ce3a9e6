"""GGUF files (llama.cpp's format), checked without torch, transformers or the gguf package.

A ``.gguf`` file holds the weights (often quantized), the tokenizer and the hyper-parameters of
one model. ``read_gguf`` parses the header (magic, version, metadata, tensor table) and checks
the file against it, so that a wrong, truncated or unsupported file is refused in well under a
second. Loading (dequantising into a dense model) is ``load.models``' job, through transformers'
``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sftscope.errors import SftscopeError

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
VERSIONS = (2, 3)  # version 1 (2023) used 32-bit lengths; nothing current writes it
DEFAULT_ALIGNMENT = 32

# ggml tensor types: (elements per block, bytes per block), as in ggml.h / gguf-py.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# general.architecture -> transformers model_type, for the causal-LM families transformers
# reads from GGUF. Other names are left to transformers to accept or refuse at load time.
GGUF_ARCHS = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen2moe": "qwen2_moe",
    "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gemma2": "gemma2", "gemma3": "gemma3_text",
    "phi3": "phi3", "falcon": "falcon", "gpt2": "gpt2", "bloom": "bloom",
    "stablelm": "stablelm", "starcoder2": "starcoder2", "nemotron": "nemotron",
    "deci": "deci", "lfm2": "lfm2", "gpt-oss": "gpt_oss", "mamba": "mamba",
    "minimax-m2": "minimax_m2",
}
# Mixture-of-experts hyper-parameters: config key -> GGUF key (``{arch}.`` prefixed).
# transformers 5.25 maps the first two only; ``load.models`` passes the expert sizes on.
MOE_KEYS = {"num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
            "moe_intermediate_size": "expert_feed_forward_length",
            "shared_expert_intermediate_size": "expert_shared_feed_forward_length"}
GGUF_MOE_SIZES = ("moe_intermediate_size", "shared_expert_intermediate_size")
# Families that are not decoder-only language models.
GGUF_NOT_CAUSAL = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5", "t5encoder",
                   "clip", "roberta", "xlm-roberta", "wavtokenizer-dec", "neo-bert"}

# Metadata value types: struct format, or None for string (8) and array (9).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GgufInfo:
    """What the header of a GGUF file says (the tensors' data is not read)."""

    path: Path
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays as their length
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (shape, ggml type, offset)
    data_start: int
    data_bytes: int | None  # bytes the tensor table describes (None: an unknown tensor type)
    notes: list[str] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}")

    def config(self) -> dict[str, Any]:
        """A ``config.json``-like dict: what the torch-free pair checks need."""
        arch = self.architecture
        vocab = self.arch_key("vocab_size") or self.metadata.get("tokenizer.ggml.tokens")
        cfg: dict[str, Any] = {"model_type": GGUF_ARCHS.get(arch, arch),
                               "gguf_architecture": arch,
                               "num_hidden_layers": self.arch_key("block_count"),
                               "hidden_size": self.arch_key("embedding_length"),
                               "vocab_size": vocab}
        cfg.update({k: self.arch_key(g) for k, g in MOE_KEYS.items()})
        return {k: v for k, v in cfg.items() if v is not None}


def _bad(path: Path, what: str) -> SftscopeError:
    return SftscopeError(f"GGUF file {path} {what}; re-download or re-convert it")


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int, endian: str) -> None:
        self.f, self.path, self.size, self.e = f, path, size, endian

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) < n:
            raise _bad(self.path, "is truncated inside its header")
        return b

    def num(self, fmt: str) -> Any:
        return struct.unpack(self.e + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.num("Q")
        if n > self.size:
            raise _bad(self.path, f"has a corrupt header (a string of {n} bytes)")
        return self.take(n).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise _bad(self.path, "is truncated inside its header")
        self.f.seek(n, os.SEEK_CUR)

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.num(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.num("I"), self.num("Q")
            if count > self.size:
                raise _bad(self.path, f"has a corrupt header (an array of {count} items)")
            if etype in _SCALAR:
                self.skip(count * struct.calcsize(_SCALAR[etype]))
            else:
                for _ in range(count):
                    self.value(etype)
            return count
        raise _bad(self.path, f"has a corrupt header (metadata value type {vtype})")


def read_gguf(path: str | Path) -> GgufInfo:
    """Parse and check a GGUF header: magic, version, metadata, tensor table, and that the file
    holds all the tensor data the table describes. One clear error for anything wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise SftscopeError(f"{path} is not a GGUF file (it starts with {magic[:4]!r}, "
                                    f"not b'GGUF'); give a .gguf model file")
            raw = f.read(4)
            if len(raw) < 4:
                raise _bad(path, "is truncated inside its header")
            endian = "<"
            version = struct.unpack("<I", raw)[0]
            if version not in VERSIONS and struct.unpack(">I", raw)[0] in VERSIONS:
                endian, version = ">", struct.unpack(">I", raw)[0]
            if version == 1:
                raise SftscopeError(f"GGUF file {path} has format version 1, which nothing reads "
                                    f"any more; re-convert it with a current llama.cpp")
            if version not in VERSIONS:
                raise SftscopeError(f"GGUF file {path} has format version {version}, which "
                                    f"sftscope does not know (it reads 2 and 3); re-convert it "
                                    f"or update sftscope")
            r = _Reader(f, path, size, endian)
            n_tensors, n_kv = r.num("Q"), r.num("Q")
            if n_tensors > size or n_kv > size:
                raise _bad(path, "has a corrupt header")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.num("I"))
            tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.num("I")
                if n_dims > 8:
                    raise _bad(path, f"has a corrupt tensor table ({name}: {n_dims} dims)")
                shape = tuple(r.num("Q") for _ in range(n_dims))
                tensors[name] = (shape, r.num("I"), r.num("Q"))
            pos = f.tell()
    except OSError as e:
        raise SftscopeError(f"GGUF file {path} could not be read ({e})") from e
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0:
        align = DEFAULT_ALIGNMENT
    start = -(-pos // align) * align
    notes: list[str] = []
    end = 0
    known = True
    for shape, ttype, offset in tensors.values():
        n = 1
        for d in shape:
            n *= d
        t = GGML_TYPES.get(ttype)
        if t is None:
            known = False
            end = max(end, offset)
            continue
        _, block, nbytes = t
        end = max(end, offset + (n // block) * nbytes)
    if not known:
        notes.append(f"{path.name}: tensor types unknown to sftscope; data size not checked")
    if start + end > size:
        raise SftscopeError(
            f"GGUF file {path} is truncated: its header describes {start + end} bytes but the "
            f"file holds {size}; re-download it")
    if not tensors:
        raise _bad(path, "holds no tensors")
    return GgufInfo(path, version, meta, tensors, start, end if known else None, notes)


def gguf_files(folder: str | Path) -> list[Path]:
    """The ``.gguf`` files directly in a folder, sorted."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.name.lower().endswith(GGUF_SUFFIX))


def check_gguf(path: str | Path, spec: str) -> GgufInfo:
    """A whole GGUF file of a decoder-only language model (torch-free)."""
    info = read_gguf(path)
    arch = info.architecture
    if not arch:
        raise SftscopeError(f"GGUF file {path} names no general.architecture; re-convert it")
    if arch in GGUF_NOT_CAUSAL:
        raise SftscopeError(f"{spec} is a GGUF of a {arch} model, not a causal language model; "
                            f"point at a decoder-only LM")
    if info.arch_key("block_count") is None:
        raise SftscopeError(f"GGUF file {path} names no {arch}.block_count; re-convert it")
    need_gguf()  # before any work: loading it will need the package
    return info


def need_gguf() -> None:
    """Refuse to load a GGUF without the ``gguf`` package (transformers reads GGUF with it);
    checked without importing it."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise SftscopeError("reading GGUF files needs the gguf package: pip install gguf")


def supported_by_transformers(arch: str) -> tuple[bool, list[str]]:
    """Whether the installed transformers reads GGUF files of this architecture (imports
    transformers: for load time, not for the torch-free checks)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # older or newer layout: let from_pretrained decide
        return True, []
    names = sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
    norm = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe"), GGUF_ARCHS.get(arch, arch)}
    return bool(norm & set(names)), names
