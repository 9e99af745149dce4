"""Load and save ONNX models: external data, opset upgrade, Constant→initializer, atomic save."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto, numpy_helper

from inhercc.errors import InherccError
from inhercc.files import (  # noqa: F401  (re-exported: they lived here)
    TEMP_MARGIN,
    TEMP_PREFIX,
    check_checkpoint_folder,
    check_name_length,
    check_output_path,
    check_paths,
    external_data_files,
    file_facts,
    file_size,
    limits,
    path_or_none,
    write_atomic,
)

MIN_OPSET = 13
TWO_GB = 2**31
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


# metadata key marking value_info that prepare_model inferred (the model as given had none)
INFERRED_SHAPES_KEY = "inhercc.inferred_value_info"


def load_model(path: str | os.PathLike[str], *, infer_shapes: bool = True) -> ModelProto:
    """Read an ONNX file (with its external data), upgrade opset < 13, name unnamed nodes, move weight
    ``Constant`` nodes into initializers and run shape inference. The file itself is never modified."""
    path = Path(path)
    if not os.path.exists(path):  # os.path: False for a name too long, where Path.exists raises
        raise InherccError(f"no such file: {path}")
    if os.path.isdir(path):
        raise InherccError(f"{path} is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise InherccError(f"{path} is not a readable ONNX model (truncated or not ONNX): {one_line(e)}") from e
    if not model.HasField("graph") or model.ir_version == 0 or not model.opset_import:
        raise InherccError(f"{path} is not an ONNX model (no graph / IR version / opset)")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise InherccError(f"cannot read the external data of {path}: {one_line(e)}") from e
    return prepare_model(model, infer_shapes=infer_shapes, source=str(path))


def prepare_model(model: ModelProto, *, infer_shapes: bool = True, source: str = "model") -> ModelProto:
    """Normalize an in-memory model the way :func:`load_model` does (on a copy)."""
    out = ModelProto()
    out.CopyFrom(model)
    out = upgrade_opset(out, source)
    name_nodes(out)
    constants_to_initializers(out)
    if infer_shapes:
        inferred_only = not out.graph.value_info
        out = infer_model_shapes(out)
        if inferred_only and out.graph.value_info:
            out.metadata_props.add(key=INFERRED_SHAPES_KEY, value="1")
    return out


def shapes_were_inferred(model: ModelProto) -> bool:
    """Whether every ``value_info`` of ``model`` is ours (added by :func:`prepare_model`), not the author's."""
    return any(p.key == INFERRED_SHAPES_KEY for p in model.metadata_props)


