"""INT8 quantization of a student through ONNX Runtime's own tools (``onnxruntime.quantization``), not by hand.

Two modes (:data:`QUANTIZE_MODES`):

- ``int8``: :func:`onnxruntime.quantization.quantize_dynamic` — int8 weights (per output channel by default,
  symmetric), activations quantized at run time (``DynamicQuantizeLinear`` → ``MatMulInteger`` /
  ``ConvInteger``). No data needed.
- ``int8-static``: :func:`onnxruntime.quantization.quantize_static` in the QDQ format — int8 weights and uint8
  activations whose ranges are calibrated (min / max) on the calibration samples, read through a
  :class:`onnxruntime.quantization.CalibrationDataReader`.

:func:`quantized_weights` says which initializers ONNX Runtime will quantize and along which axis, so
quantization-aware distillation (:mod:`inhercc.torchrt.fakequant`) fake-quantizes exactly those.

Before quantizing, :func:`equalize_factor_pairs` rescales each factor pair across its rank-r bottleneck
(``W_in·D``, ``D⁻¹·W_out``: the student's function unchanged) so the bottleneck's channels and ``W_out``'s rows
share their ranges, SmoothQuant-style. Whitened factors need it: one bottleneck channel can run 10³ times
larger than the others, and the one activation scale ONNX Runtime gives the bottleneck then rounds the others
away (a toy FFN student: cosine to the fp32 student 0.78 without, 0.9999 with; on MiniLM-L6 at ratio 0.5 the
held-out cosine to the teacher goes 0.8675 fp32 → 0.8633 INT8 without, 0.8635 with).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from inhercc.calibrate import with_outputs
from inhercc.data import Feed
from inhercc.errors import InherccError
from inhercc.model import TWO_GB, initializer_map, one_line
from inhercc.runtime import make_session
from inhercc.verify import model_batches

QUANTIZE_MODES = ("int8", "int8-static")
# op type -> the input index of its weight, for the ops each mode quantizes (onnxruntime.quantization.registry)
DYNAMIC_WEIGHTS = {"MatMul": 1, "Conv": 1, "Gemm": 1, "Gather": 0}  # Gemm: ORT rewrites it to MatMul first
STATIC_WEIGHTS = {"MatMul": 1, "Conv": 1, "ConvTranspose": 1, "Gemm": 1, "Gather": 0}


def quantize_model(
    model: ModelProto,
    mode: str,
    *,
    per_channel: bool = True,
    calibration: Sequence[Feed] = (),
    samples: int | None = None,
    batch_size: int = 32,
) -> ModelProto:
    """``model`` quantized to INT8 by ONNX Runtime (``mode`` one of :data:`QUANTIZE_MODES`); ``int8-static``
    calibrates activation ranges on the first ``samples`` of ``calibration`` in batches of ``batch_size``."""
    if mode not in QUANTIZE_MODES:
        raise InherccError(f"unknown `quantization.quantize` {mode!r}; choose from {', '.join(QUANTIZE_MODES)}")
    if mode == "int8-static" and not calibration:
        raise InherccError("`quantization.quantize` int8-static calibrates activations: it needs calibration data")
    from onnxruntime import quantization as q

    large = model.ByteSize() >= TWO_GB - (1 << 24)
    with _quiet(), tempfile.TemporaryDirectory(prefix="inhercc-quant-") as folder:
        src, dst = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        onnx.save_model(model, str(src), save_as_external_data=large, location="in.onnx.data")
        common: dict[str, Any] = {"per_channel": per_channel, "use_external_data_format": large}
        # ONNX's shape inference types no output of a contrib op (an optimized model's fused attention): float
        common["extra_options"] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        try:
            if mode == "int8":
                q.quantize_dynamic(src, dst, weight_type=q.QuantType.QInt8, **common)
            else:
                reader = FeedReader(model, calibration, samples, batch_size)
                q.quantize_static(
                    src,
                    dst,
                    reader,
                    quant_format=q.QuantFormat.QDQ,
                    activation_type=q.QuantType.QUInt8,  # U8S8: ORT's recommended format on x86-64 CPUs
                    weight_type=q.QuantType.QInt8,
                    **common,
                )
        except InherccError:
            raise
        except Exception as e:
            raise InherccError(f"ONNX Runtime could not quantize the model ({mode}): {one_line(e)}") from e
        return onnx.load_model(str(dst))


class FeedReader:
    """ONNX Runtime's ``CalibrationDataReader`` over calibration feeds: batches of ``batch_size`` of the model's
    inputs, at most ``samples`` samples in all (None: every one)."""

    def __init__(self, model: ModelProto, parts: Sequence[Feed], samples: int | None, batch_size: int) -> None:
        self.names = {i.name for i in model.graph.input} - set(initializer_map(model))
        self.batches = self._batches(model, parts, samples, batch_size)

    def _batches(self, model: ModelProto, parts: Sequence[Feed], samples: int | None, size: int) -> Iterator[Feed]:
        """The model's inputs of ``parts`` in batches of ``size``, cut after ``samples`` samples."""
        left = samples
        for part in parts:
            for batch in model_batches(model, {k: v for k, v in part.items() if k in self.names}, size):
                if left is not None and left <= 0:
                    return
                n = len(next(iter(batch.values())))
                if left is not None and n > left:
                    batch = {k: v[:left] for k, v in batch.items()}
                left = None if left is None else left - n
                yield batch

    def get_next(self) -> Feed | None:
        return next(self.batches, None)

    def rewind(self) -> None:  # part of ORT's reader protocol; calibration reads once
        pass


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer advises pre-processing on the root logger and warns about opsets: silenced."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class WeightQuant(NamedTuple):
    """How ONNX Runtime quantizes one weight: along ``axis`` (one scale per slice; None: one for the tensor),
    symmetric int8 in [-127, 127], else asymmetric uint8 in [0, 255] with a zero point."""

    axis: int | None
    symmetric: bool


