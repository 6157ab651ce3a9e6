"""Typed configs: one field declaration gives the Python API, the CLI flag, the config-file key,
the validation and the run.json record.

A config is a frozen, keyword-only dataclass whose fields are declared with :func:`opt`. On
construction every field is coerced (``"8"`` -> 8 from the command line, ``Path`` -> ``str``) and
checked (type, range, choices), then the class's own ``check()`` runs its cross-field rules.
Nothing here imports torch: the CLI validates everything before any heavy import, model load or
file write.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import PurePath
from typing import Any

from sftscope.errors import SftscopeError

Check = Callable[[Any], "str | None"]

_META = "sftscope"


def opt(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None,
        choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
        aliases: Iterable[str] = (),
        positional: bool = False, volatile: bool = False, numbers_as_text: bool = False,
        cli: bool = True, required: bool = False, factory: Callable[[], Any] | None = None,
        metavar: str | None = None, expand: str | None = None,
        envvar: str | None = None, flag: str | None = None) -> Any:
    """Declare a config field.

    ``help`` is the flag's help text. ``check(value)`` returns an error message (or None) for a
    set value; ``choices`` restricts a text field. ``aliases`` are other flag / key names
    accepted for this field (old names, lm-eval's names). ``volatile`` marks fields that do not
    change results (a rerun into a finished run folder may differ in them). ``numbers_as_text``
    lets a number from a config file stand for text (``seeds: 3``); masks never do.
    ``cli=False`` keeps a field out of the command line (API-only); ``required`` makes the flag
    required on the command line although the API accepts the default. ``expand`` (for a dict
    field) names the config class whose fields become this command's pass-through flags.
    ``flag``: the command-line name when it differs from the field's (the field's own name is
    then accepted as an alias, and messages use the flag).
    """
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    meta = {"help": help, "check": check, "choices": choices,
            "aliases": tuple(aliases), "positional": positional, "volatile": volatile,
            "numbers_as_text": numbers_as_text, "cli": cli, "required": required,
            "metavar": metavar, "expand": expand, "envvar": envvar, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_META: meta})
    return dataclasses.field(default=default, metadata={_META: meta})


def meta(f: dataclasses.Field) -> dict[str, Any]:
    """The :func:`opt` metadata of a field (empty defaults for plain fields); ``choices`` given
    as a function (a registry that can grow) is called now."""
    m = f.metadata.get(_META)
    if m is not None and callable(m["choices"]):
        return {**m, "choices": tuple(m["choices"]())}
    return m or {"help": "", "check": None, "choices": None, "aliases": (),
                                    "positional": False, "volatile": False,
                                    "numbers_as_text": False, "cli": True, "required": False,
                                    "metavar": None, "expand": None, "envvar": None,
                                    "flag": None}


def flag(name: str) -> str:
    """The command-line spelling of a field name."""
    return "--" + name.replace("_", "-")


def summary(help_text: str) -> str:
    """The first sentence of a help text (for error messages)."""
    first = help_text.split(". ")[0].split(": ")[0]
    return first.rstrip(".")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# ----------------------------------------------------------------------------- types


@typing.no_type_check
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def kind_of(tp: Any) -> str:
    """``bool``, ``int``, ``float``, ``str``, ``tuple``, ``dict``, ``int|str`` or ``any``."""
    tp, _ = _unwrap_optional(tp)
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "str"
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return "tuple"
    if origin in (dict, Mapping) or tp is dict:
        return "dict"
    if origin in (typing.Union, types.UnionType):
        args = set(typing.get_args(tp))
        if args == {int, str}:
            return "int|str"
    return "any"


def is_optional(tp: Any) -> bool:
    return _unwrap_optional(tp)[1]


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    return repr(value)


def coerce(name: str, value: Any, tp: Any, numbers_as_text: bool = False) -> Any:
    """``value`` as the field's type, or a :class:`SftscopeError` naming the flag."""
    if value is None:
        if is_optional(tp):
            return None
        raise SftscopeError(f"{flag(name)} needs a value")
    kind = kind_of(tp)
    where = flag(name)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise SftscopeError(f"{where} expects true or false, got {_describe(value)}")
    if kind == "int":
        if isinstance(value, bool):
            raise SftscopeError(f"{where} expects an integer, got {_describe(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise SftscopeError(f"{where} expects an integer, got {_describe(value)}")
    if kind == "float":
        if isinstance(value, bool):
            raise SftscopeError(f"{where} expects a number, got {_describe(value)}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise SftscopeError(f"{where} expects a number, got {_describe(value)}") from None
        else:
            raise SftscopeError(f"{where} expects a number, got {_describe(value)}")
        if not math.isfinite(out):
            raise SftscopeError(f"{where} must be a finite number, got {value!r}")
        return out
    if kind == "str":
        if isinstance(value, PurePath):
            return str(value)
        if isinstance(value, str):
            return value
        if numbers_as_text and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool):
            hint = " (in YAML, quote values such as '01000': unquoted they are read as numbers)"
        raise SftscopeError(f"{where} expects text, got {_describe(value)}{hint}")
    if kind == "int|str":
        if isinstance(value, bool):
            raise SftscopeError(f"{where} expects a number or text, got {_describe(value)}")
        if isinstance(value, (int, str)):
            return value
        raise SftscopeError(f"{where} expects a number or text, got {_describe(value)}")
    if kind == "tuple":
        args = typing.get_args(_unwrap_optional(tp)[0])
        numbers = bool(args) and args[0] is float  # tuple[float, ...]
        if isinstance(value, str):
            items = [p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]  # one number from a config file
        else:
            raise SftscopeError(f"{where} expects a comma-separated list, got {_describe(value)}")
        if numbers:
            return tuple(coerce(name, v, float) for v in items)
        bad = [v for v in items if not isinstance(v, (str, PurePath))]
        if bad:
            raise SftscopeError(f"{where} expects a list of text, got {_describe(bad[0])} in it")
        return tuple(str(v) for v in items)
    if kind == "dict":
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
        raise SftscopeError(f"{where} expects a mapping of option names to values, got "
                            f"{_describe(value)}")
    return value


# ----------------------------------------------------------------------------- checks


def at_least(lo: float) -> Check:
    """A check: the value is ``>= lo``."""
    def check(v: Any) -> str | None:
        return None if v >= lo else f"must be at least {lo:g}, got {v!r}"
    return check


def positive(v: Any) -> str | None:
    """A check: the value is ``> 0``."""
    return None if v > 0 else f"must be positive, got {v!r}"


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A check: ``lo <= v <= hi`` (open ends optional)."""
    def check(v: Any) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if ok:
            return None
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return f"must be in {left}{lo:g}, {hi:g}{right}, got {v!r}"
    return check


def non_empty(v: Any) -> str | None:
    """A check: text that is not blank."""
    return None if str(v).strip() else "must not be empty"


# ----------------------------------------------------------------------------- run folders

RUNS_ENV = "SFTSCOPE_RUNS"  # the parent of default run folders (default: sftscope-runs)


def default_out(command: str) -> str:
    """The run folder a command writes to when ``--out`` is not given:
    ``sftscope-runs/COMMAND-YYYYMMDD-HHMMSS`` (UTC; ``-2``, ``-3``, ... when taken), under
    ``$SFTSCOPE_RUNS`` when set. One rule for every command (report: see its --out)."""
    import time
    from pathlib import Path

    parent = Path(os.environ.get(RUNS_ENV) or "sftscope-runs")
    stem = f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    path, i = parent / stem, 1
    while path.exists():
        i += 1
        path = parent / f"{stem}-{i}"
    return str(path)


def resolve_out(command: str, values: dict[str, Any]) -> None:
    """Fill ``values['out']`` with :func:`default_out` when it is not given; refused in one line
    where processes must share one folder (``--num-jobs`` above 1)."""
    if values.get("out") is not None:
        return
    try:
        shards = int(values.get("num_jobs") or 1)
    except (TypeError, ValueError):
        shards = 1  # the option's own check says what is wrong
    if shards > 1:
        raise SftscopeError(f"--num-jobs {shards}: the processes share one folder, so --out "
                            "must name it")
    values["out"] = default_out(command)


# ----------------------------------------------------------------------------- the base class


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every command config: coerces and checks its fields on construction.

    ``DEFAULT_OUT``: a command whose results are files only (no table returned) gets the
    default run folder (:func:`default_out`) when ``out`` is None, in Python as on the command
    line; the others write nothing from Python without ``out``."""

    DEFAULT_OUT: typing.ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.DEFAULT_OUT and getattr(self, "out", "") is None:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
            resolve_out(type(self).__name__.removesuffix("Config").lower(), values)
            object.__setattr__(self, "out", values["out"])
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            m = meta(f)
            value = coerce(f.name, getattr(self, f.name), hints[f.name], m["numbers_as_text"])
            object.__setattr__(self, f.name, value)
            if value is None:
                continue
            if m["choices"] and value not in m["choices"]:
                raise SftscopeError(
                    f"unknown {flag(f.name)} {value!r}; use one of {', '.join(m['choices'])}"
                    + did_you_mean(str(value), m["choices"]))
            if m["check"] is not None and (msg := m["check"](value)):
                raise SftscopeError(f"{flag(f.name)} {msg}")
        for klass in type(self).__mro__:  # each ingredient's own rules, in base order
            own = klass.__dict__.get("_check")
            if own is not None:
                own(self)
        self.check()

    def check(self) -> None:
        """Cross-field rules (override); runs after every field is valid."""

    # -- records --------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The config as run.json records it (plain JSON values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def result_settings(self) -> dict[str, Any]:
        """The recorded config without the fields that do not change results."""
        vol = {f.name for f in dataclasses.fields(self) if meta(f)["volatile"]}
        return {k: v for k, v in self.record().items() if k not in vol}


def field_names(cls: type) -> dict[str, str]:
    """Every accepted name (field names and aliases, ``-`` or ``_``) -> the field name."""
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        m = meta(f)
        for n in (f.name, *m["aliases"], *([m["flag"]] if m["flag"] else [])):
            names[n.replace("-", "_")] = f.name
    return names


def build(cls: type, values: Mapping[str, Any], *, where: str = "") -> Any:
    """Construct ``cls`` from a mapping of names (aliases allowed); unknown names are errors."""
    names = field_names(cls)
    kwargs: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise SftscopeError(f"unknown option {key!r}{where}"
                                + did_you_mean(k, [n for n in names if not n.startswith("_")]))
        name = names[k]
        if name in kwargs and origin[name] != k:
            raise SftscopeError(f"{flag(origin[name])} and {flag(k)} name the same option"
                                f"{where}; give one")
        kwargs[name], origin[name] = value, k
    check_fields(cls, kwargs)  # what was given is checked before what is missing
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kwargs]
    if missing:
        f0 = {f.name: f for f in dataclasses.fields(cls)}[missing[0]]
        what = summary(meta(f0)["help"])
        name = missing[0].upper() if meta(f0)["positional"] else flag(missing[0])
        raise SftscopeError(f"missing {name}{where}" + (f" ({what})" if what else ""))
    return cls(**kwargs)


