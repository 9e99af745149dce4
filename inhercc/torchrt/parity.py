"""Parity of the torch runtime with ONNX Runtime: run both on the same feeds and compare every output.

A float output passes when its largest absolute error is within `max(rtol * max|ref|, floor)`: the error is
judged relative to the output's scale (its largest reference magnitude, not elementwise, so values near zero
inside a large output are not over-weighted), and the absolute floor keeps an output that is itself near zero
(a sigmoid map of ≈1e-5 with an error of 1e-7) from being flagged. Integer and bool outputs must be equal.
NaNs must sit at the same positions in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from inhercc.runtime import make_session, run_session
from inhercc.torchrt.dtypes import to_numpy

# The absolute floor per float dtype when `atol` is not given: a few ulps of a unit-scale value.
ATOL_FLOOR: dict[str, float] = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}


@dataclass(frozen=True)
class OutputParity:
    """One output: its errors, the bound it was held to and the verdict."""

    name: str
    ok: bool
    max_abs: float  # largest |torch - ort| (inf on a shape, dtype-kind or NaN-position mismatch)
    max_rel: float  # max_abs / max|ort| (0 when both are all zero)
    bound: float  # the allowed max_abs: max(rtol * max|ort|, floor); 0 for exact outputs
    exact: bool  # integer/bool output compared for equality
    note: str = ""  # why it failed beyond the numbers (shape, dtype, NaN positions)


@dataclass(frozen=True)
class Parity:
    """The comparison of all outputs. `max_abs` / `max_rel` are over the float outputs; `worst` is the output
    closest to (or furthest past) its bound, a failed integer output first."""

    ok: bool
    max_abs: float
    max_rel: float
    worst: str
    outputs: tuple[OutputParity, ...]

    def by_name(self) -> dict[str, OutputParity]:
        return {o.name: o for o in self.outputs}


def _float_floor(dtype: np.dtype, atol: float | None) -> float:
    if atol is not None:
        return atol
    return ATOL_FLOOR.get(np.dtype(dtype).name, 1e-6)


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, atol: float | None) -> OutputParity:
    """Compare one output of ONNX Runtime (`ref`) with the torch runtime's (`got`)."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return OutputParity(name, False, float("inf"), float("inf"), 0.0, False, f"shape {got.shape} != {ref.shape}")
    is_float = np.issubdtype(ref.dtype, np.floating) or ref.dtype.name == "bfloat16"
    if not is_float:
        equal = bool(np.array_equal(ref, got))
        diff = 0.0 if equal else float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)), initial=0.0))
        return OutputParity(name, equal, diff, 0.0 if equal else float("inf"), 0.0, True, "" if equal else "differs")
    r, g = ref.astype(np.float64), got.astype(np.float64)
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    if not np.array_equal(nan_r, nan_g):
        return OutputParity(name, False, float("inf"), float("inf"), 0.0, False, "NaN positions differ")
    finite = ~nan_r
    r, g = r[finite], g[finite]
    inf_r = np.isinf(r)
    if not np.array_equal(r[inf_r], g[inf_r]) or np.isinf(g[~inf_r]).any():
        return OutputParity(name, False, float("inf"), float("inf"), 0.0, False, "infinities differ")
    r, g = r[~inf_r], g[~inf_r]
    max_abs = float(np.max(np.abs(r - g), initial=0.0))
    scale = float(np.max(np.abs(r), initial=0.0))
    bound = max(rtol * scale, _float_floor(ref.dtype, atol))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputParity(name, max_abs <= bound, max_abs, max_rel, bound, False)


def _severity(o: OutputParity) -> float:
    """How close an output is to failing (>1 failed): max_abs over its bound."""
    if o.exact:
        return 0.0 if o.ok else float("inf")
    if o.bound == 0:
        return 0.0 if o.max_abs == 0 else float("inf")
    return o.max_abs / o.bound


def compare(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, rtol: float = 1e-4, atol: float | None = None
) -> Parity:
    """Run `model` in ONNX Runtime and as an OnnxModule on `feeds` and compare every output.

    `atol`: the absolute floor (default: `ATOL_FLOOR` for the output's dtype, 1e-6 for float32). Raises
    `UnsupportedModelError` when the torch runtime cannot run the model and `InherccError` when ONNX Runtime
    cannot (both one line).

    The reference is ONNX Runtime with its graph optimizations off: the graph as written, op by op. Its
    fused kernels (Conv+BN+activation, NCHWc layouts) reorder float32 sums: on PP-OCRv4's recognizer ORT
    with optimizations on differs from ORT with them off by 8e-5 of the output's max, more than half the
    bound, while the torch runtime differs from the unfused graph by 6.6e-5 (and from the fused one by 1.5e-4).
    """
    from inhercc.torchrt.module import OnnxModule

    session = make_session(model, opt_level="disable")
    reference = run_session(session, feeds, what="running the model in ONNX Runtime")
    module = OnnxModule(model)
    with torch.no_grad():
        got = module(**{n: feeds[n] for n in module.input_names})
    names = [o.name for o in model.graph.output]
    outputs = tuple(compare_output(n, r, to_numpy(g), rtol, atol) for n, r, g in zip(names, reference, got))
    worst = max(outputs, key=_severity) if outputs else None
    return Parity(
        ok=all(o.ok for o in outputs),
        max_abs=max((o.max_abs for o in outputs if not o.exact), default=0.0),
        max_rel=max((o.max_rel for o in outputs if not o.exact), default=0.0),
        worst=worst.name if worst is not None else "",
        outputs=outputs,
    )
