"""Fidelity of a student to its teacher: run both in ONNX Runtime on the same inputs and compare."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnx import ModelProto

from inhercc.runtime import full_batches, make_session, run_session

NOT_LOGITS = ("embed", "hidden", "pool", "feature")


def output_fidelity(teacher: np.ndarray, student: np.ndarray, name: str = "") -> dict[str, float]:
    """``cosine``: mean over samples of the cosine between flattened per-sample outputs; ``rel_l2``:
    ‖s − t‖ / ‖t‖ over the whole tensor; ``top1_agreement`` for 2-D logits (not for embeddings)."""
    return pooled_fidelity([teacher], [student], name)


def pooled_squared_error(teacher: Sequence[np.ndarray], student: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(‖s − t‖², ‖t‖²)`` of one output given in parts, each summed over all parts (in float64)."""
    err2 = norm2 = 0.0
    for t_part, s_part in zip(teacher, student):
        t = np.asarray(t_part, dtype=np.float64)
        err2 += float(np.sum((np.asarray(s_part, dtype=np.float64) - t) ** 2))
        norm2 += float(np.sum(t**2))
    return err2, norm2


def pooled_fidelity(teacher: Sequence[np.ndarray], student: Sequence[np.ndarray], name: str = "") -> dict[str, float]:
    """:func:`output_fidelity` of one output given in parts (batches of different shapes, e.g. sequence-
    length buckets): per-sample cosines and top-1 agreements pooled over all samples, ``rel_l2`` from the
    squared norms summed over the parts — the same numbers as for one concatenated array."""
    cosines, agree = [], []
    err2, norm2 = pooled_squared_error(teacher, student)
    logits = not any(k in name.lower() for k in NOT_LOGITS)
    for t_part, s_part in zip(teacher, student):
        t = np.asarray(t_part, dtype=np.float64)
        s = np.asarray(s_part, dtype=np.float64)
        t2 = t.reshape(t.shape[0], -1) if t.ndim >= 1 and t.shape[0] > 0 else t.reshape(1, -1)
        s2 = s.reshape(t2.shape)
        num = np.sum(t2 * s2, axis=1)
        den = np.linalg.norm(t2, axis=1) * np.linalg.norm(s2, axis=1)
        same = np.linalg.norm(t2 - s2, axis=1) == 0
        cosines.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(same, 1.0, 0.0)))
        logits = logits and t.ndim == 2 and t.shape[1] > 1
        if logits:
            agree.append(np.argmax(t, axis=1) == np.argmax(s, axis=1))
    out = {
        "cosine": float(np.mean(np.concatenate(cosines))),
        "rel_l2": float(np.sqrt(err2 / norm2)) if norm2 > 0 else float(np.sqrt(err2)),
    }
    if logits and agree:
        out["top1_agreement"] = float(np.mean(np.concatenate(agree)))
    return out


def compare_output_parts(
    names: list[str], teacher: Sequence[Sequence[np.ndarray]], student: Sequence[Sequence[np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Per output name, :func:`pooled_fidelity` of float outputs (integer outputs: exact-match rate) over
    several parts (``teacher[part][output]``)."""
    result: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        ts, ss = [p[j] for p in teacher], [p[j] for p in student]
        if np.issubdtype(np.asarray(ts[0]).dtype, np.floating):
            result[name] = pooled_fidelity(ts, ss, name)
        else:
            equal = sum(int(np.sum(np.asarray(t) == np.asarray(s))) for t, s in zip(ts, ss))
            result[name] = {"exact_match": equal / max(1, sum(np.asarray(t).size for t in ts))}
    return result


def fidelity(
    teacher: ModelProto,
    student: ModelProto,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    *,
    batch_size: int | None = 32,
    source: str = "verification data",
) -> dict[str, dict[str, float]]:
    """Run teacher and student on ``feeds`` — one feed dict, or several of different sample shapes — (ORT,
    CPU) and compare every graph output, pooled over the parts. Inputs are cast to the model's dtypes; a
    teacher with a fixed batch dim is run in batches of that size (a remainder is left out, with a
    warning: :func:`inhercc.runtime.full_batches`); ONNX Runtime failures are one-line errors naming
    ``source``."""
    names = [o.name for o in teacher.graph.output]
    parts = [full_batches(teacher, p, source) for p in ([feeds] if isinstance(feeds, Mapping) else list(feeds))]
    t_sess, s_sess = make_session(teacher), make_session(student)
    t_out = [run_session(t_sess, part, batch_size, f"the teacher on {source}") for part in parts]
    s_out = [run_session(s_sess, part, batch_size, f"the student on {source}") for part in parts]
    return compare_output_parts(names, t_out, s_out)


def mean_cosine(fid: Mapping[str, Mapping[str, float]]) -> float:
    """One number for a multi-output fidelity: the mean cosine over float outputs."""
    vals = [v["cosine"] for v in fid.values() if "cosine" in v]
    return float(np.mean(vals)) if vals else float("nan")
