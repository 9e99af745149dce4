"""Options declared once: a field of a frozen dataclass carries its type, default, choices, help and check.

The stages' option classes (:mod:`inhercc.recipe`, :class:`inhercc.distill.DistillConfig`,
:class:`inhercc.bench.BenchOptions`) declare their fields with :func:`option`; from the same declaration
:func:`check_options` validates a value, :func:`to_dict` / :func:`from_dict` round-trip it through JSON or
YAML, and the CLI generates its click options (``inhercc.cli.options``).

Library errors name an option by its field path in backticks (```plan.ratio` must be in (0, 1]``); the CLI
maps every such name to its flag (``--ratio``) before printing, so the API speaks in fields and the command
line in flags, from one message.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from inhercc.errors import InherccError

Check = Callable[[Any], "str | None"]  # the problem with a value ("must be positive"), or None


def option(
    default: Any = None,
    *,
    help: str = "",
    choices: tuple[str, ...] | None = None,
    check: Check | None = None,
    name: str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
    default_text: str | None = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field declaring one option. ``name``: its keyword in :meth:`Recipe.of` and the click
    parameter (default: the field name); ``flag``: its command-line spelling (default ``--name``; a boolean
    that defaults to True gets ``--name/--no-name``); ``cli=False``: settable from Python and recipe files
    only; ``default_text``: the help's ``[default: …]`` when the default is resolved from context; ``parse``:
    turns the repeated command-line strings (``--shape x=1x128``) into the field's value."""
    meta = {
        "help": help,
        "choices": choices,
        "check": check,
        "name": name,
        "flag": flag,
        "metavar": metavar,
        "cli": cli,
        "default_text": default_text,
        "parse": parse,
    }
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(value: Any) -> str | None:
    return "must be positive" if value is not None and not value > 0 else None


def non_negative(value: Any) -> str | None:
    return "must be ≥ 0" if value is not None and not value >= 0 else None


def unit_interval(value: Any) -> str | None:
    """(0, 1]: a ratio or an energy fraction."""
    return "must be in (0, 1]" if value is not None and not 0.0 < value <= 1.0 else None


def fraction(value: Any) -> str | None:
    """[0, 1): a share of steps or samples."""
    return "must be in [0, 1)" if value is not None and not 0.0 <= value < 1.0 else None


def name_of(f: dataclasses.Field[Any]) -> str:
    """The option's keyword (and click parameter name)."""
    return f.metadata.get("name") or f.name


def flag_of(f: dataclasses.Field[Any]) -> str:
    """The option as users type it: ``--calib-samples``."""
    return f.metadata.get("flag") or "--" + name_of(f).replace("_", "-")


def option_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """``(path, field)`` of every leaf option of an options class, nested classes walked (``plan.ratio``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = _dataclass_in(hints[f.name])
        if inner is not None and "help" not in f.metadata:
            yield from option_fields(inner, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a type hint names (``X`` or ``X | None``), else None."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else (hint,)
    found = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return found[0] if found else None


def option_error(path: str, problem: str, value: Any) -> InherccError:
    """The one error form: ```plan.ratio` must be in (0, 1], got 2``."""
    shown = repr(value) if isinstance(value, str) else value
    return InherccError(f"`{path}` {problem}, got {shown}")


def check_options(obj: Any, prefix: str = "") -> None:
    """Every field of an options dataclass (nested ones too) against its declaration: finite numbers, the
    choices, the check. The error names the field path."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and "help" not in f.metadata:
            check_options(value, f"{prefix}{f.name}.")
            continue
        path = prefix + f.name
        if isinstance(value, float) and not math.isfinite(value):
            raise option_error(path, "must be a finite number", value)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise InherccError(f"unknown `{path}` {value!r}; choose from {', '.join(choices)}")
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise option_error(path, problem, value)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of an options dataclass (tuples as lists, nested classes as dicts)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict") and not isinstance(value, type):  # e.g. a RankPlan: its own JSON form
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An options dataclass from :func:`to_dict`'s form; an unknown key is an error naming it, lists become
    tuples where the field is a tuple, nested dicts nested classes."""
    if not isinstance(data, Mapping):
        raise InherccError(f"`{prefix.rstrip('.') or 'recipe'}` must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InherccError(f"unknown recipe option `{prefix}{unknown[0]}`; known here: {', '.join(known)}")
    values = {}
    for key, value in data.items():
        inner = _dataclass_in(hints[key])
        if inner is not None and "help" not in known[key].metadata and isinstance(value, Mapping):
            values[key] = from_dict(inner, value, f"{prefix}{key}.")
        elif isinstance(value, list) and "tuple" in str(hints[key]):
            values[key] = tuple(value)
        else:
            values[key] = value
    return cls(**values)
