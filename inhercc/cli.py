"""The ``inhercc`` command line: click commands only — parse options, call the API, print."""

from __future__ import annotations

import errno
import json
import math
import signal
import sys
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

import click

from inhercc.errors import InherccError
from inhercc.report import format_table, human_bytes, human_count

_NO_ARGS_IS_HELP: type[Exception] = getattr(click.exceptions, "NoArgsIsHelpError", type("_Never", (Exception,), {}))


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
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            _fail(f"file name too long: {str(e.filename)[:80]}…")
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(2)


def _warn(message: str) -> None:
    click.echo(f"warning: {' '.join(message.split())}", err=True)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    _warn(str(message))


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inhercc")
def cli() -> None:
    """inhercc — compress ONNX models by inheritance (SVD-initialized asymmetric factor chains)."""
    # Other libraries' UserWarnings are noise here; inhercc's own (e.g. distillation on synthetic inputs)
    # are one ``warning: …`` line, except synthetic verification, which the compress summary states.
    warnings.simplefilter("ignore", UserWarning)
    warnings.filterwarnings("default", category=UserWarning, module=r"inhercc\b")
    warnings.filterwarnings("ignore", message="no --data given: verification", category=UserWarning)
    warnings.showwarning = _show_warning


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C: the temp files being written are removed on the way out (a second one kills)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def _flag(param: click.Parameter) -> str:
    """The option as users write it (``--calib-samples``, ``--loss``)."""
    return max(param.opts, key=len) if param.opts else (param.name or "?").upper()


class FiniteFloat(click.types.FloatParamType):
    """A float option that refuses nan and ±inf (they would hang a timing loop or poison a loss)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            raise InherccError(f"{_flag(param) if param else 'value'} must be a finite number, got {value}")
        return number


FLOAT = FiniteFloat()


def _ratio(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise InherccError(f"--ratio must be in (0, 1], got {value}")
    return value


def _rank(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise InherccError(f"{_flag(param)} must be positive, got {value}")
    return value


def _non_negative(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and value < 0:
        raise InherccError(f"{_flag(param)} must be ≥ 0, got {value}")
    return value


def _given(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` set on the command line (to refuse those the chosen mode ignores)."""
    given = []
    for param in ctx.command.params:
        if param.name in names:
            source = ctx.get_parameter_source(param.name)
            if source is not None and source != click.core.ParameterSource.DEFAULT:
                given.append(_flag(param))
    return given


def _refuse_calibration_without_data(ctx: click.Context, data: str | None) -> None:
    given = _given(ctx, ("calib_samples", "calib_batch_size"))
    if data is None and given:
        raise InherccError(f"{', '.join(given)}: calibration options, only used with --data")


_DISTILL_FIELDS = (
    "epochs",
    "steps",
    "lr",
    "batch_size",
    "val_split",
    "train",
    "temperature",
    "alpha",
    "losses",
    "feature_loss",
    "features",
    "weight_decay",
    "warmup",
    "clip",
    "patience",
    "eval_every",
    "cache_teacher",
    "checkpoint",
    "checkpoint_every",
    "resume",
    "device",
    "precision",
    "threads",
    "quiet",
)


OUTPUT_KIND_OPTION = click.option(
    "--output-kind",
    "output_kinds",
    multiple=True,
    help="OUTPUT=KIND, KIND logits|probs|embedding|values: what an output is, when the graph does not say "
    "(top-1 agreement and KD for logits; default: from the graph, then the name, else values).",
)


