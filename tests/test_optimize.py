"""ONNX Runtime's transformer optimizer on teacher and student (the optimize stage) and sibling packing: the student
keeps every fused attention node of the teacher; packed input factors compute the same products."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.optimize import FUSED_AWAY_REASON, attention_count, detect_attention, fused_counts, optimize_transformer
from inhercc.passes import rewrite_ranks
from inhercc.passes.pack_siblings import pack_siblings
from inhercc.pipeline import Factorizer, compress
from inhercc.recipe import Recipe
from tests.helpers import make_model, run

HEADS, HIDDEN, LAYERS = 4, 64, 2


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (random weights, eager attention: the form ONNX Runtime fuses) through torch's legacy
    exporter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=500,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, ids, mask, types):  # type: ignore[no-untyped-def]
            return self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    args = (torch.randint(0, 500, (2, 16)), torch.ones(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in [*names, "hidden"]}
    torch.onnx.export(
        Encoder(), args, str(path), input_names=names, output_names=["hidden"], dynamic_axes=axes, opset_version=17,
        dynamo=False,
    )  # fmt: skip
    return path


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((3, 12), np.int64)
    mask[1, 9:] = 0
    ids = rng.integers(0, 500, (3, 12)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_heads_and_hidden_are_read_from_the_graph(bert: Path) -> None:
    assert detect_attention(prepare_model(onnx.load(str(bert)))) == (HEADS, HIDDEN)


def test_factorized_qkv_lose_the_fusion_dense_ones_keep_it(bert: Path) -> None:
    """The measurement behind the design: with Q/K/V factorized (packed or not) ONNX Runtime fuses no attention;
    with them kept dense it fuses as many as in the teacher."""
    teacher = prepare_model(onnx.load(str(bert)))
    assert attention_count(optimize_transformer(teacher)) == LAYERS
    layers = find_layers(teacher)
    ranks = {la.name: 16 for la in layers if la.compressible}
    student = rewrite_ranks(teacher, ranks, layers, Factorizer("svd")).model
    assert attention_count(optimize_transformer(student)) == 0
    assert attention_count(optimize_transformer(pack_siblings(student).model)) == 0
    qkv = [n for n in ranks if any(p in n for p in ("query", "key", "value"))]
    assert len(qkv) == 3 * LAYERS
    others = rewrite_ranks(teacher, {n: r for n, r in ranks.items() if n not in qkv}, layers, Factorizer("svd")).model
    assert attention_count(optimize_transformer(others)) == 0  # the output projection factorized: no fusion
    attention = [n for n in ranks if "attention" in n]
    assert len(attention) == 4 * LAYERS
    ffn = rewrite_ranks(teacher, {n: r for n, r in ranks.items() if n not in attention}, layers, Factorizer("svd"))
    assert attention_count(optimize_transformer(ffn.model)) == LAYERS


def test_optimize_keeps_every_fused_attention_of_the_teacher(bert: Path) -> None:
    res = compress(bert, Recipe.of(ratio=0.5, init="svd", optimize=True), verify_data=feeds())
    record = res.report["optimize"]
    assert record["teacher"]["Attention"] == LAYERS
    assert record["student"]["Attention"] == record["teacher"]["Attention"]
    assert fused_counts(res.model) == record["student"]
    assert len(record["kept_dense"]) == 4 * LAYERS  # Q, K, V and the output projection of every block
    rows = {r["name"]: r for r in res.report["layers"]}
    assert all(rows[n]["rank"] is None and rows[n]["reason"] == FUSED_AWAY_REASON for n in record["kept_dense"])
    assert sum(r["rank"] is not None for r in rows.values()) == 2 * LAYERS  # the FFN's two MatMuls
    # the optimized student computes what the same plan computes unfused
    plain = compress(bert, Recipe.of(plan=res.plan, init="svd"), verify_data=feeds())
    (y_opt,), (y_plain,) = run(res.model, feeds(1)), run(plain.model, feeds(1))
    np.testing.assert_allclose(y_opt, y_plain, atol=2e-4)
    assert res.report["flops"]["student"] == plain.report["flops"]["student"]  # the fused Attention counted alike
    # the same weights, but this random BERT's zero biases are one shared initializer, which the fusion copies
    # into each packed Q/K/V bias (3·hidden per block) while dropping a few scalar constants
    extra = res.report["params"]["student"] - plain.report["params"]["student"]
    assert 0 <= extra <= LAYERS * 3 * HIDDEN
    assert res.report["fidelity"]["hidden"]["cosine"] > 0.5


def test_packed_siblings_compute_the_same_student(bert: Path) -> None:
    plain = compress(bert, Recipe.of(rank=16, init="svd", verify=False))
    packed = compress(bert, Recipe.of(rank=16, init="svd", verify=False, pack_siblings=True))
    ops = [n.op_type for n in packed.model.graph.node]
    assert ops.count("Split") == LAYERS  # Q, K, V of each block read one input
    plain_ops = [n.op_type for n in plain.model.graph.node]
    assert plain_ops.count("MatMul") - ops.count("MatMul") == 2 * LAYERS
    (y_plain,), (y_packed,) = run(plain.model, feeds(2)), run(packed.model, feeds(2))
    np.testing.assert_allclose(y_packed, y_plain, rtol=1e-5, atol=1e-6)
    assert packed.report["params"]["student"] == plain.report["params"]["student"]


@pytest.mark.parametrize("opset", [11, 17])
def test_packing_is_exact_and_keeps_readers(opset: int) -> None:
    """Three chains reading x (one of them read twice, as a heads' gate reads its bottleneck), a fourth reading
    another tensor: the three are packed, the fourth is not; outputs equal the unpacked student's."""
    rng = np.random.default_rng(0)
    w = {f"w{i}": rng.standard_normal((32, 24)).astype(np.float32) for i in range(4)}
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"p{i}") for i in range(3)]
    nodes += [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    nodes += [helper.make_node("MatMul", ["r", "w3"], ["y3"], name="p3")]
    teacher = prepare_model(make_model(nodes, {"x": ["batch", 32]}, ["y0", "y1", "y2", "y3"], w, opset=opset))
    layers = find_layers(teacher, min_params=0)
    student = rewrite_ranks(teacher, {f"p{i}": 8 for i in range(4)}, layers, Factorizer("svd")).model
    mid = next(n.output[0] for n in student.graph.node if n.name == "p0.inherit_in")
    student.graph.node.append(helper.make_node("Neg", [mid], ["extra"], name="reader"))
    student.graph.output.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))
    x = rng.standard_normal((5, 32)).astype(np.float32)
    before = run(student, {"x": x})
    result = pack_siblings(student)
    assert result.modified and len(result.notes) == 1 and "8 + 8 + 8" in result.notes[0]
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Split") == 1 and ops.count("MatMul") == 6  # 1 packed + 3 output factors + p3's two
    for got, want in zip(run(result.model, {"x": x}), before):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not pack_siblings(result.model).modified


def test_packed_siblings_are_equalized_before_quantization() -> None:
    """Packing runs before quantization: the factor pairs are equalized first (a packed input factor feeds a
    Split, which equalization cannot see through), so packing changes neither the pairs done nor the function."""
    rng = np.random.default_rng(0)
    w = {f"w{i}": rng.standard_normal((32, 24)).astype(np.float32) for i in range(3)}
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"p{i}") for i in range(3)]
    teacher = make_model(nodes, {"x": ["batch", 32]}, ["y0", "y1", "y2"], w)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    recipe = {"rank": 8, "init": "svd", "min_params": 0, "quantize": "int8", "verify": False}
    plain = compress(teacher, Recipe.of(**recipe), data={"x": x})
    packed = compress(teacher, Recipe.of(**recipe, pack_siblings=True), data={"x": x})
    assert [n.op_type for n in packed.model.graph.node].count("Split") == 1
    assert packed.report["quantization"]["equalized_pairs"] == plain.report["quantization"]["equalized_pairs"] == 3
    for got, want in zip(run(packed.model, {"x": x}), run(plain.model, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
