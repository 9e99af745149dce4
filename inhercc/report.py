"""Tables, JSON and markdown for compress/inspect/bench results."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inhercc.data import shape_text
from inhercc.errors import InherccError
from inhercc.files import write_bytes_atomic, write_json, write_text_atomic  # noqa: F401  (re-exported)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table; `align` is one char per column ('l' or 'r'), default: text left, numbers right."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "l"
            for i in range(len(headers))
        )

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align))

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(s.rstrip() for s in out)


def format_markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def human_count(n: float | int | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------
# bench results (format "inhercc-bench", see inhercc.bench)

BENCH_HEADERS = (
    "shapes",
    "model",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "samples/s",
    "ratio [95% CI]",
    "params",
    "FLOPs/sample",
)


def ratio_text(ratio: dict[str, Any] | None) -> str:
    """``0.532 [0.518, 0.547]`` from a ``ratio_of_medians`` dict; ``1 (reference)`` for the reference."""
    if ratio is None:
        return "1 (reference)"
    return f"{ratio['ratio']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]"


def bench_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per (shape set, model) of a bench result."""
    params = {m["label"]: m["params"] for m in result["models"]}
    rows: list[list[Any]] = []
    for run in result["runs"]:
        for r in run["results"]:
            lat = r["latency_ms"]
            rows.append(
                [
                    shape_text(run["shapes"]),
                    r["model"],
                    f"{lat['p50']:.3f}",
                    f"{lat['p90']:.3f}",
                    f"{lat['p99']:.3f}",
                    f"{r['throughput_per_s']:.1f}" if r["throughput_per_s"] else "-",
                    ratio_text(r["ratio_to_reference"]),
                    human_count(params.get(r["model"])),
                    human_count(run["flops_per_sample"].get(r["model"])),
                ]
            )
    return rows


def bench_header(result: dict[str, Any]) -> str:
    """One line: provider, device, ORT version, threads, optimization level and how it was timed."""
    env, st = result["environment"], result["settings"]
    threads = env["threads"] if env["threads"] else f"ORT default ({env['cpu_count']} logical CPUs)"
    timing = f"{st['repeat']} rounds" if st.get("repeat") else f"{st['duration']} s per shape set"
    extra = ""
    if env.get("cudnn_conv_algo_search"):
        extra += f", cuDNN algo search {env['cudnn_conv_algo_search']}"
    if env.get("cuda_graph"):
        extra += ", CUDA graphs"
    return (
        f"{env['provider']} on {env['device']}, onnxruntime {env['onnxruntime']}, threads {threads}, "
        f"opt level {env['opt_level']}{extra}; IO binding, warm-up {st['warmup']}, {timing} interleaved; "
        f"ratio = median / median of the reference, {int(st['confidence'] * 100)}% paired bootstrap CI "
        f"({st['resamples']} resamples, seed {st['seed']})"
    )


def bench_table(result: dict[str, Any]) -> str:
    """The terminal table of a bench result (with its header line and notes)."""
    table = format_table(BENCH_HEADERS, bench_rows(result), align="llrrrrlrr")
    out = f"{bench_header(result)}\n\n{table}"
    sizes = ", ".join(f"{m['label']} {human_bytes(m['size_bytes'])}" for m in result["models"])
    out += f"\n\nsize on disk: {sizes}"
    for note in result.get("notes", []):
        out += f"\nnote: {note}"
    return out


def bench_markdown(result: dict[str, Any], title: str = "Latency") -> str:
    """A markdown section for a bench result: header line, table, sizes, notes."""
    lines = [f"## {title}", "", bench_header(result), "", format_markdown(BENCH_HEADERS, bench_rows(result)), ""]
    lines += [
        format_markdown(
            ["model", "params", "size on disk"],
            [[m["label"], human_count(m["params"]), human_bytes(m["size_bytes"])] for m in result["models"]],
        ),
        "",
    ]
    lines += [f"- note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def check_plot_format(path: str | Path) -> None:
    """A plot is written at exactly ``path``, in the format its extension names (one matplotlib can write without
    LaTeX): refused up front rather than after the timing run."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:
        raise InherccError("`plot` needs matplotlib (pip install matplotlib)") from e
    formats = sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})
    ext = Path(path).suffix.lower().lstrip(".")
    if not ext:
        raise InherccError(f"`plot` {path} has no extension; add one of .{', .'.join(formats)}")
    if ext not in formats:
        raise InherccError(f"`plot` {path}: unsupported format .{ext}; choose one of .{', .'.join(formats)}")


def plot_bench(result: dict[str, Any], path: str | Path) -> Path:
    """Latency distributions, the models side by side, one panel per shape set, in the format of ``path``'s
    extension (png, svg, pdf …; PNG without one; needs matplotlib); written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InherccError("`plot` needs matplotlib (pip install matplotlib)") from e
    import numpy as np

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(max(5.0, 2.2 + 1.6 * len(runs[0]["results"])) * len(runs), 4.2))
    axes = np.atleast_1d(axes).ravel()
    for ax, run in zip(axes, runs):
        data = [r["samples_ms"] for r in run["results"]]
        labels = [r["model"] for r in run["results"]]
        ax.violinplot(data, showmedians=True, showextrema=False)
        ax.boxplot(data, widths=0.12, showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=15)
        top = 1.15 * max(r["latency_ms"]["p99"] for r in run["results"])
        for i, r in enumerate(run["results"], start=1):
            ax.annotate(
                ratio_text(r["ratio_to_reference"]).replace("1 (reference)", "reference"),
                (i, r["latency_ms"]["p99"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, top)  # the rare long stalls of a shared machine would squash the distributions
        ax.set_ylabel("latency (ms, axis cut at 1.15 × p99)")
        ax.set_title(shape_text(run["shapes"]), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    env = result["environment"]
    fig.suptitle(f"{env['provider']} · {env['device']} · threads {env['threads'] or 'default'}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
