"""Sample sources: input specs, ``shapes`` parsing, synthetic inputs, ``.npz`` feeds, and training data
from any source (file, folder of shards, iterable, ORT ``CalibrationDataReader``) as :class:`Samples`."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.errors import InherccError
from inhercc.graph import Dim, count_flops  # noqa: F401  (Dim re-exported: it lived here)
from inhercc.model import infer_model_shapes, initializer_map, one_line, shape_skeleton
from inhercc.specs import (  # noqa: F401  (re-exported: they lived here)
    Axes,
    Feed,
    InputSpec,
    batch_axes,
    batch_axes_of,
    batch_size_of,
    concat_batches,
    input_specs,
    is_fixed_dim,
    sample_count,
    slice_batch,
)

LABELS_KEY = "_labels"


_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*$")


def parse_shapes(items: Iterable[str]) -> dict[str, list[int]]:
    """``["input_ids=1x128", "mask=1,128"]`` → ``{"input_ids": [1, 128], "mask": [1, 128]}``."""
    shapes: dict[str, list[int]] = {}
    for item in items:
        m = _SHAPE_RE.match(item)
        if not m:
            raise InherccError(f"bad `shapes` {item!r}: expected NAME=DIMS like input_ids=1x128")
        dims = [int(d) for d in re.split(r"\s*[x,]\s*", m.group(2))]
        if any(d <= 0 for d in dims):
            raise InherccError(f"bad `shapes` {item!r}: dims must be positive")
        shapes[m.group(1)] = dims
    return shapes


# ---------------------------------------------------------------------------------------------------------
# Dynamic dims: given by the user, else chosen by kind (batch, sequence, spatial, audio, other)

# Sizes tried for each kind of dynamic dim, first choice first (the next ones when ONNX Runtime rejects it):
# sequences 128 (capped at the model's position table), spatial dims 224 (a multiple of 32, as strided and
# downsampling graphs need), audio 16000 samples (one second at 16 kHz; 512: a streaming VAD's chunk),
# anything else 64.
DIM_SIZES: dict[str, tuple[int, ...]] = {
    "sequence": (128, 64, 32, 16),
    "spatial": (224, 320, 256, 512, 64, 32),
    "audio": (16000, 512, 8000, 32000, 1024, 256, 4000),
    "channels": (3, 1, 4),
    "other": (64, 32, 16, 128, 8, 1),
}
KIND_ORDER = ("batch", "features", "sequence", "spatial", "audio", "channels", "other")  # features: read off a weight
_SEQUENCE_NAME = re.compile(r"seq|length|len\b|_len|token|time|frame|word|text", re.IGNORECASE)
_SPATIAL_NAME = re.compile(r"height|width|^[hw]$", re.IGNORECASE)
_AUDIO_NAME = re.compile(r"audio|wav|speech|pcm|signal|sample", re.IGNORECASE)
_POSITION_NAME = re.compile(r"position|pos_emb|pos_embed", re.IGNORECASE)
_RATE_NAME = re.compile(r"^sr$|sample_?rate|sampling_?rate|^rate$", re.IGNORECASE)
_COUNT_NAME = re.compile(r"len|count|^n_|num", re.IGNORECASE)
_CHANNEL_COUNTS = (1, 3, 4)


def shape_text(shapes: Mapping[str, Sequence[int]]) -> str:
    """``{"ids": [1, 128]}`` → ``ids=1x128`` (the ``shapes`` syntax; scalars, which take none, left out)."""
    return " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items() if len(v))


def _dim_kind(spec: InputSpec, axis: int, tables: Mapping[str, int]) -> str:
    """What a dynamic, non-batch dim of an input most likely is, by the input's rank and dtype (4-D: an image,
    NCHW or NHWC by where a channel count 1/3/4 is fixed; integer and bool inputs and masks: token ids; 2-D
    floats and ``[batch, 1 or 2, samples]``: audio samples), else by its symbol's name (sequence, height /
    width), else 3-D floats: a sequence."""
    d, rank = spec.shape[axis], len(spec.shape)
    symbol = d if isinstance(d, str) else ""
    if rank == 4:
        nhwc = spec.shape[3] in _CHANNEL_COUNTS and spec.shape[1] not in _CHANNEL_COUNTS
        return "channels" if axis == (3 if nhwc else 1) else "spatial"
    if spec.name in tables or not np.issubdtype(spec.dtype, np.floating) or "mask" in spec.name.lower():
        return "sequence"
    if rank == 2 and axis == 1:
        return "audio"
    if rank == 3 and axis == 2 and is_fixed_dim(spec.shape[1]) and int(spec.shape[1]) <= 2:  # type: ignore[arg-type]
        return "audio"
    if _SEQUENCE_NAME.search(symbol) or rank == 3:
        return "sequence"
    if _SPATIAL_NAME.search(symbol):
        return "spatial"
    return "audio" if _AUDIO_NAME.search(spec.name) else "other"


# Ops whose output has the shape of their first input (binary ones only with a constant that broadcasts into it)
_SHAPE_KEEPING = frozenset(
    "Cast Identity Dropout Relu LeakyRelu PRelu Elu Selu Gelu Sigmoid HardSigmoid HardSwish Tanh Softplus Abs Neg "
    "Sqrt Exp Log Erf Clip BatchNormalization LayerNormalization InstanceNormalization".split()
)
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


def _weight_dim(node: onnx.NodeProto, rank: int, axis: int, inits: Mapping[str, onnx.TensorProto]) -> int | None:
    """The size ``node`` needs at ``axis`` of its first operand (of rank ``rank``), read from its constant
    weight: MatMul B's rows, Gemm B's inner dim (by ``transB``), Conv W's input channels × ``group``."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = [int(d) for d in inits[node.input[1]].dims]
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMul" and len(w) >= 2 and rank >= 2 and axis == rank - 1:
        return w[-2]
    if node.op_type == "Gemm" and len(w) == 2 and rank == 2 and axis == (0 if attrs.get("transA") else 1):
        return w[1 if attrs.get("transB") else 0]
    if node.op_type == "Conv" and len(w) >= 3 and rank == len(w) and axis == 1:
        return w[1] * attrs.get("group", 1)
    return None


