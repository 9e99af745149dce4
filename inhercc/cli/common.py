"""What every command shares: the group, one-line errors (library field names shown as flags), warnings as
one line, finite floats and the SIGTERM handling."""

from __future__ import annotations

import errno
import math
import re
import signal
import sys
import warnings
from types import FrameType
from typing import Any

import click

from inhercc.errors import InherccError

_NO_ARGS_IS_HELP: type[Exception] = getattr(click.exceptions, "NoArgsIsHelpError", type("_Never", (Exception,), {}))
_FIELD = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")

# field path or parameter name -> the flag users type; filled as the commands' options are declared
FLAGS: dict[str, str] = {}


def as_flags(message: str) -> str:
    """Library messages name options by field (```plan.ratio```); the command line shows the flag (``--ratio``).
    A name no command declares loses its backticks."""
    return _FIELD.sub(lambda m: FLAGS.get(m.group(1), m.group(1)), message)


def flag(param: click.Parameter) -> str:
    """The option as users write it (``--calib-samples``, ``MODEL``)."""
    if isinstance(param, click.Argument):
        return (param.name or "?").upper()
    if "-o" in param.opts:  # the output, as everyone types it
        return "-o"
    return max(param.opts, key=len) if param.opts else (param.name or "?").upper()


def remember_flags(command: click.Command, paths: dict[str, str] | None = None) -> click.Command:
    """Record how ``command`` spells each parameter (and each field path it fills, ``paths``: path → name)."""
    spelled = {p.name: flag(p) for p in command.params if p.name}
    for name, text in spelled.items():
        FLAGS.setdefault(name, text)
    for path, name in (paths or {}).items():
        if name in spelled:
            FLAGS.setdefault(path, spelled[name])
    return command


class OptionalValue(click.Option):
    """An option whose value may be left out: ``--feature-loss`` alone means ``--feature-loss 1``. Unlike
    click's ``is_flag=False, flag_value=…`` (which reads ``--feature-loss -1`` as the option ``-1``), a
    negative number is still taken as the value, so that the range check can refuse it."""

    def __init__(self, *args: Any, implied: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.implied = implied


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Command(click.Command):
    """Fills in the implied value of an :class:`OptionalValue` given without one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        implied = {opt: p.implied for p in self.params if isinstance(p, OptionalValue) for opt in p.opts}
        filled: list[str] = []
        for i, arg in enumerate(args):
            filled.append(arg)
            if arg == "--":
                filled.extend(args[i + 1 :])
                break
            if arg in implied:
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is None or (nxt.startswith("-") and len(nxt) > 1 and not _is_number(nxt)):
                    filled.append(implied[arg])
        return super().parse_args(ctx, filled)


class OneLineErrors(click.Group):
    """User mistakes (bad options, bad files) print one ``error: …`` line and exit 2 — no usage block, no
    traceback."""

    command_class = Command

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except InherccError as e:
            fail(str(e))
        except _NO_ARGS_IS_HELP as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            fail(e.format_message())
        except click.exceptions.Abort:
            fail("aborted")
        except KeyboardInterrupt:
            fail("interrupted")
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            fail(f"file name too long: {str(e.filename)[:80]}…")
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


def fail(message: str) -> None:
    click.echo(f"error: {' '.join(as_flags(message).split())}", err=True)
    sys.exit(2)


def warn(message: str) -> None:
    click.echo(f"warning: {' '.join(as_flags(message).split())}", err=True)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    warn(str(message))


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inhercc")
def cli() -> None:
    """inhercc — compress ONNX models by inheritance (SVD-initialized asymmetric factor chains)."""
    # Other libraries' UserWarnings are noise here; inhercc's own (e.g. distillation on synthetic inputs)
    # are one ``warning: …`` line, except synthetic verification, which the compress summary states.
    warnings.simplefilter("ignore", UserWarning)
    warnings.filterwarnings("default", category=UserWarning, module=r"inhercc\b")
    warnings.filterwarnings("ignore", message="no `data` given: verification", category=UserWarning)
    warnings.showwarning = _show_warning


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C: the temp files being written are removed on the way out (a second one kills)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


class FiniteFloat(click.types.FloatParamType):
    """A float option that refuses nan and ±inf (they would hang a timing loop or poison a loss)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            raise InherccError(f"{flag(param) if param else 'value'} must be a finite number, got {value}")
        return number


FLOAT = FiniteFloat()
