"""The maths of inheritance, with no ONNX in sight.

Convention: a weight is a matrix ``W`` of shape ``[out, in]`` (a conv kernel flattened to
``[out, in·kh·kw]``), acting as ``y = W x``. A rank-``r`` factorization is a pair

* ``input_factor``  ``[r, in]``   — the layer of the same kind as the original (k×k conv / linear in→r),
* ``output_factor`` ``[out, r]``  — the 1×1 conv / linear r→out,

with ``W ≈ output_factor @ input_factor``. Grouped convolutions are handled as a stack of per-group
matrices ``[groups, out/g, in/g·k]``; every function here takes and returns such stacks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Split = Literal["output", "sqrt", "input"]
SPLITS: tuple[str, ...] = ("output", "sqrt", "input")


@dataclass(frozen=True)
class SVD:
    """Thin SVD of a stack of matrices: ``w[g] = u[g] @ diag(s[g]) @ vt[g]`` (float64)."""

    u: np.ndarray  # [g, out, k]
    s: np.ndarray  # [g, k]
    vt: np.ndarray  # [g, k, in]

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[1])

    def factors(self, rank: int, split: str = "output") -> tuple[np.ndarray, np.ndarray]:
        """Truncated factors ``([g, r, in], [g, out, r])`` at ``rank`` (per group)."""
        r = _check_rank(rank, self.full_rank)
        return split_factors(self.u[..., :, :r], self.s[..., :r], self.vt[..., :r, :], split)


def as_stack(weight: np.ndarray) -> np.ndarray:
    """A 2-D matrix becomes a stack of one; a 3-D stack is returned as is."""
    return weight[None] if weight.ndim == 2 else weight


def svd(weight: np.ndarray) -> SVD:
    """Thin SVD of a matrix or stack, computed in float64 whatever the storage dtype (fp16 too)."""
    w = as_stack(np.asarray(weight, dtype=np.float64))
    u, s, vt = thin_svd(w)
    return SVD(u, s, vt)


def thin_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin float64 SVD ``a = u · diag(s) · vt`` of a matrix or a stack, through the eigendecomposition of
    the smaller Gram matrix (``a aᵀ`` or ``aᵀ a``) with torch's LAPACK.

    Why not a plain SVD: on these shared 2-core machines a 768×3072 ``gesdd`` cost 7–17 s of CPU (numpy and
    torch alike) against 0.12 s for Gram + single-threaded ``eigh``, and a BERT-base has 72 such matrices. The price is
    that singular values below ≈ 1e-8·σ_max lose relative accuracy — irrelevant for truncation — while
    the singular vectors stay orthonormal, so ``u[:, :r] u[:, :r]ᵀ a`` is still the exact projection:
    the full-rank product reproduces ``a`` and rank-``r`` errors are the Eckart–Young tail.
    """
    import torch

    with single_threaded_torch():
        return _thin_svd_eigh(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)))


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"depth": 0, "saved": 0}


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch's intra-op pool at one thread for the duration (re-entrant, thread-safe): multi-threaded LAPACK
    spin-waits, and a single-threaded ``eigh`` of 768×768 cost 0.12 s of CPU against 0.34 s on 2 threads."""
    import torch

    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


def _thin_svd_eigh(t: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    squeeze = t.ndim == 2
    if squeeze:
        t = t[None]
    wide = t.shape[-2] <= t.shape[-1]
    m = t if wide else t.transpose(-1, -2)  # [g, small, large]
    lam, vec = torch.linalg.eigh(m @ m.transpose(-1, -2))
    lam, vec = lam.flip(-1), vec.flip(-1)  # descending
    sv = lam.clamp_min(0.0).sqrt()
    proj = vec.transpose(-1, -2) @ m  # Σ · (other singular vectors)ᵀ, exact projection
    tol = sv[..., :1] * (m.shape[-1] * np.finfo(np.float64).eps)
    other = torch.where((sv > tol)[..., None], proj / sv.clamp_min(1e-300)[..., None], torch.zeros_like(proj))
    if wide:
        u, vt = vec, other
    else:
        u, vt = other.transpose(-1, -2), vec.transpose(-1, -2)
    if squeeze:
        u, sv, vt = u[0], sv[0], vt[0]
    return u.numpy(), sv.numpy(), vt.numpy()


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Place the singular values: 'output' (InherNet: Σ in the output factor), 'sqrt' or 'input'."""
    if split == "output":
        left, right = np.ones_like(s), s
    elif split == "sqrt":
        left = right = np.sqrt(s)
    elif split == "input":
        left, right = s, np.ones_like(s)
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    input_factor = vt * left[..., :, None]
    output_factor = u * right[..., None, :]
    return input_factor, output_factor


