"""OnnxModule: an ONNX graph as a differentiable torch module whose parameters are its initializers.

Built once from a ModelProto: every floating-point initializer becomes an `nn.Parameter` (reachable by
its ONNX name through `parameter()` / `onnx_parameters()`), other initializers become buffers, and the
node plan (topological order, parsed attributes, chosen kernels, constant-folded subgraphs, where each
value lives, when it can be freed) is fixed at construction. `forward` then only runs kernels.

Where values live: parameters, graph inputs and everything computed from them live on the module's
device. Shape arithmetic (Shape, Size, and whatever is computed only from them and constants) stays on
the CPU, so reading a shape into Python (Reshape, Slice, Expand …) never waits for a GPU. A host value
that meets device values is copied over at that node; constants are held on both sides as needed.

Memory: a value is dropped as soon as its last consumer ran, and an elementwise op whose input is a
temporary that nothing else reads writes its result into that input's memory when autograd allows.

The graph runs with the semantics written in it whatever `train()`/`eval()` says: inference Dropout is
the identity, BatchNormalization uses the graph's statistics unless the graph sets training_mode.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from inhercc.errors import InherccError
from inhercc.torchrt import ops as _ops  # noqa: F401  (fills the op registry)
from inhercc.torchrt.dtypes import from_numpy, is_float, tensor_from_proto, tensor_to_proto, torch_dtype
from inhercc.torchrt.ops.registry import (
    Kernel,
    NodeContext,
    OpSpec,
    Unsupported,
    inplace_of,
    lookup,
    schema_version,
)


class UnsupportedModelError(InherccError):
    """The model uses ops, attributes or types the torch runtime lacks; `problems` lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"the torch runtime cannot run this model ({len(self.problems)} unsupported): " + "; ".join(self.problems)
        )


class _Step:
    """One node of the plan: kernel, input/output slots, host→device copies, slots freed afterwards,
    and the in-place variant to use with and without autograd (position, kernel) or None."""

    __slots__ = ("name", "kernel", "inputs", "outputs", "moves", "anchor", "free", "inplace_grad", "inplace_nograd")

    def __init__(
        self,
        name: str,
        kernel: Kernel,
        inputs: tuple[int, ...],
        outputs: tuple[int, ...],
        moves: tuple[int, ...],
        anchor: int,
    ) -> None:
        self.name = name
        self.kernel = kernel
        self.inputs = inputs  # slot per input position, -1 = omitted optional input
        self.outputs = outputs  # slot per output position, -1 = omitted output
        self.moves = moves  # input positions holding host values to copy to the device
        self.anchor = anchor  # an input position already on the device (-1 if none)
        self.free: tuple[int, ...] = ()
        # (position, kernel, only if the other inputs do not require grad)
        self.inplace_grad: tuple[int, Kernel, bool] | None = None
        self.inplace_nograd: tuple[int, Kernel, bool] | None = None


_NO_SLOT = -1


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {_domain(o.domain): o.version for o in model.opset_import}


