"""Rank planning: how much rank each compressible layer keeps.

Three ways to choose, exactly one per run:

* ``ratio``  — keep a fraction of the compressible layers' weight parameters; ranks are allocated
  globally by a greedy on the spectra: the step (``rank_multiple`` more singular values of one layer)
  with the largest share of that layer's energy per parameter goes first.
* ``rank``   — one rank for every layer (the InherNet demo's way).
* ``energy`` — per layer, the smallest rank keeping that fraction of its spectral energy.

Spectra are the plain singular values of the weights, or the whitened ones (output error per singular
value) when calibration data is available. A layer whose factors would save less than ``min_saving`` of
its weights stays dense. A plan is saved to / replayed from JSON so users can edit ranks by hand.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inhercc.errors import InherccError
from inhercc.layers import DEFAULT_MIN_SAVING, Layer

PLAN_FORMAT = "inhercc-plan"
PLAN_VERSION = 1


@dataclass
class RankPlan:
    """Ranks per layer name (``None`` = left dense) with the reason for every dense layer."""

    ranks: dict[str, int | None]
    reasons: dict[str, str] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    # what a plan file recorded of each layer (checked against the model when it is replayed)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    ops: dict[str, str] = field(default_factory=dict)

    def rank(self, name: str) -> int | None:
        return self.ranks.get(name)

    def factorized(self) -> dict[str, int]:
        return {k: v for k, v in self.ranks.items() if v is not None}

    def to_dict(self, layers: list[Layer] | None = None) -> dict[str, Any]:
        by_name = {layer.name: layer for layer in layers or []}
        rows = []
        for name, rank in self.ranks.items():
            row: dict[str, Any] = {"name": name, "rank": rank}
            if name in by_name:
                row["op"] = by_name[name].op
                row["shape"] = by_name[name].shape
            if rank is None:
                row["reason"] = self.reasons.get(name, "left dense")
            rows.append(row)
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "method": self.method, "layers": rows}

    def save(self, path: str | Path, layers: list[Layer] | None = None) -> None:
        from inhercc.files import write_json

        write_json(path, self.to_dict(layers))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> RankPlan:
        """A plan from its JSON form (as :meth:`to_dict` writes it), every field checked: a malformed file
        is an :class:`InherccError` naming the field."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise InherccError(f'{source} is not an inhercc plan (missing "format": "{PLAN_FORMAT}")')
        version = data.get("version", PLAN_VERSION)
        if not _is_int(version) or not 1 <= version <= PLAN_VERSION:
            raise InherccError(f'{source}: "version" {version!r} is not one this inhercc reads ({PLAN_VERSION})')
        method = data.get("method", {})
        if not isinstance(method, Mapping):
            raise InherccError(f'{source}: "method" must be an object, got {_json_type(method)}')
        _check_method(method, source)
        if "layers" not in data:
            raise InherccError(f'{source}: "layers" is missing (a list of {{"name": …, "rank": …}} objects)')
        rows = data["layers"]
        if not isinstance(rows, list):
            raise InherccError(
                f'{source}: "layers" must be a list of {{"name": …, "rank": …}} objects, got {_json_type(rows)}'
            )
        plan = cls({}, {}, dict(method))
        for i, row in enumerate(rows):
            plan._add_row(row, f"{source}: layers[{i}]")
        return plan

    def _add_row(self, row: Any, where: str) -> None:
        """One entry of a plan file's ``"layers"`` (``where`` names it in errors)."""
        if not isinstance(row, Mapping):
            raise InherccError(f'{where} must be an object like {{"name": "fc1", "rank": 16}}, got {_json_type(row)}')
        name = row.get("name")
        if not isinstance(name, str) or not name:
            raise InherccError(f'{where}: every layer needs a "name" (a string), got {_json_type(name)}')
        if name in self.ranks:
            raise InherccError(f"{where}: layer {name} is listed twice")
        if "rank" not in row:
            raise InherccError(f'{where} ({name}) needs a "rank": a positive integer, or null to keep it dense')
        rank = row["rank"]
        if rank is not None and (not _is_int(rank) or rank <= 0):
            raise InherccError(f"{where}: rank of {name} must be a positive integer or null, got {rank!r}")
        for key in ("op", "reason"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise InherccError(f'{where}: "{key}" of {name} must be a string, got {_json_type(row[key])}')
        shape = row.get("shape")
        if shape is not None:
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise InherccError(f'{where}: "shape" of {name} must be a list of dims, got {shape!r}')
            self.shapes[name] = list(shape)
        if row.get("op") is not None:
            self.ops[name] = row["op"]
        self.ranks[name] = rank
        if rank is None:
            self.reasons[name] = str(row.get("reason") or "left dense by the plan")

    @classmethod
    def load(cls, path: str | Path) -> RankPlan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise InherccError(f"no such plan file: {path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InherccError(f"plan {path} is not valid JSON: {e}") from e
        return cls.from_dict(data, str(path))


# ``method`` keys a plan file may carry, with their JSON types (others are kept as they are).
_METHOD_TYPES: dict[str, tuple[type, ...]] = {
    "mode": (str,),
    "value": (int, float),
    "rank_multiple": (int,),
    "spectrum": (str,),
    "allocation": (str,),
    "init": (str,),
    "split": (str,),
}
# ``method`` keys that describe how one run made its factors, not how the ranks were chosen: a replay
# records its own (the pipeline sets them), never the plan file's.
_RUN_KEYS = ("init", "split", "sequential", "latency_aware", "rebalanced_ratio")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_type(v: object) -> str:
    """How a JSON value reads in an error: ``null``, ``a list``, ``"fc1"``, …"""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, Mapping):
        return "an object"
    return repr(v) if isinstance(v, str) else f"{v!r} ({type(v).__name__})"


def _check_method(method: Mapping[str, Any], source: str) -> None:
    for key, types in _METHOD_TYPES.items():
        v = method.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, types):
            kind = "a string" if types == (str,) else "a number" if float in types else "an integer"
            raise InherccError(f'{source}: "method.{key}" must be {kind}, got {_json_type(v)}')
        if key == "rank_multiple" and v <= 0:
            raise InherccError(f'{source}: "method.rank_multiple" must be positive, got {v}')
        if key == "value" and not math.isfinite(v):
            raise InherccError(f'{source}: "method.value" must be a finite number, got {v}')


