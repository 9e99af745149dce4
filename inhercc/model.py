"""Load and save ONNX models: external data, opset upgrade, Constant→initializer, atomic save."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from inhercc.errors import InherccError

MIN_OPSET = 13
TWO_GB = 2**31
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


# metadata key marking value_info that prepare_model inferred (the model as given had none)
INFERRED_SHAPES_KEY = "inhercc.inferred_value_info"


def load_model(path: str | os.PathLike[str], *, infer_shapes: bool = True) -> ModelProto:
    """Read an ONNX file (with its external data), upgrade opset < 13, name unnamed nodes, move weight
    ``Constant`` nodes into initializers and run shape inference. The file itself is never modified."""
    path = Path(path)
    if not path.exists():
        raise InherccError(f"no such file: {path}")
    if path.is_dir():
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
    way they came (inferred shapes change which fusions ONNX Runtime applies)."""
    if shapes_were_inferred(model):
        del model.graph.value_info[:]
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


def name_nodes(model: ModelProto) -> None:
    """Give every unnamed node a unique, stable name (``<op>_<index>``), so plans and reports can refer to it."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def constants_to_initializers(model: ModelProto) -> int:
    """Replace top-level ``Constant`` nodes holding a tensor (``value`` or ``value_float(s)``/``value_int(s)``)
    by initializers of the same name. Returns how many were moved."""
    graph = model.graph
    keep = []
    moved = 0
    existing = {i.name for i in graph.initializer}
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
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
    return moved


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
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
    return model


def initializer_map(model: ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def float_param_count(model: ModelProto) -> int:
    """Number of floating-point initializer elements (the model's parameters)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)


def model_bytes(model: ModelProto) -> int:
    """Serialized size of the model with all weights inline (≈ size on disk)."""
    return int(model.ByteSize())


@functools.lru_cache(maxsize=16)
def _file_facts(realpath: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], bool]:
    """(external data locations, has value_info) of an ONNX file, parsed once per file version: parsing a
    BERT-base file with inline weights costs over a second, and several checks need these facts."""
    try:
        m = onnx.load(realpath, load_external_data=False)
    except Exception:
        return (), False
    locations = {kv.value for t in m.graph.initializer for kv in t.external_data if kv.key == "location"}
    return tuple(sorted(locations)), len(m.graph.value_info) > 0


def file_facts(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], bool]:
    st = os.stat(path)
    return _file_facts(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def file_size(path: str | os.PathLike[str]) -> int:
    """Size on disk of an ONNX file plus the external data files it references."""
    path = Path(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path) if f.exists())


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files referenced by an ONNX file."""
    path = Path(path)
    if not path.is_file():
        return []
    return [path.parent / n for n in file_facts(path)[0]]


def _not_writable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder``, or None. A real probe: ``os.access`` says yes to root even
    on read-only or virtual file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


def check_output_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] = ()) -> Path:
    """Refuse to write over an input (or its external data) and check that the folder is writable."""
    out = Path(output)
    protected = set()
    for p in inputs:
        p = Path(p)
        protected.add(os.path.realpath(p))
        protected.update(os.path.realpath(f) for f in external_data_files(p) if p.exists())
    if os.path.realpath(out) in protected or os.path.realpath(str(out) + ".data") in protected:
        raise InherccError(f"output {out} would overwrite the input; choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InherccError(f"output directory {parent} does not exist")
    why = _not_writable(parent)
    if why:
        raise InherccError(f"output directory {parent} is not writable ({why})")
    if out.is_dir():
        raise InherccError(f"output {out} is a directory")
    return out


def path_or_none(value: object) -> str | os.PathLike[str] | None:
    """``value`` when it names a file or folder (data may also be arrays, a dict or an iterable)."""
    return value if isinstance(value, (str, os.PathLike)) else None


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_paths(
    inputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
    outputs: Mapping[str, str | os.PathLike[str] | None],
    *,
    models: Sequence[str | os.PathLike[str]] = (),
    checkpoint: str | os.PathLike[str] | None = None,
) -> None:
    """Before any work: no output (by option label) overwrites an input (or its external data) or writes
    into an input folder (--data shards), no two outputs (the --checkpoint folder and its files included)
    are one path — symlinks and ``..`` resolved — and every output folder is writable. ``models``: the
    ONNX inputs, whose external data files are protected too."""
    from inhercc.distill import CHECKPOINT_FILE

    claims: list[tuple[str, str, str]] = []  # (label, path as given, real path written)
    for label, path in outputs.items():
        if path is not None:
            claims.append((label, path, _real(path)))
    if checkpoint is not None:
        folder = _real(checkpoint)
        for real in (folder, os.path.join(folder, CHECKPOINT_FILE), os.path.join(folder, CHECKPOINT_FILE + ".tmp")):
            claims.append(("--checkpoint", checkpoint, real))
    for in_label, in_path in inputs:
        if in_path is None:
            continue
        real_in, is_folder = _real(in_path), os.path.isdir(in_path)
        for label, path, real in claims:
            if is_folder and _inside(real, real_in) and Path(real).suffix in (".npz", ".npy"):
                raise InherccError(
                    f"{label} {path} is inside the input folder {in_label} {in_path}, whose .npz / .npy files are "
                    "read as data; choose another path"
                )
            if real == real_in:
                raise InherccError(f"{label} {path} would overwrite the input {in_label}; choose another path")
    seen: dict[str, str] = {}
    for label, path, real in claims:
        other = seen.setdefault(real, label)
        if other != label:
            raise InherccError(f"{other} and {label} are the same path ({path}); choose different paths")
    for path in outputs.values():
        if path is not None:
            check_output_path(path, list(models))
    if checkpoint is not None:
        check_checkpoint_folder(checkpoint)


def check_checkpoint_folder(folder: str | os.PathLike[str]) -> None:
    """A --checkpoint folder that can be made (or is there) and written into, checked without creating it."""
    path = Path(folder)
    if path.is_symlink() and not path.exists():
        raise InherccError(f"--checkpoint {folder} is a broken link")
    if path.exists() and not path.is_dir():
        raise InherccError(f"--checkpoint {folder} is a file, not a folder")
    existing = Path(os.path.abspath(path))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InherccError(f"--checkpoint {folder}: {existing} is a file, not a folder")
    why = _not_writable(existing)
    if why:
        raise InherccError(f"--checkpoint {folder}: {existing} is not writable ({why})")


def save_model(model: ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Save atomically: everything is written into a temp folder beside the target and renamed into place,
    so a failure never leaves a partial file. ``external_data`` defaults to on above 2 GB; the data file is
    ``<name>.data`` next to the model."""
    path = Path(path)
    check_output_path(path)
    if external_data is None:
        external_data = model.ByteSize() >= TWO_GB - (1 << 24)
    tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        tmp_model = Path(tmpdir) / path.name
        data_name = path.name + ".data"
        to_save = ModelProto()
        to_save.CopyFrom(model)
        drop_inferred_shapes(to_save)
        if external_data:
            onnx.save_model(
                to_save,
                str(tmp_model),
                save_as_external_data=True,
                location=data_name,
                all_tensors_to_one_file=True,
                size_threshold=1024,
            )
            os.replace(Path(tmpdir) / data_name, path.parent / data_name)
        else:
            onnx.save_model(to_save, str(tmp_model))
        os.replace(tmp_model, path)
    except OSError as e:
        raise InherccError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
