"""``inhercc compress``: its options are the Recipe's (generated), plus the files and what to print."""

from __future__ import annotations

from typing import Any

import click

from inhercc.cli.common import cli, remember_flags
from inhercc.cli.options import field_paths, given, options_of, parsed
from inhercc.cli.show import layer_table, summary_table
from inhercc.distill.config import DistillConfig
from inhercc.errors import InherccError
from inhercc.options import name_of
from inhercc.recipe import Recipe

PATH = click.Path(dir_okay=False, path_type=str)
DISTILL_NAMES = frozenset(name_of(f) for f in DistillConfig.__dataclass_fields__.values()) - set(
    Recipe.__dataclass_fields__
)
CALIBRATION_NAMES = ("calib_samples", "calib_batch_size")


@cli.command()
@click.argument("model", type=PATH)
@click.option("-o", "--output", required=True, type=PATH, help="Student ONNX file.")
@click.option(
    "--data",
    type=click.Path(path_type=str),
    help="Samples (.npz, one array per input; <input>.npy; or a folder of .npz / <input>.npy shards) for "
    "calibration, verification and distillation.",
)
@click.option(
    "--verify-data",
    type=click.Path(path_type=str),
    help="Held-out samples (.npz) for the fidelity check [default: --verify-samples random samples of --data, "
    "held out from calibration when --data has at least twice as many, else all of --data, calibration samples "
    "included (with a warning); with --epochs/--steps: the validation split, and --verify-data besides].",
)
@click.option(
    "--recipe",
    "recipe_path",
    type=PATH,
    help="Run this recipe (YAML / JSON, or a --report); options given besides override it.",
)
@click.option("--save-recipe", type=PATH, help="Write the resolved recipe (YAML for .yaml/.yml, else JSON).")
@click.option("--save-plan", type=PATH, help="Write the plan as JSON.")
@click.option("--report", type=PATH, help="Write a JSON report (it embeds the resolved recipe).")
@click.option("--external-data", is_flag=True, default=None, help="Store weights in <output>.data (auto above 2 GB).")
@click.option("--sensitivity", is_flag=True, help="Same as --allocation sensitivity (the default with --data).")
@click.option("-v", "--verbose", is_flag=True, help="Also print the per-layer table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no per-epoch lines.")
@options_of(Recipe, skip=("quiet",))
@click.pass_context
def compress(
    ctx: click.Context,
    model: str,
    output: str,
    data: str | None,
    verify_data: str | None,
    recipe_path: str | None,
    save_recipe: str | None,
    save_plan: str | None,
    report: str | None,
    external_data: bool | None,
    sensitivity: bool,
    verbose: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Compress MODEL into a student with SVD-initialized factor chains; with --epochs or --steps, then
    distil it from MODEL on --data."""
    from inhercc.pipeline import compress_file

    recipe = command_recipe(ctx, options, recipe_path, data, sensitivity, quiet)
    result = compress_file(
        model,
        output,
        recipe,
        data,
        verify_data,
        report_path=report,
        save_plan=save_plan,
        save_recipe=save_recipe,
        external_data=external_data,
        progress=not quiet,
        log=lambda m: click.echo(f"· {m}", err=True) if verbose else None,
    )
    rep = result.report
    if verbose:
        click.echo(layer_table(rep["layers"]))
        click.echo()
    click.echo(summary_table(rep))
    for row in rep["layers"]:
        if (row["reason"] or "").startswith("kept dense for speed"):
            click.echo(f"{row['name']}: {row['reason']}")
    click.echo(f"student written to {output}")


def command_recipe(
    ctx: click.Context, options: dict[str, Any], path: str | None, data: str | None, sensitivity: bool, quiet: bool
) -> Recipe:
    """The recipe file (or the defaults) with the options given on the command line over it; distillation options
    need --epochs or --steps (or a recipe that distils), calibration options --data."""
    base = Recipe.load(path) if path is not None else Recipe()
    overrides = parsed(Recipe, given(ctx, options))
    distilling = base.training() or {"epochs", "steps"} & set(overrides)
    extra = sorted(n for n in overrides if n in DISTILL_NAMES and n not in ("epochs", "steps"))
    if extra and not distilling:
        names = ", ".join(f"`{n}`" for n in extra)
        raise InherccError(f"{names}: distillation options, only used with `epochs` or `steps`")
    calibration = [f"`{n}`" for n in CALIBRATION_NAMES if n in overrides]
    if calibration and data is None:
        raise InherccError(f"{', '.join(calibration)}: calibration options, only used with `data`")
    if sensitivity:
        if overrides.get("allocation") not in (None, "sensitivity"):
            raise InherccError(f"`sensitivity` contradicts `allocation` {overrides['allocation']}")
        overrides["allocation"] = "sensitivity"
    if "provider" in overrides:
        overrides["provider"] = overrides["provider"].lower()
    recipe = Recipe.of(base, **overrides)
    return Recipe.of(recipe, quiet=quiet) if recipe.training() and quiet else recipe


remember_flags(compress, field_paths(Recipe))