def spectrum_energy(singular_values: np.ndarray) -> np.ndarray:
    """Per-index energy σᵢ² summed over groups, as a share of the layer's total: shape ``[k]``."""
    s = np.atleast_2d(np.asarray(singular_values, dtype=np.float64))
    e = np.sum(s**2, axis=0)
    total = float(e.sum())
    return e / total if total > 0 else e


def rank_keeping(singular_values: np.ndarray, energy: float) -> int:
    """Smallest per-group rank whose cumulative energy share reaches ``energy``."""
    e = np.cumsum(spectrum_energy(singular_values))
    if len(e) == 0:
        return 0
    return int(min(len(e), np.searchsorted(e, energy - 1e-12) + 1))


def round_rank(rank: int, multiple: int, full_rank: int) -> int:
    """Round a per-group rank up to a multiple of ``multiple``, capped at the full rank."""
    m = max(1, multiple)
    return int(min(full_rank, max(m, math.ceil(rank / m) * m)))


def plan_uniform(
    layers: list[Layer], rank: int, *, rank_multiple: int = 1, min_saving: float = DEFAULT_MIN_SAVING
) -> RankPlan:
    """The same rank for every layer (per group for grouped convs)."""
    if rank <= 0:
        raise InherccError(f"`plan.rank` must be positive, got {rank}")
    chosen = {}
    for layer in _compressible(layers):
        r = round_rank(min(rank, layer.full_rank), rank_multiple, layer.full_rank)
        chosen[layer.name] = r * layer.groups
    return _finish(layers, chosen, {"mode": "rank", "value": rank, "rank_multiple": rank_multiple}, min_saving)


def plan_energy(
    layers: list[Layer],
    spectra: Mapping[str, np.ndarray],
    energy: float,
    *,
    rank_multiple: int = 1,
    min_saving: float = DEFAULT_MIN_SAVING,
) -> RankPlan:
    """Per layer, the smallest rank keeping ``energy`` of its spectral energy."""
    if not 0.0 < energy <= 1.0:
        raise InherccError(f"`plan.energy` must be in (0, 1], got {energy}")
    chosen = {}
    for layer in _compressible(layers):
        r = round_rank(rank_keeping(spectra[layer.name], energy), rank_multiple, layer.full_rank)
        chosen[layer.name] = r * layer.groups
    return _finish(layers, chosen, {"mode": "energy", "value": energy, "rank_multiple": rank_multiple}, min_saving)


