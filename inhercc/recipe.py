"""The Recipe: every option of a compress run, declared once, per stage, in frozen dataclasses.

``Recipe`` composes the stages' options (layer selection, plan, factor init, calibration, latency, verify,
distillation), resolves the defaults that depend on context once (:meth:`Recipe.resolved`: whitened init
and sensitivity allocation with data, the rank multiple of the latency provider, ratio 0.5 when nothing
else is chosen), checks once, and round-trips to JSON / YAML (:meth:`Recipe.save`, :meth:`Recipe.load`).
The report of every run embeds its resolved recipe, so ``inhercc compress --recipe`` replays it exactly.

    recipe = Recipe.of(ratio=0.3, latency_aware=True, provider="cuda")   # flat keywords = the CLI's names
    compress("teacher.onnx", recipe, data="calib.npz")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from inhercc.calibrate import DEFAULT_BATCH_SIZE as DEFAULT_CALIB_BATCH_SIZE
from inhercc.calibrate import DEFAULT_SAMPLES as DEFAULT_CALIB_SAMPLES
from inhercc.data import parse_shapes
from inhercc.distill.config import DistillConfig
from inhercc.errors import InherccError
from inhercc.factorizer import INITS
from inhercc.files import write_text_atomic
from inhercc.latency import RANK_MULTIPLE, default_rank_multiple
from inhercc.layers import DEFAULT_MIN_PARAMS, DEFAULT_MIN_SAVING
from inhercc.linalg import SPLITS
from inhercc.options import (
    check_options,
    from_dict,
    name_of,
    non_negative,
    option,
    option_fields,
    positive,
    to_dict,
    unit_interval,
)
from inhercc.precision import PRECISIONS, check_precision
from inhercc.quantize import QUANTIZE_MODES
from inhercc.verify import output_kinds_option

ALLOCATIONS = ("greedy", "uniform", "sensitivity")
PROVIDERS = tuple(RANK_MULTIPLE)
DEFAULT_RATIO = 0.5
DEFAULT_RANK_MULTIPLE = 8
RECIPE_FORMAT = "inhercc-recipe"
RECIPE_VERSION = 1


def _below_1(value: float | None) -> str | None:
    """A saving fraction: below 1 (≤ 0 factorizes layers that do not shrink, e.g. to study them)."""
    return "must be below 1" if value is not None and not value < 1.0 else None


@dataclass(frozen=True)
class SelectOptions:
    """Which MatMul / Gemm / Conv (and, when asked, embedding) nodes are candidates (the find-layers stage)."""

    include: tuple[str, ...] = option((), metavar="REGEX", help="Only layers whose node name matches (repeatable).")
    exclude: tuple[str, ...] = option((), metavar="REGEX", help="Skip layers whose node name matches (repeatable).")
    min_params: int = option(DEFAULT_MIN_PARAMS, check=non_negative, help="Smallest weight worth factorizing.")
    min_saving: float = option(
        DEFAULT_MIN_SAVING, check=_below_1, help="A chain must save at least this fraction of the layer."
    )
    allow_nonfinite: bool = option(
        False, help="Leave layers whose weight holds NaN / Inf dense instead of refusing the model."
    )
    embeddings: bool = option(
        False,
        help="Embedding tables (Gather on a constant 2-D table) are candidates too: factorized as a rank-r table and "
        "a MatMul r→d (ALBERT), weighted by the token counts of --data.",
    )

    def __post_init__(self) -> None:  # one regex given as a string (from Python or a recipe file)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value or ()))


@dataclass(frozen=True)
class PlanOptions:
    """How ranks are chosen (the plan stage): exactly one of ratio, rank, energy, file."""

    ratio: float | None = option(
        None,
        check=unit_interval,
        help="Keep this fraction of the compressible parameters; ranks spread by --allocation.",
        default_text="0.5",
    )
    rank: int | None = option(None, check=positive, help="One rank for every layer.")
    energy: float | None = option(
        None, check=unit_interval, help="Per layer, keep this fraction of the spectral energy."
    )
    file: Any = option(None, name="plan", metavar="PLAN.json", help="Replay a plan JSON (a RankPlan from Python).")
    rank_multiple: int | None = option(
        None,
        check=positive,
        help="Round ranks up to this.",
        default_text="8; with --latency-aware 16 on cpu, 64 on cuda/tensorrt",
    )
    allocation: str | None = option(
        None,
        choices=ALLOCATIONS,
        help="How --ratio spreads ranks: a greedy on the spectra weighted by each layer's measured effect on the "
        "outputs (sensitivity; default with --data), the greedy alone (default without), or every layer keeps "
        "the ratio (uniform).",
    )

    def chosen(self) -> list[str]:
        """The ways of choosing ranks that are set."""
        return [n for n in ("ratio", "rank", "energy", "file") if getattr(self, n) is not None]


@dataclass(frozen=True)
class FactorOptions:
    """How each factor pair starts (the decomposition behind the rewrite)."""

    init: str | None = option(
        None,
        choices=INITS,
        help="Factor init: random = same-size student baseline.",
        default_text="whitened with --data, else svd",
    )
    split: str = option("output", choices=SPLITS, help="Where the singular values go (output = InherNet).")
    heads: int = option(
        1,
        check=positive,
        help="Output heads per factorized layer, mixed by a softmax gate on the rank-r bottleneck (InherNet); "
        "every head starts as the same output factor, so the student starts as the one-head student.",
    )


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration on data: Gram matrices, sensitivity and sequential fitting."""

    samples: int | None = option(
        DEFAULT_CALIB_SAMPLES,
        name="calib_samples",
        check=positive,
        help="Samples of --data whose layer inputs calibrate the whitened factors (with --data).",
    )
    batch_size: int = option(DEFAULT_CALIB_BATCH_SIZE, name="calib_batch_size", check=positive, help="(With --data.)")
    sequential: bool = option(
        False,
        help="Fit each layer to the teacher's outputs from the student's own (already compressed) inputs, stage "
        "by stage: better fidelity, one pass over the calibration samples per stage.",
    )