def check_fields(cls: type, values: Mapping[str, Any], *, what: str = "",
                 exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Validate a partial mapping of ``cls``'s fields (names, types, choices, checks), without
    constructing ``cls``; returns it keyed by field name. ``what`` names the options in
    messages (``tune``); ``exclude``: names the caller sets itself."""
    where = f" ({what} option)" if what else ""
    names = field_names(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    excluded = set(exclude)
    out: dict[str, Any] = {}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        if k not in names:
            valid = [n for n, t in names.items() if t not in excluded]
            raise SftscopeError(f"unknown {what + ' ' if what else ''}option {key!r}"
                                + did_you_mean(k, valid))
        name = names[k]
        if name in excluded:
            raise SftscopeError(f"{what + ' ' if what else ''}option {key!r} is set for each "
                                f"job by the sweep itself")
        m = meta(by_name[name])
        v = coerce(m["flag"] or name, value, hints[name], m["numbers_as_text"])
        if v is not None:
            if m["choices"] and v not in m["choices"]:
                raise SftscopeError(f"unknown {flag(name)} {v!r}{where}; use one of "
                                    f"{', '.join(m['choices'])}" + did_you_mean(str(v),
                                                                               m["choices"]))
            if m["check"] is not None and (msg := m["check"](v)):
                spelled = (name.upper().rstrip("S") if m["positional"]
                           else flag(m["flag"] or name))
                raise SftscopeError(f"{spelled}{where} {msg}")
        out[name] = v
    return out


def defaults(cls: type) -> dict[str, Any]:
    """The default of every field that has one."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names whose values differ between two recorded configs (keys of either)."""
    keys = list(dict.fromkeys([*old, *new]))
    return [k for k in keys if _norm(old.get(k)) != _norm(new.get(k))]


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def expand_path(p: str) -> str:
    """``~`` and environment variables expanded."""
    return os.path.expandvars(os.path.expanduser(p))