def _keeps_shape(node: onnx.NodeProto, value: str, rank: int, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` passes ``value`` (its first operand) on with its shape unchanged."""
    if node.input[0] != value:
        return False
    if node.op_type in _SHAPE_KEEPING:
        return True
    other = node.input[1:]
    return node.op_type in _BROADCASTING and len(other) == 1 and other[0] in inits and len(inits[other[0]].dims) <= rank


def weight_read_dims(model: ModelProto) -> dict[tuple[str, int], int]:
    """``(input, axis) → size`` for dynamic dims of float graph inputs that the first weight they meet fixes
    (through shape-keeping ops: casts, activations, norms, scaling by a constant): a tabular ``x [batch,
    features]`` into a MatMul / Gemm reads ``features`` rows; ``[n, channels, …]`` into a Conv its channels."""
    inits = initializer_map(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.input:
            consumers.setdefault(node.input[0], []).append(node)
    out: dict[tuple[str, int], int] = {}
    for spec in input_specs(model):
        if not np.issubdtype(spec.dtype, np.floating):
            continue
        rank = len(spec.shape)
        for axis in (a for a, d in enumerate(spec.shape) if not is_fixed_dim(d)):
            todo, seen = [spec.name], {spec.name}
            while todo and (spec.name, axis) not in out:
                value = todo.pop(0)
                for node in consumers.get(value, []):
                    size = _weight_dim(node, rank, axis, inits)
                    if size:
                        out[(spec.name, axis)] = size
                        break
                    if _keeps_shape(node, value, rank, inits) and node.output[0] not in seen:
                        seen.add(node.output[0])
                        todo.append(node.output[0])
    return out


def dim_kinds(model: ModelProto) -> dict[tuple[str, int], str]:
    """``(input, axis) → kind`` for every dynamic dim of the graph inputs (see :data:`DIM_SIZES`; ``features``:
    a size the first weight fixes, :func:`weight_read_dims`); a dim symbol shared by several inputs gets one
    kind (the first in :data:`KIND_ORDER` any of them has)."""
    specs = input_specs(model)
    axes = batch_axes(model)
    tables = gather_table_sizes(model)
    read = weight_read_dims(model)
    kinds: dict[tuple[str, int], str] = {}
    by_symbol: dict[str, str] = {}
    for spec in specs:
        for i, d in enumerate(spec.shape):
            if is_fixed_dim(d):
                continue
            if i == axes.get(spec.name):
                kind = "batch"
            else:
                kind = "features" if (spec.name, i) in read else _dim_kind(spec, i, tables)
            kinds[(spec.name, i)] = kind
            if isinstance(d, str):
                by_symbol[d] = min(by_symbol.get(d, kind), kind, key=KIND_ORDER.index)
    shape_of = {s.name: s.shape for s in specs}
    return {k: by_symbol.get(shape_of[k[0]][k[1]], v) for k, v in kinds.items()}  # type: ignore[arg-type]


def position_limit(model: ModelProto) -> int | None:
    """The longest sequence the model's position table covers (rows of a float initializer named like a
    position embedding: ``[N, d]`` or ``[1, N, d]``), None when it has none."""
    sizes = []
    for t in model.graph.initializer:
        if not _POSITION_NAME.search(t.name) or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        dims = list(t.dims)
        if len(dims) == 2 or (len(dims) == 3 and dims[0] == 1):
            sizes.append(int(dims[-2]))
    return min(sizes) if sizes else None


def dim_size(kind: str, attempt: int = 0, limit: int | None = None) -> int:
    """The ``attempt``-th size tried for a dim of ``kind`` (the last once they run out); sequences at most
    ``limit``."""
    sizes = DIM_SIZES[kind]
    size = sizes[min(attempt, len(sizes) - 1)]
    return min(size, limit) if kind == "sequence" and limit else size


def resolve_shapes(
    specs: list[InputSpec],
    shapes: Mapping[str, list[int]] | None = None,
    batch: int | None = None,
    *,
    model: ModelProto | None = None,
    attempt: int = 0,
) -> dict[str, list[int]]:
    """Concrete shapes for every input: given ``shapes`` first; symbolic dims shared with a given
    shape (same ``dim_param``) follow it. With ``model``, every other dynamic dim is chosen by its kind
    (:func:`dim_kinds`): the batch axis takes ``batch`` (default 1), the others the ``attempt``-th size of
    :data:`DIM_SIZES`. Without it, a leading unknown dim is the batch and any other is an error naming the
    input and the dim."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise InherccError(
            f"`shapes` names unknown input(s) {', '.join(sorted(unknown))}; inputs: {', '.join(s.name for s in specs)}"
        )
    symbols: dict[str, int] = {}
    for spec in specs:
        if spec.name in shapes:
            given = shapes[spec.name]
            if spec.shape and len(given) != len(spec.shape):
                raise InherccError(f"`shapes` {spec.name} has {len(given)} dims, the input has {len(spec.shape)}")
            for d, v in zip(spec.shape, given):
                if isinstance(d, int) and d > 0 and d != v:
                    raise InherccError(f"`shapes` {spec.name}: dim {d} is fixed in the model, got {v}")
                if isinstance(d, str):
                    symbols.setdefault(d, v)
    kinds = dim_kinds(model) if model is not None else {}
    limit = position_limit(model) if model is not None else None
    read = weight_read_dims(model) if model is not None else {}
    shape_of = {s.name: s.shape for s in specs}
    for (name, i), v in read.items():
        if isinstance(shape_of[name][i], str) and kinds.get((name, i)) == "features":
            symbols.setdefault(shape_of[name][i], v)  # type: ignore[arg-type]
    out: dict[str, list[int]] = {}
    for spec in specs:
        if spec.name in shapes:
            out[spec.name] = list(shapes[spec.name])
            continue
        dims = []
        for i, d in enumerate(spec.shape):
            kind = kinds.get((spec.name, i))
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            elif kind == "features":
                dims.append(read[(spec.name, i)])
            elif kind is not None:
                dims.append(batch or 1 if kind == "batch" else dim_size(kind, attempt, limit))
            elif i == 0:
                dims.append(batch or 1)
            else:
                raise InherccError(
                    f"cannot resolve dim {i} ({d or '?'}) of input {spec.name}; pass `shapes` "
                    f"{spec.name}={'x'.join(str(x) if isinstance(x, int) and x > 0 else 'N' for x in spec.shape)}"
                )
        out[spec.name] = dims
    return out


def default_shapes(
    model: ModelProto, batch: int = 1, given: Mapping[str, list[int]] | None = None, attempt: int = 0
) -> tuple[dict[str, list[int]], str]:
    """``(shapes, note)``: concrete shapes of every input (:func:`resolve_shapes` with the model's defaults)
    and, when some dim other than the batch was chosen here, a one-line note saying which sizes were used
    (empty otherwise)."""
    specs = input_specs(model)
    shapes = resolve_shapes(specs, given, batch, model=model, attempt=attempt)
    given = given or {}
    kinds = dim_kinds(model)
    symbols = {d for s in specs if s.name in given for d in s.shape if isinstance(d, str)}
    chosen: dict[str, int] = {}
    named: dict[str, list[int]] = {}
    for (name, axis), kind in kinds.items():
        d = next(s.shape[axis] for s in specs if s.name == name)
        if kind in ("batch", "features") or name in given or d in symbols:
            continue
        chosen.setdefault(kind, shapes[name][axis])
        named[name] = shapes[name]
    if not chosen:
        return shapes, ""
    sizes = ", ".join(f"{k}: {v}" for k, v in sorted(chosen.items(), key=lambda kv: KIND_ORDER.index(kv[0])))
    return shapes, f"dynamic dims chosen: {shape_text(named)} ({sizes}); pass `shapes` to choose other sizes"


def with_batch(model: ModelProto, shapes: Mapping[str, list[int]], batch: int) -> dict[str, list[int]]:
    """``shapes`` with ``batch`` samples: every input's batch axis set to ``batch`` where the model leaves it
    dynamic (a fixed batch dim keeps its size)."""
    axes = batch_axes(model)
    dims = {s.name: s.shape for s in input_specs(model)}
    out = {}
    for name, shape in shapes.items():
        shape = list(shape)
        a = axes.get(name)
        if a is not None and a < len(shape) and not is_fixed_dim(dims.get(name, (None,) * len(shape))[a]):
            shape[a] = batch
        out[name] = shape
    return out


def confirmed_shapes(
    model: ModelProto, batch: int = 1, given: Mapping[str, list[int]] | None = None
) -> tuple[dict[str, list[int]], str]:
    """:func:`default_shapes`, checked by one ONNX Runtime run on synthetic inputs of those shapes; when ONNX
    Runtime rejects them, the next sizes of :data:`DIM_SIZES` are tried, and an error naming ``shapes``
    follows when none runs. A model ONNX Runtime cannot load keeps the first choice (unchecked)."""
    from inhercc.runtime import make_session, ort_message, ort_run_errors

    shapes, note = default_shapes(model, batch, given)
    if not note:
        return shapes, note
    try:
        sess = make_session(model)
    except InherccError:
        return shapes, note
    tried: list[dict[str, list[int]]] = []
    error = ""
    for attempt in range(max(len(v) for v in DIM_SIZES.values())):
        shapes, note = default_shapes(model, batch, given, attempt)
        if shapes in tried:
            continue
        tried.append(shapes)
        try:
            sess.run(None, synthetic_feeds(model, shapes, seed=0))
            return shapes, note
        except ort_run_errors() as e:
            error = ort_message(e)
    raise InherccError(
        f"ONNX Runtime rejects every input size tried ({'; '.join(shape_text(s) for s in tried)}): {error}; "
        "pass `shapes` NAME=DIMS with sizes the model accepts"
    )


_VALUE_PRESERVING = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand")


def _index_uses(model: ModelProto) -> Iterator[tuple[str, onnx.NodeProto, int]]:
    """``(graph input, node, operand)`` for every node operand that carries an integer graph input's values —
    the input itself or its copy through value-preserving ops (``Cast``, ``Reshape``, ``Unsqueeze`` …)."""
    inits = {t.name for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in set(node.input):
            consumers.setdefault(i, []).append(node)
    for spec in input_specs(model):
        if spec.name in inits or np.issubdtype(spec.dtype, np.floating):
            continue
        todo, carried = [spec.name], {spec.name}
        while todo:
            value = todo.pop()
            for node in consumers.get(value, []):
                for k, i in enumerate(node.input):
                    if i == value:
                        yield spec.name, node, k
                if node.op_type in _VALUE_PRESERVING and node.input[0] == value:
                    todo.extend(o for o in node.output if o not in carried)
                    carried.update(node.output)


def gather_table_sizes(model: ModelProto) -> dict[str, int]:
    """For integer graph inputs used as ``Gather`` indices into a constant table (directly, or through
    ``Cast``/``Reshape``/``Unsqueeze``/``Squeeze``/``Flatten``/``Expand``): the table size."""
    inits = {t.name: t for t in model.graph.initializer}
    sizes: dict[str, int] = {}
    for name, node, k in _index_uses(model):
        if node.op_type == "Gather" and k == 1 and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            n = int(inits[node.input[0]].dims[axis])
            sizes[name] = min(sizes.get(name, n), n)
    return sizes


def index_ranges(model: ModelProto) -> dict[str, int]:
    """For integer graph inputs that index something: how many values they take — a ``Gather`` table's size,
    a ``OneHot``'s constant depth, or ``n`` for an ``Equal`` against a constant ``0 … n-1`` (a one-hot written
    out, as jax2tf does)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    ranges = gather_table_sizes(model)
    for name, node, k in _index_uses(model):
        if node.op_type == "OneHot" and k == 0:
            other = node.input[1]
        elif node.op_type == "Equal":
            other = node.input[1 - k]
        else:
            continue
        if other not in inits:
            continue
        values = numpy_helper.to_array(inits[other]).ravel()
        if node.op_type == "OneHot" and values.size == 1:
            n = int(values[0])
        elif node.op_type == "Equal" and values.size > 1 and np.array_equal(values, np.arange(values.size)):
            n = int(values.size)
        else:
            continue
        ranges[name] = min(ranges.get(name, n), n)
    return ranges


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def synthetic_bytes(model: ModelProto, shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """``(bytes of the synthetic inputs, bytes of the largest temporary drawn to make one)`` at ``shapes``
    (counted in Python integers: no overflow for absurd shapes)."""
    total = biggest = 0
    for spec in input_specs(model):
        count = math.prod(int(d) for d in shapes.get(spec.name, [1]))
        total += count * np.dtype(spec.dtype).itemsize
        biggest = max(biggest, count * 8)
    return total, biggest


def check_memory(need: int, what: str, free: int | None) -> None:
    """A one-line error when ``need`` bytes exceed ``free`` (``what`` says what needs them)."""
    if free is not None and need > free:
        raise InherccError(
            f"{what} need {need / 2**30:.1f} GiB of memory, only {free / 2**30:.1f} GiB is available; "
            "use a smaller shape"
        )


def check_synthetic_memory(model: ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """A one-line error when synthetic inputs of ``shapes`` would not fit in the memory available."""
    total, biggest = synthetic_bytes(model, shapes)
    check_memory(total + biggest, f"synthetic inputs {shape_text(shapes)}", available_memory())


def synthetic_feeds(
    model: ModelProto,
    shapes: Mapping[str, list[int]] | None = None,
    *,
    batch: int | None = None,
    seed: int = 0,
) -> Feed:
    """One batch of synthetic inputs, each of its dtype in a plausible range; dynamic dims not in ``shapes``
    are chosen by :func:`resolve_shapes` (``batch`` samples). Refused with one line, before allocating, when
    they would not fit in memory. See :func:`synthetic_input` for the values."""
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    concrete = resolve_shapes(specs, shapes, batch, model=model)
    check_synthetic_memory(model, concrete)
    tables = index_ranges(model)
    kinds = dim_kinds(model)
    seq = [concrete[n][i] for (n, i), k in kinds.items() if k == "sequence"]
    audio = {n for (n, _), k in kinds.items() if k == "audio"}
    return {
        s.name: synthetic_input(s, concrete[s.name], rng, tables.get(s.name), s.name in audio, max(seq, default=1))
        for s in specs
    }


def synthetic_input(
    spec: InputSpec, shape: list[int], rng: np.random.Generator, rows: int | None, audio: bool, length: int
) -> np.ndarray:
    """Values for one input: masks → ones; a sample rate (``sr``, ``sample_rate``) → 16000; other scalars →
    ``length`` for a count, else 1; floats ~ N(0, 1), audio in [-1, 1]; bools → True; indices into ``rows``
    values (a ``Gather`` table, a one-hot) → uniform below it (position ids → 0, 1, 2 …); other bytes (uint8 /
    int8, or named ``byte``) → uniform over their range (0 … 255); counts and lengths → ``length`` (the
    longest sequence dim); other integers → 0."""
    name, dtype = spec.name.lower(), spec.dtype
    if "mask" in name:
        return np.ones(shape, dtype=dtype)
    if _RATE_NAME.search(name):
        return np.full(shape, 16000, dtype=dtype)
    if not shape:
        return np.full(shape, length if _COUNT_NAME.search(name) else 1, dtype=dtype)
    if np.issubdtype(dtype, np.floating):
        if audio:
            return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)
    if rows is not None:
        if "position" in name and shape:
            return np.broadcast_to(np.arange(shape[-1]) % rows, shape).astype(dtype)
        return rng.integers(0, rows, size=shape).astype(dtype)
    if np.dtype(dtype).itemsize == 1:
        info = np.iinfo(dtype)
        return rng.integers(int(info.min), int(info.max) + 1, size=shape).astype(dtype)
    if "byte" in name:
        return rng.integers(0, 256, size=shape).astype(dtype)
    if _COUNT_NAME.search(name):
        return np.full(shape, length, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def warn_synthetic(purpose: str) -> None:
    warnings.warn(
        f"no `data` given: {purpose} uses synthetic inputs, which say little about real quality", stacklevel=3
    )


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip


def data_file_kind(path: Path) -> str:
    """``"npz"`` or ``"npy"`` by the file's first bytes; any other file is an :class:`InherccError` that says
    what an ``.npz`` is (numpy's own message for such files suggests unpickling them)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise InherccError(f"cannot read data file {path}: {e.strerror or one_line(e)}") from e
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGICS):
        return "npz"
    what = "an empty file" if not head else "not a zip file"
    raise InherccError(f"cannot read {path}: not a .npz archive ({what}; write one array per input with numpy.savez)")


def read_error(path: Path, kind: str, e: Exception) -> InherccError:
    """A one-line error for a data file numpy cannot read (object arrays named as such: numpy's text
    suggests ``allow_pickle``, which would run code from the file)."""
    if "allow_pickle" in str(e):
        return InherccError(f"{path} holds Python objects (dtype=object), not numeric arrays")
    return InherccError(f"cannot read {path} as .{kind}: {one_line(e)}")


def npy_input_name(path: Path, model: ModelProto | None) -> str:
    """The model input a lone ``.npy`` file holds: the input its stem names (as in a folder of
    ``<input>.npy`` files), else the model's only input."""
    if model is None:
        return path.stem
    names = [s.name for s in input_specs(model)]
    if path.stem in names or path.stem == LABELS_KEY:
        return path.stem
    if len(names) == 1:
        return names[0]
    raise InherccError(
        f"{path} holds one array and is not named after an input; the model has inputs {', '.join(names)}: "
        "pass an .npz or a folder of <input>.npy files"
    )


def load_npz(path: str | Path, model: ModelProto | None = None) -> Feed:
    """Arrays from an ``.npz`` (one per graph input; first axis = samples; optional ``_labels``), or from a
    lone ``.npy`` (see :func:`npy_input_name`), checked against the model's inputs when given."""
    path = Path(path)
    if not path.exists():
        raise InherccError(f"no such data file: {path}")
    if path.is_dir():
        raise InherccError(f"{path} is a folder, not a data file")
    kind = data_file_kind(path)
    try:
        if kind == "npy":
            feeds = {npy_input_name(path, model): np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as z:
                feeds = {k: z[k] for k in z.files}
    except InherccError:
        raise
    except Exception as e:
        raise read_error(path, kind, e) from e
    if not feeds:
        raise InherccError(f"{path} holds no arrays")
    if model is not None:
        check_feeds(feeds, model, str(path))
    return feeds


def check_feeds(
    feeds: Mapping[str, np.ndarray], model: ModelProto, source: str = "data", *, check_finite: bool = True
) -> None:
    """Every graph input present with a matching dtype kind and rank; same sample count; no NaN/Inf
    (``check_finite=False`` checks shapes and dtypes only, without reading the values)."""
    specs = input_specs(model)
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise InherccError(f"{source} lacks model input(s) {', '.join(missing)} (has: {', '.join(sorted(feeds))})")
    axes = batch_axes(model)
    tables = gather_table_sizes(model) if check_finite else {}
    counts = set()
    for spec in specs:
        a = feeds[spec.name]
        axis = axes.get(spec.name)
        if spec.shape and a.ndim != len(spec.shape):
            raise InherccError(f"{source}: {spec.name} has {a.ndim} dims, the model expects {len(spec.shape)}")
        for i, (d, v) in enumerate(zip(spec.shape, a.shape)):
            if i != axis and isinstance(d, int) and d > 0 and d != v:
                raise InherccError(f"{source}: {spec.name} has shape {list(a.shape)}, the model expects dim {i} = {d}")
        if np.issubdtype(spec.dtype, np.floating) != np.issubdtype(a.dtype, np.floating) or (
            spec.dtype == np.bool_
        ) != (a.dtype == np.bool_):
            raise InherccError(f"{source}: {spec.name} is {a.dtype}, the model expects {spec.dtype}")
        if check_finite and np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise InherccError(f"{source}: {spec.name} contains NaN or Inf")
        if check_finite and spec.name in tables and np.issubdtype(a.dtype, np.integer) and a.size:
            check_ids(a, tables[spec.name], f"{source}: {spec.name}")
        if axis is None or a.ndim <= axis:
            continue
        if a.shape[axis] == 0:
            raise InherccError(f"{source}: {spec.name} has no samples")
        counts.add(a.shape[axis])
    if LABELS_KEY in feeds:
        labels = feeds[LABELS_KEY]
        if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
            raise InherccError(f"{source}: {LABELS_KEY} must hold class ids, got dtype {labels.dtype}")
        if labels.ndim == 0:
            raise InherccError(f"{source}: {LABELS_KEY} must have one entry per sample, got a scalar")
        if check_finite and np.issubdtype(labels.dtype, np.floating) and not np.all(labels == np.round(labels)):
            raise InherccError(f"{source}: {LABELS_KEY} must hold whole class ids, got non-integral values")
        counts.add(labels.shape[0])
    if len(counts) > 1:
        raise InherccError(f"{source}: inputs have different sample counts {sorted(counts)}")


def check_ids(ids: np.ndarray, rows: int, what: str) -> None:
    """Indices into an embedding table of ``rows`` rows must lie in ``[-rows, rows)`` (as ``Gather`` takes
    them): else a one-line error, before ONNX Runtime meets them mid-run."""
    high, low = int(ids.max()), int(ids.min())
    if high >= rows:
        raise InherccError(f"{what} holds ids up to {high}, the embedding table has {rows} rows")
    if low < -rows:
        raise InherccError(f"{what} holds ids down to {low}, the embedding table has {rows} rows")


def cast_feeds(feeds: Mapping[str, np.ndarray], model: ModelProto) -> Feed:
    """Model inputs only, cast to the exact dtypes the model declares (int32 ids → int64, …)."""
    return {s.name: np.asarray(feeds[s.name]).astype(s.dtype, copy=False) for s in input_specs(model)}


def iter_batches(
    feeds: Mapping[str, np.ndarray], batch_size: int, axes: Mapping[str, int | None] | None = None
) -> Iterator[Feed]:
    """Consecutive slices of ``batch_size`` samples (the last may be smaller), along each array's batch axis
    (axis 0 without ``axes``; arrays without one come whole with every batch)."""
    axes = axes or {}
    n = sample_count(feeds, axes)
    for i in range(0, n, batch_size):
        yield slice_batch(feeds, axes, i, i + batch_size)


def take_samples(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None], rows: np.ndarray) -> Feed:
    """The given sample rows of every array, along its batch axis (axis 0 when ``axes`` does not name it;
    arrays without one whole)."""
    out: Feed = {}
    for k, v in feeds.items():
        a = axes.get(k, 0)
        out[k] = v if a is None or np.ndim(v) <= a else np.take(v, rows, axis=a)
    return out


def join_samples(parts: Sequence[Mapping[str, np.ndarray]], axes: Mapping[str, int | None]) -> Feed:
    """Feed dicts joined sample-wise, each array along its batch axis (:func:`concat_batches`)."""
    if len(parts) == 1:
        return dict(parts[0])
    return {k: concat_batches([p[k] for p in parts], axes.get(k, 0), k) for k in parts[0]}


# ---------------------------------------------------------------------------------------------------------
# Training data: any source as shards loaded on demand


Signature = tuple[tuple[str, tuple[int, ...], str], ...]


@dataclass
class Shard:
    """``size`` samples of a data set, read by ``load()`` only when needed. ``signature`` (per-sample
    shape and dtype of every array) says which shards can share a batch."""

    size: int
    signature: Signature
    load: Callable[[], Feed]
    source: str
    checked: bool = False


def feed_signature(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> Signature:
    """Per-sample shape (the batch axis left out: axis 0 without ``axes``) and dtype of every array."""
    axes = axes or {}

    def per_sample(k: str, v: np.ndarray) -> tuple[int, ...]:
        a = axes.get(k, 0)
        return tuple(int(d) for i, d in enumerate(v.shape) if i != a)

    return tuple(sorted((k, per_sample(k, v), np.dtype(v.dtype).str) for k, v in feeds.items()))


def _in_memory(feeds: Feed, source: str, axes: Mapping[str, int | None] | None = None) -> Shard:
    return Shard(sample_count(feeds, axes), feed_signature(feeds, axes), lambda: feeds, source)


class Samples:
    """A data set as a list of shards read one at a time (a folder of shards is never loaded whole).
    Samples are numbered globally in shard order; ``labels`` says whether every shard has ``_labels``."""

    def __init__(self, shards: list[Shard], model: ModelProto, source: str, synthetic: bool = False) -> None:
        if not shards or sum(s.size for s in shards) == 0:
            raise InherccError(f"{source} holds no samples")
        self.shards, self.model, self.source, self.synthetic = shards, model, source, synthetic
        self.axes = batch_axes(model)
        self.offsets = np.cumsum([0] + [s.size for s in shards])
        has = [any(k == LABELS_KEY for k, _, _ in s.signature) for s in shards]
        if any(has) and not all(has):
            missing = next(s.source for s, h in zip(shards, has) if not h)
            raise InherccError(f"{missing} lacks {LABELS_KEY} while other shards of {source} have them")
        self.labels = all(has)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def load(self, i: int) -> Feed:
        """Shard ``i``, its values checked (NaN/Inf, labels) as it is read."""
        shard = self.shards[i]
        feeds = shard.load()
        if not shard.checked:
            check_feeds(feeds, self.model, shard.source)
            if feed_signature(feeds, self.axes) != shard.signature:
                raise InherccError(f"{shard.source} changed while being read")
            shard.checked = True
        return feeds

    def _groups(self, indices: np.ndarray) -> dict[int, np.ndarray]:
        """Global sample indices → ``{shard: rows}`` (rows in the given order)."""
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out: dict[int, np.ndarray] = {}
        for s in np.unique(shard_of):
            out[int(s)] = indices[shard_of == s]
        return out

    def count_batches(self, indices: np.ndarray, batch_size: int, min_rows: int = 1) -> int:
        """How many batches :meth:`batches` yields (independent of the shuffling)."""
        per_sig: dict[Signature, int] = {}
        for s, rows in self._groups(np.asarray(indices)).items():
            sig = self.shards[s].signature
            per_sig[sig] = per_sig.get(sig, 0) + len(rows)
        return sum(n // batch_size + (1 if n % batch_size >= min_rows else 0) for n in per_sig.values())

    def batches(
        self,
        indices: np.ndarray,
        batch_size: int,
        rng: np.random.Generator | None = None,
        min_rows: int = 1,
    ) -> Iterator[tuple[np.ndarray, Feed]]:
        """``(global indices, feeds)`` batches of the given samples, one shard in memory at a time. With
        ``rng`` the shard order and the rows within each shard are shuffled. Shards of one signature fill
        batches together; what is left of each signature at the end comes as a last, smaller batch
        (dropped when it has fewer than ``min_rows`` samples)."""
        if batch_size <= 0:
            raise InherccError(f"batch size must be positive, got {batch_size}")
        groups = self._groups(np.asarray(indices))
        order = list(groups)
        if rng is not None:
            order = [order[i] for i in rng.permutation(len(order))]
        pending: dict[Signature, list[tuple[np.ndarray, Feed]]] = {}
        for s in order:
            rows = groups[s]
            if rng is not None:
                rows = rows[rng.permutation(len(rows))]
            feeds = self.load(s)
            local = rows - self.offsets[s]
            part = (rows, take_samples(feeds, self.axes, local))
            buf = pending.setdefault(self.shards[s].signature, [])
            buf.append(part)
            while sum(len(p[0]) for p in buf) >= batch_size:
                yield _take(buf, batch_size, self.axes)
        for buf in pending.values():
            n = sum(len(p[0]) for p in buf)
            if n >= min_rows and n > 0:
                yield _take(buf, n, self.axes)

    def gather(self, indices: np.ndarray) -> Feed:
        """The given samples in one feed dict (for calibration and small held-out sets)."""
        parts = [f for _, f in self.batches(np.asarray(indices), max(1, len(indices)))]
        if len(parts) > 1:
            raise InherccError(f"{self.source}: shards differ in shape; cannot put these samples in one batch")
        return parts[0]


def _take(buf: list[tuple[np.ndarray, Feed]], n: int, axes: Mapping[str, int | None]) -> tuple[np.ndarray, Feed]:
    """The first ``n`` buffered samples (concatenated across parts); the rest stays in ``buf``."""
    idx: list[np.ndarray] = []
    feeds: list[Feed] = []
    need = n
    while need:
        rows, f = buf[0]
        if len(rows) <= need:
            buf.pop(0)
            idx.append(rows)
            feeds.append(f)
            need -= len(rows)
        else:
            idx.append(rows[:need])
            feeds.append(slice_batch(f, axes, 0, need))
            buf[0] = (rows[need:], slice_batch(f, axes, need, len(rows)))
            need = 0
    if len(feeds) == 1:
        return idx[0], feeds[0]
    return np.concatenate(idx), join_samples(feeds, axes)


def split_indices(n: int, held: float | int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held out)`` sample indices, both sorted: a seeded random set is held out — ``held`` samples when
    an int, that fraction of ``n`` when a float in [0, 1) (at least one sample when positive). At least one
    sample is kept."""
    if isinstance(held, float):
        if not 0.0 <= held < 1.0:
            raise InherccError(f"the held-out fraction must be in [0, 1), got {held}")
        n_val = 0 if held == 0 else max(1, int(round(n * held)))
    else:
        n_val = int(held)
    if n_val >= n:
        share = f"{held:.0%}" if isinstance(held, float) else str(held)
        raise InherccError(f"{n} sample(s) are too few to hold out {share} for validation")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _model_arrays(feeds: Mapping[str, np.ndarray], model: ModelProto) -> Feed:
    """The model inputs and ``_labels`` of a feed dict (other keys are dropped)."""
    keep = {s.name for s in input_specs(model)} | {LABELS_KEY}
    return {k: v for k, v in feeds.items() if k in keep}


def _checked_model_arrays(
    feeds: Mapping[str, np.ndarray], model: ModelProto, source: str, *, check_finite: bool = True
) -> Feed:
    """:func:`check_feeds` on every array given (so its errors list them all), then the model's arrays."""
    check_feeds(feeds, model, source, check_finite=check_finite)
    return _model_arrays(feeds, model)


def _npz_header(path: Path) -> Feed:
    """Zero-stride stand-ins with the shape and dtype of every array in an ``.npz`` (values not read)."""
    import zipfile

    if data_file_kind(path) != "npz":
        raise InherccError(f"cannot read {path}: not a .npz archive (a .npy array; in a folder, name it <input>.npy)")
    out: Feed = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                    shape, _, dtype = (read or np.lib.format.read_array_header_2_0)(f)
                out[info.filename[:-4]] = _stand_in(shape, dtype)
    except Exception as e:
        raise read_error(path, "npz", e) from e
    if not out:
        raise InherccError(f"{path} holds no arrays")
    return out


def _stand_in(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape=shape, strides=(0,) * len(shape))


def _npz_shard(path: Path, model: ModelProto) -> Shard:
    head = _checked_model_arrays(_npz_header(path), model, str(path), check_finite=False)

    def load() -> Feed:
        return _model_arrays(load_npz(path), model)

    axes = batch_axes(model)
    return Shard(sample_count(head, axes), feed_signature(head, axes), load, str(path))


def _npy_shard(files: list[Path], model: ModelProto, source: str) -> Shard:
    """One shard from ``<input>.npy`` files (memory-mapped: rows are read from disk when batched)."""
    arrays: Feed = {}
    for f in files:
        try:
            arrays[f.stem] = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise read_error(f, "npy", e) from e
    arrays = _checked_model_arrays(arrays, model, source, check_finite=False)
    axes = batch_axes(model)
    return Shard(sample_count(arrays, axes), feed_signature(arrays, axes), lambda: arrays, source)


def _folder_shards(folder: Path, model: ModelProto) -> list[Shard]:
    """Shards of a folder: every ``*.npz`` file, the ``<input>.npy`` files at the top level (one shard), and
    every sub-folder of ``<input>.npy`` files (one shard each); all in name order."""
    shards: list[Shard] = []
    top_npy = sorted(folder.glob("*.npy"))
    if top_npy:
        shards.append(_npy_shard(top_npy, model, str(folder)))
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix == ".npz":
            shards.append(_npz_shard(entry, model))
        elif entry.is_dir() and any(entry.glob("*.npy")):
            shards.append(_npy_shard(sorted(entry.glob("*.npy")), model, str(entry)))
    if not shards:
        raise InherccError(f"{folder} holds no .npz files and no .npy arrays")
    return shards


def _iterable_shards(items: Iterable[Mapping[str, np.ndarray]], model: ModelProto, source: str) -> list[Shard]:
    """Feed dicts (each one sample or a batch) read once; consecutive ones of one signature are merged."""
    specs = input_specs(model)
    axes = batch_axes(model)
    runs: list[list[Feed]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InherccError(f"{source} item {i} is a {type(item).__name__}, not a dict of input arrays")
        given = {k: np.asarray(v) for k, v in item.items()}
        # one unbatched sample (rank one below the model input's) gets its batch axis
        for spec in specs:
            a = given.get(spec.name)
            if a is not None and spec.shape and a.ndim == len(spec.shape) - 1:
                given = {k: _with_batch_axis(v, axes.get(k, 0), k in axes) for k, v in given.items()}
                break
        feeds = _checked_model_arrays(given, model, f"{source} item {i}")
        if runs and feed_signature(runs[-1][-1], axes) == feed_signature(feeds, axes):
            runs[-1].append(feeds)
        else:
            runs.append([feeds])
    return [_in_memory(join_samples(run, axes), source, axes) for run in runs]


def _with_batch_axis(v: np.ndarray, axis: int | None, model_input: bool) -> np.ndarray:
    """One sample given without its batch axis, with it (inputs without a batch axis as they are)."""
    if axis is None:
        return v
    return np.expand_dims(v, axis if model_input else 0)


def open_samples(
    data: object,
    model: ModelProto,
    *,
    shapes: Mapping[str, list[int]] | None = None,
    synthetic: int = 256,
    seed: int = 0,
) -> Samples:
    """Training samples for ``model`` from any supported source:

    - an ``.npz`` path (one array per graph input, first axis = samples, optional ``_labels``);
    - a folder of shards (``*.npz`` files, ``<input>.npy`` files, sub-folders of ``<input>.npy`` files),
      read one shard at a time;
    - a dict of arrays; any iterable of feed dicts; an ONNX Runtime ``CalibrationDataReader``
      (``get_next()`` until None) — read once and kept in memory;
    - ``None``: ``synthetic`` samples from the input specs (with a warning: quality will suffer).
    """
    if isinstance(data, Samples):
        return data
    if data is None:
        warn_synthetic("distillation")
        feeds = synthetic_feeds(model, shapes, batch=synthetic, seed=seed)
        shard = _in_memory(feeds, "synthetic inputs", batch_axes(model))
        return Samples([shard], model, "synthetic inputs", synthetic=True)
    if isinstance(data, (str, Path)) or hasattr(data, "__fspath__"):
        path = Path(data)  # type: ignore[arg-type]
        if path.is_dir():
            return Samples(_folder_shards(path, model), model, str(path))
        feeds = _model_arrays(load_npz(path, model), model)
        return Samples([_in_memory(feeds, str(path), batch_axes(model))], model, str(path))
    if isinstance(data, Mapping):
        feeds = _checked_model_arrays({k: np.asarray(v) for k, v in data.items()}, model, "data")
        return Samples([_in_memory(feeds, "data", batch_axes(model))], model, "data")
    get_next = getattr(data, "get_next", None)
    if callable(get_next):
        return Samples(_iterable_shards(iter(get_next, None), model, "data reader"), model, "data reader")
    if isinstance(data, Iterable):
        return Samples(_iterable_shards(data, model, "data"), model, "data")
    raise InherccError(
        f"unsupported data {type(data).__name__}: pass an .npz path, a folder of shards, a dict of arrays, "
        "an iterable of feed dicts or a CalibrationDataReader"
    )


def with_fixed_inputs(
    model: ModelProto, shapes: Mapping[str, list[int]] | None, batch: int | None = None
) -> ModelProto:
    """A weight-less :func:`~inhercc.model.shape_skeleton` of the model with every graph input's dims fixed
    (``resolve_shapes``) and shapes re-inferred — for FLOP counts and layer input shapes."""
    fixed = shape_skeleton(model)
    concrete = resolve_shapes(input_specs(fixed), shapes, batch, model=model)  # the defaults of the real inputs
    for vi in fixed.graph.input:
        if vi.name in concrete:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, concrete[vi.name]):
                d.Clear()
                d.dim_value = v
    del fixed.graph.value_info[:]
    return infer_model_shapes(fixed)


def fixed_shape_flops(model: ModelProto, shapes: Mapping[str, list[int]] | None) -> tuple[float, tuple[str, ...]]:
    """FLOPs per sample; with concrete input shapes the dims are fixed first. ``count_flops`` already
    counts per sample (the leading dim is the batch), so nothing is divided here."""
    if not shapes:
        return count_flops(model)
    return count_flops(with_fixed_inputs(model, shapes))
