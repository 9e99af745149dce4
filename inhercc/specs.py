"""A model's inputs: their specs (name, dtype, dims), which axis of each holds the samples, and feeds cut
and joined along it. Below both :mod:`inhercc.data` and :mod:`inhercc.runtime`, which read them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.errors import InherccError
from inhercc.graph import Dim

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A graph input that is not an initializer: name, numpy dtype and (possibly symbolic) shape."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]


def input_specs(model: ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else np.dtype(np.float32)
        specs.append(InputSpec(vi.name, dtype, tuple(_dim(d) for d in t.shape.dim)))
    return specs


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    """A dim as a number, a symbol, or None when unknown (no value, ``-1`` as paddle2onnx writes it, or the
    anonymous symbol ``?``)."""
    if d.HasField("dim_value"):
        return int(d.dim_value) if d.dim_value > 0 else None
    return d.dim_param if d.dim_param and d.dim_param != "?" else None


# ---------------------------------------------------------------------------------------------------------
# Batch axes: which axis of each graph input and output holds the samples (not always axis 0)

Axes = dict[str, int | None]


_BATCH_NAME = re.compile(r"batch|^(n|b|bs|N|B)$", re.IGNORECASE)


def is_fixed_dim(d: object) -> bool:
    """Whether a dim is a known positive number."""
    return isinstance(d, (int, np.integer)) and int(d) > 0


def _value_dims(values: Iterable[onnx.ValueInfoProto], skip: set[str]) -> dict[str, tuple[Dim, ...] | None]:
    """``name → dims`` of graph values (None: rank unknown), leaving out the names in ``skip``."""
    out: dict[str, tuple[Dim, ...] | None] = {}
    for vi in values:
        if vi.name in skip:
            continue
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            out[vi.name] = None
            continue
        out[vi.name] = tuple(_dim(d) for d in t.shape.dim)
    return out


def _batch_symbol(shaped: Mapping[str, tuple[Dim, ...]], outputs: Iterable[tuple[Dim, ...]]) -> str | None:
    """The dim symbol that is the batch: named like one first, then the leading dim of the most inputs, then
    the symbol in the most inputs, then in the most outputs."""
    symbols = {d for dims in shaped.values() for d in dims if isinstance(d, str)}
    if not symbols:
        return None

    def score(sym: str) -> tuple[int, int, int, int]:
        return (
            bool(_BATCH_NAME.search(sym)),
            sum(dims[0] == sym for dims in shaped.values()),
            sum(sym in dims for dims in shaped.values()),
            sum(sym in dims for dims in outputs),
        )

    return max(sorted(symbols), key=score)


def _fixed_batch_value(shaped: Mapping[str, tuple[Dim, ...]]) -> int:
    """For inputs whose leading dims are all numbers: the batch size, the leading dim of the most inputs
    (ties: the number found in the most inputs; ``[1, 512]`` beside a state ``[2, 1, 128]`` → 1)."""
    leading = [int(dims[0]) for dims in shaped.values()]  # type: ignore[arg-type]

    def score(v: int) -> tuple[int, int]:
        return leading.count(v), sum(v in dims for dims in shaped.values())

    return max(sorted(set(leading)), key=score)


def _anonymous(d: Dim | None) -> Dim | None:
    """A dim as :func:`_dim` reads it from a graph: ONNX Runtime reports paddle2onnx's anonymous ``?`` as a symbol
    (one shared by H and W is no batch) and may report ``-1``; both are unknown."""
    return None if d == "?" or (isinstance(d, (int, np.integer)) and d < 0) else d


def batch_axes_of(
    inputs: Mapping[str, Sequence[Dim] | None], outputs: Mapping[str, Sequence[Dim] | None] | None = None
) -> Axes:
    """The batch axis of every named input and output (None: no batch axis — a scalar, or a tensor shared
    by all samples), from their dims (numbers, symbols, None for unknown; ``None`` for an unknown rank).

    Rules: when some input leads with a dynamic dim, the batch is the dim symbol named like a batch, else
    the one leading the most inputs (an LSTM state ``[2, batch, 128]`` beside ``x [batch, 512]`` has it at
    axis 1); a tensor without that symbol takes its first dynamic dim that is not another shared symbol,
    else none. When every input leads with a number (a model exported at a fixed batch), the batch is the
    number leading the most inputs, found at the first axis holding it. Unknown ranks get axis 0."""
    outs = {k: (None if v is None else tuple(map(_anonymous, v))) for k, v in (outputs or {}).items()}
    ins = {k: (None if v is None else tuple(map(_anonymous, v))) for k, v in inputs.items()}
    shaped = {k: v for k, v in ins.items() if v}
    if not shaped:
        return {k: None for k in list(ins) + list(outs)}
    if all(is_fixed_dim(v[0]) for v in shaped.values()):
        value = _fixed_batch_value(shaped)

        def axis(dims: tuple[Dim, ...]) -> int | None:
            return next((i for i, d in enumerate(dims) if is_fixed_dim(d) and int(d) == value), None)  # type: ignore[arg-type]

    else:
        out_dims = [tuple(v) for v in outs.values() if v]
        symbol = _batch_symbol(shaped, out_dims)
        others = {d for v in shaped.values() if symbol in v for d in v if isinstance(d, str) and d != symbol}

        def axis(dims: tuple[Dim, ...]) -> int | None:
            if symbol is not None and symbol in dims:
                return dims.index(symbol)
            return next((i for i, d in enumerate(dims) if not is_fixed_dim(d) and d not in others), None)

    result: Axes = {k: 0 if v is None else (axis(v) if v else None) for k, v in ins.items()}
    for k, v in outs.items():
        twin = _state_twin(k, v, ins)
        result[k] = result[twin] if twin is not None else 0 if v is None else (axis(tuple(v)) if v else None)
    return result


_STATE_SUFFIX = re.compile(r"(_?(out|new|next|n|\d+))$", re.IGNORECASE)


def _state_twin(name: str, dims: Sequence[Dim] | None, inputs: Mapping[str, tuple[Dim, ...] | None]) -> str | None:
    """The input an output of unknown dims is the next value of (a recurrent state: ``stateN`` of ``state``,
    ``hn`` of ``h0``), by name and rank; it has that input's batch axis."""
    if dims is None or any(is_fixed_dim(d) or isinstance(d, str) for d in dims):
        return None
    stem = _STATE_SUFFIX.sub("", name)
    return next(
        (k for k, v in inputs.items() if v and len(v) == len(dims) and stem and _STATE_SUFFIX.sub("", k) == stem), None
    )


