"""The ``inhercc`` command line: a package of thin commands over the API. ``compress``'s options are generated
from the Recipe, ``finetune``'s from DistillConfig (:mod:`inhercc.cli.options`); library errors name fields,
which :func:`inhercc.cli.common.as_flags` shows as the flags."""

from __future__ import annotations

import signal

from inhercc.cli import bench, compress, finetune, inspect, reskd  # noqa: F401  (importing registers the commands)
from inhercc.cli.common import cli, terminate
from inhercc.cli.show import summary_table, training_line

__all__ = ["cli", "main", "summary_table", "training_line"]


def main() -> None:
    """Console-script entry point: SIGTERM stops like Ctrl-C (``error: aborted``, temp files removed)."""
    signal.signal(signal.SIGTERM, terminate)
    cli()