def quantized_weights(model: ModelProto, mode: str, per_channel: bool = True) -> dict[str, WeightQuant]:
    """Initializer name → how ``mode`` quantizes it, for every float constant weight ONNX Runtime quantizes:
    MatMul / Gemm / Conv weights symmetric int8 (per output channel with ``per_channel``; dynamic Conv always per
    tensor, as ORT's ConvInteger wants), Gather tables as activations (uint8, one scale)."""
    ops = DYNAMIC_WEIGHTS if mode == "int8" else STATIC_WEIGHTS
    inits = initializer_map(model)
    out: dict[str, WeightQuant] = {}
    for node in model.graph.node:
        at = ops.get(node.op_type)
        if at is None or len(node.input) <= at or node.input[at] not in inits:
            continue
        weight = inits[node.input[at]]
        if weight.data_type != onnx.TensorProto.FLOAT or (mode == "int8" and not _plain_gemm(node)):
            continue
        if node.op_type == "Gather":
            out[weight.name] = WeightQuant(None, False)
        elif node.op_type == "Conv" and mode == "int8":  # ORT's ConvInteger takes one weight scale
            out[weight.name] = WeightQuant(None, True)
        else:
            out[weight.name] = WeightQuant(_channel_axis(node, len(weight.dims)) if per_channel else None, True)
    return out


def _plain_gemm(node: onnx.NodeProto) -> bool:
    """Not a Gemm, or one dynamic quantization rewrites to MatMul (alpha = beta = 1, A not transposed) and so
    quantizes; it leaves the others float."""
    if node.op_type != "Gemm":
        return True
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)


def _channel_axis(node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of a node's weight: the last for MatMul, 0 for Conv, 1 for ConvTranspose (group
    1), Gemm's by ``transB``."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1


GRAPH_OUTPUT_SUFFIX = "_QuantizeLinear_Input"  # ORT's name for the producer's tensor of a quantized graph output


