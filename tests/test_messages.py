"""Library messages name options by field, never by CLI flag: an API user reads "`plan.ratio` must be in (0, 1]",
and the CLI rewrites each backticked field to its flag ("--ratio must be in (0, 1]") before printing.

Every module of ``inhercc`` and ``passes/`` except the CLI package is parsed with ``ast``; every string constant
or f-string text passed to an exception (``InherccError(...)``, any ``…Error(...)``) or to ``warnings.warn(...)``
must be free of ``--flag`` spellings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from inhercc.cli.common import FLAGS, as_flags
from tests.test_imports import module_files

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def _is_message_call(call: ast.Call) -> bool:
    """``SomeError(...)``, ``warnings.warn(...)`` or a bare ``warn(...)``."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name.endswith("Error") or name == "warn"


def _texts(node: ast.AST) -> list[str]:
    """The literal text inside a message argument: string constants, f-string parts, at any depth."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def flag_messages(path: Path) -> list[str]:
    """``line: text`` of every message in ``path`` that spells a CLI flag."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and _is_message_call(node):
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                found += [f"{node.lineno}: {t!r}" for t in _texts(arg) if FLAG.search(t)]
    return found


def _library_modules() -> dict[str, Path]:
    return {name: path for name, path in module_files().items() if not name.startswith("inhercc.cli")}


@pytest.mark.parametrize("module", sorted(_library_modules()))
def test_library_messages_name_fields_not_flags(module: str) -> None:
    bad = flag_messages(_library_modules()[module])
    assert not bad, f"{module} names CLI flags in messages (write the field in backticks):\n" + "\n".join(bad)


def test_the_scan_sees_flags_in_every_message_shape(tmp_path: Path) -> None:
    """Plain, f-string, implicitly concatenated, keyword and ``warnings.warn`` messages are all caught; field
    names, ``-o`` alone and dashes inside words are not flags."""
    source = tmp_path / "m.py"
    source.write_text(
        "raise InherccError('bad --shape')\n"
        "raise InherccError(f'{x} must be set ' 'with --lr')\n"
        "warnings.warn(message=f'pass --data {x}')\n"
        "raise ValueError('`plan.ratio` must be in (0, 1], x--y, -o, ---')\n"
        "print('--not-a-message')\n"
    )
    assert flag_messages(source) == ["1: 'bad --shape'", "2: ' must be set with --lr'", "3: 'pass --data '"]


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("bad `shapes` 'x': expected NAME=DIMS", "bad --shape 'x': expected NAME=DIMS"),
        ("`plan.ratio` must be in (0, 1], got 2", "--ratio must be in (0, 1], got 2"),
        ("`calibration.samples` must be positive, got 0", "--calib-samples must be positive, got 0"),
        ("bad `output_kinds` 'y'", "bad --output-kind 'y'"),
        ("bad `distill.losses` 'y=kd'", "bad --loss 'y=kd'"),
        ("`distill.features` 'x' matches nothing", "--features 'x' matches nothing"),
        ("set `select.allow_nonfinite` to compress anyway", "set --allow-nonfinite to compress anyway"),
        ("unknown `opt_level` 'x'", "unknown --opt-level 'x'"),
        ("start without `distill.resume`", "start without --resume"),
    ],
)
def test_the_cli_shows_each_field_as_its_flag(message: str, shown: str) -> None:
    """The names the library messages use are all known to the CLI (importing it fills :data:`FLAGS`)."""
    import inhercc.cli  # noqa: F401  (declares the commands, which fill FLAGS)

    assert FLAGS and as_flags(message) == shown
