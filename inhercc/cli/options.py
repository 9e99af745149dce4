"""Click options generated from the options dataclasses (:mod:`inhercc.options`): one declaration of each
option — type, default, choices, help, check — serves the API, recipe files and the command line."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import click

from inhercc.cli.common import FLOAT, OptionalValue
from inhercc.options import flag_of, name_of, option_fields


def _base_type(hint: Any) -> Any:
    """``int`` for ``int | None``; ``tuple`` for ``tuple[str, ...]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    base = args[0] if args else hint
    return typing.get_origin(base) or base


def _click_type(f: dataclasses.Field[Any], hint: Any) -> dict[str, Any]:
    """The click keywords for a field's type: flags for bools, repeated strings for tuples and parsed dicts."""
    meta, base = f.metadata, _base_type(hint)
    if meta.get("parse") is not None or base in (tuple, dict, list):
        return {"multiple": True}
    if meta.get("choices"):
        return {"type": click.Choice(list(meta["choices"]), case_sensitive=False)}
    if base is bool:
        return {"is_flag": True}
    return {"type": {int: int, float: FLOAT}.get(base, str)}


def _default_text(f: dataclasses.Field[Any]) -> str | None:
    text = f.metadata.get("default_text")
    if text is not None:
        return text
    default = f.default
    if default is dataclasses.MISSING or default is None or default == () or isinstance(default, bool):
        return None
    return str(default)


def click_option(path: str, f: dataclasses.Field[Any], hint: Any) -> Callable[[Any], Any]:
    """One click option for one field. Its default is None: an option left out is not an override, and the
    declared default (shown in the help) applies where the recipe is built."""
    meta = f.metadata
    decls = flag_of(f).split()
    if _base_type(hint) is bool and meta.get("flag") is None and f.default is True:
        decls = [f"--{name_of(f).replace('_', '-')}/--no-{name_of(f).replace('_', '-')}"]
    shown = _default_text(f)
    text = (meta.get("help") or "") + (f"  [default: {shown}]" if shown is not None else "")
    kwargs: dict[str, Any] = {"default": None, "help": text.strip() or None, **_click_type(f, hint)}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if (meta.get("metavar") or "").startswith("["):  # an optional value: the flag alone means 1
        kwargs.update(cls=OptionalValue, implied="1")
    return click.option(*decls, name_of(f), **kwargs)


def generated(cls: type, *, skip: Iterable[str] = (), only: Iterable[str] | None = None) -> list[Any]:
    """The click options of every command-line field of ``cls`` (nested classes walked), in declaration order;
    a name declared twice (the recipe's ``seed`` and distillation's) gets one option, the first."""
    wanted, skipped, seen = set(only) if only is not None else None, set(skip), set()
    options = []
    for path, f in option_fields(cls):
        name = name_of(f)
        unwanted = wanted is not None and name not in wanted
        if not f.metadata.get("cli", True) or name in skipped or name in seen or unwanted:
            continue
        seen.add(name)
        owner = _owner(cls, path)
        options.append(click_option(path, f, typing.get_type_hints(owner)[f.name]))
    return options


def _owner(cls: type, path: str) -> type:
    """The dataclass that declares the field at ``path``."""
    for part in path.split(".")[:-1]:
        hint = typing.get_type_hints(cls)[part]
        args = typing.get_args(hint) or (hint,)
        cls = next(a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a))
    return cls


def options_of(cls: type, **kwargs: Any) -> Callable[[Any], Any]:
    """A decorator adding :func:`generated`'s options to a command."""

    def decorate(f: Any) -> Any:
        for option in reversed(generated(cls, **kwargs)):
            f = option(f)
        return f

    return decorate


def field_paths(cls: type) -> dict[str, str]:
    """Field path → option name (``calibration.samples`` → ``calib_samples``), for error messages."""
    return {path: name_of(f) for path, f in option_fields(cls)}


def given(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options among ``values`` set on the command line (not left at their default), parsed
    (``--shape x=1x128`` → ``{"x": [1, 128]}``) where the field declares a parser."""
    out = {}
    for param in ctx.command.params:
        if param.name in values:
            source = ctx.get_parameter_source(param.name)
            if source is not None and source != click.core.ParameterSource.DEFAULT:
                out[param.name] = values[param.name]
    return out


def parsed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each repeated string option turned into its field's value (the field's ``parse``)."""
    parsers = {name_of(f): f.metadata.get("parse") for _, f in option_fields(cls)}
    return {k: (parsers[k](v) if parsers.get(k) else v) for k, v in values.items()}
