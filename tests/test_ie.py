"""IE-KD (inhercc.distill.ie): the inheritance and exploration losses on hand-made tensors, the channel split,
the teacher's factor auto-encoder (trained, then frozen), the exported student left unchanged, and ``--ie`` from
the CLI on a tiny CNN and a tiny token model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

from inhercc import compress
from inhercc.cli import cli
from inhercc.distill import DistillConfig, distill
from inhercc.distill import trainer as trainer_mod
from inhercc.distill.ie import (
    FactorAutoEncoder,
    default_ie_feature,
    factor_encoder,
    ie_terms,
    l2_normalize,
    split_channels,
)
from inhercc.errors import InherccError
from inhercc.recipe import Recipe
from tests.helpers import make_model

FAST = {"threads": 1, "quiet": True, "batch_size": 16, "lr": 3e-3}


def tiny_cnn(channels: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x [batch, 3, 8, 8] → Conv 3×3 (``channels``) → Relu → GlobalAveragePool → Flatten → Gemm → logits [batch, 10]."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv.weight": (rng.standard_normal((channels, 3, 3, 3)) * 0.4).astype(np.float32),
        "conv.bias": (rng.standard_normal(channels) * 0.1).astype(np.float32),
        "fc.weight": (rng.standard_normal((10, channels)) * 0.5).astype(np.float32),
        "fc.bias": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, {"x": ["batch", 3, 8, 8]}, ["logits"], weights)


def tiny_tokens(hidden: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x [batch, 6, 16] → MatMul → Add → LayerNormalization (``n``) → Relu → MatMul → y [batch, 6, 8]."""
    rng = np.random.default_rng(seed)
    weights = {
        "fc1.weight": (rng.standard_normal((16, hidden)) / 4).astype(np.float32),
        "fc1.bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "ln.scale": np.ones(hidden, np.float32),
        "ln.bias": np.zeros(hidden, np.float32),
        "fc2.weight": (rng.standard_normal((hidden, 8)) / np.sqrt(hidden)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "fc1.bias"], ["hb"], name="fc1_bias"),
        helper.make_node("LayerNormalization", ["hb", "ln.scale", "ln.bias"], ["n"], name="ln", axis=-1),
        helper.make_node("Relu", ["n"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "fc2.weight"], ["y"], name="fc2"),
    ]
    return make_model(nodes, {"x": ["batch", 6, 16]}, ["y"], weights)


def cnn_data(path: Path, n: int = 96) -> Path:
    x = np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)
    np.savez(path, x=x)
    return path


def token_data(path: Path, n: int = 96) -> Path:
    x = np.random.default_rng(2).standard_normal((n, 6, 16)).astype(np.float32)
    np.savez(path, x=x)
    return path


def squeeze(model: onnx.ModelProto) -> onnx.ModelProto:
    """A compressed student of ``model``: every factorizable layer at rank 4."""
    return compress(model, Recipe.of(rank=4, rank_multiple=1, min_params=0, init="svd", verify=False)).model


def structure(model: onnx.ModelProto) -> tuple:
    """Nodes (op, inputs, outputs), initializer names and shapes, graph inputs and outputs."""
    g = model.graph
    return (
        [(n.op_type, list(n.input), list(n.output)) for n in g.node],
        [(t.name, list(t.dims)) for t in g.initializer],
        [i.name for i in g.input],
        [o.name for o in g.output],
    )


# --------------------------------------------------------------------------------------------------------
# the losses, n() and the split


def test_l2_normalize_per_sample() -> None:
    x = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])  # [2, 1, 2]: the second sample all zeros
    n = l2_normalize(x)
    assert n.shape == (2, 2)
    assert torch.allclose(n[0], torch.tensor([0.6, 0.8]) * 2**0.5)  # norm √D: unit RMS
    assert torch.equal(n[1], torch.zeros(2))  # finite, not NaN
    y = torch.randn(3, 4, 2, 2)
    assert torch.allclose(l2_normalize(y).pow(2).mean(dim=1), torch.ones(3))  # unit RMS whatever D
    assert torch.allclose(l2_normalize(5.0 * y), l2_normalize(y))  # scale-free