def _topological(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced first (stable for already-sorted graphs)."""
    available = set(known) | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted(
                {
                    i
                    for n in remaining
                    for i in n.input
                    if i not in available and not any(i in m.output for m in remaining)
                }
            )
            raise InherccError(f"graph is not executable: undefined values {missing[:10]}")
        pending = remaining
    return ordered


def _attribute_name(name: str, taken: set[str], owner: nn.Module) -> str:
    """A valid, unique nn.Module attribute name for an ONNX value name."""
    base = re.sub(r"\W", "_", name) or "value"
    if base[0].isdigit():
        base = "_" + base
    candidate, n = base, 0
    while candidate in taken or hasattr(owner, candidate):
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


class OnnxModule(nn.Module):
    """An ONNX model as an `nn.Module`.

    forward(*inputs, **named_inputs) takes the graph inputs (positionally in graph order, or by ONNX
    name; numpy arrays or tensors, cast to the declared dtype and moved to the module's device) and
    returns a tuple: the graph outputs in graph order, followed by the `extra_outputs` in the order
    given (`output_names` lists them).
    """

    def __init__(self, model: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> None:
        super().__init__()
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        graph = model.graph
        if len(graph.sparse_initializer):
            raise UnsupportedModelError(["sparse initializers"])
        opsets = _opsets(model)
        problems: dict[str, list[str]] = {}

        self.initializers = nn.Module()  # parameters (float) and buffers (other types)
        self.constants = nn.Module()  # device copies of folded constants (non-persistent buffers)
        self._param_attr: dict[str, str] = {}
        self._buffer_attr: dict[str, str] = {}
        self._initializer_types: dict[str, tuple[int, tuple[int, ...]]] = {}
        taken: set[str] = set()
        constants: dict[str, torch.Tensor] = {}  # name -> build-time value (CPU, not trainable)
        for init in graph.initializer:
            try:
                torch_dtype(init.data_type)
            except InherccError as e:
                problems.setdefault(f"initializer {init.name!r}: {e}", [])
                continue
            value = tensor_from_proto(init)
            attr = _attribute_name(init.name, taken, self.initializers)
            self._initializer_types[init.name] = (init.data_type, tuple(init.dims))
            if is_float(value.dtype):
                self.initializers.register_parameter(attr, nn.Parameter(value))
                self._param_attr[init.name] = attr
            else:
                self.initializers.register_buffer(attr, value)
                self._buffer_attr[init.name] = attr
                constants[init.name] = value

        self._input_names = [i.name for i in graph.input if i.name not in self._initializer_types]
        self._input_dtypes: list[torch.dtype | None] = []
        for value_info in graph.input:
            if value_info.name in self._initializer_types:
                continue
            tensor_type = value_info.type.tensor_type
            if not value_info.type.HasField("tensor_type"):
                problems.setdefault(f"graph input {value_info.name!r} is not a tensor", [])
                self._input_dtypes.append(None)
                continue
            try:
                self._input_dtypes.append(torch_dtype(tensor_type.elem_type) if tensor_type.elem_type else None)
            except InherccError as e:
                problems.setdefault(f"graph input {value_info.name!r}: {e}", [])
                self._input_dtypes.append(None)
        self._graph_output_names = [o.name for o in graph.output]

        known = set(self._input_names) | {init.name for init in graph.initializer}
        runtime_nodes: list[tuple[onnx.NodeProto, OpSpec, Kernel]] = []
        for node in _topological(graph, known):
            domain = _domain(node.domain)
            opset = opsets.get(domain)
            label = f"{domain or 'ai.onnx'}::{node.op_type}"
            if opset is None:
                problems.setdefault(f"{label}: domain not imported", []).append(node.name)
                continue
            try:
                spec = lookup(domain, node.op_type, opset)
                ctx = NodeContext(node, opset, _schema_version(spec, opset), constants.get)
                kernel = spec.build(ctx)
                unread = ctx.unread_attributes()
                if unread:
                    raise Unsupported(f"attribute {', '.join(unread)}")
            except (Unsupported, InherccError) as e:
                problems.setdefault(f"{label} (opset {opset}): {e}", []).append(node.name)
                continue
            inputs = [i for i in node.input if i]
            if spec.deterministic and all(i in constants for i in inputs):
                constants.update(_fold(node, kernel, constants))
            else:
                runtime_nodes.append((node, spec, kernel))
        if problems:
            raise UnsupportedModelError(
                [
                    p
                    + (
                        f" [nodes: {', '.join(n or '?' for n in names[:5])}{' …' if len(names) > 5 else ''}]"
                        if names
                        else ""
                    )
                    for p, names in problems.items()
                ]
            )

        self._build_plan(runtime_nodes, constants)
        self._extra_outputs: list[str] = []
        self.set_extra_outputs(extra_outputs)

    # ----------------------------------------------------------------------------------------- plan
    def _build_plan(
        self, runtime_nodes: list[tuple[onnx.NodeProto, OpSpec, Kernel]], constants: dict[str, torch.Tensor]
    ) -> None:
        """Assign slots, decide host/device placement per node, and prepare the step list."""
        self._slot: dict[str, int] = {}
        self._param_slots: list[tuple[int, str]] = []  # (slot, initializers attribute)
        self._buffer_slots: list[tuple[int, nn.Module, str]] = []  # (slot, owner module, attribute)
        self._template: list[torch.Tensor | None] = []
        self._constants = constants
        self._device_const_slot: dict[str, int] = {}
        self._host_const_slot: dict[str, int] = {}
        self._taken_constant_attrs: set[str] = set()

        for name in self._input_names:
            self._new_slot(name)
        for name, attr in self._param_attr.items():
            self._param_slots.append((self._new_slot(name), attr))

        host: set[str] = set()
        self._steps: list[_Step] = []
        self._producer: dict[int, tuple[OpSpec, int]] = {}  # node-output slot -> (op, its output position)
        self._uses: dict[int, int] = {}  # slot -> number of input positions reading it
        for node, spec, kernel in runtime_nodes:
            data = [
                (p, n) for p, n in enumerate(node.input) if n and p not in spec.static_inputs and n not in constants
            ]
            on_host = all(n in host for _, n in data)
            slots: list[int] = []
            for p, name in enumerate(node.input):
                if not name:
                    slots.append(_NO_SLOT)
                elif name in constants:
                    use_host = on_host or p in spec.static_inputs
                    slots.append(self._host_constant(name) if use_host else self._device_constant(name))
                else:
                    slots.append(self._slot[name])
            moves: tuple[int, ...] = ()
            anchor = _NO_SLOT
            if not on_host:
                moves = tuple(p for p, n in data if n in host)
                anchor = next(p for p, n in data if n not in host)
            outputs = tuple(self._new_slot(n) if n else _NO_SLOT for n in node.output)
            if on_host:
                host.update(n for n in node.output if n)
            for slot in slots:
                if slot != _NO_SLOT:
                    self._uses[slot] = self._uses.get(slot, 0) + 1
            for position, slot in enumerate(outputs):
                if slot != _NO_SLOT:
                    self._producer[slot] = (spec, position)
            self._steps.append(_Step(node.name or node.op_type, kernel, tuple(slots), outputs, moves, anchor))

    def _new_slot(self, name: str | None) -> int:
        self._template.append(None)
        slot = len(self._template) - 1
        if name is not None:
            self._slot[name] = slot
        return slot

    def _host_constant(self, name: str) -> int:
        """Slot holding the CPU value of a constant (for host nodes and shape inputs)."""
        if name not in self._host_const_slot:
            slot = self._new_slot(None)
            self._template[slot] = self._constants[name]
            self._host_const_slot[name] = slot
        return self._host_const_slot[name]

    def _device_constant(self, name: str) -> int:
        """Slot holding a constant as a buffer that follows the module to its device."""
        if name not in self._device_const_slot:
            slot = self._new_slot(None)
            if name in self._buffer_attr:
                self._buffer_slots.append((slot, self.initializers, self._buffer_attr[name]))
            else:
                attr = _attribute_name(name, self._taken_constant_attrs, self.constants)
                self.constants.register_buffer(attr, self._constants[name], persistent=False)
                self._buffer_slots.append((slot, self.constants, attr))
            self._device_const_slot[name] = slot
        return self._device_const_slot[name]

    def _result_slot(self, name: str) -> int:
        if name in self._slot:
            return self._slot[name]
        if name in self._constants:
            return self._device_constant(name)
        raise InherccError(f"no value named {name!r} in the graph")

    def set_extra_outputs(self, names: Iterable[str]) -> None:
        """Also return these intermediate values (after the graph outputs), e.g. for feature losses."""
        names = list(names)
        result_slots = [self._result_slot(n) for n in [*self._graph_output_names, *names]]
        self._extra_outputs = names
        self._result_slots = tuple(result_slots)
        keep = set(result_slots)
        last_use: dict[int, int] = {}
        for index, step in enumerate(self._steps):
            for slot in (*step.inputs, *step.outputs):
                if slot != _NO_SLOT:
                    last_use[slot] = index
        transient = {self._slot[n] for n in self._input_names} | {
            s for step in self._steps for s in step.outputs if s != _NO_SLOT
        }
        frees: dict[int, list[int]] = {}
        for slot, index in last_use.items():
            if slot in transient and slot not in keep:
                frees.setdefault(index, []).append(slot)
        for index, step in enumerate(self._steps):
            step.free = tuple(frees.get(index, ()))
            self._choose_inplace(step, keep)

    def _choose_inplace(self, step: _Step, keep: set[int]) -> None:
        """Pick the in-place variant a step may use: the overwritten input must be a temporary that only
        this step reads, made by an op that returns fresh memory; with autograd, the variant must be
        differentiable and the producer's backward must not keep that output (extra outputs such as
        LayerNormalization's mean are kept by its backward, so only first outputs qualify)."""
        step.inplace_grad = step.inplace_nograd = None
        inplace = inplace_of(step.kernel)
        if inplace is None:
            return
        for position, variant in inplace.variants.items():
            slot = step.inputs[position] if position < len(step.inputs) else _NO_SLOT
            if slot not in self._producer:
                continue
            producer, output_position = self._producer[slot]
            if not producer.fresh or slot in keep or self._uses.get(slot) != 1 or position in step.moves:
                continue
            if step.inplace_nograd is None:
                step.inplace_nograd = (position, variant, False)
            if (
                step.inplace_grad is None
                and inplace.grad != "never"
                and not producer.saves_output
                and output_position == 0
            ):
                step.inplace_grad = (position, variant, inplace.grad == "if_others_constant")

    # ---------------------------------------------------------------------------------------- run
    @property
    def input_names(self) -> list[str]:
        """Graph inputs (initializers excluded), in the order forward takes them."""
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        """Names of forward's results: graph outputs, then extra outputs."""
        return [*self._graph_output_names, *self._extra_outputs]

    def _device(self) -> torch.device | None:
        for p in self.initializers.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return None

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        if len(args) > len(self._input_names):
            raise InherccError(f"{len(args)} inputs given, the graph takes {len(self._input_names)}")
        given: dict[str, Any] = dict(zip(self._input_names, args))
        for name, value in kwargs.items():
            if name not in self._input_names:
                raise InherccError(f"unknown graph input {name!r} (inputs: {self._input_names})")
            if name in given:
                raise InherccError(f"graph input {name!r} given twice")
            given[name] = value
        missing = [n for n in self._input_names if n not in given]
        if missing:
            raise InherccError(f"missing graph inputs: {missing}")
        device = self._device()
        feeds = []
        for name, dtype in zip(self._input_names, self._input_dtypes):
            value = given[name]
            tensor = value if isinstance(value, torch.Tensor) else from_numpy(np.asarray(value))
            if (dtype is not None and tensor.dtype != dtype) or (device is not None and tensor.device != device):
                tensor = tensor.to(device=device, dtype=dtype)
            feeds.append(tensor)
        return feeds

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """Run the graph; see the class docstring for the input and output conventions."""
        vals = list(self._template)
        for slot, tensor in zip((self._slot[n] for n in self._input_names), self._bind(args, kwargs)):
            vals[slot] = tensor
        # getattr (not _parameters[...]) so torch.func.functional_call and parametrizations apply
        initializers = self.initializers
        for slot, attr in self._param_slots:
            vals[slot] = getattr(initializers, attr)
        for slot, owner, attr in self._buffer_slots:
            vals[slot] = getattr(owner, attr)
        tensor_type = torch.Tensor
        grad = torch.is_grad_enabled()
        for step in self._steps:
            inputs = [vals[i] if i >= 0 else None for i in step.inputs]
            if step.moves:
                device = inputs[step.anchor].device
                for p in step.moves:
                    inputs[p] = inputs[p].to(device)
            kernel = step.kernel
            inplace = step.inplace_grad if grad else step.inplace_nograd
            if inplace is not None and _fits(inputs, inplace[0], inplace[2]):
                kernel = inplace[1]
            try:
                out = kernel(*inputs)
            except Exception as e:
                shapes = ", ".join("-" if t is None else f"{tuple(t.shape)} {t.dtype}" for t in inputs)
                raise InherccError(f"node {step.name!r} failed on inputs [{shapes}]: {type(e).__name__}: {e}") from e
            if isinstance(out, tensor_type):
                vals[step.outputs[0]] = out
            else:
                for slot, value in zip(step.outputs, out):
                    if slot >= 0:
                        vals[slot] = value
            for slot in step.free:
                vals[slot] = None
        return tuple(vals[i] for i in self._result_slots)

    # ---------------------------------------------------------------------------------- parameters
    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """ONNX initializer name -> parameter, for every floating-point initializer (graph order)."""
        return {name: self.initializers._parameters[attr] for name, attr in self._param_attr.items()}

    def onnx_buffers(self) -> dict[str, torch.Tensor]:
        """ONNX initializer name -> buffer, for the non-floating-point initializers."""
        return {name: self.initializers._buffers[attr] for name, attr in self._buffer_attr.items()}

    def parameter(self, name: str) -> nn.Parameter:
        """The parameter holding the floating-point initializer `name`."""
        try:
            return self.initializers._parameters[self._param_attr[name]]
        except KeyError:
            raise InherccError(f"no floating-point initializer named {name!r}") from None

    def set_trainable(self, names: Iterable[str] | None) -> None:
        """requires_grad for exactly these initializers (None: every floating-point initializer)."""
        chosen = set(self._param_attr) if names is None else set(names)
        unknown = sorted(chosen - set(self._param_attr))
        if unknown:
            raise InherccError(
                f"not floating-point initializers of this model: {unknown[:10]}"
                + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
            )
        for name, param in self.onnx_parameters().items():
            param.requires_grad_(name in chosen)

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` whose initializers hold this module's current values (names, dtypes, shapes kept)."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        current = {**self.onnx_parameters(), **self.onnx_buffers()}
        seen: set[str] = set()
        for init in out.graph.initializer:
            value = current.get(init.name)
            if value is None:
                continue
            if tuple(value.shape) != tuple(init.dims):
                raise InherccError(
                    f"initializer {init.name!r}: model has shape {tuple(init.dims)}, module has {tuple(value.shape)}"
                )
            proto = tensor_to_proto(value, init.name, init.data_type)
            proto.doc_string = init.doc_string
            init.CopyFrom(proto)
            seen.add(init.name)
        missing = sorted(set(current) - seen)
        if missing:
            raise InherccError(f"model lacks initializers of this module: {missing[:10]}")
        return out

    def extra_repr(self) -> str:
        return (
            f"inputs={self._input_names}, outputs={self.output_names}, steps={len(self._steps)}, "
            f"parameters={len(self._param_attr)}"
        )


def _fits(inputs: Sequence[torch.Tensor | None], position: int, others_constant: bool) -> bool:
    """Whether the result can be written into inputs[position]: a floating tensor of the same dtype and
    device as the others, whose shape is already the broadcast shape (others broadcast into it); with
    `others_constant`, the other inputs must not require grad."""
    target = inputs[position]
    if not target.is_floating_point():
        return False
    shape = target.shape
    for other in inputs:
        if other is None or other is target:
            continue
        if other.dtype != target.dtype or other.device != target.device or other.dim() > len(shape):
            return False
        if others_constant and other.requires_grad:
            return False
        for mine, theirs in zip(reversed(shape), reversed(other.shape)):
            if theirs != mine and theirs != 1:
                return False
    return True


def _schema_version(spec: OpSpec, opset: int) -> int:
    """The ONNX schema version the node follows (what builders branch on)."""
    return schema_version(spec.domain, spec.op_type, opset) or opset


def _fold(node: onnx.NodeProto, kernel: Kernel, constants: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Evaluate a node whose inputs are all build-time constants."""
    inputs = [constants[i] if i else None for i in node.input]
    try:
        with torch.no_grad():
            out = kernel(*inputs)
    except Exception as e:
        raise InherccError(f"node {node.name or node.op_type!r} failed on constant inputs: {e}") from e
    values = [out] if isinstance(out, torch.Tensor) else list(out)
    return {name: value for name, value in zip(node.output, values) if name}
