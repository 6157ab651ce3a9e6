"""One progress display for every long command.

- A command announces its stages (``with stages(4): ...; stage("capture base")``) and every bar
  is labelled with the overall stage: ``[2/4 capture base]``.
- ``track(items, description, total, tokens=...)`` shows items done, items/s, tokens/s and the
  ETA. On a terminal this is a live bar (rich); when stderr is a file or a pipe, one plain line
  every ``SFTSCOPE_PROGRESS_EVERY`` seconds (default 30) and one at the end, so a log shows
  progress without a wall of carriage returns.
- The libraries' own bars and chatter (transformers loading bars, hub downloads, datasets) are
  silenced while sftscope reports (``quiet_libraries``); the Trainer reports through
  ``trainer_callback``.
- ``SFTSCOPE_NO_PROGRESS=1`` (or ``sftscope --quiet``) turns progress off; ``say`` still prints.
- Under a launcher (``torchrun``, ``accelerate launch``) only rank 0 reports: the other ranks
  show no progress and ``say`` nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_STAGE: dict[str, Any] = {"i": 0, "n": 0, "name": ""}


def _main_rank() -> bool:
    from sftscope.parallel import is_main

    return is_main()


def enabled() -> bool:
    """Progress is on unless ``SFTSCOPE_NO_PROGRESS`` is set (and only on rank 0)."""
    return not os.environ.get("SFTSCOPE_NO_PROGRESS") and _main_rank()


def interactive() -> bool:
    """stderr is a terminal (live bars) rather than a log file or pipe (periodic lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def every_seconds() -> float:
    """Seconds between plain progress lines when stderr is not a terminal."""
    try:
        return max(0.0, float(os.environ.get("SFTSCOPE_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


@contextlib.contextmanager
def stages(n: int) -> Iterator[None]:
    """Declare that the command runs ``n`` stages; ``stage(name)`` then counts them."""
    old = dict(_STAGE)
    _STAGE.update(i=0, n=n, name="")
    try:
        yield
    finally:
        _STAGE.update(old)


def plan(n: int) -> None:
    """Set how many stages the running command will announce (counting starts again)."""
    _STAGE.update(i=0, n=max(0, int(n)), name="")


# Context managers every staged command runs inside, registered by the layers above that need
# one (``runs`` registers its ``claims_scope``: a command's run folder is released however it
# ends); progress itself knows none of them.
COMMAND_SCOPES: list[Callable[[], contextlib.AbstractContextManager]] = []


def staged(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a command: its ``plan``/``stage`` calls are its own and undone when it returns
    (a command run inside another, as the demo and sweep do, does not disturb the outer one),
    and it runs inside every registered ``COMMAND_SCOPES`` (the run folder it claimed is
    released however it ends)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with contextlib.ExitStack() as scopes:
            scopes.enter_context(stages(0))
            for scope in COMMAND_SCOPES:
                scopes.enter_context(scope())
            return fn(*args, **kwargs)

    return wrapper


def stage(name: str) -> None:
    """Enter the next stage (``[i/n name]``); printed once when progress is on."""
    _STAGE["i"] = min(_STAGE["i"] + 1, _STAGE["n"]) if _STAGE["n"] else _STAGE["i"] + 1
    _STAGE["name"] = name
    if enabled():
        say(f"[bold]{stage_label()}[/]")


def stage_label(description: str | None = None) -> str:
    """``[2/4 capture base]`` (or the description alone outside a staged command)."""
    name = description or _STAGE["name"]
    if _STAGE["n"]:
        return f"[{_STAGE['i']}/{_STAGE['n']} {name}]"
    return name


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Meter:
    """Counts items and tokens over time; formats a one-line status."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens

    def line(self) -> str:
        el = time.perf_counter() - self.t0
        rate = self.done / el if el > 0 else 0.0
        parts = [f"{self.done}/{self.total}" if self.total else f"{self.done}",
                 f"{self.unit}"]
        if self.total:
            parts[-1] += f" ({100 * self.done / max(self.total, 1):.0f} %)"
        text = " ".join(parts) + f", {rate:.2f} {self.unit}/s"
        if self.tokens:
            text += f", {self.tokens / el if el > 0 else 0:,.0f} tokens/s"
        text += f", elapsed {_fmt_time(el)}"
        if self.total and self.done and self.done < self.total:
            text += f", ETA {_fmt_time((self.total - self.done) / rate if rate else float('inf'))}"
        return f"{stage_label(None) + ' ' if _STAGE['n'] else ''}{self.description}: {text}"


def track(items: Iterable[T], description: str, total: int | None = None, *,
          unit: str = "batches", tokens: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate with progress: a live bar on a terminal, periodic lines in a log.

    ``tokens(item)`` counts the tokens an item carries (for tokens/s).
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled():
        yield from items
        return
    meter = Meter(description, total, unit)
    if not interactive():
        last = time.perf_counter()
        every = every_seconds()
        printed = False
        for item in items:
            yield item
            meter.update(1, tokens(item) if tokens else 0)
            now = time.perf_counter()
            if now - last >= every:
                _plain(meter.line())
                last, printed = now, True
        if printed or time.perf_counter() - meter.t0 >= min(every, 3.0):
            _plain(meter.line())  # the closing line of any loop long enough to matter
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    label = (stage_label() + " " if _STAGE["n"] else "") + description
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                  console=_console()) as bar:
        task = bar.add_task(label, total=total, rate="")
        for item in items:
            yield item
            meter.update(1, tokens(item) if tokens else 0)
            el = time.perf_counter() - meter.t0
            rate = f"{meter.done / el:.2f} {unit}/s" if el > 0 else ""
            if meter.tokens and el > 0:
                rate += f" {meter.tokens / el:,.0f} tok/s"
            bar.update(task, advance=1, rate=rate)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _plain(line: str) -> None:
    print(f"sftscope: {line}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    """One status line on stderr (rich markup allowed; plain text when not a terminal); rank 0
    only under a launcher."""
    if not _main_rank():
        return
    if interactive():
        _console().print(message)
        return
    from rich.text import Text

    print(Text.from_markup(message).plain, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers', the hub's and datasets' own bars and info logs meanwhile."""
    undo: list[Callable[[], None]] = []
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        undo.append(lambda: hf_logging.set_verbosity(level))
    except ImportError:
        pass
    try:
        import huggingface_hub.utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            undo.append(hub_utils.enable_progress_bars)
    except (ImportError, AttributeError):
        pass
    try:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


def trainer_callback(description: str = "train"):
    """A transformers TrainerCallback that reports steps, loss and ETA through this display."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def __init__(self) -> None:
            self.meter: Meter | None = None
            self.last = 0.0
            self.loss: float | None = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.meter = Meter(description, state.max_steps or None, "steps")
            self.meter.done = state.global_step
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.meter is None or not enabled() or not state.is_world_process_zero:
                return
            self.meter.done = state.global_step
            now = time.perf_counter()
            every = 2.0 if interactive() else every_seconds()
            if now - self.last >= every or state.global_step == state.max_steps:
                loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
                _plain(self.meter.line() + loss)
                self.last = now

    return Report()