def factorize(
    weight: np.ndarray, rank: int, split: str = "output", decomposition: SVD | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Truncated-SVD factors ``([g, r, in], [g, out, r])`` of a weight stack (optimal in Frobenius norm)."""
    d = decomposition if decomposition is not None else svd(weight)
    return d.factors(rank, split)


def eckart_young_error(singular_values: np.ndarray, rank: int) -> float:
    """The optimal Frobenius error of a rank-``rank`` approximation: ``‖σ_{>r}‖`` (summed over groups)."""
    s = np.atleast_2d(np.asarray(singular_values, dtype=np.float64))
    return float(np.sqrt(np.sum(s[:, rank:] ** 2)))


def cholesky_with_ridge(gram: np.ndarray, ridge: float = 1e-6, max_tries: int = 8) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor ``S`` of ``G + λI`` (``G = S Sᵀ``); λ starts at 0 and grows (relative to the
    mean diagonal) until the factorization succeeds. Returns ``(S, λ)``.

    A rank-deficient Gram (fewer samples than features, duplicated or constant features) often factorizes
    "successfully" with pivots at rounding level; ``S⁻¹`` then holds entries of 1e7 and more along the
    directions the data never visited, and the factors blow up on new inputs. So a factorization is only
    accepted when every pivot ``S[i, i]²`` is at least ``ridge/2`` of the mean diagonal: directions with
    less variance than that are regularized (their share of the output energy is below ``ridge``)."""
    g = np.asarray(gram, dtype=np.float64)
    g = 0.5 * (g + g.T)
    scale = float(np.mean(np.diag(g))) or 1.0
    floor = 0.5 * ridge * scale
    lam = 0.0
    for attempt in range(max_tries + 1):
        try:
            s = np.linalg.cholesky(g + lam * np.eye(g.shape[0]))
            if np.all(np.isfinite(s)) and float(np.min(np.diag(s))) ** 2 >= floor:
                return s, lam
        except np.linalg.LinAlgError:
            pass
        lam = scale * ridge * (10.0**attempt)
    raise np.linalg.LinAlgError("Gram matrix is not positive definite even with a ridge")


@dataclass(frozen=True)
class WhitenedSVD:
    """SVD of ``Sᵀ Wᵀ`` per group plus the whitening factor, so factors at any rank are cheap."""

    chol: np.ndarray  # [g, in, in] lower-triangular S with G ≈ S Sᵀ
    u: np.ndarray  # [g, in, k]   left singular vectors of Sᵀ Wᵀ
    s: np.ndarray  # [g, k]       the whitened spectrum: output error removed per singular value
    vt: np.ndarray  # [g, k, out]
    ridge: float

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[1])

    def factors(self, rank: int, split: str = "output") -> tuple[np.ndarray, np.ndarray]:
        """Output-optimal factors at ``rank``: ``input_factor = U_rᵀ S⁻¹`` (Σ placed by ``split``),
        ``output_factor = V_r``."""
        r = _check_rank(rank, self.full_rank)
        # Wᵀ ≈ S⁻ᵀ U_r Σ_r V_rᵀ ; in [out, in] convention W ≈ V_r Σ_r (S⁻ᵀ U_r)ᵀ.
        ur = np.stack([solve_triangular(c.T, u[:, :r], lower=False) for c, u in zip(self.chol, self.u)])
        vt_like = np.swapaxes(ur, -1, -2)  # [g, r, in]
        u_like = np.swapaxes(self.vt[..., :r, :], -1, -2)  # [g, out, r]
        return split_factors(u_like, self.s[..., :r], vt_like, split)


