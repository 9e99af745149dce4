"""Fidelity metrics: known values, and parts of different shapes pooled exactly like one concatenated set."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from inhercc.pipeline import compress
from inhercc.recipe import Recipe
from inhercc.verify import Scores, fidelity, output_fidelity, pooled_fidelity
from tests.helpers import masked_model


def test_known_values() -> None:
    t = np.array([[1.0, 0.0], [0.0, 2.0]])
    s = np.array([[1.0, 1.0], [0.0, 2.0]])
    fid = output_fidelity(t, s, "logits")
    assert fid["cosine"] == pytest.approx((1 / np.sqrt(2) + 1) / 2)
    assert fid["rel_l2"] == pytest.approx(1 / np.sqrt(5))
    assert fid["top1_agreement"] == 1.0  # the tie in row 0 goes to the first class in both
    assert "top1_agreement" not in output_fidelity(t, s, "sentence_embedding")
    assert output_fidelity(t, t)["cosine"] == 1.0 and output_fidelity(t, t)["rel_l2"] == 0.0


def test_parts_pool_like_one_concatenated_set() -> None:
    rng = np.random.default_rng(0)
    t = rng.standard_normal((10, 5))
    s = t + 0.3 * rng.standard_normal((10, 5))
    whole = output_fidelity(t, s, "logits")
    split = pooled_fidelity([t[:3], t[3:]], [s[:3], s[3:]], "logits")
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=1e-12)
    # token-level outputs of two sequence lengths cannot be concatenated, but pool all the same
    a, b = rng.standard_normal((4, 3, 2)), rng.standard_normal((2, 7, 2))
    fid = pooled_fidelity([a, b], [a * 1.1, -b], "hidden")
    per_sample = np.concatenate([np.ones(4), -np.ones(2)])
    assert fid["cosine"] == pytest.approx(per_sample.mean())
    err2 = np.sum((0.1 * a) ** 2) + np.sum((2 * b) ** 2)
    assert fid["rel_l2"] == pytest.approx(np.sqrt(err2 / (np.sum(a**2) + np.sum(b**2))))
    ints = Scores({"ids": "integer"})
    for a, b in (([1, 2, 3], [1, 0, 3]), ([4], [4])):
        ints.add([np.array(a)], [np.array(b)])
    assert ints.fidelity()["ids"] == {"exact_match": 0.75}


def test_verification_covers_every_length_bucket(tmp_path) -> None:
    """``--verify-data`` given as a folder of two sequence lengths is scored on both (a token-level output,
    which no concatenation could hold), equal to the pooled fidelity over the two parts."""
    rng = np.random.default_rng(1)
    model = masked_model("seq")
    short = {"x": rng.standard_normal((6, 3, 4)).astype(np.float32), "attention_mask": np.ones((6, 3), np.int64)}
    long = {"x": rng.standard_normal((4, 7, 4)).astype(np.float32), "attention_mask": np.ones((4, 7), np.int64)}
    folder = tmp_path / "verify"
    folder.mkdir()
    np.savez(folder / "a.npz", **short)
    np.savez(folder / "b.npz", **long)
    calib = {"x": rng.standard_normal((20, 5, 4)).astype(np.float32), "attention_mask": np.ones((20, 5), np.int64)}
    res = compress(model, Recipe.of(rank=1, rank_multiple=1, min_params=0), data=calib, verify_data=folder)
    student = res.model
    assert {i.name for i in student.graph.initializer} >= {"w.inherit_in", "w.inherit_out"}
    both = fidelity(model, student, [short, long])
    only_short = fidelity(model, student, short)
    assert res.report["fidelity"]["y"] == pytest.approx(both["y"])
    assert res.report["fidelity"]["y"]["cosine"] != pytest.approx(only_short["y"]["cosine"])
    assert res.report["fidelity_inputs"] == "data"
    assert numpy_helper.to_array(next(i for i in student.graph.initializer if i.name == "w.inherit_in")).shape == (4, 1)


def test_one_value_per_sample_is_scored_by_the_cosine_over_samples() -> None:
    """A per-sample cosine of one number is its sign (always 1 for a positive probability): such an output's
    cosine is taken over all samples, pooled across batches, and equals numpy's on the whole arrays."""
    from inhercc.verify import OutputScore

    rng = np.random.default_rng(0)
    t = rng.uniform(0.0, 1.0, (10, 1))
    s = t + rng.normal(0.0, 0.3, t.shape)
    score = OutputScore("prob", "values")
    score.add(t[:4], s[:4])
    score.add(t[4:], s[4:])
    expected = float(np.sum(t * s) / np.linalg.norm(t) / np.linalg.norm(s))
    assert score.result()["cosine"] == pytest.approx(expected, rel=1e-12)
    assert expected < 0.99  # not the 1.0 a per-sample cosine of positive numbers gives
    summed = OutputScore("prob", "values")
    summed.load(score.vector())  # the sums survive the round trip used across processes
    assert summed.result() == score.result()
