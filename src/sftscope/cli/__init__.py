"""Command-line interface: thin commands over the Python API.

Every command module registers itself on ``app``. ``sftscope --config FILE <command>`` reads
defaults for any flag from a YAML/TOML/JSON file (a section per command, keys are the flag
names with ``_`` or ``-``), so a config file mirrors the CLI exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import typer

from sftscope.errors import SftscopeError

app = typer.Typer(
    name="sftscope",
    help="Where, in depth, did fine-tuning change the model? Layer-wise analysis of Base/SFT "
    "pairs, logit-lens probing, layer swapping and Mid-Block (segment) LoRA tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a config file into ``{command: {flag: value}}``."""
    if not path.is_file():
        raise SftscopeError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            import json

            data = json.loads(text)
        else:
            raise SftscopeError(f"config file {path}: use .yaml, .toml or .json")
    except SftscopeError:
        raise
    except Exception as e:  # parser errors of three libraries
        raise SftscopeError(f"config file {path} could not be parsed: {e}") from e
    if not isinstance(data, dict):
        raise SftscopeError(f"config file {path} must map command names to their options")
    return {str(cmd): {str(k).replace("-", "_"): v for k, v in (opts or {}).items()}
            for cmd, opts in data.items()}


@app.callback()
def _root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", help="YAML/TOML/JSON file with a section per command; its keys are "
        "flag names and set their defaults (flags given on the command line win).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    if quiet:
        import os

        os.environ["SFTSCOPE_NO_PROGRESS"] = "1"
    if config is not None:
        ctx.default_map = load_config_file(config)


# Command modules register themselves on import.
from sftscope.cli import commands  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors are one line and exit status 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="sftscope", standalone_mode=False)
    except SftscopeError as e:
        print(f"sftscope: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        sys.exit(0)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except click.exceptions.Abort:
        print("sftscope: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("sftscope: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
