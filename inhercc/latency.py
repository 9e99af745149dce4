"""Latency-aware planning: keep a layer dense when its factor chain is not faster on the target provider.

Fewer FLOPs do not always mean less time: two skinny GEMMs can be slower than one square one (a 384×384
MatMul at rank 160 keeps 83 % of its FLOPs but pays for two kernel launches, two passes over the
activations and a worse GEMM shape). For every factorized layer of a :class:`~inhercc.plan.RankPlan`,
:func:`latency_aware_plan` times the dense node against the chain the passes emit at the planned rank —
a one-node and a two-node micro-model with the layer's real input shape, on the target provider — and
sets the rank to ``None`` when the chain is not faster (by a 5 % margin). In ``ratio`` mode the
parameters those layers keep are then taken out of the others' budget (re-planned), so the student
still has the requested size.

The timer is injectable (:data:`LayerTimer`), so planning decisions are testable without timing anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.errors import InherccError
from inhercc.families import family_for
from inhercc.layers import Layer, tensor_shapes
from inhercc.plan import RankPlan

# Rank rounding per provider (``plan.rank_multiple`` default with ``latency.aware``):
# * cpu 16: MLAS's SGEMM kernels (AVX2/AVX-512) produce 16 output columns per pass and pack K in blocks of
#   16/8 floats, so a rank (N of the first GEMM, K of the second) between multiples of 16 pays for a
#   partly empty panel; 16 keeps the planner's steps fine enough for 384-wide layers.
# * cuda/tensorrt 64: cuBLAS/cuDNN tensor-core tiles are 64–256 wide in N; ranks off the tile size waste a
#   partial tile (tile quantization), and fp16 tensor cores need multiples of 8 at the very least.
RANK_MULTIPLE = {"cpu": 16, "cuda": 64, "tensorrt": 64}
DEFAULT_WARMUP = 3
DEFAULT_REPEAT = 20
MAX_REPLANS = 3
# A chain must beat its dense layer by this fraction: within it, timings on a busy machine are a coin flip,
# and a dense layer that is as fast is strictly better (exact, one node, every fusion intact).
DEFAULT_MARGIN = 0.05

# (layer, total rank, input shape of the layer) -> (dense ms, chain ms)
LayerTimer = Callable[[Layer, int, Sequence[int]], tuple[float, float]]


def default_rank_multiple(provider: str) -> int:
    """The rank rounding for a provider (``cpu``, ``cuda``, ``tensorrt``)."""
    try:
        return RANK_MULTIPLE[provider.lower()]
    except KeyError:
        raise InherccError(f"unknown provider {provider!r}; choose from {', '.join(RANK_MULTIPLE)}") from None


def layer_input_shapes(
    model: ModelProto, layers: Sequence[Layer], shapes: Mapping[str, list[int]] | None = None, batch: int | None = None
) -> dict[str, list[int]]:
    """The concrete shape of each layer's data input, by shape inference with the graph inputs fixed
    (``shapes`` / ``batch`` resolve dynamic dims)."""
    from inhercc.data import with_fixed_inputs

    fixed = with_fixed_inputs(model, shapes, batch)
    known = tensor_shapes(fixed)
    nodes = {n.name: n for n in fixed.graph.node}
    out: dict[str, list[int]] = {}
    for layer in layers:
        node = nodes.get(layer.name)
        if node is None:
            continue
        dims = known.get(node.input[family_for(layer.op).activation_input])
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            out[layer.name] = [int(d) for d in dims]
    return out


def micro_models(
    model: ModelProto, layer: Layer, rank: int, input_shape: Sequence[int], seed: int = 0
) -> tuple[ModelProto, ModelProto]:
    """The dense node alone (one node) and the chain the passes emit for it at ``rank`` (two nodes; with
    ``layer.heads`` > 1 the gated multi-head form), both reading one input of ``input_shape`` (built by the layer's
    op family). Factor values are random: only their shapes matter for timing."""
    node = next((n for n in model.graph.node if n.name == layer.name), None)
    if node is None:
        raise InherccError(f"no node named {layer.name}")
    return family_for(layer.op).micro_model(model, node, layer, rank, input_shape, seed)


class OrtLayerTimer:
    """Times micro-models on an ONNX Runtime provider: dense and chain interleaved (A B A B …), medians.
    Dense timings are cached per (op, weight shape, attributes, input shape), chains also per rank."""

    def __init__(
        self,
        model: ModelProto,
        provider: str = "cpu",
        *,
        threads: int | None = None,
        warmup: int = DEFAULT_WARMUP,
        repeat: int = DEFAULT_REPEAT,
        seed: int = 0,
    ) -> None:
        from inhercc.runtime import GPU_PROVIDERS

        self.model, self.provider, self.threads = model, provider.lower(), threads
        self.warmup, self.repeat, self.seed = warmup, repeat, seed
        self.device = "cuda" if self.provider in GPU_PROVIDERS else "cpu"
        self._dense: dict[tuple[Any, ...], float] = {}
        self._chain: dict[tuple[Any, ...], float] = {}

    def _key(self, layer: Layer, input_shape: Sequence[int]) -> tuple[Any, ...]:
        node = next(n for n in self.model.graph.node if n.name == layer.name)
        attrs = tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in node.attribute))
        return (layer.op, layer.weight_shape, attrs, tuple(input_shape), len(node.input) > 2, layer.heads)

    def _session(self, model: ModelProto) -> Any:
        from inhercc.runtime import make_session

        providers = ["tensorrt", "cuda"] if self.provider == "tensorrt" else [self.provider]
        return make_session(model, providers, threads=self.threads, require=True)

    def __call__(self, layer: Layer, rank: int, input_shape: Sequence[int]) -> tuple[float, float]:
        from inhercc.runtime import BoundRunner, time_interleaved

        key = self._key(layer, input_shape)
        if key in self._dense and (*key, rank) in self._chain:
            return self._dense[key], self._chain[(*key, rank)]
        dense, chain = micro_models(self.model, layer, rank, input_shape, self.seed)
        rng = np.random.default_rng(self.seed)
        x = family_for(layer.op).micro_feed(layer, input_shape, rng)
        feeds = {dense.graph.input[0].name: x}
        runners = [BoundRunner(self._session(m), feeds, self.device, None) for m in (dense, chain)]
        t_dense, t_chain = time_interleaved(runners, warmup=self.warmup, repeat=self.repeat)
        self._dense.setdefault(key, float(np.median(t_dense)))  # the first measurement of a shape stands
        self._chain[(*key, rank)] = float(np.median(t_chain))
        return self._dense[key], self._chain[(*key, rank)]


def speed_reason(chain_ms: float, dense_ms: float, provider: str) -> str:
    return f"kept dense for speed: chain {chain_ms:.3g} ms vs dense {dense_ms:.3g} ms on {provider}"


def latency_aware_plan(
    model: ModelProto,
    layers: Sequence[Layer],
    plan: RankPlan,
    *,
    provider: str = "cpu",
    shapes: Mapping[str, list[int]] | None = None,
    batch: int | None = None,
    timer: LayerTimer | None = None,
    threads: int | None = None,
    spectra: Mapping[str, np.ndarray] | None = None,
    min_saving: float | None = None,
    layer_weights: Mapping[str, float] | None = None,
    margin: float = DEFAULT_MARGIN,
    log: Callable[[str], None] | None = None,
    ratio: float | None = None,
) -> RankPlan:
    """``plan`` with every factorized layer whose chain is not faster than its dense node (by ``margin``,
    5 % by default) set to ``None`` (reason ``kept dense for speed: chain X ms vs dense Y ms``).

    For a plan made by the ratio planner, given that ``ratio`` and ``spectra``, the remaining layers are
    re-planned so the parameter budget still holds (a few rounds: new ranks are timed again; ``layer_weights``
    as given to the ratio planner). The timings go to ``plan.method["latency_aware"]``."""
    say = log or (lambda _msg: None)
    provider = provider.lower()
    default_rank_multiple(provider)  # validates the name
    by_name = {layer.name: layer for layer in layers}
    input_shapes = layer_input_shapes(model, [by_name[n] for n in plan.factorized() if n in by_name], shapes, batch)
    timer = timer or OrtLayerTimer(model, provider, threads=threads)
    timings: dict[str, dict[str, Any]] = {}
    slow: dict[str, str] = {}
    current = plan
    for attempt in range(MAX_REPLANS + 1):
        new_slow = False
        for name, rank in current.factorized().items():
            if name in slow or name not in by_name:
                continue
            shape = input_shapes.get(name)
            if shape is None:
                input_shapes.update(layer_input_shapes(model, [by_name[name]], shapes, batch))
                shape = input_shapes.get(name)
            if shape is None:
                timings[name] = {"rank": rank, "skipped": "input shape unknown (give the input shapes)"}
                continue
            dense_ms, chain_ms = timer(by_name[name], rank, shape)
            timings[name] = {"rank": rank, "input_shape": list(shape), "dense_ms": dense_ms, "chain_ms": chain_ms}
            say(f"{name}: rank {rank} chain {chain_ms:.3g} ms vs dense {dense_ms:.3g} ms")
            if chain_ms >= (1.0 - margin) * dense_ms:
                slow[name] = speed_reason(chain_ms, dense_ms, provider)
                new_slow = True
        if not new_slow:
            break
        again = attempt < MAX_REPLANS and ratio is not None
        replanned = _replan(layers, plan, ratio, slow, spectra, min_saving, layer_weights) if again else None
        if replanned is None:
            break
        current = replanned
    ranks = {name: (None if name in slow else r) for name, r in current.ranks.items()}
    reasons = {**current.reasons, **slow}
    skipped = [n for n, t in timings.items() if "skipped" in t]
    method = dict(current.method)
    method["latency_aware"] = {
        "provider": provider,
        "threads": threads,
        "margin": margin,
        "kept_dense": sorted(slow),
        "rebalanced": current is not plan,
        "untimed": skipped,
        "layers": timings,
    }
    if not any(r is not None for r in ranks.values()) and plan.factorized():
        say("every factor chain was slower than its dense layer: nothing left to factorize")
    return RankPlan(ranks, reasons, method)


def _replan(
    layers: Sequence[Layer],
    plan: RankPlan,
    budget: float,
    slow: Mapping[str, str],
    spectra: Mapping[str, np.ndarray] | None,
    min_saving: float | None,
    layer_weights: Mapping[str, float] | None = None,
) -> RankPlan | None:
    """Re-run the ratio planner with the slow layers held dense and their weights charged to the budget;
    None when the plan is not a ratio plan or the budget cannot absorb them."""
    from inhercc.layers import DEFAULT_MIN_SAVING
    from inhercc.plan import plan_ratio

    method = plan.method
    if method.get("mode") != "ratio" or spectra is None or method.get("replayed"):
        return None
    cands = [la for la in layers if la.compressible]
    total = sum(la.weight_params for la in cands)
    held = sum(la.weight_params for la in cands if la.name in slow)
    rest = total - held
    if rest <= 0:
        return None
    ratio = (budget * total - held) / rest
    if not 0.0 < ratio <= 1.0:
        return None
    marked = [dataclasses.replace(la, reason=slow[la.name]) if la.name in slow else la for la in layers]
    try:
        new = plan_ratio(
            marked,
            spectra,
            ratio,
            rank_multiple=int(method.get("rank_multiple", 1)),
            min_saving=DEFAULT_MIN_SAVING if min_saving is None else min_saving,
            spectrum=str(method.get("spectrum", "weight")),
            **({"layer_weights": layer_weights} if layer_weights else {}),
        )
    except InherccError:
        return None
    new.method = {**method, "rebalanced_ratio": ratio}
    return new
