"""Output kinds: a 2-D float output is not always logits. Kinds come from the graph (a Softmax/ArgMax
around it, a normalization or a pooling making it), then from names, else ``values``; the user overrides
them; top-1 agreement only for logits and probabilities, KD only for logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from inhercc import compress
from inhercc.cli import cli
from inhercc.errors import InherccError
from inhercc.losses import DistillLoss, probs_loss
from inhercc.recipe import Recipe
from inhercc.verify import (
    OutputScore,
    fidelity,
    graph_class_axes,
    graph_output_kinds,
    parse_output_kinds,
    token_mask,
)
from tests.helpers import make_model, run

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((64, 128)) / 8).astype(np.float32)


def head(tail: list, out: str = "out", extra: dict | None = None):
    """x [batch, 64] → MatMul (W 64×128) → ``h``, then the ``tail`` nodes making ``out``."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"), *tail]
    return make_model(nodes, {"x": ["batch", 64]}, [out], {"w": W, **(extra or {})})


def kinds(model) -> str:
    return graph_output_kinds(model)[model.graph.output[0].name]


def test_kinds_from_the_graph() -> None:
    two = {"two": np.array([2.0], np.float32)}
    assert kinds(head([helper.make_node("Softmax", ["h"], ["out"], axis=1)])) == "probs"
    assert kinds(head([helper.make_node("Sigmoid", ["h"], ["out"])])) == "probs"
    assert kinds(head([helper.make_node("LogSoftmax", ["h"], ["out"], axis=1)])) == "logits"
    assert kinds(head([helper.make_node("LpNormalization", ["h"], ["out"], axis=1, p=2)])) == "embedding"
    # x / ‖x‖ as torch's F.normalize exports it: ReduceL2 → Clip → Expand → Div
    shape = {"shape": np.array([1, 128], np.int64)}
    l2 = [
        helper.make_node("ReduceL2", ["h"], ["n"], axes=[1], keepdims=1),
        helper.make_node("Clip", ["n", "eps"], ["c"]),
        helper.make_node("Expand", ["c", "shape"], ["e"]),
        helper.make_node("Div", ["h", "e"], ["out"]),
    ]
    assert kinds(head(l2, extra={"eps": np.array(1e-12, np.float32), **shape})) == "embedding"
    assert kinds(head([helper.make_node("Div", ["h", "two"], ["out"])], extra=two)) == "values"  # h / 2: no norm
    # logits read by a softmax / argmax (the model also returns them), whatever their name
    probs = head([helper.make_node("Identity", ["h"], ["out"]), helper.make_node("Softmax", ["out"], ["p"], axis=1)])
    assert kinds(probs) == "logits"
    ids = head([helper.make_node("Flatten", ["h"], ["out"]), helper.make_node("ArgMax", ["out"], ["i"], axis=1)])
    assert kinds(ids) == "logits"


def test_kinds_from_names_and_the_default() -> None:
    def named(name: str) -> str:
        return kinds(head([helper.make_node("Relu", ["h"], [name])], out=name))

    assert named("logits") == "logits" and named("cls_scores") == "logits" and named("probs") == "probs"
    for name in ("sentence_embedding", "pooler_output", "last_hidden_state", "features"):
        assert named(name) == "embedding"
    assert named("out") == "values" and named("output") == "values"
    ids = head([helper.make_node("ArgMax", ["h"], ["out"], axis=1)])
    ids.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    assert kinds(ids) == "integer"


def test_top1_only_for_logits_and_the_user_overrides() -> None:
    """An L2-normalized embedding named ``out`` was scored by top-1 agreement (the rule knew only names);
    now it is an embedding, unless the user says otherwise."""
    model = head([helper.make_node("LpNormalization", ["h"], ["out"], axis=1, p=2)])
    x = RNG.standard_normal((64, 64)).astype(np.float32)
    student = compress(model, Recipe.of(rank=4, rank_multiple=1, verify=False)).model
    fid = fidelity(model, student, {"x": x})["out"]
    assert set(fid) == {"cosine", "rel_l2"}
    forced = fidelity(model, student, {"x": x}, output_kinds={"out": "logits"})["out"]
    assert forced["cosine"] == fid["cosine"] and 0.0 <= forced["top1_agreement"] <= 1.0
    res = compress(model, Recipe.of(rank=4, rank_multiple=1, output_kinds={"out": "probs"}), data={"x": x})
    assert res.report["output_kinds"] == {"out": "probs"} and "top1_agreement" in res.report["fidelity"]["out"]
    with pytest.raises(InherccError, match="unknown output.*nope"):
        compress(model, Recipe.of(rank=4, output_kinds={"nope": "logits"}))
    with pytest.raises(InherccError, match="unknown kind 'class'"):
        graph_output_kinds(model, {"out": "class"})
    assert parse_output_kinds(["a=logits", " b = embedding"]) == {"a": "logits", "b": "embedding"}
    for bad in ("a", "a=class", "=logits"):
        with pytest.raises(InherccError, match="`output_kinds`"):
            parse_output_kinds([bad])


