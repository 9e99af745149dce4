"""How the commands print reports: the before/after summary, the training line, the per-layer table."""

from __future__ import annotations

from typing import Any

from inhercc.report import format_table, human_bytes, human_count


def summary_table(rep: dict[str, Any]) -> str:
    """The before/after table of a compress report."""
    p, f, s = rep["params"], rep["flops"], rep["size"]
    rows: list[list[Any]] = [
        ["params", human_count(p["teacher"]), human_count(p["student"]), ratio_text(p["student"], p["teacher"])],
        ["FLOPs/sample", human_count(f["teacher"]), human_count(f["student"]), ratio_text(f["student"], f["teacher"])],
        ["size", human_bytes(s["teacher"]), human_bytes(s["student"]), ratio_text(s["student"], s["teacher"])],
    ]
    before = rep.get("fidelity_before", {})
    for name, fid in rep.get("fidelity", {}).items():
        for metric, value in fid.items():
            b = before.get(name, {}).get(metric)
            shown = f"{value:.4f}" if b is None else f"{b:.4f} → {value:.4f}"
            rows.append([fidelity_label(rep, name, metric), "1" if metric != "rel_l2" else "0", shown, ""])
    n_fact = sum(1 for r in rep["layers"] if r["rank"] is not None)
    out = format_table(["", "teacher", "student", "ratio"], rows, align="lrrr")
    out += f"\n{n_fact}/{len(rep['layers'])} layers factorized (init {rep.get('init', 'svd')})"
    if rep.get("fidelity_inputs") == "synthetic":
        out += "; fidelity on synthetic inputs (pass --data for real ones)"
    if rep["flops"].get("symbolic_dims_counted_as_1"):
        out += f"; FLOPs count dims {', '.join(rep['flops']['symbolic_dims_counted_as_1'])} as 1"
    out += "".join(f"\n{name}: not scored, {why}" for name, why in rep.get("fidelity_skipped", {}).items())
    if "training" in rep:
        out += "\n" + training_line(rep)
    for name, fid in rep.get("fidelity_verify_data", {}).items():
        scores = ", ".join(f"{metric} {value:.4f}" for metric, value in fid.items())
        out += f"\n{name} on --verify-data after distillation: {scores}"
    return out + conversion_lines(rep)


def conversion_lines(rep: dict[str, Any]) -> str:
    """The fp32 student's fidelity when the written one was quantized or stored in fp16 (the table shows the
    written student's)."""
    mode = rep.get("quantization", {}).get("mode")
    if not mode and not rep.get("precision"):
        return ""
    step = f"{mode} quantization" if mode else f"{rep['precision']} conversion"
    out = ""
    for key, where in (("fidelity_fp32", ""), ("fidelity_verify_data_fp32", " on --verify-data")):
        for name, fid in (rep.get(key) or {}).items():
            scores = ", ".join(f"{metric} {value:.4f}" for metric, value in fid.items())
            out += f"\n{name}{where}, the fp32 student before {step}: {scores}"
    return out


def fidelity_label(rep: dict[str, Any], name: str, metric: str) -> str:
    """``sentence_embedding cosine (embedding)``: an output, a metric and the output's kind (as scored)."""
    kind = rep.get("output_kinds", {}).get(name)
    return f"{name} {metric} ({kind})" if kind else f"{name} {metric}"


def training_line(rep: dict[str, Any]) -> str:
    """One line on the distillation of a report: epochs, steps, best validation fidelity, time."""
    t = rep["training"]
    best = f"; best val cosine {t['best_val_cosine']:.4f} (epoch {t['best_epoch']})" if t["best_val_cosine"] else ""
    early = ", stopped early" if t["stopped_early"] else ""
    return (
        f"distilled {t['epochs']} epoch(s), {t['steps']} step(s) on {t['train_samples']} samples{early}{best}; "
        f"{t['wall_s']:.1f} s on {t['device']}; fidelity before → after on {rep.get('fidelity_inputs', '?')}"
    )


def layer_table(rows: list[dict[str, Any]]) -> str:
    return format_table(
        ["layer", "op", "shape", "rank", "params before", "params after", "reason / note"],
        [
            [
                r["name"],
                r["op"],
                "x".join(map(str, r["shape"])),
                r["rank"],
                r["params_before"],
                r["params_after"],
                r["reason"] or r.get("note") or "",
            ]
            for r in rows
        ],
        align="lllrrrl",
    )


def ratio_text(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"
