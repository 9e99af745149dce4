"""The maths: truncated SVD (exact at full rank, Eckart–Young at every rank, splits), whitened SVD (optimal
in the layer outputs, checked against an independent least-squares optimum), ridge, error compensation and
random (Kaiming) factors."""

from __future__ import annotations

import numpy as np
import pytest

from inhercc import linalg


def correlated_inputs(rng: np.random.Generator, n: int, k: int, decay: float = 0.9) -> np.ndarray:
    """Activations with a decaying, rotated covariance and a mean (like real layer inputs, unlike N(0, I))."""
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (rng.standard_normal((n, k)) * decay ** np.arange(k)) @ q.T + 0.3 * rng.standard_normal(k)


def output_error(x: np.ndarray, w: np.ndarray, input_factor: np.ndarray, output_factor: np.ndarray) -> float:
    """‖X Wᵀ − X (B A)ᵀ‖ for one group: the layer-output error of the factors on inputs X."""
    return float(np.linalg.norm(x @ w.T - x @ (output_factor @ input_factor).T))


def optimal_output_error(x: np.ndarray, w: np.ndarray, rank: int) -> float:
    """Independent optimum: XWᵀ lies in the column space of X, so the best X·M of rank ``rank`` is the
    Eckart–Young truncation of XWᵀ itself (computed here by a plain LAPACK SVD of XWᵀ)."""
    s = np.linalg.svd(x @ w.T, compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


# --- plain truncated SVD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (3, 16, 24)])
@pytest.mark.parametrize("split", linalg.SPLITS)
def test_factorize_is_exact_at_full_rank(shape: tuple[int, ...], split: str) -> None:
    w = np.random.default_rng(0).standard_normal(shape)
    a, b = linalg.factorize(w, min(shape[-2:]), split)
    assert a.shape == (linalg.as_stack(w).shape[0], min(shape[-2:]), shape[-1])
    assert b.shape == (linalg.as_stack(w).shape[0], shape[-2], min(shape[-2:]))
    np.testing.assert_allclose(np.matmul(b, a), linalg.as_stack(w), atol=1e-10)


def test_factorize_error_is_the_eckart_young_tail_at_every_rank() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 64)) * 0.9 ** np.arange(64)
    reference = np.linalg.svd(w, compute_uv=False)
    d = linalg.svd(w)
    np.testing.assert_allclose(d.s[0], reference, rtol=1e-9)
    for r in range(1, 41):
        a, b = linalg.factorize(w, r, decomposition=d)
        err = float(np.linalg.norm(w - (b @ a)[0]))
        assert err == pytest.approx(linalg.eckart_young_error(d.s, r), rel=1e-7, abs=1e-9)
        assert err == pytest.approx(float(np.sqrt(np.sum(reference[r:] ** 2))), rel=1e-7, abs=1e-9)


def test_splits_give_the_same_product_and_place_sigma() -> None:
    w = np.random.default_rng(2).standard_normal((30, 50))
    products = {}
    for split in linalg.SPLITS:
        a, b = linalg.factorize(w, 12, split)
        products[split] = b @ a
        if split == "output":  # InherNet: the input factor has orthonormal rows, Σ sits in the output factor
            np.testing.assert_allclose(a[0] @ a[0].T, np.eye(12), atol=1e-10)
        if split == "input":
            np.testing.assert_allclose(b[0].T @ b[0], np.eye(12), atol=1e-10)
        if split == "sqrt":
            np.testing.assert_allclose(np.linalg.norm(a[0], axis=1), np.linalg.norm(b[0], axis=0), rtol=1e-10)
    np.testing.assert_allclose(products["sqrt"], products["output"], atol=1e-10)
    np.testing.assert_allclose(products["input"], products["output"], atol=1e-10)


