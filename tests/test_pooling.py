"""Outputs of different batches are never joined: a BERT-like encoder that also returns its token-level
hidden states, calibrated, measured and verified on padded sentences whose padding is cut per batch
(issue 13: ``compress --data`` died in ``sensitivity._run`` on ``np.concatenate``); ragged and integer
outputs are scored or skipped with a reason, never a crash."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from inhercc import compress
from inhercc.cli import cli
from inhercc.data import split_indices
from inhercc.layers import find_layers
from inhercc.pipeline import Factorizer
from inhercc.recipe import Recipe
from inhercc.runtime import make_session
from inhercc.sensitivity import measure_sensitivity, relative_output_error
from inhercc.verify import OutputScore, Scores, pooled_fidelity, token_mask
from tests.helpers import make_model

VOCAB, LENGTH = 100, 16


class Encoder(torch.nn.Module):
    """Embedding → 64 → 128 → 64 per token; a masked mean pool as the sentence embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 64)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc2(torch.relu(self.fc1(self.emb(input_ids))))
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1), h


def padded_sentences(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` token-id rows of 3..16 tokens, zero-padded to 16, with their attention mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, LENGTH + 1, n)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, VOCAB, (n, LENGTH)) * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    dyn = {0: "batch", 1: "seq"}
    torch.onnx.export(
        Encoder().eval(),
        (torch.randint(1, VOCAB, (2, 7)), torch.ones(2, 7, dtype=torch.int64)),
        str(d / "encoder.onnx"),
        dynamo=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding", "last_hidden_state"],
        dynamic_axes={
            "input_ids": dyn,
            "attention_mask": dyn,
            "sentence_embedding": {0: "batch"},
            "last_hidden_state": dyn,
        },
        opset_version=17,
    )
    feeds = padded_sentences(80)
    np.savez(d / "train.npz", **feeds)
    return SimpleNamespace(dir=d, path=d / "encoder.onnx", model=onnx.load(str(d / "encoder.onnx")), feeds=feeds)


def masked_scores(t: np.ndarray, s: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """(mean per-sample cosine, rel L2) by hand, padding positions of [batch, seq, …] left out."""
    if mask is not None:
        w = mask[..., None].astype(np.float64)
        t, s = t * w, s * w
    t2, s2 = t.reshape(len(t), -1).astype(np.float64), s.reshape(len(s), -1).astype(np.float64)
    cos = np.sum(t2 * s2, 1) / (np.linalg.norm(t2, axis=1) * np.linalg.norm(s2, axis=1))
    return float(cos.mean()), float(np.linalg.norm(s2 - t2) / np.linalg.norm(t2))


def test_compress_with_data_scores_every_output_on_padded_sentences(encoder) -> None:
    """The README's recommended path (whitened init, sensitivity allocation) on padded data: no crash, and
    the fidelity of the token-level output is its padding-free score, exactly as computed by hand."""
    res = compress(encoder.model, Recipe.of(ratio=0.5, calib_batch_size=8), data=encoder.feeds)
    rep = res.report
    assert rep["output_kinds"] == {"sentence_embedding": "embedding", "last_hidden_state": "embedding"}
    n = len(next(iter(encoder.feeds.values())))
    _, held_idx = split_indices(n, 8, seed=0)  # the one hold-out rule: verify.samples seeded random samples
    held = {k: v[held_idx] for k, v in encoder.feeds.items()}
    t_out = make_session(encoder.model).run(None, held)
    s_out = make_session(res.model).run(None, held)
    for (name, mask), t, s in zip(
        [("sentence_embedding", None), ("last_hidden_state", held["attention_mask"])], t_out, s_out
    ):
        cos, rel = masked_scores(t, s, mask)
        assert rep["fidelity"][name]["cosine"] == pytest.approx(cos, rel=1e-9)
        assert rep["fidelity"][name]["rel_l2"] == pytest.approx(rel, rel=1e-9)
        assert "top1_agreement" not in rep["fidelity"][name]
    assert 0.5 < rep["fidelity"]["sentence_embedding"]["cosine"] < 1.0


def test_sensitivity_pools_batches_cut_to_different_lengths(encoder) -> None:
    """Batches cut to their longest sentence give token-level outputs of different lengths: the measured
    errors pool them (and equal the error over the padding-free tokens)."""
    model = encoder.model
    layers = find_layers(model)
    factorizer = Factorizer("svd")
    spectra = factorizer.spectra(layers)
    measured = measure_sensitivity(model, layers, encoder.feeds, factorizer, spectra, samples=32, batch_size=4)
    assert set(measured) == {la.name for la in layers if la.compressible} and len(measured) == 2
    for m in measured.values():
        assert all(np.isfinite(m["errors"])) and m["errors"][0] >= m["errors"][-1] > 0  # lower rank, more error

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3, 2)), rng.standard_normal((2, 7, 2))
    ma, mb = np.ones((4, 3), np.int64), np.array([[1] * 5 + [0] * 2, [1] * 7])
    sa, sb = a + 0.1, b * 0.5
    err = relative_output_error([[a], [b]], [[sa], [sb]], [ma, mb])
    keep = mb[..., None].astype(bool)
    num = np.sum(0.1**2 * np.ones_like(a)) + np.sum(((sb - b) * keep) ** 2)
    assert err == pytest.approx(num / (np.sum(a**2) + np.sum((b * keep) ** 2)), rel=1e-12)


@pytest.mark.parametrize("options", [{"sequential": True}, {"init": "whitened", "allocation": "greedy"}, {"steps": 3}])
def test_every_calibrated_path_takes_token_level_outputs(encoder, options) -> None:
    """--sequential, --init whitened and distillation died the same way; each now reports both outputs."""
    res = compress(encoder.model, Recipe.of(ratio=0.5, calib_batch_size=8, **options), data=encoder.feeds)
    fid = res.report["fidelity"]
    assert set(fid) == {"sentence_embedding", "last_hidden_state"}
    assert all(0.3 < fid[n]["cosine"] <= 1.0 and np.isfinite(fid[n]["rel_l2"]) for n in fid)


def test_cli_compress_with_data_on_an_encoder_with_token_outputs(encoder, tmp_path) -> None:
    r = CliRunner().invoke(
        cli, ["compress", str(encoder.path), "-o", str(tmp_path / "s.onnx"), "--data", str(encoder.dir / "train.npz")]
    )
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert "last_hidden_state cosine (embedding)" in r.output and "sentence_embedding rel_l2 (embedding)" in r.output


def ragged_model() -> onnx.ModelProto:
    """x [batch, 32] → MatMul 32×128 → y; ``ids`` = ArgMax(y) (int64) and ``where`` = NonZero(y > 1) (int64,
    [2, count]: its length depends on the values, so it differs between batches and teacher and student)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 128)) / 4).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
        helper.make_node("ArgMax", ["y"], ["ids"], axis=1, keepdims=0),
        helper.make_node("Greater", ["y", "one"], ["big"]),
        helper.make_node("NonZero", ["big"], ["where"]),
    ]
    model = make_model(nodes, {"x": ["batch", 32]}, ["y"], {"w": w, "one": np.array(1.0, np.float32)})
    for name in ("ids", "where"):
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
    return model


def test_ragged_and_integer_outputs_are_scored_or_skipped_with_a_reason() -> None:
    model = ragged_model()
    x = np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32)
    res = compress(model, Recipe.of(rank=8, calib_batch_size=8, verify_samples=16), data={"x": x})
    rep = res.report
    assert rep["output_kinds"] == {"y": "logits", "ids": "integer", "where": "integer"}  # ArgMax reads y
    held = x[split_indices(len(x), 16, seed=0)[1]]  # the samples compress held out
    t_y, t_ids, _ = make_session(model).run(None, {"x": held})
    s_y, s_ids, _ = make_session(res.model).run(None, {"x": held})
    assert rep["fidelity"]["ids"] == {"exact_match": pytest.approx(float(np.mean(t_ids == s_ids)))}
    assert rep["fidelity"]["y"]["top1_agreement"] == pytest.approx(float(np.mean(t_ids == s_ids)))
    assert "where" not in rep["fidelity"] and "shapes differ" in rep["fidelity_skipped"]["where"]


def test_scores_pool_like_one_concatenated_set() -> None:
    rng = np.random.default_rng(2)
    t = rng.standard_normal((10, 5))
    s = t + 0.3 * rng.standard_normal((10, 5))
    whole, parts = OutputScore("y", "logits"), Scores({"y": "logits"})
    whole.add(t, s)
    for i in (0, 3, 7):
        parts.add([t[i : i + 4 if i else 3]], [s[i : i + 4 if i else 3]])
    assert parts.fidelity()["y"] == pytest.approx(whole.result(), rel=1e-12)
    assert set(whole.result()) == {"cosine", "rel_l2", "top1_agreement"}
    # token logits [batch, seq, classes]: top-1 per token, padding tokens left out
    tl = rng.standard_normal((2, 3, 4))
    sl = tl.copy()
    sl[0, 2] = -sl[0, 2]  # a padding token disagrees: not counted
    sl[1, 0] = -sl[1, 0]  # a real token disagrees
    score = OutputScore("token_logits", "logits")
    score.add(tl, sl, np.array([[1, 1, 0], [1, 1, 1]]))
    assert score.result()["top1_agreement"] == pytest.approx(4 / 5)
    # without a mask the last axis of a rank-3 output is not known to hold classes: no top-1
    assert "top1_agreement" not in pooled_fidelity([tl], [tl], "token_logits")


def test_attention_shaped_outputs_leave_padded_query_rows_out() -> None:
    """One rule for where a ``[batch, seq]`` mask applies, shared by the scores and the losses: a
    ``[batch, heads, seq, seq]`` output is scored on the real query rows only."""
    rng = np.random.default_rng(4)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    t = rng.standard_normal((2, 3, 4, 4))
    s = t + 0.1 * rng.standard_normal(t.shape)
    s[0, :, 3], s[1, :, 2:] = 100.0, -100.0  # padded query rows: anything
    score = OutputScore("attn", "values")
    score.add(t, s, mask)
    keep = mask.astype(bool)
    rows_t, rows_s = t.transpose(0, 2, 1, 3)[keep], s.transpose(0, 2, 1, 3)[keep]
    assert score.result()["rel_l2"] == pytest.approx(np.linalg.norm(rows_s - rows_t) / np.linalg.norm(rows_t))
    assert token_mask(t.shape, mask).shape == (2, 1, 4, 1) and token_mask((2, 4), None) is None


def test_outputs_batched_on_another_axis_are_scored_per_sample() -> None:
    """A recurrent state ``[2, batch, 16]`` fed and returned beside ``x [batch, 64]``: calibration, the
    sensitivity measurement, sequential calibration and verification cut and score it along axis 1."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 128)) / 8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"), helper.make_node("Add", ["h0", "one"], ["h"])]
    model = make_model(
        nodes, {"x": ["batch", 64], "h0": [2, "batch", 16]}, ["y", "h"], {"w": w, "one": np.ones(1, np.float32)}
    )
    data = {"x": rng.standard_normal((40, 64)).astype(np.float32), "h0": rng.standard_normal((2, 40, 16))}
    data["h0"] = data["h0"].astype(np.float32)
    shapes = {"x": [1, 64], "h0": [2, 1, 16]}
    for options in ({}, {"sequential": True}):
        rep = compress(model, Recipe.of(rank=8, calib_batch_size=8, shapes=shapes, **options), data=data).report
        assert rep["fidelity"]["h"] == {"cosine": 1.0, "rel_l2": 0.0}  # the state is not compressed
        assert 0.3 < rep["fidelity"]["y"]["cosine"] < 1.0
    score = OutputScore("h", "values")
    t = rng.standard_normal((2, 3, 4))
    s = t.copy()
    s[:, 1] = -s[:, 1]  # sample 1 of 3 (axis 1) flipped
    score.add(t, s, axis=1)
    assert score.result()["cosine"] == pytest.approx(1 / 3)