def whitened_svd(
    weight: np.ndarray,
    gram: np.ndarray,
    ridge: float = 1e-6,
    cross: np.ndarray | None = None,
    shrinkage: float = 0.0,
) -> WhitenedSVD:
    """Activation-aware SVD: with ``G = XᵀX = S Sᵀ``, ``‖X Wᵀ − X M‖ = ‖Sᵀ(Wᵀ − M)‖``, so the SVD of
    ``Sᵀ Wᵀ`` truncated to ``r`` gives the output-optimal rank-``r`` approximation.

    With ``cross = X_sᵀ X_t`` (the student's inputs ``X_s`` against the teacher's ``X_t``, and ``gram`` the
    student's ``X_sᵀ X_s``) the target becomes the teacher's output from the student's input:
    ``‖X_t Wᵀ − X_s M‖² = ‖Sᵀ M − S⁻¹ C Wᵀ‖² + const``, so the SVD is of ``S⁻¹ C Wᵀ`` (error compensation;
    equal to ``Sᵀ Wᵀ`` when ``X_s = X_t``).

    ``shrinkage = μ > 0`` estimates the compensated map by ridge regression toward the teacher's weight:
    ``M* = (G + μḡI)⁻¹ (C + μḡI) Wᵀ`` minimizes ``‖X_t Wᵀ − X_s M‖² + μḡ‖Wᵀ − M‖²`` (``ḡ`` the mean diagonal
    of ``gram``, so ``μ`` is relative to the input energy per feature); the SVD is then of ``Sᵀ M*``, the
    best rank-``r`` approximation of that fit on the student's inputs. The least squares fits ``in²``
    coefficients from the calibration rows and overfits them when rows are few; ``M* = Wᵀ`` (nothing
    changes) when ``X_s = X_t``, and ``μ → ∞`` is the uncompensated whitened SVD.

    ``gram`` (and ``cross``) are ``[in, in]`` or per group ``[g, in, in]``.
    """
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be ≥ 0, got {shrinkage}")
    w = as_stack(np.asarray(weight, dtype=np.float64))
    grams = _per_group(gram, w.shape[0])
    crosses = _per_group(cross, w.shape[0]) if cross is not None else None
    chols, targets, lam_max = [], [], 0.0
    for i, (wg, gg) in enumerate(zip(w, grams)):
        chol, lam = cholesky_with_ridge(gg, ridge)
        lam_max = max(lam_max, lam)
        chols.append(chol)
        if crosses is None:
            targets.append(chol.T @ wg.T)
        elif shrinkage > 0:
            shift = shrinkage * float(np.mean(np.diag(gg))) * np.eye(gg.shape[0])
            targets.append(chol.T @ np.linalg.solve(gg + shift, (crosses[i] + shift) @ wg.T))
        else:
            targets.append(solve_triangular(chol, crosses[i] @ wg.T, lower=True))
    u, s, vt = thin_svd(np.stack(targets))
    return WhitenedSVD(np.stack(chols), u, s, vt, lam_max)


def _per_group(m: np.ndarray, groups: int) -> np.ndarray:
    """``[k, k]`` broadcast to ``[g, k, k]``; a ``[g, k, k]`` stack as is (float64)."""
    a = np.asarray(m, dtype=np.float64)
    return np.broadcast_to(a, (groups,) + a.shape[-2:]) if a.ndim == 2 else a


def whitened_factorize(
    weight: np.ndarray,
    gram: np.ndarray,
    rank: int,
    split: str = "output",
    decomposition: WhitenedSVD | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Output-optimal factors ``([g, r, in], [g, out, r])`` under the input statistics ``gram``:
    ``input_factor = U_rᵀ S⁻¹`` (then Σ placed by ``split``), ``output_factor = V_r``."""
    d = decomposition if decomposition is not None else whitened_svd(weight, gram)
    return d.factors(rank, split)


def solve_triangular(tri: np.ndarray, b: np.ndarray, lower: bool) -> np.ndarray:
    """``T⁻¹ b`` for a triangular ``T`` (scipy's O(k²) solver when installed, else a general solve)."""
    try:
        from scipy.linalg import solve_triangular as _solve
    except ImportError:  # scipy is optional
        return np.linalg.solve(tri, b)
    return _solve(tri, b, lower=lower)


def random_factors(
    out_features: int, in_features: int, rank: int, groups: int = 1, seed: int = 0, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Kaiming-uniform factors of the same shapes as :func:`factorize` (the "student of the same size"
    baseline: same architecture, no inheritance)."""
    rng = np.random.default_rng(seed)
    b_in = np.sqrt(6.0 / in_features)
    b_out = np.sqrt(6.0 / rank)
    input_factor = rng.uniform(-b_in, b_in, size=(groups, rank, in_features)).astype(dtype)
    output_factor = rng.uniform(-b_out, b_out, size=(groups, out_features, rank)).astype(dtype)
    return input_factor, output_factor


def factor_params(out_features: int, in_features: int, rank: int, groups: int = 1) -> int:
    """Parameters of a rank-``rank`` (per group) factor pair for a ``[g, out, in]`` weight stack."""
    return groups * rank * (in_features + out_features)


def _check_rank(rank: int, full_rank: int) -> int:
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return min(int(rank), full_rank)