class ActivationRange(NamedTuple):
    """How a static QDQ model quantizes one activation: ``round(x / scale) + zero_point`` clipped to [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


def activation_ranges(qdq: ModelProto) -> dict[str, ActivationRange]:
    """Tensor name → its calibrated quantization, for every activation (not an initializer) a static QDQ model
    (:func:`quantize_model` ``int8-static``) quantizes with one scale."""
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    out = {}
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        scale, zero = inits.get(node.input[1]), inits.get(node.input[2])
        if scale is None or zero is None or scale.size != 1:
            continue
        info = np.iinfo(zero.dtype)
        name = node.input[0].removesuffix(GRAPH_OUTPUT_SUFFIX)  # a graph output ORT quantizes is renamed so
        out[name] = ActivationRange(float(scale), int(zero), int(info.min), int(info.max))
    return out


def qdq_weights(qdq: ModelProto) -> dict[str, WeightQuant]:
    """Initializer name → how a static QDQ model (:func:`quantize_model` ``int8-static``) stores it, read from the
    model itself: every ``<name>_quantized`` 8-bit initializer behind a ``DequantizeLinear`` (weights per channel
    or per tensor, and the constants of Add / Mul, which ORT quantizes as activations); int32 biases left out."""
    inits = {t.name: t for t in qdq.graph.initializer}
    out = {}
    for node in qdq.graph.node:
        stored = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if stored is None or not node.input[0].endswith("_quantized") or len(node.input) < 2:
            continue
        if stored.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.size > 1 else None
        out[node.input[0].removesuffix("_quantized")] = WeightQuant(axis, stored.data_type == onnx.TensorProto.INT8)
    return out


def dynamic_activations(model: ModelProto, per_channel: bool = True) -> list[str]:
    """The tensors dynamic quantization (``int8``) quantizes at run time: the data inputs of the MatMul / Conv /
    Gemm nodes whose weight it quantizes (:func:`quantized_weights`), but rows of a quantized Gather table."""
    weights = quantized_weights(model, "int8", per_channel)
    # rows of a quantized Gather table stay quantized: ORT feeds them to MatMulInteger as they are
    gathered = {n.output[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in weights}
    found = [n.input[0] for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm") and n.input[1] in weights]
    return list(dict.fromkeys(name for name in found if name not in gathered))


def quantized_node_counts(model: ModelProto) -> dict[str, int]:
    """How many of each quantization op a model holds (what the report and tests read)."""
    kinds = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear", "DequantizeLinear")
    counts = {k: 0 for k in kinds}
    for node in model.graph.node:
        if node.op_type in counts or node.op_type.startswith("QLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {k: v for k, v in counts.items() if v}


class FactorPair(NamedTuple):
    """Two chained factor nodes: ``mid`` (the rank-r bottleneck) = node(x, ``w_in``) → node(mid, ``w_out``);
    the bottleneck's channels lie on ``w_in``'s ``in_axis``, ``w_out``'s ``out_axis`` and ``mid``'s ``mid_axis``."""

    mid: str
    w_in: str
    in_axis: int
    w_out: str
    out_axis: int
    mid_axis: int


# op -> (bottleneck axis of the input factor, of the output factor, of the bottleneck tensor); Gemm by transB
PAIR_AXES = {"MatMul": (-1, 0, -1), "Conv": (0, 1, 1), "Gemm": (-1, 0, -1)}
GEMM_TRANS_B_AXES = (0, 1, -1)  # both Gemms with transB = 1: W_in [r, in], W_out [out, r]


def factor_pairs(model: ModelProto) -> list[FactorPair]:
    """The factor pairs (``<w>.inherit_in`` → ``<w>.inherit_out``, MatMul, Gemm or group-1 Conv without a bias on
    the first) whose bottleneck feeds only the second factor; a gated multi-head layer is left out (its gate reads
    the bottleneck)."""
    inits = initializer_map(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        w_in = node.input[1] if len(node.input) > 1 else ""
        if node.op_type not in PAIR_AXES or not w_in.endswith(".inherit_in") or w_in not in inits:
            continue
        base, mid = w_in[: -len(".inherit_in")], node.output[0]
        nxt = readers.get(mid, [])
        if len(nxt) != 1 or nxt[0].op_type != node.op_type or f"{base}.inherit_gate" in inits:
            continue
        second = nxt[0]
        if second.input[0] != mid or second.input[1] not in inits or not second.input[1].endswith(".inherit_out"):
            continue
        if node.op_type == "Conv" and (len(node.input) > 2 or _grouped(node) or _grouped(second)):
            continue
        axes = _gemm_axes(node, second) if node.op_type == "Gemm" else PAIR_AXES[node.op_type]
        if axes is not None:
            pairs.append(FactorPair(mid, w_in, axes[0], second.input[1], axes[1], axes[2]))
    return pairs


def _gemm_axes(first: onnx.NodeProto, second: onnx.NodeProto) -> tuple[int, int, int] | None:
    """A Gemm pair's bottleneck axes (by ``transB``, which both factors share); None when the first factor has a
    bias (equalizing would have to rescale it) or either transposes its input."""
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in (first, second)]
    if (len(first.input) > 2 and first.input[2]) or any(a.get("transA", 0) for a in attrs):
        return None
    trans = {a.get("transB", 0) for a in attrs}
    if len(trans) != 1:
        return None
    return GEMM_TRANS_B_AXES if trans == {1} else PAIR_AXES["Gemm"]


def _grouped(node: onnx.NodeProto) -> bool:
    return any(a.name == "group" and a.i != 1 for a in node.attribute)


def bottleneck_ranges(
    model: ModelProto, pairs: Sequence[FactorPair], calibration: Sequence[Feed], samples: int | None, batch_size: int
) -> dict[str, np.ndarray]:
    """Per bottleneck, the largest magnitude of each channel over the calibration samples (ONNX Runtime);
    without samples, each input-factor slice's L2 norm (inputs taken as of unit scale)."""
    if not calibration:
        inits = initializer_map(model)
        out = {}
        for p in pairs:
            w = numpy_helper.to_array(inits[p.w_in])
            axis = p.in_axis % w.ndim
            out[p.mid] = np.sqrt((np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) ** 2).sum(1))
        return out
    tapped, names = with_outputs(model, [p.mid for p in pairs])
    session = make_session(tapped)
    axes = {p.mid: p.mid_axis for p in pairs}
    ranges: dict[str, np.ndarray] = {}
    for batch in FeedReader(model, calibration, samples, batch_size).batches:
        for name, value in zip(names, session.run(names, batch)):
            v = np.moveaxis(np.abs(np.asarray(value, np.float32)), axes[name], 0)
            top = v.reshape(v.shape[0], -1).max(1)
            ranges[name] = np.maximum(ranges[name], top) if name in ranges else top
    return ranges


