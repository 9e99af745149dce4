"""Run ONNX's backend conformance cases through OnnxModule and compare with the expected outputs.

Each case is one pytest case. A case whose model uses an op/attribute/type the runtime lacks is skipped
as "unsupported" (the module refuses it at construction); a case the runtime accepts must pass, unless
it is listed with a reviewed reason in `conformance_skips.SKIPS`. A per-op table of cases run / passed is
printed at the end of the session (see conftest.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from inhercc.torchrt import OnnxModule, UnsupportedModelError
from inhercc.torchrt.dtypes import to_numpy
from inhercc.torchrt.ops import registered_ops
from tests.torchrt.conformance_cases import RESULTS, Case, all_cases, assert_close
from tests.torchrt.conformance_skips import SKIPS

CASES = all_cases()

# Registered ops that ONNX's conformance data cannot exercise, with the reason; they are tested elsewhere.
UNCOVERED: dict[str, str] = {}


@functools.cache
def _unsupported_reason(case: Case) -> str | None:
    """Why OnnxModule refuses the case's model, or None if it accepts it."""
    model, _ = case.load()
    try:
        OnnxModule(model)
    except UnsupportedModelError as e:
        return str(e)
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance(case: Case) -> None:
    if case.name in SKIPS:
        RESULTS[case.name] = "skipped"
        pytest.skip(f"reviewed skip: {SKIPS[case.name]}")
    model, data_sets = case.load()
    try:
        module = OnnxModule(model)
    except UnsupportedModelError as e:
        RESULTS[case.name] = "unsupported"
        pytest.skip(f"unsupported: {e}")
    RESULTS[case.name] = "failed"
    with torch.no_grad():
        for inputs, expected in data_sets:
            got = module(*inputs)
            assert len(got) == len(expected)
            for want, out in zip(expected, got):
                assert_close(np.asarray(want), to_numpy(out), case.rtol, case.atol)
    RESULTS[case.name] = "passed"


def test_every_registered_op_has_a_runnable_case() -> None:
    """Every op the registry implements appears in at least one accepted, non-skipped conformance case.

    Together with test_conformance (every accepted case passes) this means every supported op has a
    passing conformance case.
    """
    registered = {op for (domain, op) in registered_ops() if domain == ""}
    covered: set[str] = set()
    for case in CASES:
        if case.name in SKIPS or case.name.startswith("light/") or not case.ops <= registered:
            continue
        if not case.ops - covered:
            continue
        if _unsupported_reason(case) is None:
            covered |= case.ops
    missing = sorted(registered - covered - set(UNCOVERED))
    assert not missing, f"registered ops without an accepted conformance case: {missing}"
