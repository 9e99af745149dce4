"""The op registry: ONNX (domain, op_type, version range) -> a kernel builder.

A builder runs once per node when an `OnnxModule` is built. It reads the node's attributes and any
constant inputs through a `NodeContext`, raises `Unsupported` for anything it cannot honour, and returns
the kernel: a plain function of the node's runtime inputs (tensors, `None` for omitted optional inputs)
returning one tensor or a tuple with one entry per node output. Attribute parsing and validation thus
happen at construction, never per call.

Every attribute a builder neither reads (`ctx.attr`) nor waives (`ctx.ignore`) makes the node
unsupported, so an attribute added by a later ONNX version cannot be silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from onnx import AttributeProto, helper

from inhercc.torchrt.dtypes import tensor_from_proto

Kernel = Callable[..., Any]
Builder = Callable[["NodeContext"], Kernel]

_REQUIRED = object()


class Unsupported(Exception):
    """A node this runtime cannot execute; the message says why (op, attribute or value)."""


@dataclass(frozen=True)
class OpSpec:
    """One registered implementation: op `op_type` of `domain` for schema versions since..until."""

    domain: str
    op_type: str
    since: int
    until: int | None
    build: Builder
    # Inputs read as Python values or metadata only (shapes, axes, Shape's data): they never decide
    # where the node runs and are never moved to the accelerator.
    static_inputs: frozenset[int] = field(default_factory=frozenset)
    # False for ops whose result changes from call to call (random ops): never constant-folded.
    deterministic: bool = True
    # The kernel always returns newly allocated tensors that alias nothing else (so a later in-place
    # kernel may overwrite them once dead) …
    fresh: bool = False
    # … and whose backward keeps the output (Relu, Softmax …): those may be overwritten without grad only.
    saves_output: bool = False


_REGISTRY: dict[tuple[str, str], list[OpSpec]] = {}


def register(
    op_type: str,
    since: int,
    until: int | None = None,
    domain: str = "",
    static_inputs: Iterable[int] = (),
    deterministic: bool = True,
    fresh: bool = False,
    saves_output: bool = False,
) -> Callable[[Builder], Builder]:
    """Register a builder for `op_type` schema versions `since`..`until` (inclusive; None = open)."""

    def decorate(build: Builder) -> Builder:
        spec = OpSpec(
            domain, op_type, since, until, build, frozenset(static_inputs), deterministic, fresh, saves_output
        )
        specs = _REGISTRY.setdefault((domain, op_type), [])
        if any(s.since == since for s in specs):
            raise ValueError(f"{domain or 'ai.onnx'}::{op_type} since {since} registered twice")
        specs.append(spec)
        specs.sort(key=lambda s: s.since)
        return build

    return decorate


@dataclass(frozen=True)
class InPlace:
    """In-place variants of a kernel: input position -> a kernel that writes the result into that input.

    The module uses a variant only when that input is a dead-after-this-node temporary that already has
    the result's shape and dtype; reusing its memory avoids allocating (and page-faulting) a new tensor.
    `grad`: when autograd may use the variant — "always" (its backward needs neither operand's old
    value, e.g. add_), "if_others_constant" (only the other operands are needed, so they must not
    require grad, e.g. mul_ by a constant) or "never".
    """

    variants: dict[int, Kernel]
    grad: str = "never"


def with_inplace(kernel: Kernel, variants: dict[int, Kernel], grad: str = "never") -> Kernel:
    """Attach in-place variants to a kernel (a function object built for this node)."""
    kernel.inplace = InPlace(variants, grad)  # type: ignore[attr-defined]
    return kernel


def inplace_of(kernel: Kernel) -> InPlace | None:
    """The in-place variants attached to a kernel, if any."""
    return getattr(kernel, "inplace", None)


def schema_version(domain: str, op_type: str, opset: int) -> int | None:
    """The since_version of the ONNX schema that `opset` uses for the op; None if ONNX has no schema."""
    try:
        return onnx.defs.get_schema(op_type, opset, domain).since_version
    except onnx.defs.SchemaError:
        return None


def lookup(domain: str, op_type: str, opset: int) -> OpSpec:
    """The implementation for an op at a model opset; `Unsupported` if there is none."""
    specs = _REGISTRY.get((domain, op_type))
    if not specs:
        raise Unsupported("no implementation")
    version = schema_version(domain, op_type, opset) or opset
    candidates = [s for s in specs if s.since <= version]
    if not candidates:
        raise Unsupported(f"version {version} predates the implemented versions (since {specs[0].since})")
    spec = candidates[-1]
    if spec.until is not None and version > spec.until:
        raise Unsupported(f"version {version} is newer than the implemented versions ({spec.since}-{spec.until})")
    return spec


def registered_ops() -> dict[tuple[str, str], list[OpSpec]]:
    """A copy of the registry: (domain, op_type) -> implementations ordered by version."""
    return {k: list(v) for k, v in _REGISTRY.items()}


class NodeContext:
    """What a builder may know about its node: attributes, constant inputs, opset, output count."""

    def __init__(
        self,
        node: onnx.NodeProto,
        opset: int,
        version: int,
        constant: Callable[[str], torch.Tensor | None],
        subgraph: Callable[[str, onnx.GraphProto], Any] | None = None,
    ) -> None:
        self.node = node
        self.op_type = node.op_type
        self.opset = opset
        self.version = version
        self.inputs: list[str] = list(node.input)
        self.outputs: list[str] = list(node.output)
        self._constant = constant
        self._subgraph = subgraph
        self._attrs: dict[str, AttributeProto] = {a.name: a for a in node.attribute}
        self._used: set[str] = set()

    @property
    def n_inputs(self) -> int:
        """Number of input positions, omitted trailing optional inputs not counted."""
        n = len(self.inputs)
        while n and not self.inputs[n - 1]:
            n -= 1
        return n

    @property
    def n_outputs(self) -> int:
        """Number of output positions, omitted trailing optional outputs not counted."""
        n = len(self.outputs)
        while n and not self.outputs[n - 1]:
            n -= 1
        return n

    def has_input(self, i: int) -> bool:
        return i < len(self.inputs) and bool(self.inputs[i])

    def has_output(self, i: int) -> bool:
        return i < len(self.outputs) and bool(self.outputs[i])

    def const(self, i: int) -> torch.Tensor | None:
        """The value of input `i` if it is known when the module is built (constant, not trainable)."""
        if not self.has_input(i):
            return None
        return self._constant(self.inputs[i])

    def const_ints(self, i: int) -> list[int] | None:
        """Input `i` as a list of ints if it is a build-time constant, else None."""
        value = self.const(i)
        return None if value is None else [int(v) for v in value.reshape(-1).tolist()]

    def has_attr(self, name: str) -> bool:
        return name in self._attrs

    def attr(self, name: str, default: Any = _REQUIRED) -> Any:
        """The attribute's value as a Python object (strings decoded, tensors as torch tensors)."""
        self._used.add(name)
        proto = self._attrs.get(name)
        if proto is None:
            if default is _REQUIRED:
                raise Unsupported(f"missing required attribute {name!r}")
            return default
        if proto.ref_attr_name:
            raise Unsupported(f"attribute {name!r} refers to a function attribute")
        if proto.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise Unsupported(f"subgraph attribute {name!r}")
        if proto.type in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS):
            raise Unsupported(f"sparse tensor attribute {name!r}")
        if proto.type == AttributeProto.TYPE_PROTO:
            raise Unsupported(f"type attribute {name!r}")
        value = helper.get_attribute_value(proto)
        if proto.type == AttributeProto.STRING:
            return value.decode()
        if proto.type == AttributeProto.STRINGS:
            return [v.decode() for v in value]
        if proto.type == AttributeProto.TENSOR:
            return tensor_from_proto(value)
        if proto.type == AttributeProto.TENSORS:
            return [tensor_from_proto(v) for v in value]
        if proto.type in (AttributeProto.INTS, AttributeProto.FLOATS):
            return list(value)
        return value

    def subgraph(self, name: str) -> Any:
        """Graph attribute `name` built as a nested plan of the module (see `inhercc.torchrt.module.Body`):
        its `input_names`, `output_names` and `run(inputs, captured)`."""
        self._used.add(name)
        proto = self._attrs.get(name)
        if proto is None or proto.type != AttributeProto.GRAPH:
            raise Unsupported(f"missing graph attribute {name!r}")
        if self._subgraph is None:
            raise Unsupported("subgraphs cannot be built here")
        return self._subgraph(name, proto.g)

    def ignore(self, *names: str) -> None:
        """Waive attributes that do not change the result (seeds, hints)."""
        self._used.update(names)

    def unread_attributes(self) -> list[str]:
        """Attributes present on the node that the builder neither read nor waived."""
        return [n for n in self._attrs if n not in self._used]

    def require(self, condition: bool, reason: str) -> None:
        """Raise `Unsupported(reason)` unless `condition` holds."""
        if not condition:
            raise Unsupported(reason)


def one_of(ctx: NodeContext, name: str, default: str, allowed: Sequence[str]) -> str:
    """A string attribute restricted to the values this runtime implements."""
    value = ctx.attr(name, default)
    if value not in allowed:
        raise Unsupported(f"{name}={value!r}")
    return value
