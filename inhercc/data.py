"""Sample sources: input specs, ``--shape`` parsing, synthetic inputs and ``.npz`` feeds."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.errors import InherccError

Dim = int | str | None
Feed = dict[str, np.ndarray]
LABELS_KEY = "_labels"


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
        dims: tuple[Dim, ...] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        )
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*$")


def parse_shapes(items: Iterable[str]) -> dict[str, list[int]]:
    """``["input_ids=1x128", "mask=1,128"]`` → ``{"input_ids": [1, 128], "mask": [1, 128]}``."""
    shapes: dict[str, list[int]] = {}
    for item in items:
        m = _SHAPE_RE.match(item)
        if not m:
            raise InherccError(f"bad --shape {item!r}: expected NAME=DIMS like input_ids=1x128")
        dims = [int(d) for d in re.split(r"\s*[x,]\s*", m.group(2))]
        if any(d <= 0 for d in dims):
            raise InherccError(f"bad --shape {item!r}: dims must be positive")
        shapes[m.group(1)] = dims
    return shapes


def resolve_shapes(
    specs: list[InputSpec], shapes: Mapping[str, list[int]] | None = None, batch: int | None = None
) -> dict[str, list[int]]:
    """Concrete shapes for every input: given ``--shape`` values first; symbolic dims shared with a given
    shape (same ``dim_param``) follow it; a leading unknown dim is the batch (``batch``, default 1);
    any other unknown dim is an error naming the input and the dim."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise InherccError(
            f"--shape names unknown input(s) {', '.join(sorted(unknown))}; inputs: {', '.join(s.name for s in specs)}"
        )
    symbols: dict[str, int] = {}
    for spec in specs:
        if spec.name in shapes:
            given = shapes[spec.name]
            if spec.shape and len(given) != len(spec.shape):
                raise InherccError(f"--shape {spec.name} has {len(given)} dims, the input has {len(spec.shape)}")
            for d, v in zip(spec.shape, given):
                if isinstance(d, int) and d > 0 and d != v:
                    raise InherccError(f"--shape {spec.name}: dim {d} is fixed in the model, got {v}")
                if isinstance(d, str):
                    symbols.setdefault(d, v)
    out: dict[str, list[int]] = {}
    for spec in specs:
        if spec.name in shapes:
            out[spec.name] = list(shapes[spec.name])
            continue
        dims = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            elif i == 0:
                dims.append(batch or 1)
            else:
                raise InherccError(
                    f"cannot resolve dim {i} ({d or '?'}) of input {spec.name}; pass --shape "
                    f"{spec.name}={'x'.join(str(x) if isinstance(x, int) and x > 0 else 'N' for x in spec.shape)}"
                )
        out[spec.name] = dims
    return out


def gather_table_sizes(model: ModelProto) -> dict[str, int]:
    """For integer graph inputs used as ``Gather`` indices into a constant table: the table size."""
    inits = {t.name: t for t in model.graph.initializer}
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            n = int(inits[node.input[0]].dims[axis])
            sizes[node.input[1]] = min(sizes.get(node.input[1], n), n)
    return sizes


def synthetic_feeds(
    model: ModelProto,
    shapes: Mapping[str, list[int]] | None = None,
    *,
    batch: int | None = None,
    seed: int = 0,
) -> Feed:
    """One batch of synthetic inputs: floats ~ N(0, 1); integer inputs feeding a ``Gather`` → ids below the
    table size; inputs whose name contains "mask" → ones; other integers → zeros; bools → True."""
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    concrete = resolve_shapes(specs, shapes, batch)
    tables = gather_table_sizes(model)
    feeds: Feed = {}
    for spec in specs:
        shape = concrete[spec.name]
        if "mask" in spec.name.lower():
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        elif spec.name in tables:
            feeds[spec.name] = rng.integers(0, tables[spec.name], size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def warn_synthetic(purpose: str) -> None:
    warnings.warn(
        f"no --data given: {purpose} uses synthetic inputs, which say little about real quality", stacklevel=3
    )


def load_npz(path: str | Path, model: ModelProto | None = None) -> Feed:
    """Arrays from an ``.npz`` (one per graph input; first axis = samples; optional ``_labels``),
    checked against the model's inputs when given."""
    path = Path(path)
    if not path.exists():
        raise InherccError(f"no such data file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
    except Exception as e:
        raise InherccError(
            f"cannot read {path} as .npz: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    if not feeds:
        raise InherccError(f"{path} holds no arrays")
    if model is not None:
        check_feeds(feeds, model, str(path))
    return feeds


def check_feeds(feeds: Mapping[str, np.ndarray], model: ModelProto, source: str = "data") -> None:
    """Every graph input present with a matching dtype kind and rank; same sample count; no NaN/Inf."""
    specs = input_specs(model)
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise InherccError(f"{source} lacks model input(s) {', '.join(missing)} (has: {', '.join(sorted(feeds))})")
    counts = set()
    for spec in specs:
        a = feeds[spec.name]
        if spec.shape and a.ndim != len(spec.shape):
            raise InherccError(f"{source}: {spec.name} has {a.ndim} dims, the model expects {len(spec.shape)}")
        for i, (d, v) in enumerate(zip(spec.shape, a.shape)):
            if i > 0 and isinstance(d, int) and d > 0 and d != v:
                raise InherccError(f"{source}: {spec.name} has shape {list(a.shape)}, the model expects dim {i} = {d}")
        if np.issubdtype(spec.dtype, np.floating) != np.issubdtype(a.dtype, np.floating) or (
            spec.dtype == np.bool_
        ) != (a.dtype == np.bool_):
            raise InherccError(f"{source}: {spec.name} is {a.dtype}, the model expects {spec.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise InherccError(f"{source}: {spec.name} contains NaN or Inf")
        if a.shape[0] == 0:
            raise InherccError(f"{source}: {spec.name} has no samples")
        counts.add(a.shape[0])
    if len(counts) > 1:
        raise InherccError(f"{source}: inputs have different sample counts {sorted(counts)}")


def cast_feeds(feeds: Mapping[str, np.ndarray], model: ModelProto) -> Feed:
    """Model inputs only, cast to the exact dtypes the model declares (int32 ids → int64, …)."""
    return {s.name: np.asarray(feeds[s.name]).astype(s.dtype, copy=False) for s in input_specs(model)}


def iter_batches(feeds: Mapping[str, np.ndarray], batch_size: int) -> Iterator[Feed]:
    """Consecutive slices of ``batch_size`` samples (the last may be smaller)."""
    n = len(next(iter(feeds.values())))
    for i in range(0, n, batch_size):
        yield {k: v[i : i + batch_size] for k, v in feeds.items()}