def batch_axes(model: ModelProto) -> Axes:
    """:func:`batch_axes_of` every graph input (initializers excepted) and graph output of ``model``."""
    inits = {t.name for t in model.graph.initializer}
    return batch_axes_of(_value_dims(model.graph.input, inits), _value_dims(model.graph.output, set()))


def batch_size_of(inputs: Mapping[str, Sequence[Dim] | None], axes: Mapping[str, int | None]) -> int | None:
    """The batch size fixed by the inputs' dims at their batch axes, None when dynamic (or no input has one)."""
    fixed = set()
    for k, dims in inputs.items():
        a = axes.get(k)
        if a is not None and dims is not None and is_fixed_dim(dims[a]):
            fixed.add(int(dims[a]))  # type: ignore[arg-type]
    if len(fixed) > 1:
        raise InherccError(f"the model fixes different batch sizes {sorted(fixed)} on its inputs; cannot feed samples")
    return fixed.pop() if fixed else None


def sample_count(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> int:
    """Samples in a feed dict: the size of the first array's batch axis (:func:`batch_axes`; axis 0 when
    ``axes`` does not name the array); arrays without a batch axis are skipped; 0 when none has one."""
    for k, v in feeds.items():
        a = 0 if axes is None else axes.get(k, 0)
        if a is not None and np.ndim(v) > a:
            return int(np.shape(v)[a])
    return 0


def slice_batch(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None], start: int, stop: int) -> Feed:
    """Samples ``start:stop`` of every array along its batch axis (axis 0 when ``axes`` does not name it);
    arrays without a batch axis (None) are passed whole, as every batch needs them."""
    out: Feed = {}
    for k, v in feeds.items():
        a = axes.get(k, 0)
        if a is None or np.ndim(v) <= a:
            out[k] = v
        else:
            index = [slice(None)] * np.ndim(v)
            index[a] = slice(start, stop)
            out[k] = v[tuple(index)]
    return out


def concat_batches(parts: Sequence[np.ndarray], axis: int | None, name: str = "output") -> np.ndarray:
    """One array from per-batch parts, joined along ``axis``; with no batch axis the first part (every batch
    gives the same). Parts that differ off the batch axis are an :class:`InherccError` naming ``name``."""
    if axis is None or len(parts) == 1 or np.ndim(parts[0]) <= axis:
        return parts[0]
    try:
        return np.concatenate(parts, axis=axis)
    except ValueError as e:
        shapes = sorted({tuple(np.shape(p)) for p in parts})
        raise InherccError(f"{name} has different shapes in different batches {shapes}; cannot join them") from e


def mask_input(model: ModelProto) -> str | None:
    """The attention-mask-like input: an int/bool graph input of rank 2 whose name contains "mask"."""
    for spec in input_specs(model):
        integral = np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_
        if "mask" in spec.name.lower() and integral and len(spec.shape) == 2:
            return spec.name
    return None
