"""OnnxModule: an ONNX graph as a differentiable torch module whose parameters are its initializers.

Built once from a ModelProto: every floating-point initializer becomes an `nn.Parameter` (reachable by
its ONNX name through `parameter()` / `onnx_parameters()`), other initializers become buffers, and the
node plan (topological order, parsed attributes, chosen kernels, constant-folded subgraphs, where each
value lives, when it can be freed) is fixed at construction. `forward` then only runs kernels.

Subgraphs (the bodies of If, Loop, Scan) get nested plans built by the same machinery. A body reads the
values of its enclosing graphs (outer scope) as extra inputs of its node's step, so they are placed, moved
and freed like any other input. Weights that live in a body (its floating-point initializers and Constant
nodes of two or more elements that no node reads as a static value: `inhercc.model.is_weight`, the rule
the model loader hoists weights out of bodies by) are parameters of the module like the top-level ones,
named by their ONNX names (qualified with the node and attribute when a name is taken), and `write_back`
writes them into the subgraph they came from.

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

import functools
import re
from collections import ChainMap
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from inhercc.errors import InherccError
from inhercc.model import implicit_inputs, is_weight, node_subgraphs, weight_constant
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
        self.inputs = inputs  # slot per input position (node inputs, then outer-scope values), -1 = omitted
        self.outputs = outputs  # slot per output position, -1 = omitted output
        self.moves = moves  # input positions holding host values to copy to the device
        self.anchor = anchor  # an input position already on the device (-1 if none)
        self.free: tuple[int, ...] = ()
        # (position, kernel, only if the other inputs do not require grad)
        self.inplace_grad: tuple[int, Kernel, bool] | None = None
        self.inplace_nograd: tuple[int, Kernel, bool] | None = None


_NO_SLOT = -1
# What a body reads from outside: ("value", name) resolved in the enclosing graph's scope, ("param", key)
# a module parameter, ("const", key) a device constant of the module.
Capture = tuple[str, str]
# Where a subgraph lives: (index of the node in its graph, graph attribute name) from the top graph down.
GraphPath = tuple[tuple[int, str], ...]


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {_domain(o.domain): o.version for o in model.opset_import}


def _has_weights(node: onnx.NodeProto) -> bool:
    """Whether a node's subgraphs (at any depth) hold initializers or floating-point Constant weights."""
    for _, sub in node_subgraphs(node):
        if any(is_weight(t) for t in sub.initializer) or any(weight_constant(n) or _has_weights(n) for n in sub.node):
            return True
    return False


def _topological(graph: onnx.GraphProto, known: set[str]) -> list[tuple[int, onnx.NodeProto]]:
    """(index in the graph, node) in an order where every input (outer-scope reads of subgraphs included)
    is produced first (stable for already-sorted graphs)."""
    available = set(known) | {""}
    nodes = list(graph.node)
    needs = [[*n.input, *sorted(implicit_inputs(n))] for n in nodes]
    pending = list(range(len(nodes)))
    ordered: list[tuple[int, onnx.NodeProto]] = []
    while pending:
        remaining = []
        for i in pending:
            if all(name in available for name in needs[i]):
                ordered.append((i, nodes[i]))
                available.update(nodes[i].output)
            else:
                remaining.append(i)
        if len(remaining) == len(pending):
            produced = {o for i in remaining for o in nodes[i].output}
            missing = sorted({n for i in remaining for n in needs[i] if n not in available and n not in produced})
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