def test_cli_output_kind(tmp_path) -> None:
    import onnx

    model = head([helper.make_node("Relu", ["h"], ["out"])])
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((40, 64)).astype(np.float32))
    base = ["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s.onnx"), "--rank", "8"]
    data = ["--data", str(tmp_path / "d.npz")]
    r = CliRunner().invoke(cli, base + data)
    assert r.exit_code == 0 and "out cosine (values)" in r.output and "top1" not in r.output, r.output
    r = CliRunner().invoke(cli, base + data + ["--output-kind", "out=logits"])
    assert r.exit_code == 0 and "out top1_agreement (logits)" in r.output, r.output
    r = CliRunner().invoke(cli, base + ["--output-kind", "out=class"])
    assert r.exit_code == 2 and r.output.startswith("error: bad --output-kind 'out=class'"), r.output


def test_losses_follow_the_kinds() -> None:
    examples = {k: np.zeros((2, 5), np.float32) for k in ("a", "b", "c", "d")} | {"e": np.zeros(2, np.int64)}
    kinds = {"a": "logits", "b": "probs", "c": "embedding", "d": "values", "e": "integer"}
    loss = DistillLoss.for_outputs(examples, {"d": ("kd", 2.0)}, kinds=kinds)
    assert [(o.kind, o.weight) for o in loss.outputs] == [
        ("kd", 1.0),
        ("probs", 1.0),
        ("embedding", 1.0),
        ("kd", 2.0),  # the user's --loss wins
        ("none", 1.0),
    ]
    # probabilities: KL without a temperature, over the rows (softmax) or per element (sigmoid)
    t = torch.softmax(torch.randn(3, 4), -1)
    s = torch.softmax(torch.randn(3, 4), -1)
    assert float(probs_loss(s, t)) == pytest.approx(float((t * (t / s).log()).sum(-1).mean()), rel=1e-5)
    assert float(probs_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    tb, sb = torch.tensor([[0.9, 0.2]]), torch.tensor([[0.6, 0.3]])
    bern = tb * (tb / sb).log() + (1 - tb) * ((1 - tb) / (1 - sb)).log()
    assert float(probs_loss(sb, tb)) == pytest.approx(float(bern.mean()), rel=1e-5)


def test_cli_finetune_output_kind(tmp_path) -> None:
    import onnx

    model = head([helper.make_node("Relu", ["h"], ["out"])])
    onnx.save(model, str(tmp_path / "t.onnx"))
    onnx.save(compress(model, Recipe.of(rank=8, verify=False)).model, str(tmp_path / "s.onnx"))
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((40, 64)).astype(np.float32))
    args = ["finetune", str(tmp_path / "s.onnx"), "--teacher", str(tmp_path / "t.onnx"), "-o", str(tmp_path / "o.onnx")]
    args += ["--data", str(tmp_path / "d.npz"), "--steps", "2", "-q", "--report", str(tmp_path / "r.json")]
    r = CliRunner().invoke(cli, args + ["--output-kind", "out=logits"])
    assert r.exit_code == 0 and "out top1_agreement (logits)" in r.output, r.output
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["output_kinds"] == {"out": "logits"} and rep["training"]["losses"] == {"out": "kd"}
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "out cosine (values)" in r.output and "top1" not in r.output, r.output


def typed(model, dims: list) -> object:
    """``model`` with its (first) output's dims declared, as exporters write them."""
    model.graph.output[0].type.tensor_type.shape.Clear()
    for d in dims:
        dim = model.graph.output[0].type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    return model


