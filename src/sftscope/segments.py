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


def parse_states(spec: str, n_blocks: int | None = None) -> list[int]:
    """Hidden states ``j`` named by a list in the block-list syntax (``2``, ``0-2,4``), sorted;
    with ``n_blocks`` each must be one of the model's ``0..n_blocks`` (``j = b + 1`` is the
    output of block ``b``, 0 the embeddings)."""
    states: set[int] = set()
    for lo, hi in parse_blocks_syntax(spec):
        if n_blocks is not None and hi > n_blocks:
            raise SftscopeError(
                f"hidden state {hi} is outside the hidden states 0..{n_blocks} ({n_blocks} "
                f"blocks; j = b + 1 is the output of block b)")
        states.update(range(lo, hi + 1))
    return sorted(states)


def block_text(blocks: list[int], empty: str = "") -> str:
    """Blocks as ranges, e.g. ``[6, 7, 8, 9, 10, 11, 14]`` -> ``6-11,14`` (sorted; ``empty``
    when there is none): the one way logs, tables and reports write a block list."""
    b = sorted(int(x) for x in blocks)
    if not b:
        return empty
    parts, start, prev = [], b[0], b[0]
    for x in [*b[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


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


# ----------------------------------------------------------------------------- masks in tables
#
# A mask such as ``00100`` looks like a number to any CSV reader: ``pd.read_csv`` turns it into
# the integer 100. Every table sftscope writes therefore stores masks with a one-letter prefix,
# ``m00100``, which every reader keeps as text; readers accept both forms (and repair the
# integer form when the number of segments is known).

MASK_PREFIX = "m"
MASK_COLUMNS = ("mask", "best_mask", "prior_mask")


def is_mask(value: object) -> bool:
    """A non-empty string of ``0``/``1`` (no prefix)."""
    return isinstance(value, str) and bool(value) and set(value) <= {"0", "1"}


def mask_text(mask: object) -> str:
    """A mask as written in tables: ``01000`` -> ``m01000`` (anything else unchanged)."""
    m = mask_from_text(mask)
    return f"{MASK_PREFIX}{m}" if is_mask(m) else m


def mask_from_text(value: object, k: int | None = None) -> str:
    """A mask read back from a table: ``m01000``, ``01000``, or the number a CSV reader made of
    it (``1000``, ``1000.0``; left-padded with zeros to ``k`` segments when ``k`` is given).
    Empty cells give ``""``; text that is not a mask is returned stripped."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if value.is_integer():
            value = int(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        s = str(value)
        return s.zfill(k) if k and is_mask(s) and len(s) < k else s
    s = str(value).strip()
    if s.lower() in ("", "nan", "none"):
        return ""
    if s[:1] == MASK_PREFIX and is_mask(s[1:]):
        return s[1:]
    if s.endswith(".0") and is_mask(s[:-2]):  # a float column written back as text
        s = s[:-2]
        return s.zfill(k) if k and len(s) < k else s
    return s


def masks_as_text(df, columns: tuple[str, ...] = MASK_COLUMNS):
    """A copy of ``df`` with its mask columns in the table form (``m01000``), for writers."""
    out = df.copy()
    for c in columns:
        if c in out.columns:
            out[c] = out[c].map(mask_text)
    return out


def masks_from_text(df, k: int | None = None, columns: tuple[str, ...] = MASK_COLUMNS):
    """A copy of ``df`` with its mask columns as plain masks (``01000``), for readers."""
    out = df.copy()
    for c in columns:
        if c in out.columns:
            out[c] = out[c].map(lambda v: mask_from_text(v, k)).astype(object)
    return out


def mask_centre(mask: str) -> float | None:
    """Mean relative depth ``(i + 0.5) / K`` of the segments a mask selects (None if none)."""
    if not is_mask(mask) or "1" not in mask:
        return None
    k = len(mask)
    pos = [(i + 0.5) / k for i, c in enumerate(mask) if c == "1"]
    return sum(pos) / len(pos)


def mask_sort_key(mask: object) -> tuple:
    """The one order of masks in tables and plots: full depth first, then by the number of
    selected segments (one-segment masks first), then by the depth of their centre (bottom
    first), then by text; anything that is not a mask comes last."""
    m = mask_from_text(mask)
    if not is_mask(m):
        return (2, 0, 0.0, m)
    ones = m.count("1")
    if ones == len(m):
        return (0, 0, 0.0, m)
    return (1, ones, mask_centre(m) or 0.0, m)