def test_ie_terms_exact_values() -> None:
    t = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # n: [0.6, 0.8], [1, 0]
    i = torch.tensor([[4.0, 3.0], [2.0, 0.0]])  # n: [0.8, 0.6], [1, 0]
    e = torch.tensor([[1.0, 0.0], [0.0, -5.0]])  # n: [1, 0], [0, -1]
    inh, exp = ie_terms(t, i, e, "l1")  # n() scales unit vectors by √D = √2
    assert inh.item() == pytest.approx(2**0.5 * (0.2 + 0.2 + 0 + 0) / 4)
    assert exp.item() == pytest.approx(2**0.5 * (0.4 + 0.8 + 1.0 + 1.0) / 4)
    inh_c, exp_c = ie_terms(t, i, e, "cos")
    assert inh_c.item() == pytest.approx(inh.item())  # the inheritance term is the same in both forms
    assert exp_c.item() == pytest.approx((0.6 + 0.0) / 2)  # mean |cos(φ_T, φ_E)|


def test_ie_loss_sign_and_weights() -> None:
    from inhercc.distill.ie import ie_loss

    t = torch.tensor([[3.0, 4.0]])
    i = torch.tensor([[4.0, 3.0]])
    e = torch.tensor([[1.0, 0.0]])
    total, parts = ie_loss(t, i, e, inherit_weight=2.0, explore_weight=0.5, explore_form="l1")
    r2 = 2**0.5  # n() has unit RMS: unit vectors scaled by √D
    assert parts == pytest.approx({"ie_inherit": 0.2 * r2, "ie_explore": 0.6 * r2})
    assert total.item() == pytest.approx(r2 * (2.0 * 0.2 - 0.5 * 0.6))  # exploration pushes away: subtracted
    total, parts = ie_loss(t, i, e, inherit_weight=1.0, explore_weight=1.0, explore_form="cos")
    assert total.item() == pytest.approx(0.2 * r2 + 0.6)  # |cos| pushes toward orthogonal: added


def test_split_half_and_random() -> None:
    inh, exp = split_channels(7, "half", seed=0)
    assert inh.tolist() == [0, 1, 2] and exp.tolist() == [3, 4, 5, 6]
    a = split_channels(16, "random", seed=3)
    b = split_channels(16, "random", seed=3)
    c = split_channels(16, "random", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # seeded
    assert not torch.equal(a[0], c[0])
    assert len(a[0]) == len(a[1]) == 8
    assert set(a[0].tolist()).isdisjoint(a[1].tolist())
    assert sorted(a[0].tolist() + a[1].tolist()) == list(range(16))
    assert a[0].tolist() != list(range(8))  # a permutation, not the halves
    with pytest.raises(InherccError, match="`distill.ie_feature`"):
        split_channels(1, "half", seed=0)


def test_factor_encoder_architecture() -> None:
    conv = factor_encoder(24, spatial=True)
    convs = [m for m in conv if isinstance(m, torch.nn.Conv2d)]
    shapes = [(c.in_channels, c.out_channels, c.kernel_size) for c in convs]
    assert shapes == [(24, 24, (3, 3)), (24, 32, (3, 3)), (32, 32, (3, 3))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in conv) == 3
    assert all(m.negative_slope == 0.1 for m in conv if isinstance(m, torch.nn.LeakyReLU))
    assert conv(torch.randn(2, 24, 5, 5)).shape == (2, 32, 5, 5)
    lin = factor_encoder(24, spatial=False)
    linears = [(m.in_features, m.out_features) for m in lin if isinstance(m, torch.nn.Linear)]
    assert linears == [(24, 24), (24, 32), (32, 32)]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in lin) == 3
    assert lin(torch.randn(2, 6, 24)).shape == (2, 6, 32)
    ae = FactorAutoEncoder(24, spatial=True)
    factor, rec = ae(torch.randn(2, 24, 5, 5))
    assert factor.shape == (2, 32, 5, 5) and rec.shape == (2, 24, 5, 5)


def test_padding_tokens_left_out() -> None:
    """Token features: what the student computes at padding positions changes neither term."""
    from inhercc.distill.ie import IEKD

    ie = IEKD("n", (2, 5, 12), (2, 5, 10), DistillConfig(ie=True))
    ie.freeze()
    ie.encoders.eval()
    s, t = torch.randn(2, 5, 10), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = s.clone()
    noisy[0, 3:] = 100.0 * torch.randn(2, 10)
    a, parts_a = ie(s, t, mask)
    b, parts_b = ie(noisy, t, mask)
    assert parts_a == pytest.approx(parts_b, abs=1e-7) and a.item() == pytest.approx(b.item(), abs=1e-7)
    assert ie(noisy, t)[1] != pytest.approx(parts_a, abs=1e-4)  # without the mask they count
    assert ie.report()["channels"] == {"student": 10, "teacher": 12, "inherit": 5, "explore": 5}
    with pytest.raises(InherccError, match=r"`distill.ie_feature` 'r': shapes \[2, 8, 4, 4\] \(student\)"):
        IEKD("r", (2, 16, 8, 8), (2, 8, 4, 4), DistillConfig(ie=True))