@dataclass(frozen=True)
class LatencyOptions:
    """Latency-aware planning: keep a layer dense where its chain is not faster on the target."""

    aware: bool = option(
        False,
        name="latency_aware",
        help="Time every planned chain against its dense layer on --provider (at the --shape sizes) and keep "
        "the layer dense when the chain is not at least 5 % faster.",
    )
    provider: str = option("cpu", choices=PROVIDERS, help="Target execution provider for --latency-aware.")


@dataclass(frozen=True)
class VerifyOptions:
    """The fidelity check of the student against the teacher in ONNX Runtime."""

    enabled: bool = option(True, name="verify", help="Check the student against the teacher in ONNX Runtime.")
    samples: int = option(
        8,
        name="verify_samples",
        check=positive,
        help="Samples of --data held out for the check (when --data has at least twice as many).",
    )


@dataclass(frozen=True)
class FusionOptions:
    """ONNX Runtime's transformer optimizer and sibling packing (the optimize stage, after distillation)."""

    optimize: bool = option(
        False,
        help="Run ONNX Runtime's transformer optimizer (BERT fusions) on the student; the layers its attention "
        "fusion needs single in the teacher (Q, K, V, output projection) stay dense, so the student keeps them.",
    )
    attention_heads: int = option(0, check=non_negative, help="Heads for --optimize (0: read from the graph).")
    hidden_size: int = option(0, check=non_negative, help="Hidden size for --optimize (0: read from the graph).")
    pack: bool = option(
        False,
        name="pack_siblings",
        help="Pack the input factors of factorized MatMuls that read one input (Q/K/V, gate/up) into one MatMul "
        "and a Split: the same products, fewer kernels.",
    )


