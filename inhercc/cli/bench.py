"""``inhercc bench``: time models on ONNX Runtime, interleaved, ratios against the first."""

from __future__ import annotations

from typing import Any

import click

from inhercc.bench import BenchOptions
from inhercc.cli.common import cli, remember_flags
from inhercc.cli.options import field_paths, given, options_of, parsed

PATH = click.Path(dir_okay=False, path_type=str)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=PATH)
@options_of(BenchOptions)
@click.option("--json", "json_path", type=PATH, help="Write the result JSON.")
@click.option("--markdown", "md_path", type=PATH, help="Write a markdown table.")
@click.option(
    "--plot", type=PATH, help="Latency plot; the extension picks the format (.png, .svg, .pdf, …; needs matplotlib)."
)
@click.option("-v", "--verbose", is_flag=True, help="Progress on stderr.")
@click.pass_context
def bench(
    ctx: click.Context,
    models: tuple[str, ...],
    json_path: str | None,
    md_path: str | None,
    plot: str | None,
    verbose: bool,
    **options: Any,
) -> None:
    """Time MODELS on ONNX Runtime, interleaved (A B A B …); the first (the teacher) is the reference of
    the ratios, which come with a 95 % bootstrap confidence interval.

    \b
    inhercc bench teacher.onnx student.onnx --provider cpu --threads 2 \\
        --shape input_ids=32x128 --shape input_ids=1x128 --json bench.json
    """
    from inhercc.bench import bench
    from inhercc.model import check_paths
    from inhercc.report import (
        bench_markdown,
        bench_table,
        check_plot_format,
        plot_bench,
        write_json,
        write_text_atomic,
    )

    check_paths(
        [("MODELS", m) for m in models],
        {"--json": json_path, "--markdown": md_path, "--plot": plot},
        models=models,
    )
    if plot is not None:
        check_plot_format(plot)
    settings = BenchOptions(**parsed(BenchOptions, given(ctx, options)))  # checked by bench()
    result = bench(list(models), settings, log=lambda m: click.echo(f"· {m}", err=True) if verbose else None)
    click.echo(bench_table(result))
    if json_path:
        write_json(json_path, result)
    if md_path:
        write_text_atomic(md_path, bench_markdown(result))
    if plot:
        plot_bench(result, plot)


remember_flags(bench, field_paths(BenchOptions))
