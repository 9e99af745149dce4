"""ONNX's own backend conformance data as test cases for the torch runtime.

Sources (all inside the onnx wheel): the ~1,900 generated node cases
(`onnx.backend.test.case.node.collect_testcases`), the model cases under
`onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple}` and the `light` CNN models
(ResNet-50, VGG-19, DenseNet-121, … with constant-filled weights), whose input ONNX's runner derives
from the input shape (arange / n) and whose expected output ships as `light_<model>_output_0.pb`.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

DataSet = tuple[list[np.ndarray], list[np.ndarray]]
DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
MODEL_KINDS = ("pytorch-converted", "pytorch-operator", "simple")

# case name -> outcome ("passed", "failed", "unsupported", "skipped"), filled as the tests run.
RESULTS: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    """One conformance case: a model, its data sets and ONNX's tolerances for it."""

    name: str
    ops: frozenset[str]
    rtol: float
    atol: float
    load: Callable[[], tuple[onnx.ModelProto, list[DataSet]]] = field(compare=False, repr=False)


def _ops(model: onnx.ModelProto) -> frozenset[str]:
    """Op types of a model (domain-qualified outside the default domain)."""
    return frozenset(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)


def _normalize(value: np.ndarray | onnx.TensorProto) -> np.ndarray:
    """Node cases hold some values as TensorProto (as ONNX's runner, decode them)."""
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _node_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    out = []
    for c in cases:
        model = c.model
        data = [([_normalize(t) for t in i], [_normalize(t) for t in o]) for i, o in c.data_sets]
        out.append(
            Case(f"node/{c.name}", _ops(model), c.rtol, c.atol, functools.partial(lambda m, d: (m, d), model, data))
        )
    return out


def _read_tensors(pattern: str) -> list[np.ndarray]:
    def index(path: str) -> int:
        return int(os.path.basename(path).split("_")[-1].split(".")[0])

    tensors = []
    for path in sorted(glob.glob(pattern), key=index):
        proto = onnx.TensorProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        tensors.append(numpy_helper.to_array(proto))
    return tensors


def _load_model_dir(case_dir: str) -> tuple[onnx.ModelProto, list[DataSet]]:
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    data = [
        (_read_tensors(os.path.join(d, "input_*.pb")), _read_tensors(os.path.join(d, "output_*.pb")))
        for d in sorted(glob.glob(os.path.join(case_dir, "test_data_set_*")))
    ]
    return model, data


def _model_dir_cases() -> list[Case]:
    out = []
    for kind in MODEL_KINDS:
        for case_dir in sorted(glob.glob(os.path.join(DATA_DIR, kind, "test_*"))):
            if not os.path.exists(os.path.join(case_dir, "model.onnx")):
                continue
            rtol, atol = 1e-3, 1e-7
            spec = os.path.join(case_dir, "data.json")
            if os.path.exists(spec):
                with open(spec) as f:
                    given = json.load(f)
                rtol, atol = given.get("rtol", rtol), given.get("atol", atol)
            ops = _ops(onnx.load(os.path.join(case_dir, "model.onnx"), load_external_data=False))
            out.append(
                Case(
                    f"{kind}/{os.path.basename(case_dir)}",
                    ops,
                    rtol,
                    atol,
                    functools.partial(_load_model_dir, case_dir),
                )
            )
    return out


def _load_light(model_path: str) -> tuple[onnx.ModelProto, list[DataSet]]:
    """A light model with ONNX's runner's input (arange(n) / n in the input's shape) and expected output."""
    model = onnx.load(model_path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = []
    for value_info in model.graph.input:
        if value_info.name in initializers:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in value_info.type.tensor_type.shape.dim]
        n = int(np.prod(shape))
        inputs.append((np.arange(n).reshape(shape) / n).astype(np.float32))
    expected = _read_tensors(os.path.splitext(model_path)[0] + "_output_*.pb")
    return model, [(inputs, expected)]


def _light_cases() -> list[Case]:
    out = []
    for spec in sorted(glob.glob(os.path.join(DATA_DIR, "real", "test_*", "data.json"))):
        with open(spec) as f:
            given = json.load(f)
        url = given.get("url", "")
        if not url.startswith("onnx/backend/test/data/light/"):
            continue
        path = os.path.join(DATA_DIR, "light", os.path.basename(url))
        ops = _ops(onnx.load(path, load_external_data=False))
        out.append(
            Case(
                f"light/test_{given['model_name']}",
                ops,
                given.get("rtol", 1e-3),
                given.get("atol", 1e-7),
                functools.partial(_load_light, path),
            )
        )
    return out


@functools.lru_cache(maxsize=1)
def all_cases() -> tuple[Case, ...]:
    """Every conformance case, node cases first."""
    return tuple(_node_cases() + _model_dir_cases() + _light_cases())


def assert_close(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> None:
    """ONNX's own comparison (onnx.backend.test.runner.Runner.assert_similar_outputs)."""
    np.testing.assert_array_equal(got.shape, expected.shape, err_msg="output shape")
    if expected.dtype == object:
        np.testing.assert_array_equal(got, expected)
        return
    np.testing.assert_equal(got.dtype, expected.dtype)
    if got.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)
        got, expected = got.astype(np.float32), expected.astype(np.float32)
    elif got.dtype.name.startswith("float8"):
        got, expected = got.astype(np.float32), expected.astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
