"""Prints the per-op conformance table after a run that included conformance cases."""

from __future__ import annotations

from typing import Any

from tests.torchrt.conformance_cases import RESULTS, all_cases


def conformance_table() -> tuple[list[str], list[list[Any]], dict[str, int]]:
    """(headers, one row per op seen in a run case, totals per outcome)."""
    from inhercc.torchrt.ops import registered_ops

    registered = {op for (domain, op) in registered_ops() if domain == ""}
    per_op: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for case in all_cases():
        outcome = RESULTS.get(case.name)
        if outcome is None:
            continue
        totals[outcome] = totals.get(outcome, 0) + 1
        for op in case.ops:
            counts = per_op.setdefault(op, {})
            counts[outcome] = counts.get(outcome, 0) + 1
    rows = []
    for op in sorted(per_op, key=lambda o: (o not in registered, o)):
        c = per_op[op]
        ran = c.get("passed", 0) + c.get("failed", 0)
        rows.append(
            [
                op,
                "yes" if op in registered else "no",
                sum(c.values()),
                ran,
                c.get("passed", 0),
                c.get("failed", 0),
                c.get("skipped", 0),
                c.get("unsupported", 0),
            ]
        )
    headers = ["op", "registered", "cases", "ran", "passed", "failed", "reviewed skip", "unsupported"]
    return headers, rows, totals


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    from inhercc.report import format_table

    headers, rows, totals = conformance_table()
    reporter = terminalreporter
    reporter.section("ONNX conformance through OnnxModule")
    ran = totals.get("passed", 0) + totals.get("failed", 0)
    reporter.write_line(
        f"{len(RESULTS)} cases: ran {ran}, passed {totals.get('passed', 0)}, failed {totals.get('failed', 0)}, "
        f"reviewed skips {totals.get('skipped', 0)}, unsupported {totals.get('unsupported', 0)}"
    )
    supported = [r for r in rows if r[1] == "yes"]
    reporter.write_line(format_table(headers, supported))
    others = [r[0] for r in rows if r[1] == "no"]
    if others:
        reporter.write_line(f"ops without an implementation ({len(others)}): {', '.join(others)}")
