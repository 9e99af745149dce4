"""The ``inhercc`` command line: click commands only — parse options, call the API, print."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import click

from inhercc.errors import InherccError
from inhercc.report import format_table, human_bytes, human_count


_NO_ARGS_IS_HELP: type[Exception] = getattr(click.exceptions, "NoArgsIsHelpError", type("_Never", (Exception,), {}))


class OneLineErrors(click.Group):
    """User mistakes (bad options, bad files) print one ``error: …`` line and exit 2 — no usage block, no
    traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except InherccError as e:
            _fail(str(e))
        except _NO_ARGS_IS_HELP as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message())
        except click.exceptions.Abort:
            _fail("aborted")
        except KeyboardInterrupt:
            _fail("interrupted")
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(2)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inhercc")
def cli() -> None:
    """inhercc — compress ONNX models by inheritance (SVD-initialized asymmetric factor chains)."""
    warnings.simplefilter("ignore", UserWarning)  # the CLI states synthetic-data use in its own output


def _ratio(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise InherccError(f"--ratio must be in (0, 1], got {value}")
    return value


def _rank(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise InherccError(f"--{param.name.replace('_', '-')} must be positive, got {value}")
    return value


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Student ONNX file."
)
@click.option(
    "--ratio",
    type=float,
    callback=_ratio,
    help="Keep this fraction of the compressible parameters "
    "(default 0.5); ranks allocated globally by a greedy on the spectra.",
)
@click.option("--rank", type=int, callback=_rank, help="One rank for every layer.")
@click.option("--energy", type=float, help="Per layer, keep this fraction of the spectral energy.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=str), help="Replay a plan JSON.")
@click.option("--save-plan", type=click.Path(dir_okay=False, path_type=str), help="Write the plan as JSON.")
@click.option("--rank-multiple", type=int, default=8, show_default=True, callback=_rank, help="Round ranks up to this.")
@click.option(
    "--split",
    type=click.Choice(["output", "sqrt", "input"]),
    default="output",
    show_default=True,
    help="Where the singular values go (output = InherNet).",
)
@click.option(
    "--init",
    type=click.Choice(["svd", "whitened", "random"]),
    default=None,
    help="Factor init: whitened when --data is given, else svd; random = same-size student baseline.",
)
@click.option("--include", multiple=True, help="Only layers whose node name matches this regex (repeatable).")
@click.option("--exclude", multiple=True, help="Skip layers whose node name matches this regex (repeatable).")
@click.option("--data", type=click.Path(path_type=str), help="Samples (.npz, one array per input) for verification.")
@click.option("--verify-data", type=click.Path(path_type=str), help="Held-out samples (.npz) for the fidelity check "
              "(default: the last --verify-samples of --data, held out from calibration).")
@click.option("--verify-samples", type=int, default=8, show_default=True, callback=_rank)
@click.option("--shape", "shapes", multiple=True, help="Input shape for dynamic dims, e.g. input_ids=1x128.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str), help="Write a JSON report.")
@click.option("--external-data", is_flag=True, default=None, help="Store weights in <output>.data (auto above 2 GB).")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime fidelity check.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Also print the per-layer table.")
def compress(
    model: str,
    output: str,
    ratio: float | None,
    rank: int | None,
    energy: float | None,
    plan_path: str | None,
    save_plan: str | None,
    rank_multiple: int,
    split: str,
    init: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    data: str | None,
    verify_data: str | None,
    verify_samples: int,
    shapes: tuple[str, ...],
    report_path: str | None,
    external_data: bool | None,
    no_verify: bool,
    seed: int,
    verbose: bool,
) -> None:
    """Compress MODEL into a student with SVD-initialized factor chains."""
    from inhercc.data import parse_shapes
    from inhercc.pipeline import compress_file

    result = compress_file(
        model,
        output,
        report_path=report_path,
        save_plan=save_plan,
        external_data=external_data,
        ratio=ratio,
        rank=rank,
        energy=energy,
        plan=plan_path,
        rank_multiple=rank_multiple,
        split=split,
        init=init,
        include=include or None,
        exclude=exclude or None,
        data=data,
        verify_data=verify_data,
        verify_samples=verify_samples,
        shapes=parse_shapes(shapes),
        verify=not no_verify,
        seed=seed,
        log=lambda m: click.echo(f"· {m}", err=True) if verbose else None,
    )
    rep = result.report
    if verbose:
        click.echo(layer_table(rep["layers"]))
        click.echo()
    click.echo(summary_table(rep))
    click.echo(f"student written to {output}")


def summary_table(rep: dict[str, Any]) -> str:
    """The before/after table of a compress report."""
    p, f, s = rep["params"], rep["flops"], rep["size"]
    rows: list[list[Any]] = [
        ["params", human_count(p["teacher"]), human_count(p["student"]), _ratio_str(p["student"], p["teacher"])],
        ["FLOPs/sample", human_count(f["teacher"]), human_count(f["student"]), _ratio_str(f["student"], f["teacher"])],
        ["size", human_bytes(s["teacher"]), human_bytes(s["student"]), _ratio_str(s["student"], s["teacher"])],
    ]
    for name, fid in rep.get("fidelity", {}).items():
        for metric, value in fid.items():
            rows.append([f"{name} {metric}", "1" if metric != "rel_l2" else "0", f"{value:.4f}", ""])
    n_fact = sum(1 for r in rep["layers"] if r["rank"] is not None)
    out = format_table(["", "teacher", "student", "ratio"], rows, align="lrrr")
    out += f"\n{n_fact}/{len(rep['layers'])} layers factorized (init {rep.get('init', 'svd')})"
    if rep.get("fidelity_inputs") == "synthetic":
        out += "; fidelity on synthetic inputs (pass --data for real ones)"
    if rep["flops"].get("symbolic_dims_counted_as_1"):
        out += f"; FLOPs count dims {', '.join(rep['flops']['symbolic_dims_counted_as_1'])} as 1"
    return out


def layer_table(rows: list[dict[str, Any]]) -> str:
    return format_table(
        ["layer", "op", "shape", "rank", "params before", "params after", "reason"],
        [
            [
                r["name"],
                r["op"],
                "x".join(map(str, r["shape"])),
                r["rank"],
                r["params_before"],
                r["params_after"],
                r["reason"] or "",
            ]
            for r in rows
        ],
        align="lllrrrl",
    )


def _ratio_str(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--include", multiple=True, help="Only layers whose node name matches this regex.")
@click.option("--exclude", multiple=True, help="Skip layers whose node name matches this regex.")
@click.option("--rank-multiple", type=int, default=8, show_default=True, callback=_rank)
@click.option("--data", type=click.Path(path_type=str), help="Calibration samples: show whitened (output) spectra.")
def inspect(
    model: str, as_json: bool, include: tuple[str, ...], exclude: tuple[str, ...], rank_multiple: int, data: str | None
) -> None:
    """Per-layer table: weight shape, params, FLOPs, ranks keeping 90/99 % energy, why not compressible."""
    from inhercc.pipeline import inspect_model

    info = inspect_model(
        model, include=include or None, exclude=exclude or None, rank_multiple=rank_multiple, data=data
    )
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
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
    click.echo(
        format_table(
            ["layer", "op", "shape", "params", "FLOPs", "rank@90%", "rank@99%", "reason"], rows, align="lllrrrrl"
        )
    )
    t = info["totals"]
    click.echo(
        f"\n{t['layers']} layers, {t['compressible']} compressible "
        f"({human_count(t['compressible_params'])} of {human_count(t['params'])} params); "
        f"{human_count(t['flops'])} FLOPs/sample; spectrum: {info['spectrum']}"
    )


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