class _Plan:
    """The execution plan of one graph (the model's graph or a subgraph body): value slots, steps, results.

    A body plan (`parent` set) reads what it does not define through captures (see `Capture`); its node's
    step passes them in. `host`: the body runs where its node runs on the host (no weights, host inputs).
    """

    def __init__(
        self,
        owner: OnnxModule,
        graph: onnx.GraphProto,
        formal: Sequence[str],
        constants: MutableMapping[str, torch.Tensor],
        parent: _Plan | None = None,
        host: bool = False,
        path: GraphPath = (),
    ) -> None:
        self.owner = owner
        self.graph = graph
        self.parent = parent
        self.host = host
        self.path = path
        self.constants = constants  # name -> build-time value (CPU, not trainable), outer scopes included
        self.template: list[torch.Tensor | None] = []
        self.slot: dict[str, int] = {}
        self.formal_slots = [self._new_slot(n) for n in formal]
        self.host_names: set[str] = set(formal) if host else set()
        self.local_params: dict[str, str] = {}  # body: local name -> module parameter key
        self.captures: list[Capture] = []
        self.capture_slots: list[int] = []
        self._capture_slot: dict[Capture, int] = {}
        self.pick: tuple[int, ...] = ()  # positions of this body's captures in its step's outer inputs
        self.steps: list[_Step] = []
        self.producer: dict[int, tuple[OpSpec, int]] = {}  # node-output slot -> (op, its output position)
        self.uses: dict[int, int] = {}  # slot -> number of input positions reading it
        self._host_const_slot: dict[str, int] = {}
        self._device_const_slot: dict[str, int] = {}
        self.result_slots: tuple[int, ...] = ()
        self.host_results: tuple[int, ...] = ()  # results of a device body that a host node computed

    # ------------------------------------------------------------------------------------- slots
    def _new_slot(self, name: str | None) -> int:
        self.template.append(None)
        slot = len(self.template) - 1
        if name is not None:
            self.slot[name] = slot
        return slot

    def capture(self, entry: Capture) -> int:
        """The slot of something read from outside this body."""
        if entry not in self._capture_slot:
            slot = self._new_slot(None)
            self._capture_slot[entry] = slot
            self.captures.append(entry)
            self.capture_slots.append(slot)
        return self._capture_slot[entry]

    def host_constant(self, name: str) -> int:
        """Slot holding the CPU value of a constant (for host nodes and shape inputs)."""
        if name not in self._host_const_slot:
            slot = self._new_slot(None)
            self.template[slot] = self.constants[name]
            self._host_const_slot[name] = slot
        return self._host_const_slot[name]

    def device_constant(self, name: str) -> int:
        """Slot holding a constant that follows the module to its device (a body captures it)."""
        if name not in self._device_const_slot:
            if self.parent is None:
                slot = self.owner._device_buffer_slot(name, self.constants[name])
            else:
                slot = self.capture(("const", self.owner._nested_constant(name, self.constants[name])))
            self._device_const_slot[name] = slot
        return self._device_const_slot[name]

    def resolve(self, name: str, host_use: bool) -> int:
        """The slot of a value read here: local, constant (host or device copy), weight or outer scope."""
        if name in self.slot:
            return self.slot[name]
        if name in self.constants:
            return self.host_constant(name) if host_use else self.device_constant(name)
        if name in self.local_params:
            return self.capture(("param", self.local_params[name]))
        if self.parent is None:
            raise InherccError(f"no value named {name!r} in the graph")
        return self.capture(("value", name))

    def is_host(self, name: str) -> bool:
        """Whether a runtime value read here lives on the host."""
        if name in self.slot:
            return name in self.host_names
        return self.host and name not in self.local_params

    def resolve_capture(self, entry: Capture) -> tuple[int, bool]:
        """(slot, on host) here for something a body of one of this graph's nodes reads."""
        kind, key = entry
        if kind == "value":
            return self.resolve(key, host_use=False), key not in self.constants and self.is_host(key)
        if self.parent is not None:
            return self.capture(entry), False
        if kind == "param":
            return self.owner._param_slot(key), False
        return self.owner._device_buffer_slot(key, self.owner._nested_constants[key]), False

    # ------------------------------------------------------------------------------------ weights
    def add_local_weights(self) -> None:
        """A body's weights (:func:`inhercc.model.is_weight`, not read as a static value: what the model loader
        hoists) become module parameters; its other initializers become constants."""
        static = self._static_names()
        for index, init in enumerate(self.graph.initializer):
            value = tensor_from_proto(init)
            if is_weight(init) and init.name not in static:
                key = self.owner._add_parameter(init.name, value, self.path, ("init", index), init.data_type)
                self.local_params[init.name] = key
            else:
                self.constants[init.name] = value
        for index, node in enumerate(self.graph.node):
            proto = weight_constant(node)
            if proto is None or node.output[0] in static:
                continue
            value = tensor_from_proto(proto)
            key = self.owner._add_parameter(node.output[0], value, self.path, ("const", index), proto.data_type)
            self.local_params[node.output[0]] = key

    def _static_names(self) -> set[str]:
        """Values this graph's nodes read as shapes, axes or other Python values."""
        names: set[str] = set()
        opsets = self.owner._opsets
        for node in self.graph.node:
            domain = _domain(node.domain)
            try:
                spec = lookup(domain, node.op_type, opsets.get(domain, 0))
            except Unsupported:
                continue
            names.update(node.input[p] for p in spec.static_inputs if p < len(node.input))
        return names

    # -------------------------------------------------------------------------------------- nodes
    def add_nodes(self, known: set[str], problems: dict[str, list[str]]) -> None:
        """Plan every node in topological order: build its kernel, fold it or add a step."""
        opsets = self.owner._opsets
        for node_index, node in _topological(self.graph, known):
            if node.output and node.output[0] in self.local_params and node.op_type == "Constant":
                continue
            domain = _domain(node.domain)
            opset = opsets.get(domain)
            label = f"{domain or 'ai.onnx'}::{node.op_type}"
            if opset is None:
                problems.setdefault(f"{label}: domain not imported", []).append(node.name)
                continue
            has_bodies = bool(node_subgraphs(node))
            children: list[_Plan] = []
            try:
                spec = lookup(domain, node.op_type, opset)
                data = [n for p, n in enumerate(node.input) if n and p not in spec.static_inputs]
                data += sorted(implicit_inputs(node))
                on_host = all(self.is_host(n) for n in data if n not in self.constants)
                on_host = on_host and not (has_bodies and _has_weights(node))

                build_body = functools.partial(
                    self._build_body, children=children, host=on_host, node_index=node_index, problems=problems
                )
                ctx = NodeContext(node, opset, _schema_version(spec, opset), self.constants.get, build_body)
                kernel = spec.build(ctx)
                unread = ctx.unread_attributes()
                if unread:
                    raise Unsupported(f"attribute {', '.join(unread)}")
            except (Unsupported, InherccError) as e:
                problems.setdefault(f"{label} (opset {opset}): {e}", []).append(node.name)
                continue
            inputs = [i for i in node.input if i]
            if not has_bodies and spec.deterministic and all(i in self.constants for i in inputs):
                self.constants.update(_fold(node, kernel, self.constants))
                continue
            try:
                self._add_step(node, spec, kernel, on_host, children)
            except InherccError as e:  # reads a value whose producer was refused: that refusal is reported
                if not problems:
                    problems.setdefault(str(e), []).append(node.name)

    def _build_body(
        self,
        attr: str,
        graph: onnx.GraphProto,
        *,
        children: list[_Plan],
        host: bool,
        node_index: int,
        problems: dict[str, list[str]],
    ) -> Body:
        """A node's subgraph as a nested plan (called by its builder through `NodeContext.subgraph`)."""
        child = _Plan.subgraph(self, graph, host, (*self.path, (node_index, attr)), problems)
        children.append(child)
        return Body(child)

    @staticmethod
    def subgraph(
        parent: _Plan, graph: onnx.GraphProto, host: bool, path: GraphPath, problems: dict[str, list[str]]
    ) -> _Plan:
        """The plan of a subgraph read by a node of `parent`."""
        formal = [i.name for i in graph.input]
        for value in (*graph.input, *graph.output):
            if value.type.WhichOneof("value") not in (None, "tensor_type"):
                problems.setdefault(f"subgraph value {value.name!r} is not a tensor", [])
        plan = _Plan(parent.owner, graph, formal, ChainMap({}, parent.constants), parent, host, path)
        plan.add_local_weights()
        known = set(formal) | {i.name for i in graph.initializer} | parent.visible()
        plan.add_nodes(known, problems)
        try:
            plan.result_slots = tuple(plan.resolve(o.name, host_use=host) for o in graph.output)
        except InherccError as e:
            problems.setdefault(f"subgraph: {e}", [])
        if not host:  # the node's outputs are device values: results computed on the host are moved
            plan.host_results = tuple(k for k, o in enumerate(graph.output) if o.name in plan.host_names)
        plan.set_frees(set(plan.result_slots))
        return plan

    def visible(self) -> set[str]:
        """Every name a body of this graph's nodes may read."""
        names = set(self.slot) | set(self.constants) | set(self.local_params)
        names |= {o for n in self.graph.node for o in n.output}
        if self.parent is not None:
            names |= self.parent.visible()
        return names

    def _add_step(
        self, node: onnx.NodeProto, spec: OpSpec, kernel: Kernel, on_host: bool, children: list[_Plan]
    ) -> None:
        """Assign slots, host/device placement and outer-scope inputs for one runtime node."""
        slots: list[int] = []
        device_positions: list[int] = []
        moves: list[int] = []
        for p, name in enumerate(node.input):
            if not name:
                slots.append(_NO_SLOT)
                continue
            static = p in spec.static_inputs
            slots.append(self.resolve(name, host_use=on_host or static))
            if static or on_host:
                continue
            if name not in self.constants and self.is_host(name):
                moves.append(p)
            else:
                device_positions.append(p)
        outer: list[Capture] = []
        for child in children:
            child.pick = tuple(_index_of(outer, entry) for entry in child.captures)
        for entry in outer:
            slot, host = self.resolve_capture(entry)
            if not on_host:
                (moves if host else device_positions).append(len(slots))
            slots.append(slot)
        outputs = tuple(self._new_slot(n) if n else _NO_SLOT for n in node.output)
        if on_host:
            self.host_names.update(n for n in node.output if n)
        for slot in slots:
            if slot != _NO_SLOT:
                self.uses[slot] = self.uses.get(slot, 0) + 1
        for position, slot in enumerate(outputs):
            if slot != _NO_SLOT:
                self.producer[slot] = (spec, position)
        anchor = device_positions[0] if device_positions else _NO_SLOT
        step = _Step(node.name or node.op_type, kernel, tuple(slots), outputs, tuple(moves), anchor)
        if anchor == _NO_SLOT:
            step.moves = ()
        self.steps.append(step)

    # ---------------------------------------------------------------------------- freeing, in-place
    def set_frees(self, keep: set[int]) -> None:
        """Free each temporary after its last reader; choose the in-place variants."""
        last_use: dict[int, int] = {}
        for index, step in enumerate(self.steps):
            for slot in (*step.inputs, *step.outputs):
                if slot != _NO_SLOT:
                    last_use[slot] = index
        transient = set(self.formal_slots) | {s for step in self.steps for s in step.outputs if s != _NO_SLOT}
        frees: dict[int, list[int]] = {}
        for slot, index in last_use.items():
            if slot in transient and slot not in keep:
                frees.setdefault(index, []).append(slot)
        for index, step in enumerate(self.steps):
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
            if slot not in self.producer:
                continue
            producer, output_position = self.producer[slot]
            if not producer.fresh or slot in keep or self.uses.get(slot) != 1 or position in step.moves:
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
    def execute(self, vals: list[Any]) -> tuple[torch.Tensor, ...]:
        """Run the steps on filled slots; returns the result slots' values."""
        tensor_type = torch.Tensor
        grad = torch.is_grad_enabled()
        for step in self.steps:
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
        return tuple(vals[i] for i in self.result_slots)


