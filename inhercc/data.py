"""Sample sources: input specs, ``--shape`` parsing, synthetic inputs, ``.npz`` feeds, and training data
from any source (file, folder of shards, iterable, ORT ``CalibrationDataReader``) as :class:`Samples`."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.errors import InherccError
from inhercc.model import one_line

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
        if check_finite and np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise InherccError(f"{source}: {spec.name} contains NaN or Inf")
        if a.shape[0] == 0:
            raise InherccError(f"{source}: {spec.name} has no samples")
        counts.add(a.shape[0])
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


def cast_feeds(feeds: Mapping[str, np.ndarray], model: ModelProto) -> Feed:
    """Model inputs only, cast to the exact dtypes the model declares (int32 ids → int64, …)."""
    return {s.name: np.asarray(feeds[s.name]).astype(s.dtype, copy=False) for s in input_specs(model)}


def sample_count(feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in a feed dict (the first axis of its arrays)."""
    return len(next(iter(feeds.values())))


def iter_batches(feeds: Mapping[str, np.ndarray], batch_size: int) -> Iterator[Feed]:
    """Consecutive slices of ``batch_size`` samples (the last may be smaller)."""
    n = sample_count(feeds)
    for i in range(0, n, batch_size):
        yield {k: v[i : i + batch_size] for k, v in feeds.items()}


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


def feed_signature(feeds: Mapping[str, np.ndarray]) -> Signature:
    return tuple(sorted((k, tuple(int(d) for d in v.shape[1:]), np.dtype(v.dtype).str) for k, v in feeds.items()))


def _in_memory(feeds: Feed, source: str) -> Shard:
    return Shard(sample_count(feeds), feed_signature(feeds), lambda: feeds, source)


class Samples:
    """A data set as a list of shards read one at a time (a folder of shards is never loaded whole).
    Samples are numbered globally in shard order; ``labels`` says whether every shard has ``_labels``."""

    def __init__(self, shards: list[Shard], model: ModelProto, source: str, synthetic: bool = False) -> None:
        if not shards or sum(s.size for s in shards) == 0:
            raise InherccError(f"{source} holds no samples")
        self.shards, self.model, self.source, self.synthetic = shards, model, source, synthetic
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
            if feed_signature(feeds) != shard.signature:
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
            part = (rows, {k: np.asarray(v[local]) for k, v in feeds.items()})
            buf = pending.setdefault(self.shards[s].signature, [])
            buf.append(part)
            while sum(len(p[0]) for p in buf) >= batch_size:
                yield _take(buf, batch_size)
        for buf in pending.values():
            n = sum(len(p[0]) for p in buf)
            if n >= min_rows and n > 0:
                yield _take(buf, n)

    def gather(self, indices: np.ndarray) -> Feed:
        """The given samples in one feed dict (for calibration and small held-out sets)."""
        parts = [f for _, f in self.batches(np.asarray(indices), max(1, len(indices)))]
        if len(parts) > 1:
            raise InherccError(f"{self.source}: shards differ in shape; cannot put these samples in one batch")
        return parts[0]


def _take(buf: list[tuple[np.ndarray, Feed]], n: int) -> tuple[np.ndarray, Feed]:
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
            feeds.append({k: v[:need] for k, v in f.items()})
            buf[0] = (rows[need:], {k: v[need:] for k, v in f.items()})
            need = 0
    if len(feeds) == 1:
        return idx[0], feeds[0]
    return np.concatenate(idx), {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def split_indices(n: int, val_split: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` sample indices, both sorted: a seeded random ``val_split`` fraction is held
    out (at least one sample when the fraction is positive; at least one is kept for training)."""
    if not 0.0 <= val_split < 1.0:
        raise InherccError(f"--val-split must be in [0, 1), got {val_split}")
    n_val = 0 if val_split == 0 else max(1, int(round(n * val_split)))
    if n_val >= n:
        raise InherccError(f"{n} sample(s) are too few to hold out {val_split:.0%} for validation")
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

    return Shard(sample_count(head), feed_signature(head), load, str(path))


def _npy_shard(files: list[Path], model: ModelProto, source: str) -> Shard:
    """One shard from ``<input>.npy`` files (memory-mapped: rows are read from disk when batched)."""
    arrays: Feed = {}
    for f in files:
        try:
            arrays[f.stem] = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise read_error(f, "npy", e) from e
    arrays = _checked_model_arrays(arrays, model, source, check_finite=False)
    return Shard(sample_count(arrays), feed_signature(arrays), lambda: arrays, source)


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
    runs: list[list[Feed]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InherccError(f"{source} item {i} is a {type(item).__name__}, not a dict of input arrays")
        given = {k: np.asarray(v) for k, v in item.items()}
        # one unbatched sample (rank one below the model input's) gets its batch axis
        for spec in specs:
            a = given.get(spec.name)
            if a is not None and spec.shape and a.ndim == len(spec.shape) - 1:
                given = {k: v[None] for k, v in given.items()}
                break
        feeds = _checked_model_arrays(given, model, f"{source} item {i}")
        if runs and feed_signature(runs[-1][-1]) == feed_signature(feeds):
            runs[-1].append(feeds)
        else:
            runs.append([feeds])
    shards = []
    for run in runs:
        merged = run[0] if len(run) == 1 else {k: np.concatenate([f[k] for f in run]) for k in run[0]}
        shards.append(_in_memory(merged, source))
    return shards


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
        return Samples([_in_memory(feeds, "synthetic inputs")], model, "synthetic inputs", synthetic=True)
    if isinstance(data, (str, Path)) or hasattr(data, "__fspath__"):
        path = Path(data)  # type: ignore[arg-type]
        if path.is_dir():
            return Samples(_folder_shards(path, model), model, str(path))
        feeds = _model_arrays(load_npz(path, model), model)
        return Samples([_in_memory(feeds, str(path))], model, str(path))
    if isinstance(data, Mapping):
        feeds = _checked_model_arrays({k: np.asarray(v) for k, v in data.items()}, model, "data")
        return Samples([_in_memory(feeds, "data")], model, "data")
    get_next = getattr(data, "get_next", None)
    if callable(get_next):
        return Samples(_iterable_shards(iter(get_next, None), model, "data reader"), model, "data reader")
    if isinstance(data, Iterable):
        return Samples(_iterable_shards(data, model, "data"), model, "data")
    raise InherccError(
        f"unsupported data {type(data).__name__}: pass an .npz path, a folder of shards, a dict of arrays, "
        "an iterable of feed dicts or a CalibrationDataReader"
    )
