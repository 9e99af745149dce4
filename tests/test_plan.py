"""Rank planning: the greedy meets the ratio, beats uniform ranks, honours multiples; plans round-trip."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from inhercc.errors import InherccError
from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.pipeline import Factorizer
from inhercc.plan import RankPlan, apply_plan, plan_energy, plan_ratio, plan_uniform, rank_keeping
from tests.helpers import make_model


def spectral_model(rng: np.random.Generator):
    """Four MatMuls with very different spectra (fast decay to flat), sizes 96–192."""
    dims = [(96, 128, 0.5), (128, 192, 0.9), (192, 96, 0.97), (96, 96, 1.0)]
    nodes, weights, x = [], {}, "x"
    for i, (n_in, n_out, decay) in enumerate(dims):
        u, _ = np.linalg.qr(rng.standard_normal((n_in, n_in)))
        v, _ = np.linalg.qr(rng.standard_normal((n_out, n_out)))
        k = min(n_in, n_out)
        s = decay ** np.arange(k) * (1.0 + i)
        weights[f"w{i}"] = (u[:, :k] * s) @ v[:, :k].T
        weights[f"w{i}"] = weights[f"w{i}"].astype(np.float32)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"l{i}"))
        x = f"h{i}"
    return make_model(nodes, {"x": ["N", 96]}, [x], weights)


def layers_and_spectra(model):
    layers = find_layers(prepare_model(model), min_params=0)
    return layers, Factorizer("svd").spectra(layers)


def relative_weight_error(layers, spectra, ranks) -> float:
    total = 0.0
    for la in layers:
        s = spectra[la.name][0]
        r = ranks[la.name]
        total += np.sum(s[r:] ** 2) / np.sum(s**2) if r is not None else 0.0
    return float(total)


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5, 0.7])
def test_greedy_meets_ratio_within_one_step(ratio: float) -> None:
    layers, spectra = layers_and_spectra(spectral_model(np.random.default_rng(0)))
    plan = plan_ratio(layers, spectra, ratio, rank_multiple=8)
    budget = ratio * sum(la.weight_params for la in layers)
    used = sum(la.factor_params(plan.ranks[la.name]) if plan.ranks[la.name] else la.weight_params for la in layers)
    max_step = max(la.factor_params(8) for la in layers)
    assert used <= budget
    assert budget - used < max_step


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_greedy_beats_uniform_ranks_at_equal_budget(ratio: float) -> None:
    layers, spectra = layers_and_spectra(spectral_model(np.random.default_rng(1)))
    greedy = plan_ratio(layers, spectra, ratio, rank_multiple=1)
    used = sum(la.factor_params(r) if (r := greedy.ranks[la.name]) else la.weight_params for la in layers)
    # the uniform rank spending the same parameters (or more)
    per_rank = sum(la.factor_params(1) for la in layers)
    uniform_rank = int(np.ceil(used / per_rank))
    uniform = {la.name: min(uniform_rank, la.full_rank) for la in layers}
    assert sum(la.factor_params(r) for la, r in zip(layers, uniform.values())) >= used
    e_greedy = relative_weight_error(layers, spectra, greedy.ranks)
    e_uniform = relative_weight_error(layers, spectra, uniform)
    assert e_greedy < 0.95 * e_uniform, (e_greedy, e_uniform)


def test_rank_multiple_honoured() -> None:
    layers, spectra = layers_and_spectra(spectral_model(np.random.default_rng(2)))
    for m in (4, 8, 16):
        plan = plan_ratio(layers, spectra, 0.4, rank_multiple=m)
        for la in layers:
            r = plan.ranks[la.name]
            assert r is None or r % m == 0 or r == la.full_rank
    plan = plan_uniform(layers, 13, rank_multiple=8)
    assert set(plan.factorized().values()) == {16}


def test_energy_plan_keeps_requested_energy() -> None:
    layers, spectra = layers_and_spectra(spectral_model(np.random.default_rng(3)))
    plan = plan_energy(layers, spectra, 0.9, rank_multiple=1, min_saving=-10)
    for la in layers:
        s2 = spectra[la.name][0] ** 2
        r = plan.ranks[la.name]
        assert s2[:r].sum() / s2.sum() >= 0.9 - 1e-9
        assert s2[: r - 1].sum() / s2.sum() < 0.9
        assert r == rank_keeping(spectra[la.name], 0.9)


def test_layer_left_dense_when_saving_below_ten_percent() -> None:
    layers, spectra = layers_and_spectra(spectral_model(np.random.default_rng(4)))
    plan = plan_uniform(layers, 48, rank_multiple=1)  # 48·(96+96) = 9216 = full 96×96 weight: no saving
    assert plan.ranks["l3"] is None
    assert "would save only" in plan.reasons["l3"]
    assert plan.ranks["l0"] == 48


def test_plan_json_round_trip_and_hand_edit(tmp_path) -> None:
    layers, spectra = layers_and_spectra(spectral_model(np.random.default_rng(5)))
    plan = plan_ratio(layers, spectra, 0.5, rank_multiple=8)
    path = tmp_path / "plan.json"
    plan.save(path, layers)
    loaded = RankPlan.load(path)
    assert loaded.ranks == plan.ranks
    assert loaded.method == plan.method
    import json

    data = json.loads(path.read_text())
    data["layers"][0]["rank"] = 24
    path.write_text(json.dumps(data))
    replayed = apply_plan(layers, RankPlan.load(path))
    assert replayed.ranks["l0"] == 24
    assert all(replayed.ranks[k] == plan.ranks[k] for k in plan.ranks if k != "l0")


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"format": "nope"}, "not an inhercc plan"),
        ({"layers": [{"name": "l0", "rank": -3}]}, "must be a positive integer"),
        ({"layers": [{"name": "ghost", "rank": 8}]}, "not in the model"),
    ],
)
def test_bad_plans_are_rejected(edit, message) -> None:
    layers, _ = layers_and_spectra(spectral_model(np.random.default_rng(6)))
    data = {"format": "inhercc-plan", "version": 1, "layers": [{"name": "l0", "rank": 8}]} | edit
    with pytest.raises(InherccError, match=message):
        apply_plan(layers, RankPlan.from_dict(data))


def test_ratio_out_of_range() -> None:
    layers, spectra = layers_and_spectra(spectral_model(np.random.default_rng(7)))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InherccError, match="`plan.ratio` must be in"):
            plan_ratio(layers, spectra, bad)
    with pytest.raises(InherccError, match="too small"):
        plan_ratio(layers, spectra, 0.01, rank_multiple=32)