def test_svd_runs_in_float64_for_fp16_weights() -> None:
    w = np.random.default_rng(3).standard_normal((16, 24)).astype(np.float16)
    d = linalg.svd(w)
    assert d.u.dtype == d.s.dtype == d.vt.dtype == np.float64
    np.testing.assert_allclose((d.u * d.s[:, None, :]) @ d.vt, w.astype(np.float64)[None], atol=1e-10)


def test_rank_is_checked_and_capped() -> None:
    w = np.random.default_rng(4).standard_normal((8, 12))
    with pytest.raises(ValueError):
        linalg.factorize(w, 0)
    a, _ = linalg.factorize(w, 100)
    assert a.shape[1] == 8


# --- whitened SVD ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_features, in_features", [(24, 40), (40, 24)])
def test_whitened_is_output_optimal_at_every_rank_and_beats_plain_svd(out_features: int, in_features: int) -> None:
    rng = np.random.default_rng(5)
    x = correlated_inputs(rng, 500, in_features)
    w = rng.standard_normal((out_features, in_features))
    gram = x.T @ x
    d = linalg.whitened_svd(w, gram)
    assert d.ridge == 0.0  # full-rank Gram: no ridge
    full = min(out_features, in_features)
    for r in range(1, full + 1):
        a, b = linalg.whitened_factorize(w, gram, r, decomposition=d)
        wa, wb = linalg.factorize(w, r)
        whitened, plain = output_error(x, w, a[0], b[0]), output_error(x, w, wa[0], wb[0])
        best = optimal_output_error(x, w, r)
        assert whitened == pytest.approx(best, rel=1e-6, abs=1e-8 * np.linalg.norm(x @ w.T))
        if r < full:
            assert whitened < plain * (1 - 1e-3)
        # the whitened spectrum is the output error removed per singular value
        assert float(np.sqrt(np.sum(d.s[0, r:] ** 2))) == pytest.approx(best, rel=1e-6, abs=1e-6)
    a, b = linalg.whitened_factorize(w, gram, full, decomposition=d)
    np.testing.assert_allclose((b @ a)[0], w, atol=1e-8)  # exact at full rank


@pytest.mark.parametrize("split", linalg.SPLITS)
def test_whitened_splits_give_the_same_product(split: str) -> None:
    rng = np.random.default_rng(6)
    x = correlated_inputs(rng, 200, 32)
    w = rng.standard_normal((20, 32))
    a, b = linalg.whitened_factorize(w, x.T @ x, 7, split)
    a0, b0 = linalg.whitened_factorize(w, x.T @ x, 7, "output")
    np.testing.assert_allclose(b @ a, b0 @ a0, atol=1e-9)


def test_whitened_grouped_stack_is_optimal_per_group() -> None:
    rng = np.random.default_rng(7)
    groups, out_f, in_f, r = 3, 10, 18, 4
    xs = [correlated_inputs(rng, 150, in_f, decay=0.8 + 0.05 * g) for g in range(groups)]
    w = rng.standard_normal((groups, out_f, in_f))
    grams = np.stack([x.T @ x for x in xs])
    a, b = linalg.whitened_factorize(w, grams, r)
    assert a.shape == (groups, r, in_f) and b.shape == (groups, out_f, r)
    for g in range(groups):
        assert output_error(xs[g], w[g], a[g], b[g]) == pytest.approx(optimal_output_error(xs[g], w[g], r), rel=1e-6)
    # a 2-D Gram is shared by every group of the stack
    a2, b2 = linalg.whitened_factorize(w, grams[0], r)
    for g in range(groups):
        assert output_error(xs[0], w[g], a2[g], b2[g]) == pytest.approx(optimal_output_error(xs[0], w[g], r), rel=1e-6)


