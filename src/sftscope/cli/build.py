"""Click commands generated from the config classes: one field, one flag.

Every flag defaults to "not given" (None); the config file's section for the command fills in
next, then the field defaults. Values are coerced and checked by the config class itself, so a
flag, a config-file key and a Python API keyword go through the same validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sftscope.config.core import (
    Config,
    build,
    check_fields,
    did_you_mean,
    field_names,
    kind_of,
    meta,
    resolve_out,
    summary,
)
from sftscope.errors import SftscopeError

EXPAND_PREFIX = {"tune": "", "eval": "eval-", "suggest": None}
# old pass-through flag names of `sweep` kept as aliases of the eval-prefixed ones
EXPAND_ALIASES = {"eval": {"limit": ("limit",),
                           "shots": ("shots", "num-fewshot", "eval-num-fewshot"),
                           "max_new_tokens": ("max-new-tokens",),
                           "fewshot_data": ("fewshot-data",)}}


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    elif f.default_factory is not dataclasses.MISSING:
        d = f.default_factory()
    else:
        return "required"
    if d is None or d == () or d == {}:
        return ""
    if isinstance(d, bool):
        return f"default: {'yes' if d else 'no'}"
    if isinstance(d, tuple):
        return "default: " + ",".join(map(str, d))
    return f"default: {d:g}" if isinstance(d, float) else f"default: {d}"


def _help(f: dataclasses.Field, m: dict[str, Any]) -> str:
    text = m["help"]
    extra = []
    if m["required"] or _default_text(f) == "required":
        extra.append("required")
    elif d := _default_text(f):
        extra.append(d)
    if m["envvar"]:
        extra.append(f"env {m['envvar']}")
    return text + (f"  [{'; '.join(extra)}]" if extra else "")


def _decls(name: str, aliases: tuple[str, ...], kind: str, dest: str) -> list[str]:
    names = [name, *aliases]
    if kind == "bool":
        return [f"--{n.replace('_', '-')}/--no-{n.replace('_', '-')}" for n in names] + [dest]
    return [f"--{n.replace('_', '-')}" for n in names] + [dest]


def _option(f: dataclasses.Field, kind: str, dest: str, *, name: str | None = None,
            aliases: tuple[str, ...] | None = None, help_prefix: str = "") -> click.Option:
    m = meta(f)
    if aliases is None:
        aliases = m["aliases"] + ((f.name,) if m["flag"] and name is None else ())
    decls = _decls(name or m["flag"] or f.name, aliases, kind, dest)
    metavar = m["metavar"] or {"int": "N", "float": "X", "tuple": "A,B", "int|str": "N"}.get(
        kind, "TEXT")
    if m["choices"]:
        metavar = "[" + "|".join(m["choices"]) + "]"
    if kind == "bool":
        return click.Option(decls, default=None, help=help_prefix + _help(f, m),
                            envvar=m["envvar"])
    return click.Option(decls, default=None, type=click.STRING, metavar=metavar,
                        help=help_prefix + _help(f, m), envvar=m["envvar"],
                        show_envvar=False)


def _expand_class(key: str) -> type:
    from sftscope.config import commands

    return {"tune": commands.TuneConfig, "eval": commands.EvalConfig,
            "suggest": commands.SuggestConfig}[key]


def _excluded(key: str) -> tuple[str, ...]:
    from sftscope.config import commands

    return {"tune": commands.SWEEP_TUNE_KEYS, "eval": commands.SWEEP_EVAL_KEYS,
            "suggest": commands.SWEEP_SUGGEST_KEYS}[key]


def _shared_with_tune() -> set[str]:
    from sftscope.config.commands import EvalConfig, TuneConfig

    return ({f.name for f in dataclasses.fields(TuneConfig)}
            & {f.name for f in dataclasses.fields(EvalConfig)})


def params_for(cls: type[Config]) -> list[click.Parameter]:
    """The click parameters of a config class (generated; see the module docstring)."""
    hints = _hints(cls)
    own = set(cls.__dict__.get("__annotations__", {}))
    fields = [f for f in dataclasses.fields(cls) if meta(f)["cli"]]
    required = [f for f in fields if _default_text(f) == "required" or meta(f)["required"]]
    rest = [f for f in fields if f not in required]
    ordered = required + [f for f in rest if f.name in own] + [f for f in rest
                                                               if f.name not in own]
    taken = set(field_names(cls))
    params: list[click.Parameter] = []
    for f in ordered:
        m = meta(f)
        kind = kind_of(hints[f.name])
        if m["positional"]:
            params.append(click.Argument([f.name], nargs=-1, required=False,
                                         metavar=f.name.upper().rstrip("S") + "..."))
            continue
        if m["expand"]:
            params += _expand_params(f, m["expand"], taken)
            continue
        params.append(_option(f, kind, f.name))
    return params


def _expand_params(f: dataclasses.Field, key: str, taken: set[str]) -> list[click.Parameter]:
    """Pass-through flags: the fields of another command's config, collected into a dict."""
    params: list[click.Parameter] = [click.Option(
        [f"--{key}-opt", f"{f.name}__opt"], multiple=True, metavar="KEY=VALUE",
        help=f"Any other {key} option as KEY=VALUE (repeatable).")]
    prefix = EXPAND_PREFIX[key]
    if prefix is None:
        return params
    sub = _expand_class(key)
    hints = _hints(sub)
    skip = set(_excluded(key))
    if key == "eval":
        skip |= _shared_with_tune()
    for g in dataclasses.fields(sub):
        if g.name in skip or not meta(g)["cli"]:
            continue
        name = prefix + g.name.replace("_", "-")
        aliases = tuple(a for a in EXPAND_ALIASES.get(key, {}).get(g.name, ())
                        if a.replace("-", "_") not in taken)
        if name.replace("-", "_") in taken:
            continue
        taken.add(name.replace("-", "_"))
        params.append(_option(g, kind_of(hints[g.name]), f"{f.name}__{g.name}",
                              name=name.replace("-", "_"), aliases=aliases,
                              help_prefix=f"({key}) "))
    return params