def test_a_sigmoid_map_is_values_and_gets_no_top1() -> None:
    """A detector's sigmoid heatmap ``[batch, 1, 8, 16]`` reported a top-1 agreement over the image width;
    it is ``values`` now, and top-1 agreement needs a class axis: rank 2, rank 3 with a token mask, or the
    axis a Softmax / ArgMax reads."""
    shape = {"shape": np.array([-1, 1, 8, 16], np.int64)}
    tail = [helper.make_node("Reshape", ["h", "shape"], ["r"]), helper.make_node("Sigmoid", ["r"], ["out"])]
    heatmap = typed(head(tail, extra=shape), ["batch", 1, 8, 16])
    assert kinds(heatmap) == "values"
    assert kinds(typed(head([helper.make_node("Sigmoid", ["h"], ["out"])]), ["batch", 128])) == "probs"
    x = RNG.standard_normal((32, 64)).astype(np.float32)
    student = compress(heatmap, Recipe.of(rank=4, rank_multiple=1, verify=False)).model
    assert set(fidelity(heatmap, student, {"x": x})["out"]) == {"cosine", "rel_l2"}
    # forced to probs, still no class axis to take a top-1 over
    assert "top1_agreement" not in fidelity(heatmap, student, {"x": x}, output_kinds={"out": "probs"})["out"]


def test_top1_over_the_axis_an_argmax_reads() -> None:
    """Segmentation logits ``[batch, 4 classes, 8, 4]`` read by ``ArgMax(axis=1)``: top-1 agreement per pixel
    over the class axis, equal to the agreement of the two models' argmax maps."""
    shape = {"shape": np.array([-1, 4, 8, 4], np.int64)}
    tail = [
        helper.make_node("Reshape", ["h", "shape"], ["out"]),
        helper.make_node("ArgMax", ["out"], ["ids"], axis=1, keepdims=0),
    ]
    model = head(tail, extra=shape)
    assert graph_class_axes(model) == {"out": 1}
    x = RNG.standard_normal((32, 64)).astype(np.float32)
    student = compress(model, Recipe.of(rank=2, rank_multiple=1, verify=False)).model
    t = run(model, {"x": x})[0]
    s = run(student, {"x": x})[0]
    want = float(np.mean(np.argmax(t, 1) == np.argmax(s, 1)))
    assert 0.2 < want < 1.0
    assert fidelity(model, student, {"x": x})["out"]["top1_agreement"] == pytest.approx(want, rel=1e-12)
    # without a class axis from the graph, a rank-4 output gets none
    score = OutputScore("out", "logits")
    score.add(t, s)
    assert "top1_agreement" not in score.result()


def test_token_level_probabilities_leave_padding_out_of_the_loss() -> None:
    """Token-level probabilities ``[batch, seq, classes]`` (softmax rows and sigmoid elements) and token-level
    embeddings: the loss is the one over the real tokens only; padding positions change nothing."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    keep = mask.bool()
    t, s = torch.softmax(torch.randn(2, 4, 5, generator=g), -1), torch.softmax(torch.randn(2, 4, 5, generator=g), -1)
    want = float((t[keep] * (t[keep] / s[keep]).log()).sum(-1).mean())
    assert float(probs_loss(s, t, token_mask(t.shape, mask))) == pytest.approx(want, rel=1e-5)
    tb, sb = torch.rand(2, 4, 5, generator=g), torch.rand(2, 4, 5, generator=g)
    bern = tb * (tb / sb).log() + (1 - tb) * ((1 - tb) / (1 - sb)).log()
    assert float(probs_loss(sb, tb, token_mask(tb.shape, mask))) == pytest.approx(float(bern[keep].mean()), rel=1e-5)
    # in the objective: the probs and the embedding outputs both ignore padding positions
    loss = DistillLoss.for_outputs(
        {"p": t.numpy(), "h": tb.numpy()}, kinds={"p": "probs", "h": "embedding"}, temperature=1.0
    )
    base, parts = loss([s, sb], [t, tb], mask=mask)
    assert parts["p"] == pytest.approx(want, rel=1e-5)
    junk_s, junk_sb = s.clone(), sb.clone()
    junk_s[~keep], junk_sb[~keep] = torch.tensor([1.0, 0, 0, 0, 0]), 5.0
    assert float(loss([junk_s, junk_sb], [t, tb], mask=mask)[0]) == pytest.approx(float(base), rel=1e-6)
    real = s.clone()
    real[0, 0] = torch.tensor([1.0, 0, 0, 0, 0])
    assert float(loss([real, sb], [t, tb], mask=mask)[0]) > float(base) + 0.1
