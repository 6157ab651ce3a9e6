"""Command-line interface: commands generated from the typed configs, thin over the Python API.

``sftscope --config FILE <command>`` (or ``<command> --config FILE``) reads defaults for any flag
from a YAML/TOML/JSON file with a section per command, keys being flag names (``-`` or ``_``);
flags given on the command line win. Bad input of any kind -- a typo'd flag, a wrong type, a
missing file, a wrong kind of model -- is one line on stderr and exit status 2, decided before
torch or transformers are imported.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from sftscope.errors import SftscopeError
from sftscope.version import __version__

INTERRUPTED = "interrupted; run the same command again to resume"


class _Group(click.Group):
    """Unknown commands get a did-you-mean; bare ``sftscope`` prints help."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and name not in self.commands and not name.startswith("-"):
            from sftscope.config.core import did_you_mean

            raise click.UsageError(f"unknown command {name!r}"
                                   + did_you_mean(name, self.commands)
                                   + f"; commands: {', '.join(self.commands)}")
        return super().resolve_command(ctx, args)


@click.group(cls=_Group, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config", default=None, metavar="FILE",
              help="YAML/TOML/JSON file with a section per command; its keys are flag names "
              "and set their defaults (flags given on the command line win).")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No progress display.")
@click.version_option(__version__, "--version", prog_name="sftscope")
@click.pass_context
def app(ctx: click.Context, config: str | None, quiet: bool) -> None:
    """Where, in depth, did fine-tuning change the model? Layer-wise analysis of Base/SFT
    pairs, logit-lens probing, layer swapping and Mid-Block (segment) LoRA tuning.

    Every command has --help. Bad input: one line on stderr, exit status 2."""
    if quiet:
        import os

        os.environ["SFTSCOPE_NO_PROGRESS"] = "1"
    ctx.ensure_object(dict)
    if config is not None:
        from sftscope.cli.build import load_config_file

        ctx.obj["config"] = load_config_file(Path(config))
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _register() -> None:
    from sftscope.cli.build import make_command
    from sftscope.cli.runners import COMMANDS

    for name, (cls, runner, text) in COMMANDS.items():
        short = text.strip().splitlines()[0].rstrip(".")
        app.add_command(make_command(name, cls, runner, text, short_help=short))


_register()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fail(message: str, code: int = 2) -> None:
    from sftscope.parallel import is_main, world_size

    if world_size() > 1:  # the launcher stops the others after a failure: no traceback of
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # its SIGTERM while this one exits
    if is_main():  # under a launcher every rank fails the same way; one of them says so
        print(f"sftscope: error: {message}", file=sys.stderr)
    sys.exit(code)


def _peer_failed() -> None:
    """Under torchrun, a process that died makes the launcher stop the others: say which one
    died (one line, exit 2) rather than that this one was interrupted."""
    from sftscope.parallel import lost_peer, world_size

    if world_size() > 1:
        lost = lost_peer(world_size(), wait_s=0.5)
        if lost is not None:
            _fail(str(lost))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors are one line and exit status 2, never a traceback."""
    import os

    from sftscope.process import setup_process
    from sftscope.runs import DISK_ERRNOS, disk_error

    # Waiting OpenMP threads sleep, freed memory stays in the heap (see process.py): before
    # torch starts its thread pool, which no command has done yet at this point.
    setup_process()
    # sftscope reports progress itself: the hub's and transformers' own bars stay off
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = app.main(args=args, prog_name="sftscope", standalone_mode=False)
    except click.exceptions.Exit as e:  # --help, --version
        sys.exit(e.exit_code)
    except click.exceptions.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "sftscope"
        msg = " ".join(e.format_message().split())
        _fail(f"{msg[:1].lower() + msg[1:]}; see '{cmd} --help'")
    except click.exceptions.Abort:  # click's name for a KeyboardInterrupt inside a command
        _peer_failed()
        print(f"sftscope: {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        _peer_failed()  # under a launcher, the signal may be the launcher's after a death
        print(f"sftscope: {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    except SftscopeError as e:
        if type(e).__name__ == "Interrupted":
            print(f"sftscope: {e}", file=sys.stderr)
            sys.exit(130)
        _fail(" ".join(str(e).split()))
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            _fail(str(disk_error(e)))
        raise
    except MemoryError:
        _fail("out of memory; use a smaller --batch-size or --limit, or a larger machine")
    sys.exit(rv if isinstance(rv, int) else 0)
