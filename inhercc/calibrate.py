"""Calibration: run the teacher in ONNX Runtime with the compressible layers' inputs exposed as extra graph
outputs and stream their Gram matrices ``G = XᵀX`` (float64, O(k²) memory per layer, never O(samples)).

Rows of ``X`` are what the layer's weight multiplies: the last axis of a MatMul/Gemm input; for a Conv, the
unfolded patches (``in/g·kh·kw`` columns in the order of ``W[out, in/g, kh, kw].reshape(out, -1)``, one Gram
per group). Padding positions are left out when the model has an attention-mask-like input. The Grams feed
:func:`inhercc.linalg.whitened_svd` (output-optimal factors) and the calibrated rank allocation.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.data import Feed, cast_feeds, input_specs, iter_batches
from inhercc.errors import InherccError
from inhercc.layers import Layer
from inhercc.runtime import make_session

DEFAULT_SAMPLES = 256
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_BYTES = 1 << 30  # exposed activations per batch; more taps than fit are run in several groups
_CHUNK_ELEMS = 1 << 22  # rows·columns converted to float64 at a time (32 MiB)


@dataclass(frozen=True)
class ConvGeometry:
    """What a Conv does to its input's spatial axes (ONNX attributes, resolved to explicit pads)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end... (ONNX order); ignored unless auto_pad is NOTSET
    dilations: tuple[int, ...]
    auto_pad: str
    groups: int

    @classmethod
    def of(cls, node: onnx.NodeProto, kernel: Sequence[int], groups: int) -> ConvGeometry:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n = len(kernel)
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        return cls(
            tuple(int(k) for k in kernel),
            tuple(int(s) for s in attrs.get("strides", [1] * n)),
            tuple(int(p) for p in attrs.get("pads", [0] * (2 * n))),
            tuple(int(d) for d in attrs.get("dilations", [1] * n)),
            auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
            int(groups),
        )

    def explicit_pads(self, spatial: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """(begin, end) padding per spatial axis for an input of size ``spatial``."""
        if self.auto_pad in ("", "NOTSET"):
            n = len(self.kernel)
            return tuple((self.pads[i], self.pads[i + n]) for i in range(n))
        if self.auto_pad == "VALID":
            return tuple((0, 0) for _ in self.kernel)
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            raise InherccError(f"unsupported Conv auto_pad {self.auto_pad!r}")
        out = []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            out.append((small, big) if self.auto_pad == "SAME_UPPER" else (big, small))
        return tuple(out)


def conv_patches(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Unfold one sample ``x[C, *spatial]`` into the patch matrix ``[groups, positions, C/g·prod(kernel)]``
    seen by a Conv with geometry ``geom`` (zero padding included, as the Conv sees it)."""
    c = x.shape[0]
    g = geom.groups
    pads = geom.explicit_pads(x.shape[1:])
    xp = np.pad(x, ((0, 0),) + pads) if any(p for pair in pads for p in pair) else x
    n = len(geom.kernel)
    span = tuple((k - 1) * d + 1 for k, d in zip(geom.kernel, geom.dilations))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(1, n + 1)))  # [C, *out_full, *span]
    index = (slice(None),) + tuple(slice(None, None, s) for s in geom.strides)
    index += tuple(slice(None, None, d) for d in geom.dilations)
    win = win[index]  # [C, *out, *kernel]
    positions = int(np.prod(win.shape[1 : n + 1]))
    kk = int(np.prod(geom.kernel))
    win = win.reshape(g, c // g, positions, kk)
    return np.ascontiguousarray(win.transpose(0, 2, 1, 3)).reshape(g, positions, (c // g) * kk)


@dataclass
class _Tap:
    """One exposed tensor and how its rows are read (layers sharing both share the Gram)."""

    tensor: str
    op: str  # "MatMul" | "Gemm" | "Conv"
    geom: ConvGeometry | None
    layers: list[str]
    gram: np.ndarray | None = None
    rows: int = 0

    def add(self, value: np.ndarray, mask: np.ndarray | None) -> None:
        if self.op == "Conv":
            assert self.geom is not None
            for sample in value:
                self._accumulate(conv_patches(sample, self.geom))
            return
        x = value
        if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
            x = x[mask != 0]  # drop padding positions
        elif mask is not None and x.ndim == 2 and x.shape[0] == mask.size:
            x = x[mask.reshape(-1) != 0]  # [batch·seq, in]: an exporter flattened the tokens
        self._accumulate(x.reshape(1, -1, x.shape[-1]))

    def _accumulate(self, patches: np.ndarray) -> None:
        """``patches[g, rows, k]`` → ``gram[g] += Pᵀ P`` in float64, a bounded chunk of rows at a time."""
        g, rows, k = patches.shape
        if self.gram is None:
            self.gram = np.zeros((g, k, k), dtype=np.float64)
        step = max(1, _CHUNK_ELEMS // max(1, g * k))
        for i in range(0, rows, step):
            p = patches[:, i : i + step].astype(np.float64)
            self.gram += np.matmul(p.transpose(0, 2, 1), p)
        self.rows += rows


class Progress:
    """A one-line progress bar on stderr (nothing when disabled)."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = max(1, total), label, enabled
        self.done, self.t0 = 0, time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            elapsed = time.perf_counter() - self.t0
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def mask_input(model: ModelProto) -> str | None:
    """The attention-mask-like input: an int/bool graph input of rank 2 whose name contains "mask"."""
    for spec in input_specs(model):
        integral = np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_
        if "mask" in spec.name.lower() and integral and len(spec.shape) == 2:
            return spec.name
    return None


def calibration_feeds(model: ModelProto, feeds: Mapping[str, np.ndarray], samples: int | None) -> Feed:
    """The model inputs of the first ``samples`` samples (all when None), cast to the declared dtypes."""
    if samples is not None and samples <= 0:
        raise InherccError(f"--calib-samples must be positive, got {samples}")
    cast = cast_feeds(feeds, model)
    n = len(next(iter(cast.values())))
    take = n if samples is None else min(n, samples)
    return {k: v[:take] for k, v in cast.items()}


def _taps(model: ModelProto, layers: Sequence[Layer]) -> list[_Tap]:
    nodes = {n.name: n for n in model.graph.node}
    taps: dict[tuple, _Tap] = {}
    for layer in layers:
        node = nodes.get(layer.name)
        if node is None or not node.input or layer.op not in ("MatMul", "Gemm", "Conv"):
            continue
        geom = ConvGeometry.of(node, layer.kernel, layer.groups) if layer.op == "Conv" else None
        key = (node.input[0], "Conv" if geom else "dense", geom)
        if key not in taps:
            taps[key] = _Tap(node.input[0], layer.op if geom else "MatMul", geom, [])
        taps[key].layers.append(layer.name)
    return list(taps.values())


def _with_outputs(model: ModelProto, tensors: Sequence[str]) -> tuple[ModelProto, list[str]]:
    """A copy of ``model`` whose outputs are exactly ``tensors`` that are not graph inputs (those are fed)."""
    inputs = {i.name for i in model.graph.input}
    types = {vi.name: vi.type for vi in list(model.graph.value_info) + list(model.graph.output)}
    out = ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    names = []
    for t in tensors:
        if t in inputs or t in names:
            continue
        vi = onnx.ValueInfoProto(name=t)
        if t in types:
            vi.type.CopyFrom(types[t])
        else:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        out.graph.output.append(vi)
        names.append(t)
    return out, names


def _groups(taps: list[_Tap], sizes: Mapping[str, int], budget: int) -> list[list[_Tap]]:
    """Split taps into runs whose exposed activations (bytes per batch) fit in ``budget``."""
    groups: list[list[_Tap]] = [[]]
    used = 0
    for tap in taps:
        size = sizes.get(tap.tensor, 0)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(tap)
        used += size
    return groups


def collect_grams(
    model: ModelProto,
    layers: Sequence[Layer],
    feeds: Mapping[str, np.ndarray],
    *,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, np.ndarray]:
    """Per-layer Gram matrices of the layer inputs over the first ``samples`` samples of ``feeds``.

    Returns ``{layer name: G}``, ``G`` of shape ``[k, k]`` (``groups == 1``) or ``[g, k, k]`` (grouped
    conv), ``k`` the layer's ``in_features``. Layers whose input cannot be exposed are left out (they fall
    back to plain SVD). Taps are run in several passes when their activations for one batch would exceed
    ``max_bytes``.
    """
    if batch_size <= 0:
        raise InherccError(f"calibration batch size must be positive, got {batch_size}")
    feed = calibration_feeds(model, feeds, samples)
    taps = _taps(model, layers)
    if not taps:
        return {}
    mask_name = mask_input(model)
    n = len(next(iter(feed.values())))
    # One probe sample sizes every exposed activation; then as few passes over the data as memory allows.
    probe_model, probe_names = _with_outputs(model, [t.tensor for t in taps])
    sizes: dict[str, int] = {}
    if probe_names:
        probe = make_session(probe_model).run(probe_names, {k: v[:1] for k, v in feed.items()})
        sizes = {name: int(v.nbytes) * min(batch_size, n) for name, v in zip(probe_names, probe)}
    del probe_model
    groups = _groups(taps, sizes, max_bytes)
    n_batches = math.ceil(n / batch_size)
    bar = Progress(n_batches * len(groups), f"calibrating {n} samples", progress)
    try:
        for group in groups:
            group_model, names = _with_outputs(model, [t.tensor for t in group])
            sess = make_session(group_model) if names else None
            del group_model
            for batch in iter_batches(feed, batch_size):
                values = dict(zip(names, sess.run(names, batch))) if sess is not None else {}
                values.update({k: v for k, v in batch.items() if k not in values})
                mask = batch.get(mask_name) if mask_name else None
                for tap in group:
                    tap.add(np.asarray(values[tap.tensor]), mask)
                bar.step()
    finally:
        bar.close()
    grams: dict[str, np.ndarray] = {}
    for tap in taps:
        if tap.gram is None:
            continue
        g = tap.gram if tap.op == "Conv" and tap.gram.shape[0] > 1 else tap.gram[0]
        for name in tap.layers:
            grams[name] = g
    return grams