def distill_options(epochs_help: str) -> Callable[[Any], Any]:
    """The distillation options shared by ``compress`` and ``finetune`` (``--epochs`` says what it does in
    each)."""
    options = [
        click.option("--epochs", type=int, callback=_rank, help=epochs_help),
        click.option("--steps", type=int, callback=_rank, help="Distil for this many optimizer steps (not epochs)."),
        click.option("--lr", type=FLOAT, default=5e-4, show_default=True, help="AdamW peak learning rate."),
        click.option("--batch-size", type=int, default=32, show_default=True, callback=_rank, help="Per process."),
        click.option("--val-split", type=FLOAT, default=0.1, show_default=True, help="Held-out fraction."),
        click.option(
            "--train",
            default="factors",
            show_default=True,
            help="Which initializers to train: factors (<w>.inherit_in/out), all, or a regex over names "
            "(never one-element constants).",
        ),
        click.option("--temperature", type=FLOAT, default=4.0, show_default=True, help="KD temperature."),
        click.option("--alpha", type=FLOAT, default=0.3, show_default=True, help="Weight of CE on _labels."),
        click.option(
            "--loss",
            "losses",
            multiple=True,
            help="OUTPUT=KIND[:WEIGHT], KIND kd|probs|embedding|none (default by the output's kind: kd for logits, "
            "probs for probabilities, else embedding).",
        ),
        click.option(
            "--feature-loss",
            cls=OptionalValue,
            implied="1",
            type=FLOAT,
            default=0.0,
            metavar="[WEIGHT]",
            help="Feature inheritance loss (intermediate tensors vs the teacher's), optional weight [1].",
        ),
        click.option(
            "--features",
            default="layers",
            show_default=True,
            help="What --feature-loss compares: layers (factorized layer outputs), norms (normalization outputs: "
            "each block's hidden state) or a regex over tensor names.",
        ),
        click.option("--weight-decay", type=FLOAT, default=0.0, show_default=True),
        click.option("--warmup", type=FLOAT, default=0.05, show_default=True, help="Warm-up fraction of the steps."),
        click.option("--clip", type=FLOAT, default=1.0, show_default=True, help="Gradient-norm clipping."),
        click.option(
            "--patience", type=int, default=3, show_default=True, callback=_non_negative, help="Early stop (0: never)."
        ),
        click.option("--eval-every", type=int, callback=_rank, help="Validate every N steps [default: per epoch]."),
        click.option(
            "--cache-teacher/--no-cache-teacher", default=None, help="Cache teacher outputs [default: when they fit]."
        ),
        click.option("--checkpoint", type=click.Path(file_okay=False, path_type=str), help="Checkpoint folder."),
        click.option(
            "--checkpoint-every",
            type=int,
            callback=_rank,
            help="Steps (with --checkpoint) [default: every validation].",
        ),
        click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint when there is one."),
        click.option("--device", help="cpu, cuda or cuda:N [default: cuda when available]."),
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16"]),
            default="fp32",
            show_default=True,
            help="bf16: the student's training forward in bfloat16 autocast (faster; validation stays fp32).",
        ),
        click.option("--threads", type=int, callback=_rank, help="torch / ONNX Runtime threads [default: theirs]."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-epoch lines."),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def calibration_options(f: Any) -> Any:
    """The calibration options shared by ``compress`` and ``inspect`` (defaults: inhercc.calibrate's)."""
    options = [
        click.option(
            "--calib-samples",
            type=int,
            default=256,
            show_default=True,
            callback=_rank,
            help="Samples of --data whose layer inputs calibrate the whitened factors (with --data).",
        ),
        click.option(
            "--calib-batch-size", type=int, default=16, show_default=True, callback=_rank, help="(With --data.)"
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def distill_config(options: dict[str, Any], seed: int, output_kinds: dict[str, str] | None = None) -> Any:
    """A DistillConfig from the parsed distillation options (which are popped from ``options``)."""
    from inhercc.distill import DistillConfig
    from inhercc.losses import parse_loss_overrides

    values = {k: options.pop(k) for k in _DISTILL_FIELDS}
    if values["epochs"] is not None and values["steps"] is not None:
        raise InherccError("choose one of --epochs, --steps (got both)")
    if values["checkpoint_every"] is not None and values["checkpoint"] is None:
        raise InherccError("--checkpoint-every: a checkpoint option, only used with --checkpoint")
    values["losses"] = parse_loss_overrides(values["losses"])
    values["patience"] = values["patience"] or None
    return DistillConfig(seed=seed, output_kinds=output_kinds or {}, **values)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Student ONNX file."
)
@click.option(
    "--ratio",
    type=FLOAT,
    callback=_ratio,
    help="Keep this fraction of the compressible parameters (default 0.5); ranks spread by --allocation.",
)
@click.option("--rank", type=int, callback=_rank, help="One rank for every layer.")
@click.option("--energy", type=FLOAT, help="Per layer, keep this fraction of the spectral energy.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=str), help="Replay a plan JSON.")
@click.option("--save-plan", type=click.Path(dir_okay=False, path_type=str), help="Write the plan as JSON.")
@click.option(
    "--rank-multiple",
    type=int,
    default=None,
    callback=_rank,
    help="Round ranks up to this [default: 8; with --latency-aware 16 on cpu, 64 on cuda/tensorrt].",
)
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
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Leave layers whose weight holds NaN / Inf dense instead of refusing the model.",
)
@click.option(
    "--data",
    type=click.Path(path_type=str),
    help="Samples (.npz, one array per input; <input>.npy; or a folder of .npz / <input>.npy shards) for "
    "calibration, "
    "verification and distillation.",
)
@click.option(
    "--verify-data",
    type=click.Path(path_type=str),
    help="Held-out samples (.npz) for the fidelity check [default: the last --verify-samples samples of --data, "
    "held out from calibration when --data has at least twice as many, else all of --data, calibration samples "
    "included (with a warning); with --epochs/--steps: the validation split, and --verify-data besides].",
)
@click.option("--verify-samples", type=int, default=8, show_default=True, callback=_rank)
@click.option("--shape", "shapes", multiple=True, help="Input shape for dynamic dims, e.g. input_ids=1x128.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str), help="Write a JSON report.")
@click.option("--external-data", is_flag=True, default=None, help="Store weights in <output>.data (auto above 2 GB).")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime fidelity check.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--latency-aware",
    is_flag=True,
    help="Time every planned chain against its dense layer on --provider (at the --shape sizes) and keep "
    "the layer dense when the chain is not at least 5 % faster.",
)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda", "tensorrt"], case_sensitive=False),
    default="cpu",
    show_default=True,
    help="Target execution provider for --latency-aware.",
)
@calibration_options
@click.option(
    "--allocation",
    type=click.Choice(["greedy", "uniform", "sensitivity"]),
    default=None,
    help="How --ratio spreads ranks: a greedy on the spectra weighted by each layer's measured effect on the "
    "outputs (sensitivity; default with --data), the greedy alone (default without), or every layer keeps "
    "the ratio (uniform).",
)
@click.option("--sensitivity", is_flag=True, help="Same as --allocation sensitivity (the default with --data).")
@click.option(
    "--sequential",
    is_flag=True,
    help="Fit each layer to the teacher's outputs from the student's own (already compressed) inputs, stage "
    "by stage: better fidelity, one pass over the calibration samples per stage.",
)
@OUTPUT_KIND_OPTION
@click.option("-v", "--verbose", is_flag=True, help="Also print the per-layer table.")
@distill_options(
    "Distil for this many epochs after compressing (compress distils only when --epochs or --steps is given)."
)
@click.pass_context
def compress(
    ctx: click.Context,
    model: str,
    output: str,
    ratio: float | None,
    rank: int | None,
    energy: float | None,
    plan_path: str | None,
    save_plan: str | None,
    rank_multiple: int | None,
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
    latency_aware: bool,
    provider: str,
    calib_samples: int,
    calib_batch_size: int,
    allocation: str | None,
    sensitivity: bool,
    sequential: bool,
    output_kinds: tuple[str, ...],
    allow_nonfinite: bool,
    verbose: bool,
    **options: Any,
) -> None:
    """Compress MODEL into a student with SVD-initialized factor chains; with --epochs or --steps, then
    distil it from MODEL on --data."""
    from inhercc.data import parse_shapes
    from inhercc.latency import default_rank_multiple
    from inhercc.pipeline import compress_file
    from inhercc.verify import parse_output_kinds

    training = options["epochs"] is not None or options["steps"] is not None
    threads = options["threads"]  # also the --latency-aware timing threads
    given = [g for g in _given(ctx, _DISTILL_FIELDS) if not (latency_aware and g == "--threads") and g != "--quiet"]
    if sensitivity and allocation not in (None, "sensitivity"):
        raise InherccError(f"--sensitivity contradicts --allocation {allocation}")
    progress = not options["quiet"]  # also the calibration progress bars
    if not training and given:
        raise InherccError(f"{', '.join(given)}: distillation options, only used with --epochs or --steps")
    _refuse_calibration_without_data(ctx, data)
    config = distill_config(options, seed)
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
        rank_multiple=rank_multiple or (default_rank_multiple(provider) if latency_aware else 8),
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
        distill=config if training else None,
        latency_aware=latency_aware,
        provider=provider.lower(),
        threads=threads,
        calib_samples=calib_samples,
        calib_batch_size=calib_batch_size,
        allocation="sensitivity" if sensitivity else allocation,
        sequential=sequential,
        output_kinds=parse_output_kinds(output_kinds),
        allow_nonfinite=allow_nonfinite,
        progress=progress,
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


def summary_table(rep: dict[str, Any]) -> str:
    """The before/after table of a compress report."""
    p, f, s = rep["params"], rep["flops"], rep["size"]
    rows: list[list[Any]] = [
        ["params", human_count(p["teacher"]), human_count(p["student"]), _ratio_str(p["student"], p["teacher"])],
        ["FLOPs/sample", human_count(f["teacher"]), human_count(f["student"]), _ratio_str(f["student"], f["teacher"])],
        ["size", human_bytes(s["teacher"]), human_bytes(s["student"]), _ratio_str(s["student"], s["teacher"])],
    ]
    before = rep.get("fidelity_before", {})
    for name, fid in rep.get("fidelity", {}).items():
        for metric, value in fid.items():
            b = before.get(name, {}).get(metric)
            shown = f"{value:.4f}" if b is None else f"{b:.4f} → {value:.4f}"
            rows.append([_fidelity_label(rep, name, metric), "1" if metric != "rel_l2" else "0", shown, ""])
    n_fact = sum(1 for r in rep["layers"] if r["rank"] is not None)
    out = format_table(["", "teacher", "student", "ratio"], rows, align="lrrr")
    out += f"\n{n_fact}/{len(rep['layers'])} layers factorized (init {rep.get('init', 'svd')})"
    if rep.get("fidelity_inputs") == "synthetic":
        out += "; fidelity on synthetic inputs (pass --data for real ones)"
    if rep["flops"].get("symbolic_dims_counted_as_1"):
        out += f"; FLOPs count dims {', '.join(rep['flops']['symbolic_dims_counted_as_1'])} as 1"
    out += "".join(f"\n{name}: not scored, {why}" for name, why in rep.get("fidelity_skipped", {}).items())
    if "training" in rep:
        out += "\n" + training_line(rep)
    for name, fid in rep.get("fidelity_verify_data", {}).items():
        scores = ", ".join(f"{metric} {value:.4f}" for metric, value in fid.items())
        out += f"\n{name} on --verify-data after distillation: {scores}"
    return out


def _fidelity_label(rep: dict[str, Any], name: str, metric: str) -> str:
    """``sentence_embedding cosine (embedding)``: an output, a metric and the output's kind (as scored)."""
    kind = rep.get("output_kinds", {}).get(name)
    return f"{name} {metric} ({kind})" if kind else f"{name} {metric}"


def training_line(rep: dict[str, Any]) -> str:
    """One line on the distillation of a report: epochs, steps, best validation fidelity, time."""
    t = rep["training"]
    best = f"; best val cosine {t['best_val_cosine']:.4f} (epoch {t['best_epoch']})" if t["best_val_cosine"] else ""
    early = ", stopped early" if t["stopped_early"] else ""
    return (
        f"distilled {t['epochs']} epoch(s), {t['steps']} step(s) on {t['train_samples']} samples{early}{best}; "
        f"{t['wall_s']:.1f} s on {t['device']}; fidelity before → after on {rep.get('fidelity_inputs', '?')}"
    )


def layer_table(rows: list[dict[str, Any]]) -> str:
    return format_table(
        ["layer", "op", "shape", "rank", "params before", "params after", "reason / note"],
        [
            [
                r["name"],
                r["op"],
                "x".join(map(str, r["shape"])),
                r["rank"],
                r["params_before"],
                r["params_after"],
                r["reason"] or r.get("note") or "",
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
@calibration_options
@click.option("--shape", "shapes", multiple=True, help="Input shape FLOPs are counted at, e.g. input_ids=1x128.")
@click.option("-q", "--quiet", is_flag=True, help="No calibration progress bar.")
@click.pass_context
def inspect(
    ctx: click.Context,
    model: str,
    as_json: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    rank_multiple: int,
    data: str | None,
    calib_samples: int,
    calib_batch_size: int,
    shapes: tuple[str, ...],
    quiet: bool,
) -> None:
    """Per-layer table: weight shape, params, FLOPs, ranks keeping 90/99 % energy (of the weights, or of the
    layer outputs with --data), why not compressible."""
    from inhercc.data import parse_shapes
    from inhercc.pipeline import inspect_model

    _refuse_calibration_without_data(ctx, data)
    info = inspect_model(
        model,
        include=include or None,
        exclude=exclude or None,
        rank_multiple=rank_multiple,
        data=data,
        calib_samples=calib_samples,
        calib_batch_size=calib_batch_size,
        progress=not quiet and not as_json,
        shapes=parse_shapes(shapes),
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


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--provider",
    type=click.Choice(["cuda", "cpu", "tensorrt"], case_sensitive=False),
    default=None,
    help="Execution provider (default: cuda when a session can really use it, else cpu).",
)
@click.option("--threads", type=int, callback=_rank, help="Intra-op threads (default: ONNX Runtime's).")
@click.option(
    "--opt-level",
    type=click.Choice(["disable", "basic", "extended", "all"]),
    default="all",
    show_default=True,
    help="ONNX Runtime graph optimization level.",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    help="NAME=DIMS for dynamic dims, e.g. input_ids=32x128; a name given again starts another shape set "
    "(each warmed up and timed on its own).",
)
@click.option("--batch", type=int, callback=_rank, help="Leading dynamic dim not set by --shape (default 1).")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model and shape set.")
@click.option("--repeat", type=int, help="Timed rounds (A B A B …) per shape set [default: 100].")
@click.option("--duration", type=FLOAT, help="Instead of --repeat: seconds of timed rounds per shape set.")
@click.option(
    "--cudnn-algo",
    type=click.Choice(["heuristic", "exhaustive", "default"], case_sensitive=False),
    default="heuristic",
    show_default=True,
    help="CUDA: cudnn_conv_algo_search (exhaustive also lengthens the warm-up).",
)
@click.option("--fp16", is_flag=True, help="CUDA/TensorRT: also time a float16 copy of every model.")
@click.option("--cuda-graph", is_flag=True, help="CUDA: replay CUDA graphs when every model allows it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Synthetic inputs and bootstrap.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str), help="Write the result JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=str), help="Write a markdown table.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="Latency plot; the extension picks the format (.png, .svg, .pdf, …; needs matplotlib).",
)
@click.option("-v", "--verbose", is_flag=True, help="Progress on stderr.")
def bench(
    models: tuple[str, ...],
    provider: str | None,
    threads: int | None,
    opt_level: str,
    shapes: tuple[str, ...],
    batch: int | None,
    warmup: int,
    repeat: int | None,
    duration: float | None,
    cudnn_algo: str,
    fp16: bool,
    cuda_graph: bool,
    seed: int,
    json_path: str | None,
    md_path: str | None,
    plot_path: str | None,
    verbose: bool,
) -> None:
    """Time MODELS on ONNX Runtime, interleaved (A B A B …); the first (the teacher) is the reference of
    the ratios, which come with a 95 % bootstrap confidence interval.

    \b
    inhercc bench teacher.onnx student.onnx --provider cpu --threads 2 \\
        --shape input_ids=32x128 --shape input_ids=1x128 --json bench.json
    """
    from inhercc.bench import BenchOptions, bench, default_provider, parse_shape_sets
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
        {"--json": json_path, "--markdown": md_path, "--plot": plot_path},
        models=models,
    )
    if plot_path is not None:
        check_plot_format(plot_path)
    options = BenchOptions(
        provider=(provider or default_provider()).lower(),
        threads=threads,
        opt_level=opt_level,
        shape_sets=parse_shape_sets(shapes),
        batch=batch,
        warmup=warmup,
        repeat=repeat,
        duration=duration,
        cudnn_conv_algo_search=cudnn_algo.upper(),
        fp16=fp16,
        cuda_graph=cuda_graph,
        seed=seed,
    )
    result = bench(list(models), options, log=lambda m: click.echo(f"· {m}", err=True) if verbose else None)
    click.echo(bench_table(result))
    if json_path:
        write_json(json_path, result)
    if md_path:
        write_text_atomic(md_path, bench_markdown(result))
    if plot_path:
        plot_bench(result, plot_path)


@cli.command()
@click.argument("student", type=click.Path(dir_okay=False, path_type=str))
@click.option("--teacher", required=True, type=click.Path(dir_okay=False, path_type=str), help="Teacher ONNX file.")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Fine-tuned ONNX file."
)
@click.option(
    "--data",
    type=click.Path(path_type=str),
    help="Training samples: .npz (one array per input, optional _labels), <input>.npy, or a folder of shards "
    "[default: synthetic, with a warning].",
)
@click.option("--shape", "shapes", multiple=True, help="Input shape for synthetic data, e.g. input_ids=1x128.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str), help="Write a JSON report.")
@click.option("--external-data", is_flag=True, default=None, help="Store weights in <output>.data (auto above 2 GB).")
@click.option("--seed", type=int, default=0, show_default=True, help="Validation split and shuffling.")
@OUTPUT_KIND_OPTION
@distill_options("Distil for this many epochs [default: 3, unless --steps is given].")
def finetune(
    student: str,
    teacher: str,
    output: str,
    data: str | None,
    shapes: tuple[str, ...],
    report_path: str | None,
    external_data: bool | None,
    seed: int,
    output_kinds: tuple[str, ...],
    **options: Any,
) -> None:
    """Distil STUDENT (e.g. compressed earlier, or from a hand-edited plan) from --teacher on --data."""
    from inhercc.data import parse_shapes
    from inhercc.distill import finetune_file
    from inhercc.verify import parse_output_kinds

    result = finetune_file(
        student,
        teacher,
        output,
        data,
        report_path=report_path,
        external_data=external_data,
        config=distill_config(options, seed, parse_output_kinds(output_kinds)),
        shapes=parse_shapes(shapes),
    )
    rep = result.report
    rows = []
    for name, fid in rep.get("fidelity", {}).items():
        for metric, value in fid.items():
            b = rep.get("fidelity_before", {}).get(name, {}).get(metric)
            rows.append([_fidelity_label(rep, name, metric), "-" if b is None else f"{b:.4f}", f"{value:.4f}"])
    click.echo(format_table(["", "before", "after"], rows, align="lrr"))
    for name, why in rep.get("fidelity_skipped", {}).items():
        click.echo(f"{name}: not scored, {why}")
    click.echo(training_line(rep))
    click.echo(f"student written to {output}")


def main() -> None:
    """Console-script entry point: SIGTERM stops like Ctrl-C (``error: aborted``, temp files removed)."""
    signal.signal(signal.SIGTERM, _terminate)
    cli()


if __name__ == "__main__":
    main()