def test_default_feature() -> None:
    cnn = tiny_cnn()
    assert default_ie_feature(squeeze(cnn), cnn) == "r"  # the input of the global pooling
    tok = tiny_tokens()
    assert default_ie_feature(squeeze(tok), tok) == "n"  # the last normalization output
    # ReduceMean over the spatial axes counts as a global pooling
    rm = onnx.ModelProto()
    rm.CopyFrom(cnn)
    rm.graph.node[2].CopyFrom(helper.make_node("ReduceMean", ["r"], ["p"], name="pool", axes=[2, 3], keepdims=1))
    assert default_ie_feature(rm, rm) == "r"


def test_config_checks() -> None:
    with pytest.raises(InherccError, match=r"`distill.ie_feature`.*`distill.ie`"):
        DistillConfig(ie_feature="r").check()
    with pytest.raises(InherccError, match="`distill.ie_split`"):
        DistillConfig(ie=True, ie_split="odd").check()
    with pytest.raises(InherccError, match="`distill.ie_explore`"):
        DistillConfig(ie=True, ie_explore="l2").check()
    with pytest.raises(InherccError, match="`distill.ie_ae_steps`"):
        DistillConfig(ie=True, ie_ae_steps=0).check()
    with pytest.raises(InherccError, match="`distill.ie_explore_weight`"):
        DistillConfig(ie=True, ie_explore_weight=-1.0).check()


# --------------------------------------------------------------------------------------------------------
# training


def test_bad_feature_is_one_line_naming_the_field(tmp_path) -> None:
    cnn = tiny_cnn()
    with pytest.raises(InherccError) as e:
        distill(squeeze(cnn), cnn, cnn_data(tmp_path / "d.npz"), ie=True, ie_feature="nope", steps=1, **FAST)
    msg = str(e.value)
    assert "`distill.ie_feature`" in msg and "'nope'" in msg and "\n" not in msg


def test_teacher_ae_frozen_and_learns(tmp_path, monkeypatch) -> None:
    """The AE's reconstruction L1 goes down in its phase; then nothing of it (weights, BN statistics) changes
    while the student and its encoders train, and the student's encoders do change."""
    cnn = tiny_cnn()
    seen: dict[str, dict[str, torch.Tensor]] = {}
    build, finish = trainer_mod.Trainer._build_optimizer, trainer_mod.Trainer.finish

    def snap(prefix: str, self) -> None:
        seen[prefix + "ae"] = {k: v.detach().clone() for k, v in self.ie.teacher_ae.state_dict().items()}
        seen[prefix + "enc"] = {k: v.detach().clone() for k, v in self.ie.encoders.state_dict().items()}

    def build_and_snap(self) -> None:
        build(self)
        snap("before_", self)

    def snap_and_finish(self):
        snap("after_", self)
        return finish(self)

    monkeypatch.setattr(trainer_mod.Trainer, "_build_optimizer", build_and_snap)
    monkeypatch.setattr(trainer_mod.Trainer, "finish", snap_and_finish)
    r = distill(squeeze(cnn), cnn, cnn_data(tmp_path / "d.npz"), ie=True, ie_ae_steps=40, steps=6, **FAST)
    ie = r.report["training"]["ie"]
    assert ie["feature"] == "r" and ie["ae_steps"] == 40
    assert ie["ae_l1"]["last"] < 0.7 * ie["ae_l1"]["first"]
    for k, v in seen["before_ae"].items():
        assert torch.equal(v, seen["after_ae"][k]), k
    assert any(not torch.equal(v, seen["after_enc"][k]) for k, v in seen["before_enc"].items())
    for term in ("inherit", "explore"):
        assert np.isfinite(ie[term]["first"]) and np.isfinite(ie[term]["last"])
        assert 0 <= ie[term]["first"] <= 2.0