def equalize_factor_pairs(
    model: ModelProto, calibration: Sequence[Feed] = (), samples: int | None = None, batch_size: int = 32
) -> tuple[ModelProto, int]:
    """A copy of ``model`` with every :func:`factor_pairs` pair rescaled across its bottleneck so channel ``j``'s
    activation range and ``w_out``'s slice ``j`` range meet at their geometric mean (``s_j = √(a_j / w_j)``:
    ``w_in`` slice ÷ s_j, ``w_out`` slice × s_j; the function is unchanged). Returns it and the pairs done."""
    pairs = factor_pairs(model)
    if not pairs:
        return model, 0
    ranges = bottleneck_ranges(model, pairs, calibration, samples, batch_size)
    out = ModelProto()
    out.CopyFrom(model)
    inits = initializer_map(out)
    for p in pairs:
        w_in, w_out = numpy_helper.to_array(inits[p.w_in]), numpy_helper.to_array(inits[p.w_out])
        out_axis = p.out_axis % w_out.ndim
        w_max = np.abs(np.moveaxis(w_out, out_axis, 0)).reshape(w_out.shape[out_axis], -1).max(1)
        a_max = ranges[p.mid]
        ok = (a_max > 0) & (w_max > 0) & np.isfinite(a_max)
        scale = np.where(ok, np.sqrt(np.where(ok, a_max, 1.0) / np.where(ok, w_max, 1.0)), 1.0).astype(np.float32)
        inits[p.w_in].CopyFrom(numpy_helper.from_array(w_in / _along(scale, p.in_axis, w_in.ndim), p.w_in))
        inits[p.w_out].CopyFrom(numpy_helper.from_array(w_out * _along(scale, out_axis, w_out.ndim), p.w_out))
    return out, len(pairs)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``v`` shaped to broadcast along ``axis`` of an ``ndim``-array."""
    shape = [1] * ndim
    shape[axis % ndim] = len(v)
    return v.reshape(shape)
