"""Depth segments and masks: one rule for swapping, LoRA, sweeps and plots.

Segment ``i`` of ``K`` over ``L`` blocks covers blocks ``[(i*L)//K, ((i+1)*L)//K)``. A mask is a
string of ``K`` characters ``0``/``1`` read bottom segment first (next to the embeddings).
"""

from __future__ import annotations

import itertools
import re

from sftscope.errors import SftscopeError


def segment_bounds(n_blocks: int, k: int) -> list[tuple[int, int]]:
    """Half-open block ranges of the ``k`` segments over ``n_blocks`` blocks."""
    if k < 1:
        raise SftscopeError(f"--segments must be at least 1, got {k}")
    if k > n_blocks:
        raise SftscopeError(
            f"--segments {k} is larger than the model's {n_blocks} blocks; use at most {n_blocks}"
        )
    return [((i * n_blocks) // k, ((i + 1) * n_blocks) // k) for i in range(k)]


def segment_of_block(block: int, n_blocks: int, k: int) -> int:
    """Index of the segment that holds ``block``."""
    for i, (lo, hi) in enumerate(segment_bounds(n_blocks, k)):
        if lo <= block < hi:
            return i
    raise SftscopeError(f"block {block} is outside 0..{n_blocks - 1}")


def parse_mask(mask: str, k: int | None = None, *, allow_empty: bool = False) -> str:
    """Validate a mask string (``01000``); ``k`` is the expected length if known."""
    mask = mask.strip()
    if not mask or set(mask) - {"0", "1"}:
        raise SftscopeError(
            f"mask {mask!r} must be a string of 0 and 1, bottom segment first (e.g. 01000)"
        )
    if k is not None and len(mask) != k:
        raise SftscopeError(
            f"mask {mask!r} has {len(mask)} characters but --segments is {k}; "
            f"give one character per segment"
        )
    if not allow_empty and "1" not in mask:
        raise SftscopeError(f"mask {mask!r} selects no segment; set at least one 1")
    return mask


def mask_blocks(mask: str, n_blocks: int) -> list[int]:
    """Blocks selected by a mask (its length is the number of segments)."""
    mask = parse_mask(mask, allow_empty=True)
    bounds = segment_bounds(n_blocks, len(mask))
    return [b for bit, (lo, hi) in zip(mask, bounds) if bit == "1" for b in range(lo, hi)]


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_blocks_syntax(spec: str) -> list[tuple[int, int]]:
    """The inclusive ranges of a block list such as ``6-11,14`` (syntax only)."""
    ranges: list[tuple[int, int]] = []
    for part in spec.replace(" ", "").split(","):
        m = _RANGE.match(part)
        if not m:
            raise SftscopeError(
                f"block list {spec!r}: {part!r} is not a block or range; use e.g. 6-11,14"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise SftscopeError(f"block list {spec!r}: range {part} runs backwards")
        ranges.append((lo, hi))
    return ranges


def parse_blocks(spec: str, n_blocks: int) -> list[int]:
    """Parse an explicit block list such as ``6-11,14`` (inclusive ranges, 0-based)."""
    blocks: set[int] = set()
    for lo, hi in parse_blocks_syntax(spec):
        if hi >= n_blocks:
            raise SftscopeError(
                f"block list {spec!r}: block {hi} does not exist "
                f"(the model has blocks 0..{n_blocks - 1})"
            )
        blocks.update(range(lo, hi + 1))
    if not blocks:
        raise SftscopeError(f"block list {spec!r} selects no block")
    return sorted(blocks)


def all_masks(k: int) -> list[str]:
    """Every non-empty mask of ``k`` segments."""
    return ["".join(bits) for bits in itertools.product("01", repeat=k) if "1" in bits]


def single_masks(k: int) -> list[str]:
    """The ``k`` one-segment masks, then full depth."""
    return ["".join("1" if j == i else "0" for j in range(k)) for i in range(k)] + ["1" * k]


PAPER_MASKS: dict[int, list[str]] = {
    5: ["11111", "10000", "01000", "00100", "00010", "00001", "01100", "00110", "01110"],
    3: ["111", "100", "010", "001", "110", "011"],
    10: ["1111111111"] + ["".join("1" if j == i else "0" for j in range(10)) for i in range(10)],
}


def mask_group(name: str, k: int) -> list[str]:
    """Expand a mask group (``singles``, ``paper``, ``all``) or a comma list of masks."""
    groups = {"singles": single_masks, "all": all_masks}
    out: list[str] = []
    for item in [p.strip() for p in name.split(",") if p.strip()]:
        if item in groups:
            out += groups[item](k)
        elif item == "paper":
            out += PAPER_MASKS.get(k, single_masks(k))
        elif set(item) <= {"0", "1"}:
            out.append(parse_mask(item, k))
        else:
            raise SftscopeError(
                f"unknown mask group {item!r}: use singles, paper, all, or masks like 01000"
            )
    return list(dict.fromkeys(out))


def relative_depth(j: int, n_states: int) -> float:
    """Hidden-state index ``j`` of ``0..n_states-1`` as a fraction of depth (0 = embeddings)."""
    return j / max(n_states - 1, 1)
