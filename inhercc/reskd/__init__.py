"""ResKD (Li et al., IEEE TIP 2021): a student, res-students trained on the residual between the teacher and the
members so far, and a sample-adaptive cascade summing them — one ONNX model that runs on plain ONNX Runtime.

:mod:`~inhercc.reskd.cascade` (the merged graph, skipping with gather / scatter / If),
:mod:`~inhercc.reskd.calibrate` (the skip thresholds), :mod:`~inhercc.reskd.options`,
:mod:`~inhercc.reskd.train` (residual training through :func:`inhercc.distill.distill`) and
:mod:`~inhercc.reskd.run` (:func:`reskd`, :func:`reskd_file`).
"""

from __future__ import annotations

from inhercc.reskd.calibrate import Cascade, calibrate
from inhercc.reskd.cascade import SKIP_RULES, build_cascade, check_members
from inhercc.reskd.options import ResKDOptions
from inhercc.reskd.run import ResKDResult, ReskdWarning, reskd, reskd_file
from inhercc.reskd.train import residual_target

__all__ = [
    "SKIP_RULES",
    "Cascade",
    "ResKDOptions",
    "ResKDResult",
    "ReskdWarning",
    "build_cascade",
    "calibrate",
    "check_members",
    "reskd",
    "reskd_file",
    "residual_target",
]