def plan_ratio(
    layers: list[Layer],
    spectra: Mapping[str, np.ndarray],
    ratio: float,
    *,
    rank_multiple: int = 1,
    min_saving: float = DEFAULT_MIN_SAVING,
    spectrum: str = "weight",
    layer_weights: Mapping[str, float] | None = None,
) -> RankPlan:
    """Global greedy: keep ``ratio`` of the compressible layers' weight parameters, buying the steps with
    the largest energy share per parameter first (each layer's shares scaled by ``layer_weights[name]``
    when given: the measured per-layer importance of :mod:`inhercc.sensitivity`). Every layer starts at
    one step; a layer whose rank would save less than ``min_saving`` is bought dense in one last step (its
    remaining energy for its remaining parameters). The result stays within the budget and misses it by
    less than one step."""
    if not 0.0 < ratio <= 1.0:
        raise InherccError(f"`plan.ratio` must be in (0, 1], got {ratio}")
    cands = _compressible(layers)
    method = {"mode": "ratio", "value": ratio, "rank_multiple": rank_multiple, "spectrum": spectrum}
    method["allocation"] = "sensitivity" if layer_weights is not None else "greedy"
    if not cands:
        return _finish(layers, {}, method, min_saving)
    budget = ratio * sum(layer.weight_params for layer in cands)
    m = max(1, rank_multiple)
    state: dict[str, int | None] = {}  # per-group rank, None = dense
    energies: dict[str, np.ndarray] = {}
    spent = 0.0
    for layer in cands:
        r0 = min(m, layer.full_rank)
        state[layer.name] = r0
        energies[layer.name] = spectrum_energy(spectra[layer.name])
        if layer_weights is not None:
            energies[layer.name] = energies[layer.name] * float(layer_weights.get(layer.name, 1.0))
        spent += layer.factor_params(r0 * layer.groups)
    if spent > budget:
        raise InherccError(
            f"`plan.ratio` {ratio} is too small: the smallest factors (rank {m} per layer) already keep "
            f"{spent / (budget / ratio):.1%} of the compressible parameters"
        )

    def next_step(layer: Layer) -> tuple[float, float, int | None] | None:
        r = state[layer.name]
        if r is None:
            return None
        e = energies[layer.name]
        dense_cap = (1.0 - min_saving) * layer.weight_params
        nr = min(r + m, layer.full_rank)
        if nr > r and layer.factor_params(nr * layer.groups) <= dense_cap:
            gain, cost, target = float(e[r:nr].sum()), layer.factor_params((nr - r) * layer.groups), nr
        else:  # no cheaper factorization left: the next step is the dense layer itself
            gain = float(e[r:].sum())
            cost, target = layer.weight_params - layer.factor_params(r * layer.groups), None
        if cost <= 0 or gain <= 0:
            return None
        return gain / cost, cost, target

    heap: list[tuple[float, int, float, int | None]] = []
    for i, layer in enumerate(cands):
        step = next_step(layer)
        if step:
            heapq.heappush(heap, (-step[0], i, step[1], step[2]))
    while heap:
        _, i, cost, target = heapq.heappop(heap)
        layer = cands[i]
        if spent + cost > budget:
            continue  # this layer cannot grow further; others with smaller steps still may
        spent += cost
        state[layer.name] = target
        step = next_step(layer)
        if step:
            heapq.heappush(heap, (-step[0], i, step[1], step[2]))
    chosen = {name: (r * _by_name(cands, name).groups if r is not None else None) for name, r in state.items()}
    return _finish(layers, chosen, method, min_saving)


def keep_ratio_rank(layer: Layer, ratio: float) -> float:
    """The (fractional) per-group rank at which a layer's factors hold ``ratio`` of its weights."""
    return ratio * layer.out_features * layer.in_features / (layer.out_features + layer.in_features)


