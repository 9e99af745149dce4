"""The rewrite's student starts as a copy of the teacher without the weights it replaces (no 340 MB memcpy on
BERT-base): the student is byte for byte the one a full copy gives, and a weight something else reads stays."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, helper

from inhercc.factorizer import Factorizer
from inhercc.families import families
from inhercc.layers import find_layers
from inhercc.model import infer_model_shapes
from inhercc.passes.base import FactorizePass, replaced_weights, rewrite_ranks, run_passes
from tests.helpers import make_model, mlp


def full_copy_rewrite(model: ModelProto, ranks: dict[str, int], layers, factors) -> ModelProto:  # noqa: ANN001
    """The rewrite as it was: copy everything, then let the passes drop what nothing reads."""
    student = ModelProto()
    student.CopyFrom(model)
    by_name = {la.name: la for la in layers}
    out = run_passes(student, [FactorizePass(ranks, by_name, factors, f.op_type) for f in families()]).model
    del out.graph.value_info[:]
    return infer_model_shapes(out)


def test_the_lean_copy_gives_the_same_student_bytes() -> None:
    model = mlp(np.random.default_rng(0))
    layers = find_layers(model)
    ranks = {"fc1": 16, "fc2": 16}
    assert replaced_weights(model, ranks, {la.name: la for la in layers}) == {"fc1.weight", "fc2.weight"}
    lean = rewrite_ranks(model, ranks, layers, Factorizer("svd"))
    assert lean.modified and len(lean.notes) == 2
    full = full_copy_rewrite(model, ranks, layers, Factorizer("svd"))
    assert lean.model.SerializeToString() == full.SerializeToString()


def test_a_weight_read_elsewhere_is_kept() -> None:
    """A tied weight (read by the layer and by another node) is not left out of the copy."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "w"], ["y"], name="tied"),
    ]
    model = make_model(nodes, {"x": [64, 64]}, ["y"], {"w": w})
    layers = find_layers(model, min_params=0, min_saving=-1.0)
    assert replaced_weights(model, {"fc": 8}, {la.name: la for la in layers}) == set()
