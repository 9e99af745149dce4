"""Import and save: external data, opset upgrade, Constant weights, metadata kept, atomic save."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from inhercc.errors import InherccError
from inhercc.model import constants_to_initializers, float_param_count, load_model, opset_of, save_model
from inhercc.pipeline import compress
from inhercc.recipe import Recipe
from tests.helpers import make_model, mlp, rel_err, run


def test_external_data_load_and_compress(tmp_path) -> None:
    teacher = mlp(np.random.default_rng(0), (128, 256, 64))
    path = tmp_path / "t.onnx"
    onnx.save_model(teacher, str(path), save_as_external_data=True, location="t.onnx.data", size_threshold=0)
    assert (tmp_path / "t.onnx.data").exists()
    loaded = load_model(path)
    assert float_param_count(loaded) == 128 * 256 + 256 * 64 + 64
    res = compress(path, Recipe.of(ratio=0.5, verify=False))
    assert res.report["params"]["teacher"] == 128 * 256 + 256 * 64 + 64


def test_opset_below_13_is_upgraded() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    old = make_model(nodes, {"x": [2, 64]}, ["y"], {"W": w}, opset=11)
    prepared = compress(old, Recipe.of(rank=8, min_params=0, verify=False))
    assert opset_of(prepared.model) == 13
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert run(prepared.model, {"x": x})[0].shape == (2, 64)


def test_weight_constants_become_initializers_and_are_compressed() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    teacher = make_model(nodes, {"x": [3, 64]}, ["y"], {})
    m = onnx.ModelProto()
    m.CopyFrom(teacher)
    assert constants_to_initializers(m) == 1
    assert [n.op_type for n in m.graph.node] == ["MatMul"]
    res = compress(teacher, Recipe.of(rank=48, rank_multiple=1, min_params=0, min_saving=-1.0, verify=False))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert rel_err(run(res.model, {"x": x})[0], run(teacher, {"x": x})[0]) < 1e-4


def test_names_io_and_metadata_kept() -> None:
    teacher = mlp(np.random.default_rng(3))
    teacher.doc_string = "teacher doc"
    helper.set_model_props(teacher, {"author": "me"})
    res = compress(teacher, Recipe.of(rank=8, min_params=0, verify=False))
    s = res.model
    assert [i.name for i in s.graph.input] == ["x"] and [o.name for o in s.graph.output] == ["y"]
    assert s.doc_string == "teacher doc"
    assert {p.key: p.value for p in s.metadata_props} == {"author": "me"}
    assert {n.name for n in teacher.graph.node} - {"fc1", "fc2"} <= {n.name for n in s.graph.node}


def test_input_file_never_modified_and_save_is_atomic(tmp_path) -> None:
    teacher = mlp(np.random.default_rng(4))
    path = tmp_path / "t.onnx"
    onnx.save(teacher, str(path))
    before = path.read_bytes()
    res = compress(path, Recipe.of(rank=8, min_params=0, verify=False))
    assert path.read_bytes() == before
    with pytest.raises(InherccError, match="overwrite the input"):
        from inhercc.pipeline import compress_file

        compress_file(path, path, Recipe.of(rank=8))
    out = tmp_path / "s.onnx"
    save_model(res.model, out)
    assert sorted(os.listdir(tmp_path)) == ["s.onnx", "t.onnx"]  # no temp leftovers
    save_model(res.model, tmp_path / "e.onnx", external_data=True)
    assert (tmp_path / "e.onnx.data").exists()
    loaded = load_model(tmp_path / "e.onnx")
    assert float_param_count(loaded) == float_param_count(res.model)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch) -> None:
    res = compress(mlp(np.random.default_rng(5)), Recipe.of(rank=8, min_params=0, verify=False))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(InherccError, match="No space left"):
        save_model(res.model, tmp_path / "s.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "not an ONNX model"),
        (b"hello, I am a text file\n", "not a readable ONNX model"),
    ],
)
def test_bad_files(tmp_path, content: bytes, message: str) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InherccError, match=message):
        load_model(p)


def test_truncated_protobuf(tmp_path) -> None:
    p = tmp_path / "t.onnx"
    onnx.save(mlp(np.random.default_rng(6)), str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InherccError, match="truncated"):
        load_model(p)


def test_inferred_shapes_never_reach_a_written_file(tmp_path) -> None:
    """Shapes inhercc infers (to find layers and count FLOPs) are not the author's: a teacher saved without
    value_info gives a student without it — from a path or from a load_model()ed ModelProto — and a plain
    load → save round trip writes no value_info and no marker. A teacher that ships value_info keeps it."""
    rng = np.random.default_rng(3)
    bare = tmp_path / "bare.onnx"
    onnx.save(mlp(rng), str(bare))
    assert not onnx.load(str(bare)).graph.value_info
    loaded = load_model(bare)
    assert loaded.graph.value_info  # inferred for the passes
    for teacher in (str(bare), loaded):
        student = compress(teacher, Recipe.of(ratio=0.5, verify=False)).model
        assert not student.graph.value_info and not student.metadata_props
    save_model(loaded, tmp_path / "roundtrip.onnx")
    again = onnx.load(str(tmp_path / "roundtrip.onnx"))
    assert not again.graph.value_info and not again.metadata_props
    # the author's own shapes stay
    shaped = onnx.shape_inference.infer_shapes(mlp(rng))
    assert shaped.graph.value_info
    onnx.save(shaped, str(tmp_path / "shaped.onnx"))
    student = compress(load_model(tmp_path / "shaped.onnx"), Recipe.of(ratio=0.5, verify=False)).model
    assert student.graph.value_info and not student.metadata_props
    save_model(student, tmp_path / "student.onnx")
    assert onnx.load(str(tmp_path / "student.onnx")).graph.value_info
