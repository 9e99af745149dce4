"""Fake quantization of an :class:`~inhercc.torchrt.module.OnnxModule`'s weights, for quantization-aware training.

:func:`fake_quantize_weights` puts a torch parametrization on each chosen initializer: the forward then reads
the weight rounded to the int8 grid ONNX Runtime's quantizer will use (symmetric, one scale per output channel
or per tensor: ``scale = max|w| / 127``, zero point 0, values in [-127, 127]; or asymmetric uint8 with a zero
point for tables quantized as activations) through ``torch.fake_quantize_per_channel_affine`` /
``…_per_tensor_affine``, whose gradient passes straight through inside the range. The parameter itself stays
float32 and is what the optimizer updates; :func:`remove_fake_quant` takes the parametrizations off again
(the float weights kept), so the module writes its plain weights back to ONNX.

Activations are fake-quantized in the graph the module is built from: :func:`with_activation_fake_quant`
routes every reader of a quantized tensor through a ``FakeQuantize`` node (a training-only op of this runtime)
with the scale and zero point ONNX Runtime calibrated (static), or computed from each batch's range as its
``DynamicQuantizeLinear`` does (dynamic); the module's parameters keep their names, so it writes back into the
plain student.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
import torch
from onnx import helper
from torch import nn
from torch.nn.utils import parametrize

from inhercc.errors import InherccError
from inhercc.torchrt.ops.registry import Kernel, NodeContext, register

INT8_MIN, INT8_MAX = -127, 127  # ONNX Runtime's symmetric int8 weight range
UINT8_MIN, UINT8_MAX = 0, 255
DOMAIN = "inhercc.fakequant"  # the training-only op below: never in a written model


class FakeQuant(nn.Module):
    """A weight as its int8 round trip: symmetric per channel along ``axis`` (None: per tensor), or asymmetric
    uint8 per tensor (``symmetric`` False). Scales follow the weight at every forward (no gradient through them)."""

    def __init__(self, axis: int | None, symmetric: bool = True) -> None:
        super().__init__()
        self.axis, self.symmetric = axis, symmetric

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            return _asymmetric(w)
        if self.axis is None:
            scale = _scale(w.detach().abs().max())
            return torch.fake_quantize_per_tensor_affine(w, scale, 0, INT8_MIN, INT8_MAX)
        axis = self.axis % w.dim()
        dims = [d for d in range(w.dim()) if d != axis]
        scale = _scale(w.detach().abs().amax(dim=dims) if dims else w.detach().abs())
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, INT8_MIN, INT8_MAX)


def _scale(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax / 127`` in float32 (ONNX Runtime's symmetric int8 scale); 1 where the weight is all zero."""
    scale = absmax.float() / INT8_MAX
    return torch.where(scale > torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))


def _asymmetric(w: torch.Tensor) -> torch.Tensor:
    """Per tensor uint8 with a zero point, the range stretched to hold 0 (ONNX Runtime's activation scheme, and
    its ``DynamicQuantizeLinear``)."""
    lo = torch.clamp(w.detach().min(), max=0.0).float()
    hi = torch.clamp(w.detach().max(), min=0.0).float()
    scale = (hi - lo) / (UINT8_MAX - UINT8_MIN)
    if not scale > torch.finfo(torch.float32).tiny:
        return w
    zero = int(torch.round(UINT8_MIN - lo / scale).clamp(UINT8_MIN, UINT8_MAX))
    return torch.fake_quantize_per_tensor_affine(w, float(scale), zero, UINT8_MIN, UINT8_MAX)


def _attribute_of(module: nn.Module, param: nn.Parameter) -> tuple[nn.Module, str]:
    """The submodule and attribute name holding ``param`` (found by identity)."""
    for owner in module.modules():
        for name, p in owner.named_parameters(recurse=False):
            if p is param:
                return owner, name
    raise InherccError(f"parameter not found in the module ({tuple(param.shape)})")


def fake_quantize_weights(module: nn.Module, weights: Mapping[str, tuple[int | None, bool]]) -> list[str]:
    """Fake-quantize the ONNX initializers ``weights`` (name → (axis, symmetric), as
    :func:`inhercc.quantize.quantized_weights` gives) of an ``OnnxModule``; names it holds no float parameter
    for are skipped. Returns the names done."""
    done = []
    params = module.onnx_parameters()  # type: ignore[operator]
    for name, (axis, symmetric) in weights.items():
        param = params.get(name)
        if param is None or not param.is_floating_point():
            continue
        owner, attr = _attribute_of(module, param)
        parametrize.register_parametrization(owner, attr, FakeQuant(axis, symmetric))
        done.append(name)
    return done


def remove_fake_quant(module: nn.Module) -> int:
    """Take every fake-quant parametrization off (the float weights stay the parameters). Returns how many."""
    removed = 0
    for owner in list(module.modules()):
        if not parametrize.is_parametrized(owner):
            continue
        for attr in list(owner.parametrizations.keys()):  # type: ignore[union-attr]
            if any(isinstance(p, FakeQuant) for p in owner.parametrizations[attr]):  # type: ignore[index]
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
                removed += 1
    return removed


@register("FakeQuantize", since=1, domain=DOMAIN, fresh=True)
def _fake_quantize_op(ctx: NodeContext) -> Kernel:
    """``x`` through its quantization round trip, per tensor (straight-through gradient inside the range): at a
    calibrated scale and zero point, or (``dynamic``) at the ones ONNX Runtime's ``DynamicQuantizeLinear`` computes
    from each batch's range."""
    if ctx.attr("dynamic", 0):
        return _asymmetric
    scale, zero = float(ctx.attr("scale")), int(ctx.attr("zero_point"))
    qmin, qmax = int(ctx.attr("qmin")), int(ctx.attr("qmax"))
    return lambda x: torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)


def with_activation_fake_quant(
    model: onnx.ModelProto, ranges: Mapping[str, tuple[float, int, int, int] | None]
) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes read each tensor of ``ranges`` (name → (scale, zero point, qmin, qmax),
    e.g. :func:`inhercc.quantize.activation_ranges`; None: uint8 at each batch's range, as dynamic quantization)
    through a ``FakeQuantize`` node; a graph output among them is fake-quantized where it is produced (ONNX
    Runtime quantizes it too)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    outputs = {o.name for o in graph.output}
    wanted = {name: f"{name}.fake_quant" for name in ranges if name not in outputs}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in wanted:
                node.input[i] = wanted[name]
        for i, name in enumerate(node.output):
            if name in ranges and name in outputs:  # a graph output: its producer writes the float one first
                node.output[i] = f"{name}.before_fake_quant"
    added = []
    for name, given in ranges.items():
        source, target = (f"{name}.before_fake_quant", name) if name in outputs else (name, wanted[name])
        attrs = {"dynamic": 1} if given is None else dict(zip(("scale", "zero_point", "qmin", "qmax"), given))
        node = helper.make_node("FakeQuantize", [source], [target], domain=DOMAIN, name=f"{name}.fake_quant", **attrs)
        added.append(node)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(_placed(nodes, added, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def _placed(nodes: list[onnx.NodeProto], added: list[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` with each of ``added`` right after the producer of its input (graph inputs first)."""
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in added:
        by_input.setdefault(node.input[0], []).append(node)
    ordered = [n for name in known for n in by_input.pop(name, [])]
    for node in nodes:
        ordered.append(node)
        for name in node.output:
            ordered.extend(by_input.pop(name, []))
    return ordered
