"""``inhercc finetune``: distil a student from its teacher; its options are DistillConfig's (generated)."""

from __future__ import annotations

from typing import Any

import click

from inhercc.cli.common import cli, remember_flags
from inhercc.cli.options import field_paths, given, options_of, parsed
from inhercc.cli.show import fidelity_label, training_line
from inhercc.distill.config import DistillConfig
from inhercc.report import format_table

PATH = click.Path(dir_okay=False, path_type=str)


@cli.command()
@click.argument("student", type=PATH)
@click.option("--teacher", required=True, type=PATH, help="Teacher ONNX file.")
@click.option("-o", "--output", required=True, type=PATH, help="Fine-tuned ONNX file.")
@click.option(
    "--data",
    type=click.Path(path_type=str),
    help="Training samples: .npz (one array per input, optional _labels), <input>.npy, or a folder of shards "
    "[default: synthetic, with a warning].",
)
@click.option("--shape", "shapes", multiple=True, help="Input shape for synthetic data, e.g. input_ids=1x128.")
@click.option("--report", type=PATH, help="Write a JSON report.")
@click.option("--external-data", is_flag=True, default=None, help="Store weights in <output>.data (auto above 2 GB).")
@options_of(DistillConfig)
@click.pass_context
def finetune(
    ctx: click.Context,
    student: str,
    teacher: str,
    output: str,
    data: str | None,
    shapes: tuple[str, ...],
    report: str | None,
    external_data: bool | None,
    **options: Any,
) -> None:
    """Distil STUDENT (e.g. compressed earlier, or from a hand-edited plan) from --teacher on --data."""
    from inhercc.data import parse_shapes
    from inhercc.distill import finetune_file

    config = DistillConfig(**parsed(DistillConfig, given(ctx, options)))
    result = finetune_file(
        student,
        teacher,
        output,
        data,
        report_path=report,
        external_data=external_data,
        config=config,
        shapes=parse_shapes(shapes),
    )
    rep = result.report
    rows = []
    for name, fid in rep.get("fidelity", {}).items():
        for metric, value in fid.items():
            b = rep.get("fidelity_before", {}).get(name, {}).get(metric)
            rows.append([fidelity_label(rep, name, metric), "-" if b is None else f"{b:.4f}", f"{value:.4f}"])
    click.echo(format_table(["", "before", "after"], rows, align="lrr"))
    for name, why in rep.get("fidelity_skipped", {}).items():
        click.echo(f"{name}: not scored, {why}")
    click.echo(training_line(rep))
    click.echo(f"student written to {output}")


remember_flags(finetune, {f"distill.{path}": name for path, name in field_paths(DistillConfig).items()})
