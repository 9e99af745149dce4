"""``inhercc reskd``: a student, res-students trained on the residual, and a sample-adaptive cascade in one ONNX
file; its options are ResKDOptions' and DistillConfig's (generated)."""

from __future__ import annotations

from typing import Any

import click

from inhercc.cli.common import cli, remember_flags
from inhercc.cli.options import field_paths, given, options_of, parsed
from inhercc.report import format_table
from inhercc.reskd.options import ResKDOptions

PATH = click.Path(dir_okay=False, path_type=str)
# distillation options the rounds set themselves (the losses) or do not support (features, IE-KD, checkpoints)
NOT_HERE = ("losses", "feature_loss", "features", "checkpoint", "checkpoint_every", "resume") + tuple(
    f"ie{s}" for s in ("", "_feature", "_ae_steps", "_split", "_inherit_weight", "_explore_weight", "_explore")
)


@cli.command()
@click.argument("teacher", type=PATH)
@click.option("-o", "--output", required=True, type=PATH, help="Cascade ONNX file.")
@click.option(
    "--data",
    type=click.Path(path_type=str),
    help="Samples (.npz with _labels for accuracy, or a folder of shards): training, and the validation split "
    "the skip thresholds are calibrated on.",
)
@click.option("--report", type=PATH, help="Write the JSON report here [default: beside the output, .json].")
@options_of(ResKDOptions, skip=NOT_HERE)
@click.pass_context
def reskd(ctx: click.Context, teacher: str, output: str, data: str | None, report: str | None, **options: Any) -> None:
    """Distil TEACHER into a ResKD cascade: a student, res-students trained on what the members so far miss
    (teacher − their sum), and per-sample skipping of the res-students a confident sample does not need."""
    from inhercc.reskd.run import report_path_for, reskd_file

    settings = ResKDOptions.of(**parsed(ResKDOptions, given(ctx, options)))
    quiet = settings.distill.quiet
    result = reskd_file(
        teacher, output, settings, data, report_path=report, log=None if quiet else lambda m: click.echo(f"· {m}")
    )
    click.echo(cascade_table(result.report))
    click.echo(f"cascade written to {output}, report to {report or report_path_for(output)}")


def cascade_table(rep: dict[str, Any]) -> str:
    """One row per member (params, FLOPs, τ before it, fraction reaching it, accuracy of the prefix ending there)
    and the adaptive cascade's line."""
    val, skip = rep["validation"], rep["skip"]
    taus = [None, *(skip["thresholds"] or [None] * (len(rep["members"]) - 1))]
    logits = val.get("prefix_cosine") is None
    prefix = (val["prefix_accuracy"] if logits else val["prefix_cosine"]) or [None] * len(rep["members"])
    form = "{:.2f}" if logits else "{:.4f}"
    cascade = val["accuracy"] if logits else val.get("cascade_cosine_onnx")
    rows = [
        [m["name"], f"{m['params']:,}", f"{m['flops']:,.0f}", _num(t, "{:.4f}"), f"{m['reach']:.1%}", _num(a, form)]
        for m, t, a in zip(rep["members"], taus, prefix)
    ]
    rows.append(
        ["cascade", "", f"{val['expected_flops']:,.0f}", "", f"{val['flops_fraction']:.1%} of T", _num(cascade, form)]
    )
    rows.append(
        [
            "teacher",
            f"{rep['teacher']['params']:,}",
            f"{rep['teacher']['flops']:,.0f}",
            "",
            "",
            _num(val["teacher_accuracy"]),
        ]
    )
    score = "accuracy" if logits else "cosine to T"
    table = format_table(["", "params", "FLOPs", "τ", "reach", score], rows, align="lrrrrr")
    note = skip.get("note")
    return table + (f"\n{note}" if note else "")


def _num(value: float | None, form: str = "{:.2f}") -> str:
    return "-" if value is None else form.format(value)


remember_flags(reskd, {f"reskd.{path}": name for path, name in field_paths(ResKDOptions).items()})