def test_ridge_on_a_rank_deficient_gram() -> None:
    """Fewer samples than features plus a duplicated feature: the Cholesky needs a ridge, the factors stay
    finite and bounded, and the output error on the calibration inputs is still the optimum."""
    rng = np.random.default_rng(8)
    x = correlated_inputs(rng, 20, 48)
    x[:, 1] = x[:, 0]  # an exactly duplicated feature
    w = rng.standard_normal((16, 48))
    gram = x.T @ x
    assert np.linalg.matrix_rank(gram) == 20
    chol, lam = linalg.cholesky_with_ridge(gram)
    assert lam > 0
    assert np.all(np.isfinite(chol))
    np.testing.assert_allclose(chol @ chol.T, gram + lam * np.eye(48), atol=1e-8 * np.abs(gram).max())
    scale = float(np.mean(np.diag(gram)))
    assert lam <= 1e-3 * scale  # a small ridge, relative to the mean variance
    for r in (4, 8, 12):
        a, b = linalg.whitened_factorize(w, gram, r)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        assert np.abs(b @ a).max() < 100 * np.abs(w).max()  # no blow-up along unvisited directions
        best = optimal_output_error(x, w, r)
        assert output_error(x, w, a[0], b[0]) <= best + 1e-3 * np.linalg.norm(x @ w.T)
        wa, wb = linalg.factorize(w, r)
        assert output_error(x, w, a[0], b[0]) < output_error(x, w, wa[0], wb[0])


def test_near_singular_gram_that_factorizes_still_gets_a_ridge() -> None:
    """Rounding can let a singular Gram pass Cholesky with pivots near 1e-16: that must not be accepted."""
    rng = np.random.default_rng(9)
    x = correlated_inputs(rng, 300, 16)
    x = np.concatenate([x, x[:, :1] * (1 + 1e-12)], axis=1)  # a (numerically) duplicated feature
    chol, lam = linalg.cholesky_with_ridge(x.T @ x)
    assert lam > 0
    assert np.min(np.diag(chol)) ** 2 >= 0.5e-6 * np.mean(np.diag(x.T @ x))


def test_full_rank_gram_gets_no_ridge_and_is_exact() -> None:
    gram = np.diag([4.0, 1.0, 0.25])
    chol, lam = linalg.cholesky_with_ridge(gram)
    assert lam == 0.0
    np.testing.assert_allclose(chol, np.diag([2.0, 1.0, 0.5]))


def test_error_compensation_fits_teacher_outputs_from_student_inputs() -> None:
    """With ``cross = X_sᵀ X_t`` the factors minimize ‖X_t Wᵀ − X_s M‖ over rank-r M: checked against the
    projection of the teacher's output on the column space of the student's input, then Eckart–Young."""
    rng = np.random.default_rng(10)
    xt = correlated_inputs(rng, 400, 30)
    xs = xt + 0.2 * correlated_inputs(rng, 400, 30)  # the student's (perturbed) view of the same samples
    w = rng.standard_normal((22, 30))
    target = xt @ w.T
    q, _ = np.linalg.qr(xs)
    proj = q @ (q.T @ target)
    sv = np.linalg.svd(proj, compute_uv=False)
    for r in (3, 10, 22):
        a, b = linalg.whitened_factorize(
            w, xs.T @ xs, r, decomposition=linalg.whitened_svd(w, xs.T @ xs, cross=xs.T @ xt)
        )
        err = float(np.linalg.norm(target - xs @ (b @ a)[0].T))
        best = float(np.sqrt(np.linalg.norm(target - proj) ** 2 + np.sum(sv[r:] ** 2)))
        assert err == pytest.approx(best, rel=1e-6)
        # and it beats the plain whitened factors, which ignore that the input changed
        a0, b0 = linalg.whitened_factorize(w, xt.T @ xt, r)
        assert err < float(np.linalg.norm(target - xs @ (b0 @ a0)[0].T))
    # without a perturbation the cross term changes nothing
    d0 = linalg.whitened_svd(w, xt.T @ xt)
    d1 = linalg.whitened_svd(w, xt.T @ xt, cross=xt.T @ xt)
    np.testing.assert_allclose(d1.s, d0.s, rtol=1e-8)


