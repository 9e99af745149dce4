"""``inhercc inspect``: the candidate layers, their spectra and why a layer cannot be compressed."""

from __future__ import annotations

import json
from typing import Any

import click

from inhercc.cli.common import cli, remember_flags
from inhercc.cli.options import given, options_of, parsed
from inhercc.errors import InherccError
from inhercc.recipe import DEFAULT_RANK_MULTIPLE, Recipe
from inhercc.report import format_table, human_count

# the Recipe options inspect shares with compress (declared there once)
SHARED = (
    "include",
    "exclude",
    "embeddings",
    "min_params",
    "rank_multiple",
    "calib_samples",
    "calib_batch_size",
    "shapes",
)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--data", type=click.Path(path_type=str), help="Calibration samples: show whitened (output) spectra.")
@click.option("-q", "--quiet", is_flag=True, help="No calibration progress bar.")
@options_of(Recipe, only=SHARED)
@click.pass_context
def inspect(ctx: click.Context, model: str, as_json: bool, data: str | None, quiet: bool, **options: Any) -> None:
    """Per-layer table: weight shape, params, FLOPs, ranks keeping 90/99 % energy (of the weights, or of the
    layer outputs with --data), why not compressible."""
    from inhercc.pipeline import inspect_model

    chosen = parsed(Recipe, given(ctx, options))
    calibration = [f"`{n}`" for n in ("calib_samples", "calib_batch_size") if n in chosen]
    if calibration and data is None:
        raise InherccError(f"{', '.join(calibration)}: calibration options, only used with `data`")
    recipe = Recipe.of(**chosen)
    recipe.check()
    info = inspect_model(
        model,
        include=recipe.select.include or None,
        exclude=recipe.select.exclude or None,
        min_params=recipe.select.min_params,
        rank_multiple=recipe.plan.rank_multiple or DEFAULT_RANK_MULTIPLE,
        data=data,
        calib_samples=recipe.calibration.samples,
        calib_batch_size=recipe.calibration.batch_size,
        progress=not quiet and not as_json,
        shapes=recipe.shapes,
        embeddings=recipe.select.embeddings,
    )
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(layer_rows(info))
    t = info["totals"]
    click.echo(
        f"\n{t['layers']} layers, {t['compressible']} compressible "
        f"({human_count(t['compressible_params'])} of {human_count(t['params'])} params); "
        f"{human_count(t['flops'])} FLOPs/sample; spectrum: {info['spectrum']}"
    )


def layer_rows(info: dict[str, Any]) -> str:
    rows = [
        [
            r["name"],
            r["op"],
            "x".join(map(str, r["shape"])),
            r["params"],
            r["flops"],
            r["rank90"],
            r["rank99"],
            r["reason"] or "",
        ]
        for r in info["layers"]
    ]
    headers = ["layer", "op", "shape", "params", "FLOPs", "rank@90%", "rank@99%", "reason"]
    return format_table(headers, rows, align="lllrrrrl")


remember_flags(inspect)