def _index_of(items: list[Capture], entry: Capture) -> int:
    """The position of `entry` in `items`, appending it first if absent."""
    if entry not in items:
        items.append(entry)
    return items.index(entry)


class Body:
    """A subgraph as its node's kernel sees it: run(inputs, outer) with the body's graph inputs in order
    and the node's outer-scope inputs (the extra step inputs after the node's own); returns the outputs."""

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan
        self.input_names = [i.name for i in plan.graph.input]
        self.output_names = [o.name for o in plan.graph.output]

    def run(self, inputs: Sequence[torch.Tensor | None], outer: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        plan = self._plan
        if len(inputs) != len(plan.formal_slots):
            raise InherccError(f"subgraph takes {len(plan.formal_slots)} inputs, {len(inputs)} given")
        vals: list[Any] = list(plan.template)
        for slot, value in zip(plan.formal_slots, inputs):
            vals[slot] = value
        for slot, position in zip(plan.capture_slots, plan.pick):
            vals[slot] = outer[position]
        results = list(plan.execute(vals))
        if plan.host_results:
            device = next((t.device for t in (*inputs, *outer) if t is not None), None)
            for k in plan.host_results:
                results[k] = results[k].to(device)
        return results


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
        self._opsets = _opsets(model)
        problems: dict[str, list[str]] = {}

        self.initializers = nn.Module()  # parameters (float) and buffers (other types)
        self.constants = nn.Module()  # device copies of folded constants (non-persistent buffers)
        self._param_attr: dict[str, str] = {}
        self._buffer_attr: dict[str, str] = {}
        self._initializer_types: dict[str, tuple[int, tuple[int, ...]]] = {}
        # parameters that live in subgraphs: key -> (graph path, ("init" | "const", index), elem type)
        self._nested_params: dict[str, tuple[GraphPath, tuple[str, int], int]] = {}
        self._nested_constants: dict[str, torch.Tensor] = {}
        self._taken: set[str] = set()
        self._taken_constant_attrs: set[str] = set()
        constants: dict[str, torch.Tensor] = {}  # name -> build-time value (CPU, not trainable)
        for init in graph.initializer:
            try:
                torch_dtype(init.data_type)
            except InherccError as e:
                problems.setdefault(f"initializer {init.name!r}: {e}", [])
                continue
            value = tensor_from_proto(init)
            attr = _attribute_name(init.name, self._taken, self.initializers)
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

        self._param_slots: list[tuple[int, str]] = []  # (slot, initializers attribute)
        self._param_slot_of: dict[str, int] = {}
        self._buffer_slots: list[tuple[int, nn.Module, str]] = []  # (slot, owner module, attribute)
        self._device_slot_of: dict[str, int] = {}
        self._plan = _Plan(self, graph, self._input_names, constants)
        for name in list(self._param_attr):
            self._param_slot(name)
        known = set(self._input_names) | {init.name for init in graph.initializer}
        self._plan.add_nodes(known, problems)
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
        self._extra_outputs: list[str] = []
        self.set_extra_outputs(extra_outputs)

    # ----------------------------------------------------------------------------------------- plan
    @property
    def _steps(self) -> list[_Step]:
        return self._plan.steps

    @property
    def _slot(self) -> dict[str, int]:
        return self._plan.slot

    @property
    def _result_slots(self) -> tuple[int, ...]:
        return self._plan.result_slots

    def _param_slot(self, key: str) -> int:
        """The top plan's slot for a parameter (filled from the module at each forward)."""
        if key not in self._param_slot_of:
            plan = self._plan
            slot = plan._new_slot(key if key in self._initializer_types else None)
            self._param_slots.append((slot, self._param_attr[key]))
            self._param_slot_of[key] = slot
        return self._param_slot_of[key]

    def _device_buffer_slot(self, key: str, value: torch.Tensor) -> int:
        """The top plan's slot for a constant held as a buffer that follows the module to its device."""
        if key not in self._device_slot_of:
            slot = self._plan._new_slot(None)
            if key in self._buffer_attr:
                self._buffer_slots.append((slot, self.initializers, self._buffer_attr[key]))
            else:
                attr = _attribute_name(key, self._taken_constant_attrs, self.constants)
                self.constants.register_buffer(attr, value, persistent=False)
                self._buffer_slots.append((slot, self.constants, attr))
            self._device_slot_of[key] = slot
        return self._device_slot_of[key]

    def _nested_constant(self, name: str, value: torch.Tensor) -> str:
        """A unique key for a subgraph's constant that a body reads on the device."""
        key = f"{name}#{len(self._nested_constants)}"
        self._nested_constants[key] = value
        return key

    def _add_parameter(
        self, name: str, value: torch.Tensor, path: GraphPath, where: tuple[str, int], elem_type: int
    ) -> str:
        """Register a subgraph's weight as a parameter; its key is its ONNX name unless that is taken."""
        key = name
        if key in self._param_attr or key in self._initializer_types:
            node_index, attr = path[-1]
            key = f"{name}@{node_index}.{attr}"
            n = 0
            while key in self._param_attr:
                n += 1
                key = f"{name}@{node_index}.{attr}.{n}"
        attr_name = _attribute_name(key, self._taken, self.initializers)
        self.initializers.register_parameter(attr_name, nn.Parameter(value))
        self._param_attr[key] = attr_name
        self._nested_params[key] = (path, where, elem_type)
        return key

    def set_extra_outputs(self, names: Iterable[str]) -> None:
        """Also return these intermediate values (after the graph outputs), e.g. for feature losses."""
        names = list(names)
        plan = self._plan
        result_slots = []
        for n in [*self._graph_output_names, *names]:
            if n in self._param_slot_of:
                result_slots.append(self._param_slot_of[n])
            elif n in plan.slot or n in plan.constants:
                result_slots.append(plan.resolve(n, host_use=False))
            else:
                raise InherccError(f"no value named {n!r} in the graph")
        self._extra_outputs = names
        plan.result_slots = tuple(result_slots)
        plan.set_frees(set(result_slots))

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
        plan = self._plan
        vals: list[Any] = list(plan.template)
        for slot, tensor in zip(plan.formal_slots, self._bind(args, kwargs)):
            vals[slot] = tensor
        # getattr (not _parameters[...]) so torch.func.functional_call and parametrizations apply
        initializers = self.initializers
        for slot, attr in self._param_slots:
            vals[slot] = getattr(initializers, attr)
        for slot, owner, attr in self._buffer_slots:
            vals[slot] = getattr(owner, attr)
        return plan.execute(vals)

    # ---------------------------------------------------------------------------------- parameters
    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """ONNX initializer name -> parameter, for every floating-point initializer (graph order), then the
        weights that live in subgraphs (see the module docstring for their names)."""
        return {name: self.initializers._parameters[attr] for name, attr in self._param_attr.items()}

    def onnx_buffers(self) -> dict[str, torch.Tensor]:
        """ONNX initializer name -> buffer, for the non-floating-point initializers."""
        return {name: self.initializers._buffers[attr] for name, attr in self._buffer_attr.items()}

    def parameter(self, name: str) -> nn.Parameter:
        """The parameter holding the floating-point initializer (or subgraph weight) `name`."""
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
        """A copy of `model` whose initializers (and subgraph weights) hold this module's current values
        (names, dtypes, shapes kept)."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        current = {**self.onnx_parameters(), **self.onnx_buffers()}
        seen: set[str] = set()
        for init in out.graph.initializer:
            value = current.get(init.name)
            if value is None or init.name in self._nested_params:
                continue
            _write_tensor(init, value)
            seen.add(init.name)
        for key, (path, (kind, index), _) in self._nested_params.items():
            graph = _graph_at(out.graph, path, key)
            if kind == "init":
                _write_tensor(graph.initializer[index], current[key])
            else:  # a Constant node: its value written as a ``value`` tensor (``value_floats`` too)
                node = graph.node[index]
                proto = weight_constant(node)
                if proto is None:
                    raise InherccError(f"model lacks the Constant holding weight {key!r}")
                _write_tensor(proto, current[key])
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("value", proto))
            seen.add(key)
        missing = sorted(set(current) - seen)
        if missing:
            raise InherccError(f"model lacks initializers of this module: {missing[:10]}")
        return out

    def extra_repr(self) -> str:
        return (
            f"inputs={self._input_names}, outputs={self.output_names}, steps={len(self._steps)}, "
            f"parameters={len(self._param_attr)}"
        )


def _write_tensor(proto: onnx.TensorProto, value: torch.Tensor) -> None:
    """Overwrite a TensorProto's data with `value` (name, dtype, doc string kept; shapes must match)."""
    if tuple(value.shape) != tuple(proto.dims):
        raise InherccError(
            f"initializer {proto.name!r}: model has shape {tuple(proto.dims)}, module has {tuple(value.shape)}"
        )
    new = tensor_to_proto(value, proto.name, proto.data_type)
    new.doc_string = proto.doc_string
    proto.CopyFrom(new)


def _graph_at(graph: onnx.GraphProto, path: GraphPath, key: str) -> onnx.GraphProto:
    """The subgraph at `path` (node index, attribute name per level) below `graph`."""
    for node_index, attr in path:
        try:
            node = graph.node[node_index]
            graph = next(a.g for a in node.attribute if a.name == attr)
        except (IndexError, StopIteration):
            raise InherccError(f"model lacks the subgraph holding weight {key!r}") from None
    return graph


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
