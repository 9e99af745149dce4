"""Speed of the PyTorch round-trip executor: OnnxModule vs the same model run natively in torch.

For each teacher the exported ONNX graph runs through `inhercc.torchrt.OnnxModule` and the torch model
it was exported from runs natively (MiniLM: Hugging Face BertModel + mean pooling; its default attention
is SDPA, and the eager-attention variant is timed too for reference). Forward (no grad) and
forward+backward (loss = sum of squared outputs, gradients for every parameter) are timed in interleaved
repeats; medians are reported.

    python -m benchmarks.bench_torchrt                 # batch 32 x sequence 128, 2 threads, 5 repeats
    python -m benchmarks.bench_torchrt --repeats 3 --models minilm

Writes benchmarks/results/torchrt_speed.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from benchmarks import teachers
from inhercc.report import format_markdown, format_table, write_json, write_text_atomic
from inhercc.torchrt import OnnxModule

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.3  # forward+backward, MiniLM at batch 32 x sequence 128 on 2 CPU threads
MODELS = ("minilm", "minilm-dynamo", "mobilenetv2")

Runner = Callable[[], torch.Tensor]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _timed_forward(module: torch.nn.Module, args: Sequence[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        module(*args)
    return time.perf_counter() - start


def _timed_training_step(module: torch.nn.Module, args: Sequence[torch.Tensor]) -> float:
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    _first(module(*args)).square().sum().backward()
    return time.perf_counter() - start


def _inputs(name: str, batch: int, sequence: int) -> list[torch.Tensor]:
    if name.startswith("minilm"):
        sentences = teachers.english_sentences("train", batch)
        feed = teachers.encode(sentences, max_length=sequence, pad_to=sequence)
        return [torch.from_numpy(feed[k]) for k in teachers.MINILM_INPUTS]
    return [torch.from_numpy(teachers.imagenet_images(batch, seed=0))]


def _natives(name: str) -> dict[str, torch.nn.Module]:
    """The torch model(s) the teacher was exported from, by label."""
    if not name.startswith("minilm"):
        return {"native": teachers.load_mobilenet_v2_torch()}
    import transformers

    eager = transformers.AutoModel.from_pretrained(str(teachers.minilm_model_dir()), attn_implementation="eager")
    return {"native": teachers.sentence_encoder(), "native_eager": teachers.sentence_encoder(eager.eval())}


def bench_model(name: str, batch: int, sequence: int, repeats: int) -> list[dict[str, Any]]:
    """Median seconds per mode for the ONNX graph via OnnxModule and for each native torch model."""
    model = onnx.load(str(teachers.cached_teacher(name)))
    runners: dict[str, torch.nn.Module] = {"onnx": OnnxModule(model), **_natives(name)}
    for module in runners.values():
        module.requires_grad_(True)
    args = _inputs(name, batch, sequence)
    times: dict[tuple[str, str], list[float]] = {}
    for module in runners.values():  # warm-up (allocator, kernels)
        _timed_forward(module, args)
        _timed_training_step(module, args)
    for _ in range(repeats):
        for label, module in runners.items():  # interleaved, so load changes hit all alike
            times.setdefault((label, "forward"), []).append(_timed_forward(module, args))
            times.setdefault((label, "forward+backward"), []).append(_timed_training_step(module, args))
    shape = f"{batch}x{sequence}" if name.startswith("minilm") else f"{batch}x3x224x224"
    rows = []
    for mode in ("forward", "forward+backward"):
        onnx_s = statistics.median(times[("onnx", mode)])
        row: dict[str, Any] = {"model": name, "input": shape, "mode": mode, "onnx_ms": 1e3 * onnx_s}
        for label in runners:
            if label != "onnx":
                native_s = statistics.median(times[(label, mode)])
                row[f"{label}_ms"] = 1e3 * native_s
                row[f"ratio_vs_{label}"] = onnx_s / native_s
        row["repeats"] = repeats
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows: list[dict[str, Any]] = []
    for name in opts.models.split(","):
        rows += bench_model(name.strip(), opts.batch, opts.sequence, opts.repeats)

    env = {
        "torch": torch.__version__,
        "threads": opts.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_after": os.getloadavg(),
        "repeats": opts.repeats,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    write_json(opts.out / "torchrt_speed.json", {"environment": env, "target_ratio": TARGET_RATIO, "rows": rows})
    table, markdown = render(rows, env)
    print(table)
    write_text_atomic(opts.out / "torchrt_speed.md", markdown)


def _ms(value: float | None) -> int | None:
    return None if value is None else round(value)


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def render(rows: Sequence[dict[str, Any]], env: dict[str, Any]) -> tuple[str, str]:
    """(plain-text table with the verdict, markdown page) for benchmark rows."""
    headers = ["model", "input", "mode", "native ms", "onnx ms", "onnx/native", "eager ms", "onnx/eager"]
    table = [
        [
            r["model"],
            r["input"],
            r["mode"],
            _ms(r["native_ms"]),
            _ms(r["onnx_ms"]),
            _ratio(r["ratio_vs_native"]),
            _ms(r.get("native_eager_ms")),
            _ratio(r.get("ratio_vs_native_eager")),
        ]
        for r in rows
    ]
    minilm = [r for r in rows if r["model"] == "minilm" and r["mode"] == "forward+backward"]
    verdict = ""
    if minilm:
        ratio = minilm[0]["ratio_vs_native"]
        verdict = (
            f"MiniLM (legacy export) forward+backward: {ratio:.2f}x native "
            f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'missed'})"
        )
    markdown = [
        "# OnnxModule vs native torch (CPU)",
        "",
        f"torch {env['torch']}, {env['threads']} threads, medians of {env['repeats']} interleaved repeats; "
        f"load average after the run {env['load_average_after'][0]:.1f} (a shared machine: ratios are the "
        "stable part).",
        "`native`: the torch model the ONNX file was exported from (MiniLM: Hugging Face BertModel with SDPA "
        "attention + mean pooling); `eager`: the same with eager attention; `onnx`: the exported graph run by "
        "`inhercc.torchrt.OnnxModule`. forward+backward: loss = sum of squared outputs, gradients for every "
        "parameter.",
        "",
        format_markdown(headers, table),
        "",
        verdict,
        "",
    ]
    return format_table(headers, table) + ("\n" + verdict if verdict else ""), "\n".join(markdown)


if __name__ == "__main__":
    main()