def drop_inferred_shapes(model: ModelProto) -> None:
    """Remove the shapes :func:`prepare_model` inferred (and their marker), in place: files are written the
    way they came (inferred shapes change which fusions ONNX Runtime applies). Subgraph shapes go too."""
    if shapes_were_inferred(model):
        for scope in graph_scopes(model):
            del scope.graph.value_info[:]
    keep = [p for p in model.metadata_props if p.key != INFERRED_SHAPES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def opset_of(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def upgrade_opset(model: ModelProto, source: str = "model") -> ModelProto:
    """Convert a model below opset 13 with ONNX's version converter, or refuse it clearly."""
    version = opset_of(model)
    if version >= MIN_OPSET:
        return model
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:
        raise InherccError(
            f"{source} uses opset {version} (< {MIN_OPSET}) and the ONNX version converter failed: {one_line(e)}"
        ) from e
    return converted


@dataclass(frozen=True)
class GraphScope:
    """One graph of a model: the main graph (``path`` "") or an If / Loop / Scan body, at any depth.
    ``path`` is where it lives ("If_12/then_branch", nested "Loop_0/body/If_1/else_branch"); ``where`` says it
    in words ("If 'If_12' then_branch"); ``outer`` are the enclosing graphs, main graph first."""

    path: str
    where: str
    graph: GraphProto
    outer: tuple[GraphProto, ...] = ()


def node_subgraphs(node: onnx.NodeProto) -> list[tuple[str, GraphProto]]:
    """``(attribute name, body)`` of every subgraph a node holds (If branches, Loop / Scan bodies)."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend((f"{a.name}[{i}]", g) for i, g in enumerate(a.graphs))
    return out


def body_reads(graph: GraphProto) -> set[str]:
    """Names a body reads from its enclosing graphs: what its nodes (and the bodies below them) read, and its
    outputs, less what it defines itself (inputs, initializers, node outputs: a body's own ``t`` shadows an
    outer ``t``)."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names |= implicit_inputs(node)
    names.discard("")
    return names - _defined(graph)


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Values of the enclosing graphs a node's bodies (If branches, Loop / Scan bodies) read: inputs the node
    takes besides its own ``input`` list."""
    return set().union(*(body_reads(body) for _, body in node_subgraphs(node)))


def subgraph_path(path: str, node_name: str, attr: str) -> str:
    """Where the body ``attr`` of node ``node_name`` in the graph at ``path`` lives; a node name that already
    starts with its graph's path (as :func:`name_nodes` names them) is not repeated."""
    local = node_name[len(path) + 1 :] if path and node_name.startswith(path + "/") else node_name
    return f"{path}/{local}/{attr}" if path else f"{local}/{attr}"


def graph_scopes(model: ModelProto) -> list[GraphScope]:
    """The main graph, then every subgraph depth-first in node order (parents before their bodies)."""
    scopes = [GraphScope("", "", model.graph)]
    i = 0
    while i < len(scopes):
        scope = scopes[i]
        inner = []
        for node in scope.graph.node:
            for attr, body in node_subgraphs(node):
                path = subgraph_path(scope.path, node.name, attr)
                where = f"{scope.where} / " if scope.where else ""
                inner.append(
                    GraphScope(path, f"{where}{node.op_type} '{node.name}' {attr}", body, (*scope.outer, scope.graph))
                )
        scopes[i + 1 : i + 1] = inner
        i += 1
    return scopes


def name_nodes(model: ModelProto) -> None:
    """Give every node a unique, stable name, so plans and reports can refer to it: unnamed nodes of the main
    graph become ``<op>_<index>``, those of a subgraph ``<subgraph path>/<op>_<index>``; a name already taken
    (two If branches exported alike) gets its subgraph path in front (or ``_`` behind in the main graph)."""
    explicit = {n.name for s in graph_scopes(model) for n in s.graph.node if n.name}
    taken: set[str] = set()
    stack = [("", model.graph)]
    while stack:
        path, graph = stack.pop(0)
        for i, node in enumerate(graph.node):
            if not node.name or node.name in taken:
                base = node.name or f"{node.op_type}_{i}"
                name = f"{path}/{base}" if path else base
                while name in taken or (name in explicit and name != node.name):
                    name += "_"
                node.name = name
            taken.add(node.name)
            stack.extend((subgraph_path(path, node.name, attr), body) for attr, body in node_subgraphs(node))


def constants_to_initializers(model: ModelProto) -> int:
    """Replace ``Constant`` nodes holding a tensor (``value`` or ``value_float(s)``/``value_int(s)``) by
    initializers of the same name. In If / Loop / Scan bodies the weights (:func:`is_weight`: Constants and
    the bodies' own initializers) move to the main graph's initializers, read from the body as outer-scope values:
    every weight is then a main-graph initializer (what calibration, sensitivity and the torch runtime
    feed and train); a name that another graph uses too is made unique. Returns how many were moved."""
    graph = model.graph
    keep = []
    moved = 0
    existing = {i.name for i in graph.initializer}
    for node in graph.node:
        tensor = constant_tensor(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is None or node.output[0] in existing:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        existing.add(tensor.name)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved + _hoist_subgraph_weights(model)


def _hoist_subgraph_weights(model: ModelProto) -> int:
    """Move the weights of every subgraph (:func:`is_weight`: float Constants and initializers of two or more
    elements that no node of the body reads as a static value) to the main graph (see
    :func:`constants_to_initializers`); a body output or a body input's default value stays where it is, and
    so do scalars (a Clip bound stays a constant, as in the torch runtime). Bodies are edited innermost
    first: rewriting a body's node list copies the bodies nested in it."""
    scopes = graph_scopes(model)
    mentions = {s.path: _mentioned(s.graph) for s in scopes}
    moved = 0
    for scope in reversed(scopes[1:]):
        body = scope.graph
        fixed = {o.name for o in body.output} | {i.name for i in body.input} | static_reads(body)
        tensors: list[TensorProto] = []
        keep_nodes = []
        for node in body.node:
            tensor = weight_constant(node) if node.output and node.output[0] not in fixed else None
            if tensor is None:
                keep_nodes.append(node)
                continue
            tensor.name = node.output[0]
            tensors.append(tensor)
        keep_inits = [t for t in body.initializer if not is_weight(t) or t.name in fixed]
        tensors += [t for t in body.initializer if is_weight(t) and t.name not in fixed]
        if not tensors:
            continue
        names = {t.name for t in tensors}
        keep_vi = [v for v in body.value_info if v.name not in names]
        for field, kept in ((body.node, keep_nodes), (body.initializer, keep_inits), (body.value_info, keep_vi)):
            if len(kept) < len(field):
                del field[:]
                field.extend(kept)
        for t in tensors:
            t.name = _hoisted_name(scope, t.name, mentions)
            model.graph.initializer.append(t)
            mentions[""].add(t.name)
        moved += len(tensors)
    return moved


def _mentioned(graph: GraphProto) -> set[str]:
    """Every value name a graph itself (not its bodies) defines or reads."""
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    names.discard("")
    return names


def _hoisted_name(scope: GraphScope, name: str, mentions: dict[str, set[str]]) -> str:
    """The main-graph name of a tensor hoisted out of ``scope``: its own when no graph outside the scope's
    subtree mentions it and no body inside redefines it, else ``<path>/<name>`` (made unique), renamed in the
    body and below. ``mentions``: the value names of every graph by path, kept up to date."""
    inside = {p for p in mentions if p == scope.path or p.startswith(scope.path + "/")}
    outside = any(name in names for p, names in mentions.items() if p not in inside)
    if not outside and not _redefined_below(scope.graph, name):
        return name
    everything = set().union(*mentions.values())
    new = f"{scope.path}/{name}"
    while new in everything:
        new += "_"
    _rename_reads(scope.graph, name, new)
    for p in inside:
        mentions[p].discard(name)
    mentions[scope.path].add(new)
    return new


def _redefined_below(graph: GraphProto, name: str) -> bool:
    """Whether a body nested (at any depth) in ``graph`` defines a value called ``name``."""
    for node in graph.node:
        for _, body in node_subgraphs(node):
            if name in _defined(body) or _redefined_below(body, name):
                return True
    return False


def _defined(graph: GraphProto) -> set[str]:
    """Value names a graph defines itself (inputs, initializers, node outputs)."""
    return (
        {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    )


def _rename_reads(graph: GraphProto, old: str, new: str) -> None:
    """Rename every read of ``old`` in ``graph`` and in the bodies below it, except in a body that defines
    its own ``old`` (which shadows ours there)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for _, body in node_subgraphs(node):
            if old not in _defined(body):
                _rename_reads(body, old, new)


# Inputs the torch runtime reads as static (Python) values that may hold a float tensor: its shape (Shape,
# Size), its type (CastLike), resize scales / roi. A float constant read there is no weight (its registry's
# ``static_inputs`` hold these; tests/test_subgraphs.py checks they agree).
STATIC_FLOAT_INPUTS: dict[str, tuple[int, ...]] = {
    "Shape": (0,),
    "Size": (0,),
    "CastLike": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
}


def is_weight(t: TensorProto) -> bool:
    """Whether a tensor is a weight: floating point with two or more elements (0-d and one-element floats,
    such as Clip bounds and scales, stay constants)."""
    return t.data_type in FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) >= 2


def weight_constant(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor of a Constant node that holds a weight (:func:`is_weight`), else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    t = constant_tensor(node)
    return t if t is not None and is_weight(t) else None


def static_reads(graph: GraphProto) -> set[str]:
    """Float values a graph's own nodes read as static values (:data:`STATIC_FLOAT_INPUTS`)."""
    return {n.input[p] for n in graph.node for p in STATIC_FLOAT_INPUTS.get(n.op_type, ()) if p < len(n.input)} - {""}


def constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """A copy of a Constant node's value as a tensor (``value`` or ``value_float(s)`` / ``value_int(s)``), else
    None."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            t = TensorProto()
            t.CopyFrom(attr.t)
            return t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None  # sparse_value / strings: leave the node alone


def copy_without(model: ModelProto, drop: set[str]) -> ModelProto:
    """A copy of ``model`` leaving out the main-graph initializers named in ``drop``: no copy of weights about
    to be replaced (``CopyFrom`` copies them all: 340 MB for BERT-base, +501 MB peak in the rewrite;
    benchmarks/results/graphsurgeon.md)."""
    out = ModelProto()
    for f, value in model.ListFields():
        if f.name != "graph":
            _put(out, f.name, value)
    for f, value in model.graph.ListFields():
        if f.name == "initializer":
            out.graph.initializer.extend(t for t in value if t.name not in drop)
        else:
            _put(out.graph, f.name, value)
    return out


def _put(dst: Any, name: str, value: Any) -> None:
    """Copy one protobuf field: a message merged, a repeated field extended, a scalar set."""
    if hasattr(value, "MergeFrom"):
        getattr(dst, name).MergeFrom(value)
    elif hasattr(value, "extend"):
        getattr(dst, name).extend(value)
    else:
        setattr(dst, name, value)


def shape_skeleton(model: ModelProto, max_elements: int = 4096) -> ModelProto:
    """The model without its big float weights: they become typed graph inputs of the same shape. Shape
    inference needs their shapes, not their values, and a BERT-base copy is 340 MB of memcpy and
    protobuf sizing per call; the skeleton is a few hundred kB."""
    skeleton = ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, f, getattr(model, f))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, sg = model.graph, skeleton.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        if t.data_type in FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > max_elements:
            if t.name not in declared:
                sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            sg.initializer.append(t)
    return skeleton


def infer_model_shapes(model: ModelProto) -> ModelProto:
    """Fill ``value_info`` (and output types) in place and return the model. Inference runs on the
    :func:`shape_skeleton`: ONNX Runtime's symbolic shape inference first (it follows Shape→Reshape chains,
    so attention heads and sequence dims stay named), then ONNX's own (data propagation on)."""
    skeleton = shape_skeleton(model)
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(skeleton, auto_merge=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
        except Exception:
            return model  # best effort: shapes only feed FLOP counts and synthetic inputs
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
    by_name = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        if o.name in by_name and not o.type.tensor_type.HasField("shape"):
            o.type.CopyFrom(by_name[o.name].type)
    _copy_subgraph_shapes(inferred, model)
    return model


def _copy_subgraph_shapes(inferred: ModelProto, model: ModelProto) -> None:
    """Give the subgraphs of ``model`` the shapes inferred in ``inferred`` (the same graph structure), as the
    main graph gets its own: FLOP counts of layers inside If / Loop / Scan bodies need them."""
    pairs = list(zip(graph_scopes(inferred)[1:], graph_scopes(model)[1:]))
    if any(a.path != b.path for a, b in pairs):
        return
    for source, target in pairs:
        if source.graph.value_info:
            known = {i.name for i in target.graph.input} | {t.name for t in target.graph.initializer}
            del target.graph.value_info[:]
            target.graph.value_info.extend(v for v in source.graph.value_info if v.name not in known)


def initializer_map(model: ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def float_param_count(model: ModelProto) -> int:
    """Number of floating-point initializer elements (the model's parameters)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)


def model_bytes(model: ModelProto) -> int:
    """Serialized size of the model with all weights inline (≈ size on disk)."""
    return int(model.ByteSize())


def save_model(model: ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Save atomically: everything is written into a temp folder beside the target and renamed into place,
    so a failure never leaves a partial file. ``external_data`` defaults to on above 2 GB; the data file is
    ``<name>.data`` next to the model."""
    path = Path(path)
    check_output_path(path)
    if external_data is None:
        external_data = model.ByteSize() >= TWO_GB - (1 << 24)
    data_name = path.name + ".data"
    if external_data and len(os.fsencode(data_name)) > limits(path)[0]:
        raise InherccError(f"output name is too long for its external data file ({data_name[:40]}…); shorten it")
    to_save = ModelProto()
    to_save.CopyFrom(model)
    drop_inferred_shapes(to_save)

    def write(tmp: Path) -> None:
        if external_data:
            onnx.save_model(
                to_save,
                str(tmp),
                save_as_external_data=True,
                location=data_name,
                all_tensors_to_one_file=True,
                size_threshold=1024,
            )
        else:
            onnx.save_model(to_save, str(tmp))

    try:
        write_atomic(path, write, beside=[data_name] if external_data else [])
    except OSError as e:
        raise InherccError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): library errors stay one line."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def has_value_info(model: ModelProto | str | os.PathLike[str]) -> bool:
    """Whether the teacher as given (before our shape inference) carries ``value_info``."""
    if isinstance(model, ModelProto):
        return len(model.graph.value_info) > 0 and not shapes_were_inferred(model)
    try:
        return file_facts(model)[1]
    except OSError:
        return False  # load_model reports missing files


def as_model(model: ModelProto | str | os.PathLike[str]) -> ModelProto:
    """A prepared model from a path or a ModelProto (the caller's object is never modified)."""
    if isinstance(model, ModelProto):
        return prepare_model(model)
    return load_model(model)