@dataclass(frozen=True)
class QuantizeOptions:
    """What the written student is stored as, after factorization and distillation (the quantize and precision
    stages): INT8 through ONNX Runtime's quantizer, or float16 through its converter."""

    quantize: str | None = option(
        None,
        choices=QUANTIZE_MODES,
        help="Quantize the student with ONNX Runtime: int8 (dynamic, weights int8) or int8-static (QDQ, "
        "activations calibrated on --data). With --epochs/--steps the student is distilled through the same "
        "quantization, fake-quantized (weights and activations).",
    )
    per_channel: bool = option(True, help="INT8 weights with one scale per output channel (else per tensor).")
    precision: str = option(
        "fp32",
        name="student_precision",
        choices=PRECISIONS,
        check=check_precision,
        help="Store the student in fp16 (Softmax / normalizations kept fp32; for GPUs). bf16: not available.",
    )


@dataclass(frozen=True)
class Recipe:
    """Every option of a compress run. ``distill`` None: no fine-tuning after the rewrite."""

    select: SelectOptions = field(default_factory=SelectOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    factors: FactorOptions = field(default_factory=FactorOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    fusion: FusionOptions = field(default_factory=FusionOptions)
    quantization: QuantizeOptions = field(default_factory=QuantizeOptions)
    seed: int = option(0, help="Random init, synthetic inputs, the hold-out split and shuffling.")
    threads: int | None = option(
        None, check=positive, help="torch / ONNX Runtime threads (also latency timing).", default_text="theirs"
    )
    shapes: dict[str, list[int]] | None = option(
        None,
        flag="--shape",
        metavar="NAME=DIMS",
        parse=lambda items: parse_shapes(items) or None,
        help="Input shape for dynamic dims, e.g. input_ids=1x128 (FLOPs, synthetic inputs, latency timing).",
    )
    output_kinds: dict[str, str] = output_kinds_option()
    distill: DistillConfig | None = None

    @classmethod
    def of(cls, base: Recipe | None = None, **flat: Any) -> Recipe:
        """A recipe from flat keywords — the CLI's option names (``ratio``, ``calib_samples``,
        ``latency_aware``, ``epochs`` …) — over ``base``. A distillation keyword given a value turns distillation
        on (None is "not set" there unless ``base`` distils; ``distill=DistillConfig(…)`` gives the whole
        section)."""
        recipe = base or cls()
        paths = flat_paths()
        unknown = sorted(set(flat) - set(paths) - {"distill"})
        if unknown:
            raise InherccError(f"unknown option `{unknown[0]}`; known: {', '.join(sorted(paths))}")
        if "distill" in flat:
            recipe = replace(recipe, distill=flat.pop("distill"))
        sections: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            head, _, leaf = paths[name].rpartition(".")
            sections.setdefault(head, {})[leaf] = value
        top = sections.pop("", {})
        if recipe.distill is None and all(v is None for v in sections.get("distill", {}).values()):
            sections.pop("distill", None)
        for head, values in sections.items():
            current = getattr(recipe, head) or (DistillConfig() if head == "distill" else None)
            top[head] = replace(current, **values)
        return replace(recipe, **top)

    def training(self) -> bool:
        return self.distill is not None

    def resolved(self, has_data: bool) -> Recipe:
        """The recipe with every context-dependent default filled in and checked (with or without data)."""
        self.check()
        plan, factors = self.plan, self.factors
        if not plan.chosen():
            plan = replace(plan, ratio=DEFAULT_RATIO)
        if plan.rank_multiple is None:
            multiple = default_rank_multiple(self.latency.provider) if self.latency.aware else DEFAULT_RANK_MULTIPLE
            plan = replace(plan, rank_multiple=multiple)
        if factors.init is None:
            factors = replace(factors, init="whitened" if has_data else "svd")
        if plan.allocation is None:
            # Measured on MiniLM-L6 and MobileNetV2 at ratio 0.5 (benchmarks/results/whitened.md): neither spectrum
            # greedy nor uniform ranks win on both; the measured sensitivity is best on both, at ~2× the Gram time.
            sensitive = factors.init == "whitened" and has_data
            plan = replace(plan, allocation="sensitivity" if sensitive else "greedy")
        distill = self.distill
        if distill is not None:
            distill = replace(
                distill,
                seed=self.seed,
                threads=self.threads,
                output_kinds=dict(self.output_kinds),
                fake_quant=self.quantization.quantize,
                fake_quant_per_channel=self.quantization.per_channel,
            )
        out = replace(self, plan=plan, factors=factors, distill=distill)
        out.check_context(has_data)
        return out

    def check(self) -> None:
        """Every field against its declaration, and the choices that exclude each other."""
        check_options(self)
        chosen = self.plan.chosen()
        if len(chosen) > 1:
            names = ", ".join(f"`plan.{n}`" for n in chosen)
            raise InherccError(f"choose one of `plan.ratio`, `plan.rank`, `plan.energy`, `plan.file` (got {names})")
        if self.distill is not None:
            self.distill.check()
        if self.quantization.quantize is not None and self.quantization.precision != "fp32":
            raise InherccError("choose one of `quantization.quantize`, `quantization.precision` fp16 (got both)")

    def check_context(self, has_data: bool) -> None:
        """The resolved choices against the context: what needs calibration data has it."""
        init, needs_ratio = self.factors.init, self.plan.ratio is not None
        if init == "whitened" and not has_data:
            raise InherccError("`factors.init` whitened needs calibration data (`data`)")
        if self.calibration.sequential and (not has_data or init != "whitened"):
            raise InherccError("`calibration.sequential` needs calibration data (`data`) and `factors.init` whitened")
        if self.quantization.quantize == "int8-static" and not has_data:
            raise InherccError("`quantization.quantize` int8-static calibrates activations: it needs calibration data")
        if needs_ratio and self.plan.allocation == "sensitivity":
            if not has_data:
                raise InherccError("`plan.allocation` sensitivity needs calibration data (`data`)")
            if init == "random":
                raise InherccError(
                    "`plan.allocation` sensitivity measures truncation errors; "
                    "use it with `factors.init` svd or whitened"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with a format tag (what :meth:`from_dict` and :meth:`load` read)."""
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, **to_dict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        body = dict(data)
        if body.pop("format", RECIPE_FORMAT) != RECIPE_FORMAT or body.pop("version", RECIPE_VERSION) > RECIPE_VERSION:
            raise InherccError(f"not an {RECIPE_FORMAT} of version ≤ {RECIPE_VERSION}")
        recipe = from_dict(cls, body)
        recipe.check()
        return recipe

    def save(self, path: str | os.PathLike[str]) -> None:
        """As YAML for ``.yaml`` / ``.yml``, else JSON; written atomically."""
        write_text_atomic(path, dumps(self.to_dict(), path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        """A recipe file (YAML or JSON), or a compress report that embeds one."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InherccError(f"cannot read recipe {path}: {e.strerror or e}") from None
        data = loads(text, path)
        if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
            data = data["recipe"]  # a compress report
        if not isinstance(data, dict):
            raise InherccError(f"recipe {path}: expected a mapping of options")
        try:
            return cls.from_dict(data)
        except InherccError as e:
            raise InherccError(f"recipe {path}: {e}") from None


def flat_paths() -> dict[str, str]:
    """Flat keyword → field path (``calib_samples`` → ``calibration.samples``); the first declaration of a name
    wins, so the recipe's ``seed`` / ``threads`` / ``output_kinds`` also set distillation's (:meth:`resolved`)."""
    paths: dict[str, str] = {}
    for path, f in option_fields(Recipe):
        paths.setdefault(name_of(f), path)
    return paths


def dumps(data: dict[str, Any], path: str | os.PathLike[str]) -> str:
    if str(path).lower().endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"


def loads(text: str, path: str | os.PathLike[str]) -> Any:
    try:
        if str(path).lower().endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        kind = "YAML" if str(path).lower().endswith((".yaml", ".yml")) else "JSON"
        raise InherccError(f"recipe {path} is not valid {kind}: {' '.join(str(e).split())}") from None