def plan_proportional(
    layers: list[Layer], ratio: float, *, rank_multiple: int = 1, min_saving: float = DEFAULT_MIN_SAVING
) -> RankPlan:
    """Every layer keeps the same fraction ``ratio`` of its weights (rank rounded down to ``rank_multiple``,
    at least one step): no spectrum involved — the baseline a calibrated allocation has to beat."""
    if not 0.0 < ratio <= 1.0:
        raise InherccError(f"`plan.ratio` must be in (0, 1], got {ratio}")
    m = max(1, rank_multiple)
    chosen = {}
    for layer in _compressible(layers):
        r = min(layer.full_rank, max(m, int(keep_ratio_rank(layer, ratio) // m) * m))
        chosen[layer.name] = r * layer.groups
    method = {"mode": "ratio", "value": ratio, "rank_multiple": rank_multiple, "allocation": "uniform"}
    return _finish(layers, chosen, method, min_saving)


def apply_plan(layers: list[Layer], plan: RankPlan, *, min_saving: float = DEFAULT_MIN_SAVING) -> RankPlan:
    """Check a user-supplied plan against the model's layers: names exist (with the op and shape the plan
    recorded), ranks are within the layer's full rank (``min(out, in)`` per group), grouped convs get ranks
    divisible by their groups. As for ``plan.rank``, a layer whose factors would save under ``min_saving`` of
    its weights stays dense, with the reason."""
    by_name = {layer.name: layer for layer in layers}
    unknown = [name for name in plan.ranks if name not in by_name]
    if unknown:
        raise InherccError(f"plan names {len(unknown)} layer(s) not in the model: {', '.join(unknown[:5])}")
    chosen: dict[str, int | None] = {}
    reasons: dict[str, str] = {}
    for layer in layers:
        _check_recorded(layer, plan)
        rank = plan.ranks.get(layer.name)
        if layer.name not in plan.ranks:
            reasons[layer.name] = layer.reason or "not in the plan"
            continue
        if rank is None:
            reasons[layer.name] = plan.reasons.get(layer.name) or layer.reason or "left dense by the plan"
            continue
        if layer.weight is None or layer.reason and not layer.reason.startswith(("too small", "no saving", "excluded")):
            raise InherccError(f"plan asks to factorize {layer.name}, which cannot be: {layer.reason}")
        if rank % layer.groups:
            raise InherccError(f"plan rank {rank} of {layer.name} is not divisible by its {layer.groups} groups")
        most = layer.full_rank * layer.groups
        if rank > most:
            raise InherccError(
                f"plan rank {rank} of {layer.name} (weight {'x'.join(map(str, layer.shape))}) exceeds its "
                f"maximum rank {most}"
            )
        too_little = _saving_shortfall(layer, rank, min_saving)
        if too_little:
            reasons[layer.name] = too_little
        else:
            chosen[layer.name] = rank
    ranks: dict[str, int | None] = {layer.name: chosen.get(layer.name) for layer in layers}
    method = {k: v for k, v in plan.method.items() if k not in _RUN_KEYS}
    return RankPlan(ranks, reasons, {**method, "replayed": True})


def _check_recorded(layer: Layer, plan: RankPlan) -> None:
    """The op and weight shape a plan file recorded for ``layer`` must be the model's (else the plan was
    made for another model)."""
    shape, op = plan.shapes.get(layer.name), plan.ops.get(layer.name)
    if shape is not None and shape != layer.shape:
        raise InherccError(
            f"plan records {layer.name} with weight shape {shape}, the model's is {layer.shape} "
            "(a plan made for another model?)"
        )
    if op is not None and op != layer.op:
        raise InherccError(
            f"plan records {layer.name} as {op}, the model's is {layer.op} (a plan made for another model?)"
        )


def _saving_shortfall(layer: Layer, rank: int, min_saving: float) -> str | None:
    """Why ``layer`` stays dense at ``rank`` (its factors save under ``min_saving`` of the weights), or None."""
    saving = 1.0 - layer.factor_params(rank) / layer.weight_params
    if saving < min_saving:
        return f"rank {rank} would save only {max(saving, 0.0):.0%} (< {min_saving:.0%})"
    return None


def _finish(layers: list[Layer], chosen: dict[str, int | None], method: dict[str, Any], min_saving: float) -> RankPlan:
    ranks: dict[str, int | None] = {}
    reasons: dict[str, str] = {}
    for layer in layers:
        if not layer.compressible:
            ranks[layer.name] = None
            reasons[layer.name] = layer.reason or ""
            continue
        r = chosen.get(layer.name)
        if r is None:
            ranks[layer.name] = None
            reasons[layer.name] = "kept dense by the plan (the budget let it keep its full weight)"
            continue
        too_little = _saving_shortfall(layer, r, min_saving)
        ranks[layer.name] = None if too_little else r
        if too_little:
            reasons[layer.name] = too_little
    return RankPlan(ranks, reasons, method)


def _compressible(layers: list[Layer]) -> list[Layer]:
    return [layer for layer in layers if layer.compressible]


def _by_name(layers: list[Layer], name: str) -> Layer:
    return next(layer for layer in layers if layer.name == name)
