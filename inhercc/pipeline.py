"""The compiler's entry points: :func:`compress` runs the stages (:mod:`inhercc.stages`) of a :class:`Recipe`;
:func:`compress_file` does it file to file; :func:`inspect_model` tabulates the candidate layers."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto

from inhercc.calibrate import DEFAULT_BATCH_SIZE as DEFAULT_CALIB_BATCH_SIZE
from inhercc.calibrate import DEFAULT_SAMPLES as DEFAULT_CALIB_SAMPLES
from inhercc.data import default_shapes, fixed_shape_flops, open_samples
from inhercc.distill import is_main_process
from inhercc.errors import InherccError
from inhercc.factorizer import Factorizer
from inhercc.files import check_paths, file_size, path_or_none, write_json
from inhercc.layers import DEFAULT_MIN_PARAMS, Layer, find_layers
from inhercc.model import as_model, float_param_count, save_model
from inhercc.plan import RankPlan
from inhercc.recipe import DEFAULT_RANK_MULTIPLE, Recipe
from inhercc.stages import (
    STAGES,
    Stage,
    all_parts,
    choose_shapes,
    data_label,
    layer_flops,
    open_state,
    run_stages,
)

__all__ = ["CompressResult", "Factorizer", "Recipe", "compress", "compress_file", "inspect_model", "as_model"]

Log = Callable[[str], None]  # compress's log: one line per stage (a runtime argument, not in the Recipe)


@dataclass
class CompressResult:
    """The student, the plan that made it, the layer records and the report (JSON-ready dict)."""

    model: ModelProto
    plan: RankPlan
    layers: list[Layer]
    report: dict[str, Any] = field(default_factory=dict)


def compress(
    teacher: ModelProto | str | os.PathLike[str],
    recipe: Recipe | None = None,
    data: Any = None,
    verify_data: Any = None,
    *,
    grams: Mapping[str, np.ndarray] | None = None,
    latency_timer: Callable[[Layer, int, Any], tuple[float, float]] | None = None,
    log: Log | None = None,
    progress: bool = False,
    stages: Sequence[Stage] = STAGES,
    **legacy: Any,
) -> CompressResult:
    """Compress a teacher (path or ModelProto) into a student with SVD-initialized factor chains, as the
    ``recipe`` says (default: ``Recipe()``, ratio 0.5; see :class:`inhercc.recipe.Recipe` for every option).

    ``data`` (any source :func:`inhercc.data.open_samples` takes) calibrates the factors (whitened init and a
    sensitivity-weighted rank allocation by default), trains the student when the recipe distils, and — less
    a seeded random ``verify.samples`` held out from calibration — scores it; ``verify_data`` is scored instead
    (after distillation: besides the validation split). Without data the check runs on synthetic inputs.

    ``grams`` replaces the calibration's Gram matrices; ``latency_timer`` the ONNX Runtime timing of latency-aware
    planning; ``log`` receives one line per step; ``progress`` draws bars on stderr; ``stages`` is the list of
    stages run (:data:`inhercc.stages.STAGES`). Returns the student, its plan, the layer records and a report
    with params, FLOPs, size, fidelity, timings and the resolved recipe (replayable).

    The option keywords of earlier releases (``ratio=``, ``epochs=``, ``distill=`` …) are still accepted, with
    a :class:`DeprecationWarning`: they build the recipe (``Recipe.of(**keywords)``).
    """
    recipe = recipe_with_legacy(recipe, legacy)
    runtime = {"grams": grams, "timer": latency_timer, "progress": progress, "say": log or (lambda _m: None)}
    state = run_stages(stages, open_state(teacher, recipe, data, verify_data, **runtime))
    if state.student is None or state.plan is None:
        raise InherccError("the stages run made no student (a custom stage list needs rewrite)")
    return CompressResult(state.student, state.plan, state.layers, state.report)


def recipe_with_legacy(recipe: Recipe | None, legacy: Mapping[str, Any]) -> Recipe:
    """The recipe, or one built from the keywords of earlier releases (with a DeprecationWarning)."""
    if not legacy:
        return recipe or Recipe()
    if not isinstance(recipe, (Recipe, type(None))):
        raise InherccError(f"`recipe` must be an inhercc Recipe, got {type(recipe).__name__}")
    names = ", ".join(f"{k}=" for k in legacy)
    warnings.warn(
        f"compress({names}): option keywords are deprecated and will be removed in the next release; pass a "
        f"Recipe (inhercc.Recipe.of({names}…))",
        DeprecationWarning,
        stacklevel=3,
    )
    return Recipe.of(recipe, **legacy)


def compress_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    recipe: Recipe | None = None,
    data: Any = None,
    verify_data: Any = None,
    *,
    report_path: str | os.PathLike[str] | None = None,
    save_plan: str | os.PathLike[str] | None = None,
    save_recipe: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    **kwargs: Any,
) -> CompressResult:
    """:func:`compress` from a file to a file: the outputs are checked before any work (none over an input —
    model, data, plan — or over another output), written atomically. Sizes in the report are the real sizes
    on disk; ``save_recipe`` writes the resolved recipe (YAML for .yaml / .yml, else JSON)."""
    runtime = {k: kwargs.pop(k) for k in ("grams", "latency_timer", "log", "progress", "stages") if k in kwargs}
    recipe = recipe_with_legacy(recipe, kwargs)
    plan_file = recipe.plan.file if not isinstance(recipe.plan.file, RankPlan) else None
    distill = recipe.distill
    check_paths(
        [("`model`", input_path), ("`data`", path_or_none(data)), ("`verify_data`", path_or_none(verify_data))]
        + [("`plan.file`", path_or_none(plan_file))],
        {"`output`": output_path, "`report`": report_path, "`save_plan`": save_plan, "`save_recipe`": save_recipe},
        models=(input_path,),
        checkpoint=distill.checkpoint if distill is not None else None,
    )
    result = compress(input_path, recipe, data, verify_data, **runtime)
    if not is_main_process():  # under torchrun only rank 0 writes
        return result
    save_model(result.model, output_path, external_data=external_data)
    result.report["size"] = {"teacher": file_size(input_path), "student": file_size(output_path)}
    result.report["files"] = {"teacher": str(input_path), "student": str(output_path)}
    if save_plan is not None:
        result.plan.save(save_plan, result.layers)
    if save_recipe is not None:
        Recipe.from_dict(result.report["recipe"]).save(save_recipe)
    if report_path is not None:
        write_json(report_path, result.report)
    return result


def inspect_model(
    model: ModelProto | str | os.PathLike[str],
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_params: int = DEFAULT_MIN_PARAMS,
    rank_multiple: int = DEFAULT_RANK_MULTIPLE,
    data: Any = None,
    grams: Mapping[str, np.ndarray] | None = None,
    calib_samples: int | None = DEFAULT_CALIB_SAMPLES,
    calib_batch_size: int = DEFAULT_CALIB_BATCH_SIZE,
    progress: bool = False,
    shapes: Mapping[str, list[int]] | None = None,
    embeddings: bool = False,
) -> dict[str, Any]:
    """Per-layer table (name, op, weight shape, params, FLOPs, the ranks keeping 90 % / 99 % of the
    spectral energy — of the weights, or of the layer outputs when ``grams`` are given or calibrated on
    the first ``calib_samples`` of ``data`` — and the reason for every layer that cannot be compressed)
    with totals. FLOPs are per sample at ``shapes``, else at the data's shapes, else at sizes chosen for the
    dynamic dims (:func:`inhercc.data.default_shapes`, said in one warning). ``embeddings``: embedding tables
    are candidates too."""
    m = as_model(model)
    layers = find_layers(
        m, include=include, exclude=exclude, min_params=min_params, rank_multiple=rank_multiple, embeddings=embeddings
    )
    feeds = all_parts(open_samples(data, m)) if data is not None else []
    if feeds and grams is None:
        from inhercc.calibrate import collect_grams

        grams = collect_grams(
            m,
            [la for la in layers if la.weight is not None and la.out_features],
            feeds,
            samples=calib_samples,
            batch_size=calib_batch_size,
            progress=progress,
            source=data_label(data),
        )
    values, record = inspect_shapes(m, shapes, feeds)
    rows = inspect_rows(layers, Factorizer("whitened" if grams is not None else "svd", grams=grams), m, values)
    total_flops, symbolic = fixed_shape_flops(m, values)
    return {
        "spectrum": "whitened" if grams is not None else "weight",
        "shapes": record,
        "layers": rows,
        "totals": {
            "layers": len(layers),
            "compressible": sum(1 for la in layers if la.compressible),
            "params": float_param_count(m),
            "compressible_params": sum(la.params for la in layers if la.compressible),
            "flops": total_flops,
            "symbolic_dims_counted_as_1": list(symbolic),
        },
    }


def inspect_rows(
    layers: Sequence[Layer], factorizer: Factorizer, model: ModelProto, shapes: Mapping[str, list[int]] | None
) -> list[dict[str, Any]]:
    """One row per candidate layer: shape, params, FLOPs at ``shapes``, the ranks keeping 90 / 99 % energy."""
    from inhercc.plan import rank_keeping

    flops_at = layer_flops(model, shapes)
    rows = []
    for layer in layers:
        row: dict[str, Any] = {
            "name": layer.name,
            "op": layer.op,
            "shape": layer.shape,
            "params": layer.params,
            "flops": flops_at.get(layer.name, layer.flops),
            "full_rank": layer.full_rank * layer.groups,
            "rank90": None,
            "rank99": None,
            "reason": layer.reason,
            "subgraph": layer.subgraph,
        }
        if layer.weight is not None and layer.out_features and layer.in_features:
            s = factorizer.spectrum(layer)
            row["rank90"] = rank_keeping(s, 0.90) * layer.groups
            row["rank99"] = rank_keeping(s, 0.99) * layer.groups
        rows.append(row)
    return rows


def inspect_shapes(
    model: ModelProto, shapes: Mapping[str, list[int]] | None, parts: Sequence[Any]
) -> tuple[dict[str, list[int]] | None, dict[str, Any]]:
    """:func:`choose_shapes` (the sizes compress would use, confirmed by ONNX Runtime); when ONNX Runtime runs
    none of the sizes tried, inspect still counts, at :func:`inhercc.data.default_shapes`' first guess, and
    the warning says why."""
    try:
        return choose_shapes(model, shapes, parts)
    except InherccError as e:
        if shapes or parts:
            raise
        values, note = default_shapes(model)
        warnings.warn(f"{note}; FLOPs counted at the first guess: {e}", stacklevel=3)
        return values, {"values": values, "chosen": "default"}