def test_shrinkage_fits_the_compensation_by_ridge_regression_toward_the_teacher_weight() -> None:
    """``shrinkage = μ``: the full-rank map is the ridge fit M* = argmin ‖X_t Wᵀ − X_s M‖² + μḡ‖Wᵀ − M‖²
    (checked by least squares on the data with √(μḡ)·I rows appended), each rank r the best approximation
    of X_s M* (Eckart–Young); no change when X_s = X_t; μ → ∞ is the uncompensated whitened SVD."""
    rng = np.random.default_rng(11)
    xt = correlated_inputs(rng, 60, 30)  # few rows: the compensation overfits
    xs = xt + 0.3 * correlated_inputs(rng, 60, 30)
    w = rng.standard_normal((22, 30))
    gram, cross = xs.T @ xs, xs.T @ xt
    mu = 0.05
    root = np.sqrt(mu * np.mean(np.diag(gram))) * np.eye(30)
    ridge_fit = np.linalg.lstsq(np.vstack([xs, root]), np.vstack([xt, root]) @ w.T, rcond=None)[0]  # [in, out]
    d = linalg.whitened_svd(w, gram, cross=cross, shrinkage=mu)
    a, b = linalg.whitened_factorize(w, gram, 22, decomposition=d)
    np.testing.assert_allclose((b @ a)[0].T, ridge_fit, rtol=1e-7, atol=1e-9)
    sv = np.linalg.svd(xs @ ridge_fit, compute_uv=False)
    unshrunk = linalg.whitened_svd(w, gram, cross=cross)
    for r in (4, 12):
        a, b = linalg.whitened_factorize(w, gram, r, decomposition=d)
        err = float(np.linalg.norm(xs @ ridge_fit - xs @ (b @ a)[0].T))
        assert err == pytest.approx(float(np.sqrt(np.sum(sv[r:] ** 2))), rel=1e-6)
        # on the calibration rows the unshrunk fit is the better one (it is their least squares)
        a0, b0 = linalg.whitened_factorize(w, gram, r, decomposition=unshrunk)
        target = xt @ w.T
        assert np.linalg.norm(target - xs @ (b0 @ a0)[0].T) < np.linalg.norm(target - xs @ (b @ a)[0].T)
    # the student sees what the teacher saw: nothing to compensate, nothing to shrink
    same = linalg.whitened_svd(w, xt.T @ xt, cross=xt.T @ xt, shrinkage=mu)
    np.testing.assert_allclose(same.s, linalg.whitened_svd(w, xt.T @ xt).s, rtol=1e-8)
    huge = linalg.whitened_svd(w, gram, cross=cross, shrinkage=1e9)
    np.testing.assert_allclose(huge.s, linalg.whitened_svd(w, gram).s, rtol=1e-6)
    with pytest.raises(ValueError, match="shrinkage"):
        linalg.whitened_svd(w, gram, shrinkage=-1.0)


# --- random (Kaiming) factors ------------------------------------------------------------------------------


def test_random_factors_have_the_svd_shapes_and_kaiming_scale() -> None:
    w = np.zeros((2, 64, 96))
    a_svd, b_svd = linalg.factorize(np.random.default_rng(0).standard_normal(w.shape), 16)
    a, b = linalg.random_factors(64, 96, 16, groups=2, seed=3)
    assert a.shape == a_svd.shape and b.shape == b_svd.shape
    assert np.abs(a).max() <= np.sqrt(6 / 96) and np.abs(b).max() <= np.sqrt(6 / 16)
    assert np.std(a) == pytest.approx(np.sqrt(2 / 96), rel=0.1)  # Kaiming: var = 2 / fan_in
    assert np.std(b) == pytest.approx(np.sqrt(2 / 16), rel=0.1)
    a2, b2 = linalg.random_factors(64, 96, 16, groups=2, seed=3)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, linalg.random_factors(64, 96, 16, groups=2, seed=4)[0])
