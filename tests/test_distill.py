"""Distillation (inhercc.distill / losses) on a real small case: a digit classifier (scikit-learn's 8×8
digits) whose two hidden layers are compressed to rank 8, then fine-tuned from the teacher."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from inhercc import compress
from inhercc.calibrate import with_outputs
from inhercc.cli import cli, summary_table
from inhercc.data import LABELS_KEY, open_samples, split_indices
from inhercc.distill import (
    DistillConfig,
    Teacher,
    distill,
    factor_names,
    feature_tensors,
    inherited_outputs,
    rebalance_factors,
    select_trainable,
)
from inhercc.errors import InherccError
from inhercc.losses import (
    DistillLoss,
    OutputLoss,
    ce_loss,
    kd_loss,
    parse_loss_overrides,
    relative_mse,
)
from inhercc.recipe import Recipe
from inhercc.runtime import make_session
from inhercc.verify import fidelity, token_mask
from tests.helpers import make_model

FAST_1 = {"threads": 1, "quiet": True}
FAST = {**FAST_1, "batch_size": 64, "lr": 3e-3}


def digits_teacher(x: np.ndarray, y: np.ndarray, norm: bool = False) -> onnx.ModelProto:
    """x[64] → 128 → ReLU → 128 → ReLU → 10 logits: random features with a ridge-regression head (a real
    classifier, ≈ 95 % accuracy, built in milliseconds). ``norm``: a LayerNormalization (output ``n0``)
    before the first ReLU."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((64, 128)) * np.sqrt(2 / 64) * 4).astype(np.float32)
    b0 = (rng.standard_normal(128) * 0.1).astype(np.float32)
    w1 = (rng.standard_normal((128, 128)) * np.sqrt(2 / 128)).astype(np.float32)
    b1 = (rng.standard_normal(128) * 0.1).astype(np.float32)
    z0 = x @ w0 + b0
    if norm:
        z0 = (z0 - z0.mean(1, keepdims=True)) / np.sqrt(z0.var(1, keepdims=True) + 1e-5)
    h = np.maximum(np.maximum(z0, 0) @ w1 + b1, 0)
    hb = np.concatenate([h, np.ones((len(h), 1), np.float32)], 1)
    w2 = np.linalg.solve(hb.T @ hb + 1e-1 * np.eye(hb.shape[1]), hb.T @ (np.eye(10)[y] * 10 - 5)).astype(np.float32)
    weights = {"fc0.weight": w0, "fc0.bias": b0, "fc1.weight": w1, "fc1.bias": b1}
    weights |= {"fc2.weight": w2[:-1], "fc2.bias": w2[-1]}
    if norm:
        weights |= {"ln.scale": np.ones(128, np.float32), "ln.bias": np.zeros(128, np.float32)}
    nodes, inp = [], "x"
    for i in range(3):
        out = "logits" if i == 2 else f"z{i}"
        nodes += [
            helper.make_node("MatMul", [inp, f"fc{i}.weight"], [f"h{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"h{i}", f"fc{i}.bias"], [out], name=f"fc{i}_bias"),
        ]
        if i == 0 and norm:
            nodes.append(helper.make_node("LayerNormalization", [out, "ln.scale", "ln.bias"], ["n0"], name="ln"))
            out = "n0"
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"], name=f"act{i}"))
            inp = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def digits_xy() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits as float32 in [0, 1] ``[n, 64]`` and int64 labels (the teacher's data)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("digits")
    x, y = digits_xy()
    teacher = digits_teacher(x, y)
    student = compress(teacher, Recipe.of(rank=8, init="svd", verify=False)).model
    onnx.save(teacher, str(d / "teacher.onnx"))
    onnx.save(student, str(d / "student.onnx"))
    np.savez(d / "train.npz", x=x, **{LABELS_KEY: y})
    np.savez(d / "nolabels.npz", x=x)
    return SimpleNamespace(dir=d, x=x, y=y, teacher=teacher, student=student)


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def changed(before: onnx.ModelProto, after: onnx.ModelProto) -> set[str]:
    a, b = inits(before), inits(after)
    return {k for k in a if not np.array_equal(a[k], b[k])}


# --------------------------------------------------------------------------------------------------------
# losses


def test_kd_loss_is_zero_at_the_teacher_and_scales_with_t_squared() -> None:
    t = torch.randn(8, 10)
    assert float(kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10)
    p_t = torch.softmax(t / 2, -1)
    kl = (p_t * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(4 * float(kl), rel=1e-5)


def test_feature_loss_leaves_padding_positions_out() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    hidden_t, hidden_s = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    probs_t, probs_s = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    keep = mask.bool()
    # hidden states: exactly the relative MSE over the real tokens
    want = ((hidden_s[keep] - hidden_t[keep]) ** 2).sum() / (hidden_t[keep] ** 2).sum()
    got = relative_mse(hidden_s, hidden_t, token_mask(hidden_t.shape, mask))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # attention probabilities: the real query rows
    rows_t, rows_s = probs_t.permute(0, 2, 1, 3)[keep], probs_s.permute(0, 2, 1, 3)[keep]
    want = ((rows_s - rows_t) ** 2).sum() / (rows_t**2).sum()
    got = relative_mse(probs_s, probs_t, token_mask(probs_t.shape, mask))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert token_mask((2, 6), mask) is None and token_mask(hidden_t.shape, None) is None
    # in the objective: changing padding positions changes nothing, changing a real token does
    loss = DistillLoss([OutputLoss("e", "embedding", 1.0)], feature_weight=1.0)
    out = [torch.ones(2, 3)]

    def total(s_feat: torch.Tensor) -> float:
        return float(loss(out, out, None, [s_feat], [hidden_t], mask)[0])

    garbage = hidden_s.clone()
    garbage[~keep] = 1e3
    assert total(garbage) == pytest.approx(total(hidden_s), rel=1e-6)
    garbage[0, 0] += 1.0
    assert total(garbage) > total(hidden_s)
    assert float(loss(out, out, None, [hidden_s], [hidden_t])[0]) != pytest.approx(total(hidden_s))  # no mask


def test_training_passes_the_batch_attention_mask_to_the_feature_loss(monkeypatch) -> None:
    """A token model (x [batch, seq, 8] → two MatMuls → masked mean pooling): the feature loss gets each
    batch's own attention mask."""
    rng = np.random.default_rng(0)
    w = {k: (rng.standard_normal((8, 8)) / 3).astype(np.float32) for k in ("w0", "w1")}
    w |= {"axis": np.array([-1], np.int64), "one": np.array([1], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w1"], ["z"], name="fc1"),
        helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["z", "m3"], ["zm"], name="mul"),
        helper.make_node("ReduceSum", ["zm", "one"], ["pooled"], name="pool", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    teacher = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    teacher.ir_version = 8
    student = compress(teacher, Recipe.of(rank=2, init="svd", rank_multiple=1, min_params=0, verify=False)).model
    x = rng.standard_normal((40, 5, 8)).astype(np.float32)
    mask = (np.arange(5)[None] < rng.integers(1, 6, 40)[:, None]).astype(np.int64)
    seen: list[tuple[np.ndarray, tuple[int, ...]]] = []
    call = DistillLoss.__call__

    def spy(self, s_out, t_out, labels=None, s_feat=(), t_feat=(), mask=None):
        seen.append((mask.numpy().copy(), tuple(t_feat[0].shape)))
        return call(self, s_out, t_out, labels, s_feat, t_feat, mask)

    monkeypatch.setattr(DistillLoss, "__call__", spy)
    cfg = DistillConfig(steps=3, batch_size=12, val_split=0.0, feature_loss=1.0, seed=1, threads=1, quiet=True)
    distill(student, teacher, {"x": x, "attention_mask": mask}, config=cfg)
    assert len(seen) == 3
    rows = {tuple(r) for r in mask}
    for m, shape in seen:
        assert m.shape == shape[:2] == (12, 5) and all(tuple(r) in rows for r in m)


def test_output_kinds_and_overrides() -> None:
    # without kinds from a graph, by name as the scores judge them (verify.name_kind): a 2-D "output" is values
    shapes = {"logits": (1, 10), "output": (1, 1000), "sentence_embedding": (1, 384), "token_logits": (1, 7, 50)}
    examples = {k: np.zeros(v, np.float32) for k, v in shapes.items()} | {"ids": np.zeros(1, np.int64)}
    loss = DistillLoss.for_outputs(examples)
    assert [o.kind for o in loss.outputs] == ["kd", "embedding", "embedding", "kd", "none"]
    assert parse_loss_overrides(["a=kd", "b=embedding:0.5", "c=none"]) == {
        "a": ("kd", 1.0),
        "b": ("embedding", 0.5),
        "c": ("none", 1.0),
    }
    for bad in ("a", "a=mse", "a=kd:x", "a=kd:-1"):
        with pytest.raises(InherccError, match="`distill.losses`"):
            parse_loss_overrides([bad])
    with pytest.raises(InherccError, match="unknown output"):
        DistillLoss.for_outputs({"logits": np.zeros((1, 10), np.float32)}, {"nope": ("kd", 1.0)})
    loss = DistillLoss.for_outputs({"logits": np.zeros((1, 10), np.float32), "label": np.zeros(1, np.int64)})
    assert [(o.name, o.kind) for o in loss.outputs] == [("logits", "kd"), ("label", "none")]


def test_labels_add_cross_entropy_with_weight_alpha() -> None:
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.arange(6)
    loss = DistillLoss([OutputLoss("logits", "kd")], temperature=7.0, alpha=0.3, labels=True)
    total, parts = loss([s], [t], y)
    expected = 0.7 * kd_loss(s, t, 7.0) + 0.3 * torch.nn.functional.cross_entropy(s, y)
    assert float(total) == pytest.approx(float(expected), rel=1e-6) and "ce" in parts
    assert float(DistillLoss([OutputLoss("logits", "kd")], temperature=7.0)([s], [t])[0]) != pytest.approx(float(total))
    with pytest.raises(InherccError, match="class ids in"):
        ce_loss(s, torch.full((6,), 10))
    with pytest.raises(InherccError, match="no output is distilled as logits"):
        DistillLoss([OutputLoss("emb", "embedding")], labels=True)


# --------------------------------------------------------------------------------------------------------
# training


def test_distillation_lowers_the_loss_and_raises_held_out_fidelity(case, monkeypatch) -> None:
    trained_on: set[int] = set()
    original = Teacher.__call__

    def spy(self, idx, feeds, *, features, train=True):
        if train:
            trained_on.update(int(i) for i in idx)
        return original(self, idx, feeds, features=features, train=train)

    monkeypatch.setattr(Teacher, "__call__", spy)
    result = distill(case.student, case.teacher, case.dir / "train.npz", epochs=3, **FAST)
    rep = result.report
    hist = rep["training"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]  # the initialization, then every epoch
    assert hist[-1]["loss"] < 0.5 * hist[1]["loss"]
    assert hist[-1]["val_loss"] < hist[1]["val_loss"] < hist[0]["val_loss"]
    before, after = rep["fidelity_before"]["logits"], rep["fidelity"]["logits"]
    assert after["cosine"] > before["cosine"] + 0.02
    assert after["rel_l2"] < before["rel_l2"]
    assert after["top1_agreement"] >= before["top1_agreement"]
    # held-out: the validation samples were never trained on, and the report's fidelity is the ONNX student's
    train_idx, val_idx = split_indices(len(case.x), 0.1, 0)
    assert rep["fidelity_inputs"].startswith("validation split") and rep["training"]["val_samples"] == len(val_idx)
    assert trained_on == set(train_idx.tolist())
    direct = fidelity(case.teacher, result.model, {"x": case.x[val_idx]})
    assert direct["logits"]["cosine"] == pytest.approx(after["cosine"], abs=1e-6)
    t = rep["training"]
    assert t["steps"] == 3 * t["steps_per_epoch"] == t["steps_planned"]
    assert t["best_val_cosine"] == pytest.approx(max(h["val_cosine"] for h in hist))
    assert t["trained"]["tensors"] == 4 and t["wall_s"] > 0
    assert changed(case.student, result.model) == set(factor_names(inits(case.student)))


def test_bf16_autocast_trains_and_validates_in_float32(case, monkeypatch) -> None:
    """--precision bf16: the training forward runs bfloat16 matrix products, the losses and the kept weights
    stay float32 and the validation scores the float32 student (what ONNX Runtime runs)."""
    seen: list[torch.dtype] = []
    original = torch.matmul

    def spy(a, b, *args, **kwargs):
        out = original(a, b, *args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    fp32 = distill(case.student, case.teacher, case.dir / "train.npz", epochs=2, **FAST)
    seen_fp32, seen[:] = list(seen), []
    bf16 = distill(case.student, case.teacher, case.dir / "train.npz", epochs=2, precision="bf16", **FAST)
    assert torch.bfloat16 in seen and torch.bfloat16 not in seen_fp32
    assert bf16.report["training"]["precision"] == "bf16"
    hist = bf16.report["training"]["history"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    before, after = bf16.report["fidelity_before"]["logits"], bf16.report["fidelity"]["logits"]
    assert after["cosine"] > before["cosine"] + 0.02
    # close to the float32 run, and the saved factors are float32
    assert after["cosine"] == pytest.approx(fp32.report["fidelity"]["logits"]["cosine"], abs=0.02)
    assert all(v.dtype == np.float32 for k, v in inits(bf16.model).items() if k in factor_names(inits(bf16.model)))
    # validation in float32: the report's fidelity is the ONNX student's on the validation split
    _, val_idx = split_indices(len(case.x), 0.1, 0)
    direct = fidelity(case.teacher, bf16.model, {"x": case.x[val_idx]})
    assert direct["logits"]["cosine"] == pytest.approx(after["cosine"], abs=1e-6)
    with pytest.raises(InherccError, match="unknown `distill.precision`"):
        distill(case.student, case.teacher, case.dir / "train.npz", steps=1, precision="fp8", **FAST)


def test_labels_change_the_objective(case) -> None:
    with_labels = distill(case.student, case.teacher, case.dir / "train.npz", steps=4, **FAST)
    without = distill(case.student, case.teacher, case.dir / "nolabels.npz", steps=4, **FAST)
    assert "_labels" in with_labels.report["training"]["losses"]
    assert "_labels" not in without.report["training"]["losses"]
    a, b = inits(with_labels.model), inits(without.model)
    assert any(not np.allclose(a[k], b[k]) for k in factor_names(a))
    # same weights (the initialization), other objective
    assert with_labels.report["training"]["history"][0]["val_loss"] != pytest.approx(
        without.report["training"]["history"][0]["val_loss"]
    )


def test_train_selects_exactly_the_intended_parameters(case) -> None:
    factors = select_trainable(case.student, "factors")
    assert sorted(factors) == [
        "fc0.weight.inherit_in",
        "fc0.weight.inherit_out",
        "fc1.weight.inherit_in",
        "fc1.weight.inherit_out",
    ]
    every = select_trainable(case.student, "all")
    assert set(every) == set(inits(case.student))  # all float initializers of this student
    assert select_trainable(case.student, r"bias$") == ["fc0.bias", "fc1.bias", "fc2.bias"]
    for mode, expected in (
        ("factors", set(factors)),
        (r"^fc1\.", {"fc1.weight.inherit_in", "fc1.weight.inherit_out", "fc1.bias"}),
        ("all", set(every)),
    ):
        result = distill(case.student, case.teacher, case.dir / "train.npz", steps=2, train=mode, **FAST)
        assert changed(case.student, result.model) == expected, mode
        assert result.report["training"]["trained"]["tensors"] == len(expected)
    with pytest.raises(InherccError, match="matches no float initializer"):
        select_trainable(case.student, "nothing-like-this")
    # one-element constants (epsilons, scales) are never trained, by name or by "all"
    with_eps = onnx.ModelProto()
    with_eps.CopyFrom(case.student)
    with_eps.graph.initializer.append(numpy_helper.from_array(np.array(1e-5, np.float32), "fc0.eps"))
    assert "fc0.eps" not in select_trainable(with_eps, "all")
    assert sorted(select_trainable(with_eps, r"^fc0\.")) == [
        "fc0.bias",
        "fc0.weight.inherit_in",
        "fc0.weight.inherit_out",
    ]
    with pytest.raises(InherccError, match="no factor initializers"):
        select_trainable(case.teacher, "factors")  # e.g. finetune on an uncompressed model
    with pytest.raises(InherccError, match="valid regex"):
        select_trainable(case.student, "(")


def test_rebalancing_keeps_the_function_and_equalizes_factor_scales(case) -> None:
    from inhercc.torchrt import OnnxModule

    module = OnnxModule(case.student)
    params = module.onnx_parameters()
    with torch.no_grad():
        params["fc0.weight.inherit_in"].mul_(1e-4)  # a whitened-like imbalance
        params["fc0.weight.inherit_out"].mul_(1e4)
        before = module(x=case.x[:16])[0]
        assert rebalance_factors(params, ["fc1.weight.inherit_in"]) == 0  # half a pair trained: untouched
        assert rebalance_factors(params, factor_names(params)) == 2
        after = module(x=case.x[:16])[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    for base in ("fc0.weight", "fc1.weight"):
        rms = [float(params[f"{base}.inherit_{k}"].detach().pow(2).mean().sqrt()) for k in ("in", "out")]
        assert rms[0] == pytest.approx(rms[1], rel=1e-4)


def test_feature_loss_compares_factorized_layer_outputs(case) -> None:
    assert inherited_outputs(case.student, case.teacher) == ["h0", "h1"]  # the factorized MatMuls' outputs
    result = distill(case.student, case.teacher, case.dir / "train.npz", steps=6, feature_loss=1.0, **FAST)
    assert result.report["training"]["losses"]["features"].startswith("2 tensors")
    assert result.report["fidelity"]["logits"]["cosine"] > result.report["fidelity_before"]["logits"]["cosine"]


def test_features_choose_the_tensors_the_feature_loss_compares(case, tmp_path) -> None:
    teacher = digits_teacher(case.x, case.y, norm=True)
    student = compress(teacher, Recipe.of(rank=8, init="svd", verify=False)).model
    assert feature_tensors(student, teacher) == ["h0", "h1"]  # layers: the factorized layers' outputs
    assert feature_tensors(student, teacher, "norms") == ["n0"]
    assert feature_tensors(student, teacher, "^(a1|n0)$") == ["n0", "a1"]  # regex, student order
    for which, message in [
        ("(", "neither layers, norms nor a valid regex"),
        ("nothing_like_this", "matches no tensor"),
        ("^logits$", "matches no tensor"),  # graph outputs are the main loss's
    ]:
        with pytest.raises(InherccError, match=message):
            feature_tensors(student, teacher, which)
    with pytest.raises(InherccError, match="no normalization"):
        feature_tensors(case.student, case.teacher, "norms")
    with pytest.raises(InherccError, match="give `distill.feature_loss`"):
        distill(student, teacher, case.dir / "train.npz", steps=2, features="norms", **FAST)

    np.savez(tmp_path / "x.npz", x=case.x)
    result = distill(student, teacher, tmp_path / "x.npz", steps=8, feature_loss=1.0, features="norms", **FAST)
    assert result.report["training"]["losses"]["features"] == "1 tensors (norms) x 1.0"
    before, after = result.report["fidelity_before"]["logits"], result.report["fidelity"]["logits"]
    assert after["cosine"] > before["cosine"]


def test_norms_found_where_exporters_write_them_out_in_primitive_ops(tmp_path) -> None:
    """A torch block (Linear → LayerNorm → Linear → RMSNorm → Linear) exported at opset 13, where LayerNorm
    becomes ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add and RMSNorm x·rsqrt(mean(x²)+ε)·γ, and at opset 17 (fused
    LayerNormalization): ``norms`` finds both normalizations' outputs — the values after the affine."""
    import io

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc0, self.fc1, self.fc2 = (torch.nn.Linear(16, 16) for _ in range(3))
            self.ln = torch.nn.LayerNorm(16)
            self.gamma = torch.nn.Parameter(torch.rand(16) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(self.fc0(x))
            z = self.fc1(torch.relu(h))
            r = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma
            return self.fc2(r)

    torch.manual_seed(0)
    block, x = Block().eval(), torch.randn(4, 16)
    with torch.no_grad():
        ln_out = block.ln(block.fc0(x))
        z = block.fc1(torch.relu(ln_out))
        rms_out = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * block.gamma
    for opset in (13, 17):
        buf = io.BytesIO()
        torch.onnx.export(block, (x,), buf, opset_version=opset, dynamo=False, input_names=["x"])
        teacher = onnx.load_from_string(buf.getvalue())
        ops = {n.op_type for n in teacher.graph.node}
        assert ("LayerNormalization" in ops) == (opset == 17)
        student = compress(teacher, Recipe.of(rank=4, init="svd", rank_multiple=1, min_params=0, verify=False)).model
        found = feature_tensors(student, teacher, "norms")
        assert len(found) == 2, (opset, found)
        exposed, names = with_outputs(teacher, found)
        values = make_session(exposed).run(names, {"x": x.numpy()})
        np.testing.assert_allclose(values[0], ln_out.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(values[1], rms_out.numpy(), rtol=1e-4, atol=1e-5)


def test_features_must_be_float_tensors(tmp_path) -> None:
    """``--features`` naming an integer tensor (a Shape output both graphs compute) is a user error."""
    rng = np.random.default_rng(3)
    w = {"w0": rng.standard_normal((64, 48)).astype(np.float32), "w1": rng.standard_normal((48, 64)).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="fc1"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["h1", "shape"], ["y"], name="reshape"),
    ]
    teacher = make_model(nodes, {"x": ["N", 64]}, ["y"], w)
    student = compress(teacher, Recipe.of(rank=8, rank_multiple=1, min_params=0, init="svd", verify=False)).model
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    with pytest.raises(InherccError, match="shape not float"):
        distill(student, teacher, tmp_path / "x.npz", steps=2, feature_loss=1.0, features="^shape$", **FAST)


def test_resume_continues_the_same_run(case, tmp_path) -> None:
    cfg = DistillConfig(steps=20, checkpoint_every=4, seed=5, **{**FAST, "batch_size": 128})
    full = distill(case.student, case.teacher, case.dir / "train.npz", config=cfg, checkpoint=str(tmp_path / "a"))
    run_b = functools.partial(distill, case.student, case.teacher, case.dir / "train.npz", config=cfg)
    in_b = {"checkpoint": str(tmp_path / "b")}

    def crash(info):
        if info["step"] == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_b(**in_b, callback=crash)
    steps: list[int] = []
    resumed = run_b(**in_b, resume=True, callback=lambda info: steps.append(info["step"]))
    assert steps == list(range(9, 21))  # continued after the step-8 checkpoint
    t_full, t_res = full.report["training"], resumed.report["training"]
    assert t_res["resumed_from_step"] == 8 and t_res["steps"] == t_full["steps"] == 20
    assert t_res["epochs"] == t_full["epochs"] == 2  # 13 batches per epoch: the run crossed an epoch
    a, b = inits(full.model), inits(resumed.model)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert [h["val_cosine"] for h in t_res["history"]] == pytest.approx([h["val_cosine"] for h in t_full["history"]])
    with pytest.raises(InherccError, match="settings differ"):
        run_b(**in_b, resume=True, lr=1e-2)
    # a checkpoint written before --precision and --features existed resumes as fp32 (and only as fp32)
    # comparing the factorized layers' outputs
    ckpt_path = tmp_path / "b" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["config"]["precision"], ckpt["config"]["features"]
    torch.save(ckpt, ckpt_path)
    assert run_b(**in_b, resume=True).report["training"]["steps"] == 20
    with pytest.raises(InherccError, match="precision 'fp32' → 'bf16'"):
        run_b(**in_b, resume=True, precision="bf16")


def test_prefetching_the_teacher_in_a_worker_thread_changes_nothing(case, monkeypatch) -> None:
    import threading

    threads: list[str] = []
    call = Teacher.__call__

    def spy(self, idx, feeds, **kw):
        threads.append(threading.current_thread().name)
        return call(self, idx, feeds, **kw)

    monkeypatch.setattr(Teacher, "__call__", spy)
    cfg = DistillConfig(steps=12, seed=3, cache_teacher=False, feature_loss=1.0, **FAST)
    ahead = distill(case.student, case.teacher, case.dir / "train.npz", config=cfg, prefetch=True)
    worker = [t for t in threads if t.startswith("inhercc-teacher")]
    # every training batch's teacher ran in the worker (and one batch ahead of the last step); validation in
    # the caller
    assert len(worker) == 13
    threads.clear()
    inline = distill(case.student, case.teacher, case.dir / "train.npz", config=cfg, prefetch=False)
    assert not any(t.startswith("inhercc-teacher") for t in threads)
    assert changed(case.student, ahead.model) and not changed(ahead.model, inline.model)  # bit-identical
    assert ahead.report["training"]["history"] == inline.report["training"]["history"]
    # by default only where the teacher has cores of its own: not when torch takes them all
    threads.clear()
    distill(case.student, case.teacher, case.dir / "train.npz", config=cfg, threads=os.cpu_count())
    assert not any(t.startswith("inhercc-teacher") for t in threads)


def test_early_stop_and_best_weights(case) -> None:
    # a learning rate far too high: validation gets worse, training stops, the best weights are kept
    result = distill(
        case.student,
        case.teacher,
        case.dir / "train.npz",
        epochs=8,
        patience=1,
        eval_every=3,
        **{**FAST, "lr": 0.5, "clip": None, "warmup": 0.0},
    )
    t = result.report["training"]
    assert t["stopped_early"] and t["steps"] < t["steps_planned"]
    fid = result.report["fidelity"]["logits"]["cosine"]
    assert fid == pytest.approx(t["best_val_cosine"], abs=1e-4)  # the written-back weights are the best ones


def test_compress_then_distil_in_one_go(case) -> None:
    cfg = DistillConfig(**FAST)
    result = compress(case.teacher, Recipe.of(rank=8, epochs=2, distill=cfg), data=case.dir / "train.npz")
    rep = result.report
    assert rep["init"] == "whitened"  # calibrated on the training split
    assert rep["training"]["epochs"] == 2
    assert rep["fidelity"]["logits"]["cosine"] > rep["fidelity_before"]["logits"]["cosine"] + 0.01
    assert factor_names(inits(result.model))
    assert "fidelity_verify_data" not in rep
    # --verify-data is scored after training too (the validation split stays the model-selection set)
    held = {"x": case.x[-100:]}
    verified = compress(
        case.teacher, Recipe.of(rank=8, epochs=1, distill=cfg), data=case.dir / "train.npz", verify_data=held
    )
    expected = fidelity(case.teacher, verified.model, held)["logits"]
    assert verified.report["fidelity_verify_data"]["logits"] == pytest.approx(expected)
    assert "on --verify-data after distillation: cosine" in summary_table(verified.report)


def test_data_sources_and_synthetic_fallback(case) -> None:
    items = [{"x": case.x[i : i + 50]} for i in range(0, 400, 50)]
    result = distill(case.student, case.teacher, iter(items), steps=3, **FAST)
    assert result.report["training"]["train_samples"] == 360
    with pytest.warns(UserWarning, match="synthetic"):
        result = distill(case.student, case.teacher, None, steps=2, synthetic_samples=40, **FAST)
    assert result.report["fidelity_inputs"].startswith("synthetic validation split")
    samples = open_samples(case.dir / "train.npz", case.teacher)
    result = distill(case.student, case.teacher, samples, steps=2, val_split=0.0, **FAST)
    assert (
        result.report["training"]["best_val_cosine"] is None and "training samples" in result.report["fidelity_inputs"]
    )


def test_distributed_two_cpu_processes_end_with_identical_weights(case, tmp_path) -> None:
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, sys
        import numpy as np
        from onnx import numpy_helper
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from inhercc.distill import distill, is_main_process
        d = {str(case.dir)!r}
        r = distill(d + "/student.onnx", d + "/teacher.onnx", d + "/train.npz", steps=5, batch_size=32, lr=3e-3,
                    threads=1, quiet=True, checkpoint={str(tmp_path / "ckpt")!r})
        rank = os.environ["RANK"]
        np.savez({str(tmp_path)!r} + f"/rank{{rank}}.npz",
                 **{{t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}})
        with open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w") as f:
            json.dump({{"main": is_main_process(), "training": r.report["training"],
                       "has_fidelity": "fidelity" in r.report}}, f)
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert set(w0.files) == set(w1.files)
    for k in w0.files:
        assert np.array_equal(w0[k], w1[k]), k
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["main"] and not r1["main"]
    assert r0["training"]["world_size"] == 2 and r0["training"]["steps"] == 5
    assert r0["has_fidelity"] and not r1["has_fidelity"]
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists()
    assert any(not np.array_equal(w0[k], v) for k, v in inits(case.student).items())


# --------------------------------------------------------------------------------------------------------
# CLI


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_finetune_and_compress_with_epochs(case, tmp_path) -> None:
    out, rep = tmp_path / "tuned.onnx", tmp_path / "r.json"
    r = invoke(
        "finetune",
        case.dir / "student.onnx",
        "--teacher",
        case.dir / "teacher.onnx",
        "--data",
        case.dir / "train.npz",
        "-o",
        out,
        "--epochs",
        "1",
        "--lr",
        "3e-3",
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--report",
        rep,
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert "logits cosine" in r.output and "distilled 1 epoch(s)" in r.output
    report = json.loads(rep.read_text())
    assert {"fidelity_before", "fidelity", "training"} <= set(report)
    assert report["fidelity"]["logits"]["cosine"] > report["fidelity_before"]["logits"]["cosine"]
    assert changed(case.student, onnx.load(str(out))) == set(factor_names(inits(case.student)))

    out2, rep2 = tmp_path / "s.onnx", tmp_path / "r2.json"
    r = invoke(
        "compress",
        case.dir / "teacher.onnx",
        "-o",
        out2,
        "--rank",
        "8",
        "--init",
        "svd",
        "--data",
        case.dir / "train.npz",
        "--steps",
        "5",
        "--threads",
        "1",
        "--report",
        rep2,
        "-q",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(rep2.read_text())
    assert report["training"]["steps"] == 5 and "fidelity_before" in report
    assert "→" in r.output and "distilled" in r.output


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, x: _npz(p, pixels=x), "lacks model input(s) x"),
        (lambda p, x: _npz(p, x=(x * 16).astype(np.int64)), "x is int64, the model expects float32"),
        (lambda p, x: _npz(p, x=x[:, :32]), "expects dim 1 = 64"),
        (lambda p, x: (p.write_bytes(b""), p)[1], "cannot read"),
        (lambda p, x: _npz(p, x=np.where(np.arange(64) == 3, np.nan, x)), "contains NaN or Inf"),
        (lambda p, x: _npz(p, x=x, _labels=np.arange(3)), "different sample counts"),
    ],
)
def test_cli_bad_data_is_one_line_error(case, tmp_path, make, message) -> None:
    data = make(tmp_path / "bad.npz", case.x[:100])
    out = tmp_path / "o.onnx"
    for args in (
        ("finetune", case.dir / "student.onnx", "--teacher", case.dir / "teacher.onnx", "-o", out),
        ("compress", case.dir / "teacher.onnx", "-o", out, "--epochs", "1"),
    ):
        r = invoke(*args, "--data", data, "-q")
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
        assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--lr", "0.1"), "only used with --epochs or --steps"),
        (("--epochs", "1", "--resume"), "--resume needs --checkpoint"),
        (("--epochs", "1", "--train", "nomatch"), "matches no float initializer"),
        (("--epochs", "1", "--loss", "logits=mse"), "bad --loss"),
        (("--epochs", "1", "--val-split", "1.5"), "--val-split"),
        (("--epochs", "0"), "--epochs must be positive"),
        (("--epochs", "1", "--device", "tpu"), "unknown --device"),
        (("--epochs", "1", "--precision", "fp8"), "--precision"),
        (("--epochs", "1", "--features", "norms"), "give --feature-loss"),
        (("--epochs", "1", "--feature-loss", "--features", "norms"), "no normalization"),
    ],
)
def test_cli_bad_options_are_one_line_errors(case, tmp_path, extra, message) -> None:
    r = invoke(
        "compress",
        case.dir / "teacher.onnx",
        "-o",
        tmp_path / "o.onnx",
        "--data",
        case.dir / "train.npz",
        "--init",
        "svd",
        "-q",
        *extra,
    )
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.output


def test_finetune_rejects_a_student_of_another_teacher(case, tmp_path) -> None:
    other = onnx.ModelProto()
    other.CopyFrom(case.teacher)
    other.graph.output[0].name = "scores"
    other.graph.node[-1].output[0] = "scores"
    onnx.save(other, str(tmp_path / "other.onnx"))
    r = invoke(
        "finetune",
        case.dir / "student.onnx",
        "--teacher",
        tmp_path / "other.onnx",
        "-o",
        tmp_path / "o.onnx",
        "--data",
        case.dir / "train.npz",
        "-q",
    )
    assert r.exit_code == 2 and "differ from teacher outputs" in r.output


def state_model(scale: list[float]) -> onnx.ModelProto:
    """``y = x·W`` and a recurrent state at batch axis 1: ``hn = h0·s`` (``h0`` ``[2, batch, 3]``, as an
    LSTM's), ``s = scale``."""
    w = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Mul", ["h0", "s"], ["hn"])],
        "state",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, "batch", 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [2, "batch", 3]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(scale, np.float32), "s")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_teacher_cache_cuts_each_output_along_its_batch_axis() -> None:
    """A state ``[2, batch, 3]`` is cached per sample, not per direction: cache hits in another order and
    partial misses give exactly the outputs of a direct run."""
    teacher = Teacher(state_model([2.0] * 3), [], "cpu", 0, True, 6)
    rng = np.random.default_rng(0)
    x, h = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((2, 6, 3)).astype(np.float32)
    sess = make_session(state_model([2.0] * 3))
    for idx in ([0, 1], [1, 0], [0, 2, 1], [3, 2]):  # fill, all cached (other order), partial miss, partial miss
        rows = np.array(idx)
        feeds = {"x": x[rows], "h0": h[:, rows]}
        out, _ = teacher(rows, feeds, features=False)
        want = sess.run(None, feeds)
        assert [o.shape for o in out] == [(len(idx), 8), (2, len(idx), 3)]
        for got, ref in zip(out, want):
            np.testing.assert_array_equal(got, ref)
    assert sorted(teacher._cache) == [0, 1, 2, 3]


def test_distillation_with_a_state_at_batch_axis_one() -> None:
    """Distilling a model whose state input and output have the batch at axis 1 (several epochs, so the
    teacher cache is used): the student's state scale is learnt back to the teacher's (2, 2, 2 from
    1.5, 2.5, 1), and the state output ends close to the teacher's."""
    rng = np.random.default_rng(0)
    x, h0 = rng.standard_normal((40, 4)).astype(np.float32), rng.standard_normal((2, 40, 3)).astype(np.float32)
    data = {"x": x, "h0": h0}
    cfg = DistillConfig(epochs=20, batch_size=6, lr=0.1, train="s", val_split=0.25, patience=None, **FAST_1)
    res = distill(state_model([1.5, 2.5, 1.0]), state_model([2.0] * 3), data, config=cfg)
    s = numpy_helper.to_array(next(t for t in res.model.graph.initializer if t.name == "s"))
    np.testing.assert_allclose(s, 2.0, atol=0.02)
    assert res.report["training"]["teacher_cached"] is True
    h = data["h0"][:, split_indices(40, 0.25, 0)[1]]  # before: ‖h·(s − 2)‖ / ‖2h‖ on the validation split
    before = np.linalg.norm(h * (np.array([1.5, 2.5, 1.0]) - 2.0)) / np.linalg.norm(2.0 * h)
    assert res.report["fidelity_before"]["hn"]["rel_l2"] == pytest.approx(before, rel=1e-5)
    assert res.report["fidelity"]["hn"]["rel_l2"] < 0.01 and res.report["fidelity"]["hn"]["cosine"] > 0.99999
