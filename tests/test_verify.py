"""Fidelity metrics: known values, and parts of different shapes pooled exactly like one concatenated set."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from inhercc.pipeline import compress
from inhercc.verify import compare_output_parts, fidelity, output_fidelity, pooled_fidelity
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
    ints = compare_output_parts(
        ["ids"], [[np.array([1, 2, 3])], [np.array([4])]], [[np.array([1, 0, 3])], [np.array([4])]]
    )
    assert ints["ids"] == {"exact_match": 0.75}
    assert compare_output_parts(["y"], [[t]], [[s]])["y"] == output_fidelity(t, s, "y")


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
    res = compress(model, rank=1, rank_multiple=1, min_params=0, data=calib, verify_data=folder)
    student = res.model
    assert {i.name for i in student.graph.initializer} >= {"w.inherit_in", "w.inherit_out"}
    both = fidelity(model, student, [short, long])
    only_short = fidelity(model, student, short)
    assert res.report["fidelity"]["y"] == pytest.approx(both["y"])
    assert res.report["fidelity"]["y"]["cosine"] != pytest.approx(only_short["y"]["cosine"])
    assert res.report["fidelity_inputs"] == "data"
    assert numpy_helper.to_array(next(i for i in student.graph.initializer if i.name == "w.inherit_in")).shape == (4, 1)