def parse_kv(pairs: tuple[str, ...] | list[str] | None, flag: str) -> dict[str, Any]:
    """``["rank=8", "mlp=true"]`` -> ``{"rank": 8, "mlp": True}`` (YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for p in pairs or ():
        key, sep, val = p.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SftscopeError(f"{flag} {p!r}: write KEY=VALUE, e.g. {flag} warmup_steps=10")
        try:
            out[key] = yaml.safe_load(val) if val.strip() else None
        except yaml.YAMLError:
            out[key] = val
    return out


def collect(cls: type[Config], given: dict[str, Any],
            file_section: dict[str, Any] | None) -> dict[str, Any]:
    """Merge config-file values and given flags into constructor keywords for ``cls``."""
    values: dict[str, Any] = {}
    names = field_names(cls)
    for key, value in (file_section or {}).items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise SftscopeError(f"unknown option {key!r} in the config file's section for this "
                                f"command" + did_you_mean(k, names))
        values[names[k]] = value
    expanded: dict[str, dict[str, Any]] = {}
    for dest, value in given.items():
        if value is None or value == ():
            continue
        if "__" in dest:
            field_name, sub = dest.split("__", 1)
            bucket = expanded.setdefault(field_name, {})
            if sub == "opt":
                bucket.update(parse_kv(value, f"--{_expand_key(cls, field_name)}-opt"))
            else:
                bucket[sub] = value
            continue
        values[dest] = value
    for field_name, bucket in expanded.items():
        merged = dict(values.get(field_name) or {})
        merged.update(bucket)
        values[field_name] = merged
    return values


def _expand_key(cls: type, field_name: str) -> str:
    f = {g.name: g for g in dataclasses.fields(cls)}[field_name]
    return str(meta(f)["expand"])


def make_command(name: str, cls: type[Config], runner: Callable[[Any], Any], help: str,
                 short_help: str | None = None) -> click.Command:
    """A click command: flags from ``cls``; the callback builds the config and calls ``runner``."""

    def callback(**given: Any) -> Any:
        ctx = click.get_current_context()
        section = (ctx.obj or {}).get("config", {}).get(name)
        cfg_file = given.pop("config", None)
        if cfg_file is not None:
            section = load_config_file(Path(cfg_file)).get(name, {})
        values = collect(cls, given, section)
        if "out" in field_names(cls) and getattr(cls, "RUN_FOLDER", True):
            resolve_out(name, values)  # --out: optional everywhere, one default folder
        held = _claim(name, cls, values)
        try:
            check_fields(cls, values)  # what was given, before what is missing
            for f in dataclasses.fields(cls):  # required on the command line, optional in API
                if meta(f)["required"] and values.get(f.name) is None:
                    raise SftscopeError(f"missing --{f.name.replace('_', '-')} "
                                        f"({summary(meta(f)['help'])})")
            cfg = build(cls, values)
            return runner(cfg)
        finally:
            from sftscope.runs import release

            release(held)

    params = params_for(cls)
    params.append(click.Option(["--config", "config"], default=None, metavar="FILE",
                               help="YAML/TOML/JSON file; its section for this command sets "
                               "defaults for any flag (flags given here win)."))
    return click.Command(name, callback=callback, params=params, help=help,
                         short_help=short_help, context_settings={
                             "help_option_names": ["-h", "--help"], "max_content_width": 100})


def _claim(name: str, cls: type[Config], values: dict[str, Any]) -> str | None:
    """Claim the run folder ``--out`` before the validation starts (``runs.claim``), so that
    of two runs started into one folder the second is refused at once. Not for a report (its
    --out is a file) nor for sweep shards, which share one folder by design."""
    out = values.get("out")
    if out is None or not getattr(cls, "RUN_FOLDER", True):
        return None
    try:
        if int(values.get("num_jobs") or 1) > 1:
            return None
    except (TypeError, ValueError):
        return None  # the config's own check says what is wrong
    from sftscope.runs import claim

    return str(claim(str(out), name))


class DuplicateKey(SftscopeError):
    """A config file names one option twice (the parsers would keep the last silently)."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(f"key {k!r} appears twice in one object; keep one")
        out[k] = v
    return out


