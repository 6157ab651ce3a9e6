"""Options shared by several commands."""

from __future__ import annotations

import typer

from sftscope.errors import SftscopeError

TABLE_FORMATS = ("csv", "parquet", "json")


def formats_option():
    return typer.Option("csv", help="Table formats, comma-separated: csv, parquet, json.")


def split_formats(value: str) -> tuple[str, ...]:
    """Parse ``csv,parquet`` into a validated tuple."""
    fmts = tuple(f.strip() for f in value.split(",") if f.strip())
    bad = [f for f in fmts if f not in TABLE_FORMATS]
    if bad or not fmts:
        raise SftscopeError(f"unknown table format {', '.join(bad) or value!r}; "
                            f"use {', '.join(TABLE_FORMATS)}")
    return fmts