def test_exported_graph_unchanged(tmp_path) -> None:
    tok = tiny_tokens()
    student = squeeze(tok)
    data = token_data(tmp_path / "d.npz")
    plain = distill(student, tok, data, steps=3, **FAST).model
    ie = distill(student, tok, data, steps=3, ie=True, ie_ae_steps=5, ie_split="random", **FAST)
    assert structure(ie.model) == structure(plain) == structure(student)
    assert ie.report["training"]["ie"]["feature"] == "n"
    assert ie.report["training"]["ie"]["split"] == "random"


def test_resume_continues_the_same_ie_run(tmp_path) -> None:
    """A run stopped after a checkpoint and resumed ends where an uninterrupted one does (encoders, the frozen
    auto-encoder and the recorded terms come back from the checkpoint); other IE settings or no IE: an error."""
    cnn = tiny_cnn()
    student, data = squeeze(cnn), cnn_data(tmp_path / "d.npz")
    cfg = DistillConfig(steps=8, checkpoint_every=3, seed=2, ie=True, ie_ae_steps=10, **FAST)
    full = distill(student, cnn, data, config=cfg, checkpoint=str(tmp_path / "a"))

    def crash(info):
        if info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(student, cnn, data, config=cfg, checkpoint=str(tmp_path / "b"), callback=crash)
    resumed = distill(student, cnn, data, config=cfg, checkpoint=str(tmp_path / "b"), resume=True)
    t_full, t_res = full.report["training"], resumed.report["training"]
    assert t_res["resumed_from_step"] == 3 and t_res["steps"] == 8
    assert t_res["ie"] == t_full["ie"]  # the AE's L1 and the terms, first and last, as in the full run
    a = {t.name: onnx.numpy_helper.to_array(t) for t in full.model.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in resumed.model.graph.initializer}
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(InherccError, match="settings differ.*ie_split"):
        distill(student, cnn, data, config=cfg, checkpoint=str(tmp_path / "b"), resume=True, ie_split="random")
    with pytest.raises(InherccError, match="cannot be read"):
        distill(student, cnn, data, config=cfg, checkpoint=str(tmp_path / "b"), resume=True, ie=False)


# --------------------------------------------------------------------------------------------------------
# CLI


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("kind", ["cnn", "tokens"])
def test_cli_compress_and_finetune_with_ie(tmp_path, kind) -> None:
    teacher = tiny_cnn() if kind == "cnn" else tiny_tokens()
    thin = tiny_cnn(channels=8, seed=5) if kind == "cnn" else tiny_tokens(hidden=16, seed=5)
    data = cnn_data(tmp_path / "d.npz") if kind == "cnn" else token_data(tmp_path / "d.npz")
    onnx.save(teacher, tmp_path / "t.onnx")
    onnx.save(thin, tmp_path / "thin.onnx")
    common = ("--data", data, "--threads", "1", "--batch-size", "16", "--ie", "--ie-ae-steps", "5", "-q")
    r = invoke(
        "compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--rank", "4", "--rank-multiple", "1",
        "--min-params", "0", "--init", "svd", "--epochs", "1", "--report", tmp_path / "r.json", *common,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ie = json.loads((tmp_path / "r.json").read_text())["training"]["ie"]
    assert ie["feature"] == ("r" if kind == "cnn" else "n")
    assert {"first", "last"} <= set(ie["inherit"]) and {"first", "last"} <= set(ie["explore"])
    r = invoke(
        "finetune", tmp_path / "thin.onnx", "--teacher", tmp_path / "t.onnx", "-o", tmp_path / "f.onnx",
        "--train", "all", "--steps", "3", "--ie-explore", "cos", "--report", tmp_path / "f.json", *common,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ie = json.loads((tmp_path / "f.json").read_text())["training"]["ie"]
    half = 4 if kind == "cnn" else 8
    assert ie["channels"] == {"student": 2 * half, "teacher": 2 * half * 2, "inherit": half, "explore": half}
    assert ie["explore_form"] == "cos" and 0 <= ie["explore"]["last"] <= 1
    assert structure(onnx.load(tmp_path / "f.onnx")) == structure(thin)


def test_cli_bad_feature(tmp_path) -> None:
    onnx.save(tiny_cnn(), tmp_path / "t.onnx")
    r = invoke(
        "compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--rank", "4", "--rank-multiple", "1",
        "--min-params", "0", "--data", cnn_data(tmp_path / "d.npz"), "--steps", "1", "--threads", "1",
        "--ie", "--ie-feature", "nope", "-q",
    )  # fmt: skip
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--ie-feature" in lines[0] and "'nope'" in lines[0], r.output
    assert "Traceback" not in r.output