def _unique_keys_loader() -> type:
    """A safe YAML loader that refuses a key given twice in one mapping."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN202
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise DuplicateKey(f"key {key!r} appears twice (line "
                                       f"{key_node.start_mark.line + 1}); keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def load_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a config file into ``{command: {flag: value}}`` (unknown sections are errors)."""
    from sftscope.config.commands import COMMANDS

    if not path.is_file():
        raise SftscopeError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SftscopeError(f"config file {path} could not be read ({e})") from e
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_unique_keys_loader()) or {}
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)  # refuses a repeated key itself
        elif suffix == ".json":
            import json

            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            raise SftscopeError(f"config file {path}: use .yaml, .toml or .json")
    except DuplicateKey as e:
        raise SftscopeError(f"config file {path}: {e}") from e
    except SftscopeError:
        raise
    except Exception as e:  # the parse errors of three libraries
        msg = " ".join(str(e).split())[:200]
        raise SftscopeError(f"config file {path} could not be parsed ({msg})") from e
    if not isinstance(data, dict):
        raise SftscopeError(f"config file {path} must map command names to their options")
    out: dict[str, dict[str, Any]] = {}
    for cmd, opts in data.items():
        if str(cmd) not in COMMANDS:
            raise SftscopeError(f"config file {path}: unknown section {cmd!r}; sections are "
                                f"command names ({', '.join(COMMANDS)})"
                                + did_you_mean(str(cmd), COMMANDS))
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise SftscopeError(f"config file {path}: section {cmd!r} must map flag names to "
                                f"values")
        out[str(cmd)] = dict(opts)
    return out


__all__ = ["collect", "load_config_file", "make_command", "params_for", "parse_kv"]
