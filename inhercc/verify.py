"""Fidelity of a student to its teacher: run both in ONNX Runtime on the same inputs and compare."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import ModelProto

from inhercc.runtime import make_session, run_session

NOT_LOGITS = ("embed", "hidden", "pool", "feature")


def output_fidelity(teacher: np.ndarray, student: np.ndarray, name: str = "") -> dict[str, float]:
    """``cosine``: mean over samples of the cosine between flattened per-sample outputs; ``rel_l2``:
    ‖s − t‖ / ‖t‖ over the whole tensor; ``top1_agreement`` for 2-D logits (not for embeddings)."""
    t = np.asarray(teacher, dtype=np.float64)
    s = np.asarray(student, dtype=np.float64)
    t2 = t.reshape(t.shape[0], -1) if t.ndim >= 1 and t.shape[0] > 0 else t.reshape(1, -1)
    s2 = s.reshape(t2.shape)
    num = np.sum(t2 * s2, axis=1)
    den = np.linalg.norm(t2, axis=1) * np.linalg.norm(s2, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.linalg.norm(t2 - s2, axis=1) == 0, 1.0, 0.0))
    tn = float(np.linalg.norm(t))
    out = {
        "cosine": float(np.mean(cos)),
        "rel_l2": float(np.linalg.norm(s - t) / tn) if tn > 0 else float(np.linalg.norm(s - t)),
    }
    if t.ndim == 2 and t.shape[1] > 1 and not any(k in name.lower() for k in NOT_LOGITS):
        out["top1_agreement"] = float(np.mean(np.argmax(t, axis=1) == np.argmax(s, axis=1)))
    return out


def compare_outputs(
    names: list[str], teacher: list[np.ndarray], student: list[np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per output name, :func:`output_fidelity` of float outputs (integer outputs: exact-match rate)."""
    result: dict[str, dict[str, float]] = {}
    for name, t, s in zip(names, teacher, student):
        if np.issubdtype(np.asarray(t).dtype, np.floating):
            result[name] = output_fidelity(t, s, name)
        else:
            result[name] = {"exact_match": float(np.mean(np.asarray(t) == np.asarray(s)))}
    return result


def fidelity(
    teacher: ModelProto,
    student: ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    batch_size: int | None = 32,
    teacher_outputs: list[np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Run teacher and student on ``feeds`` (ORT, CPU) and compare every graph output."""
    names = [o.name for o in teacher.graph.output]
    if teacher_outputs is None:
        teacher_outputs = run_session(make_session(teacher), feeds, batch_size)
    student_outputs = run_session(make_session(student), feeds, batch_size)
    return compare_outputs(names, teacher_outputs, student_outputs)


def mean_cosine(fid: Mapping[str, Mapping[str, float]]) -> float:
    """One number for a multi-output fidelity: the mean cosine over float outputs."""
    vals = [v["cosine"] for v in fid.values() if "cosine" in v]
    return float(np.mean(vals)) if vals else float("nan")
