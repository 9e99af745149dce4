"""CLI guards: every output checked against every input and the other outputs, options validated before any
work (one ``error: …`` line, exit 2, inputs untouched, nothing written), SIGTERM cleaned up like Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import mlp
from tests.test_cli import invoke


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    """teacher.onnx (an FFN 64→96→48), a compressed student.onnx, data.npz (64 samples), plan.json, a folder
    of shards, and out/ for the outputs."""
    rng = np.random.default_rng(0)
    onnx.save(mlp(rng, (64, 96, 48)), str(tmp_path / "teacher.onnx"))
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    (tmp_path / "shards").mkdir()
    np.savez(tmp_path / "shards" / "a.npz", x=rng.standard_normal((16, 64)).astype(np.float32))
    (tmp_path / "out").mkdir()
    r = invoke(
        "compress", tmp_path / "teacher.onnx", "-o", tmp_path / "student.onnx", "--rank", "8",
        "--save-plan", tmp_path / "plan.json", "--no-verify",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return tmp_path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _one_line_error(root: Path, args: list[str], message: str) -> None:
    """``args`` (``{w}`` = the work folder) fail with one line holding ``message``; no file changes."""
    before = _snapshot(root)
    r = invoke(*[a.replace("{w}", str(root)) for a in args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output
    assert _snapshot(root) == before  # inputs untouched, no output, no temp file left


T, S, D, O = "{w}/teacher.onnx", "{w}/student.onnx", "{w}/data.npz", "{w}/out"
FT = ["finetune", S, "--teacher", T, "--data", D]

OUTPUT_CLASHES = {
    "--report = --data": (
        ["compress", T, "-o", f"{O}/a.onnx", "--data", D, "--report", D],
        "--report {w}/data.npz would overwrite the input --data",
    ),
    "-o = --data": (["compress", T, "-o", D, "--data", D], "would overwrite the input --data"),
    "finetune -o = --data": ([*FT, "--epochs", "1", "-o", D], "would overwrite the input --data"),
    "finetune -o = --teacher": ([*FT, "--epochs", "1", "-o", T], "would overwrite the input --teacher"),
    "--save-plan = --plan": (
        ["compress", T, "-o", f"{O}/a.onnx", "--plan", "{w}/plan.json", "--save-plan", "{w}/plan.json"],
        "would overwrite the input --plan",
    ),
    "--report = --verify-data": (
        ["compress", T, "-o", f"{O}/a.onnx", "--data", D, "--verify-data", D, "--report", "{w}/out/../data.npz"],
        "would overwrite the input --data",
    ),
    "--report = -o": (
        ["compress", T, "-o", f"{O}/a.onnx", "--report", f"{O}/a.onnx"],
        "-o and --report are the same path",
    ),
    "--save-plan = --report via ..": (
        ["compress", T, "-o", f"{O}/a.onnx", "--report", f"{O}/r.json", "--save-plan", f"{O}/../out/r.json"],
        "--report and --save-plan are the same path",
    ),
    "bench --json = --markdown": (
        ["bench", T, S, "--provider", "cpu", "--json", f"{O}/b.json", "--markdown", f"{O}/b.json"],
        "--json and --markdown are the same path",
    ),
    "bench --plot = model": (["bench", T, S, "--provider", "cpu", "--plot", S], "would overwrite the input MODELS"),
    "--checkpoint = -o": (
        [*FT, "--epochs", "1", "-o", f"{O}/t.onnx", "--checkpoint", f"{O}/t.onnx"],
        "-o and --checkpoint are the same path",
    ),
    "-o = checkpoint file": (
        [*FT, "--epochs", "1", "-o", f"{O}/ck/checkpoint.pt", "--checkpoint", f"{O}/ck"],
        "-o and --checkpoint are the same path",
    ),
    "output inside the --data folder": (
        ["compress", T, "-o", f"{O}/a.onnx", "--data", "{w}/shards", "--report", "{w}/shards/r.npz"],
        "--report {w}/shards/r.npz is inside the input folder --data",
    ),
    "--checkpoint = the --data folder": (
        [*FT[:-1], "{w}/shards", "--epochs", "1", "-o", f"{O}/t.onnx", "--checkpoint", "{w}/shards"],
        "--checkpoint {w}/shards would overwrite the input --data",
    ),
}


@pytest.mark.parametrize("case", list(OUTPUT_CLASHES))
def test_outputs_never_overwrite_inputs_or_each_other(case: str, work: Path) -> None:
    args, message = OUTPUT_CLASHES[case]
    _one_line_error(work, args, message.replace("{w}", str(work)))


def test_output_symlink_to_an_input_is_refused(work: Path) -> None:
    (work / "out" / "link.npz").symlink_to(work / "data.npz")
    _one_line_error(
        work, ["compress", T, "-o", f"{O}/a.onnx", "--data", D, "--report", f"{O}/link.npz"], "overwrite the input"
    )


CHECKPOINT_CASES = {
    "parent is a file": (f"{D}/ck", "data.npz is a file, not a folder"),
    "is a file": (D, "is a file"),
    "unwritable": ("/proc/self/ck", "/proc/self is not writable"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_folder_checked_before_training(case: str, work: Path) -> None:
    folder, message = CHECKPOINT_CASES[case]
    _one_line_error(work, [*FT, "--epochs", "1", "-o", f"{O}/t.onnx", "--checkpoint", folder], message)


def test_checkpoint_folder_is_made_when_it_can_be(work: Path) -> None:
    ck = work / "out" / "new" / "ck"
    r = invoke(*[a.replace("{w}", str(work)) for a in FT], "--steps", "2", "-o", work / "out" / "t.onnx", "-q",
               "--checkpoint", ck, "--checkpoint-every", "1")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (ck / "checkpoint.pt").is_file() and (work / "out" / "t.onnx").is_file()


BAD_OPTIONS = {
    "epochs and steps": (["--epochs", "1", "--steps", "3"], "choose one of --epochs, --steps"),
    "weight decay nan": (["--epochs", "1", "--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    "weight decay < 0": (["--epochs", "1", "--weight-decay", "-0.1"], "--weight-decay must be ≥ 0"),
    "temperature nan": (["--epochs", "1", "--temperature", "nan"], "--temperature must be a finite number"),
    "temperature inf": (["--epochs", "1", "--temperature", "inf"], "--temperature must be a finite number"),
    "clip nan": (["--epochs", "1", "--clip", "nan"], "--clip must be a finite number"),
    "lr -inf": (["--epochs", "1", "--lr", "-inf"], "--lr must be a finite number"),
    "feature loss nan": (["--epochs", "1", "--feature-loss", "nan"], "--feature-loss must be a finite number"),
    "feature loss -1": (["--epochs", "1", "--feature-loss", "-1"], "--feature-loss must be ≥ 0, got -1"),
    "feature loss=-1": (["--epochs", "1", "--feature-loss=-1"], "--feature-loss must be ≥ 0, got -1"),
    "patience -1": (["--epochs", "1", "--patience", "-1"], "--patience must be ≥ 0, got -1"),
    "checkpoint-every alone": (["--epochs", "1", "--checkpoint-every", "2"], "only used with --checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_distillation_options_refused_up_front(case: str, work: Path) -> None:
    extra, message = BAD_OPTIONS[case]
    _one_line_error(work, [*FT, "-o", f"{O}/t.onnx", *extra], message)


def test_compress_epochs_and_steps_refused_but_either_distils(work: Path) -> None:
    _one_line_error(
        work, ["compress", T, "-o", f"{O}/a.onnx", "--data", D, "--epochs", "1", "--steps", "2"], "choose one of"
    )
    _one_line_error(work, ["compress", T, "-o", f"{O}/a.onnx", "--lr", "1e-3"], "only used with --epochs or --steps")
    r = invoke("compress", work / "teacher.onnx", "-o", work / "out" / "a.onnx", "--data", work / "data.npz",
               "--steps", "2", "-q", "--report", work / "out" / "r.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((work / "out" / "r.json").read_text())["training"]["steps"] == 2


@pytest.mark.parametrize("weight", [None, "2"])
def test_feature_loss_value_is_optional(weight: str | None, work: Path) -> None:
    args = ["--feature-loss"] + ([weight] if weight else [])
    r = invoke(*[a.replace("{w}", str(work)) for a in FT], "--steps", "1", "-o", work / "out" / "t.onnx", *args,
               "--features", "layers", "-q", "--report", work / "out" / "r.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    features = json.loads((work / "out" / "r.json").read_text())["training"]["losses"]["features"]
    assert features.endswith(f"x {float(weight or 1)}"), features


BENCH_CASES = {
    "duration nan": (["--duration", "nan"], "--duration must be a finite number, got nan"),
    "duration inf": (["--duration", "inf"], "--duration must be a finite number, got inf"),
    "plot unknown format": (["--plot", f"{O}/p.xyz"], "unsupported format .xyz"),
    "plot without extension": (["--plot", f"{O}/plotfile"], "has no extension"),
    "plot pgf (needs LaTeX)": (["--plot", f"{O}/p.pgf"], "unsupported format .pgf"),
}


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_bench_options_checked_before_timing(case: str, work: Path) -> None:
    extra, message = BENCH_CASES[case]
    _one_line_error(work, ["bench", T, S, "--provider", "cpu", *extra], message)


def test_bench_plot_written_at_the_exact_path(work: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = work / "out" / "p.svg"
    r = invoke("bench", work / "teacher.onnx", work / "student.onnx", "--provider", "cpu", "--warmup", "1",
               "--repeat", "3", "--plot", plot)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (work / "out").iterdir()) == ["p.svg"]
    assert plot.read_text().lstrip().startswith("<?xml")


MODE_ONLY = {
    "compress --calib-samples": (["compress", T, "-o", f"{O}/a.onnx", "--calib-samples", "4"], "--calib-samples"),
    "compress --calib-batch-size": (
        ["compress", T, "-o", f"{O}/a.onnx", "--epochs", "1", "--calib-batch-size", "4"],
        "--calib-batch-size",
    ),
    "inspect --calib-samples": (["inspect", T, "--calib-samples", "4"], "--calib-samples"),
}


@pytest.mark.parametrize("case", list(MODE_ONLY))
def test_calibration_options_need_data(case: str, work: Path) -> None:
    args, flag = MODE_ONLY[case]
    _one_line_error(work, args, f"{flag}: calibration options, only used with --data")


def test_finetune_without_data_warns_on_one_line(work: Path) -> None:
    r = invoke("finetune", work / "student.onnx", "--teacher", work / "teacher.onnx", "-o", work / "out" / "t.onnx",
               "--steps", "1", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    warning = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert warning == [
        "warning: no --data given: distillation uses synthetic inputs, which say little about real quality"
    ]


def test_compress_warns_when_verification_reuses_calibration(work: Path) -> None:
    small = work / "small.npz"
    np.savez(small, x=np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32))
    r = invoke("compress", work / "teacher.onnx", "-o", work / "out" / "a.onnx", "--rank", "8", "--data", small)
    assert r.exit_code == 0, r.output
    assert "warning: only 6 calibration samples" in r.output and "reuses the calibration samples" in r.output
    r = invoke(
        "compress", work / "teacher.onnx", "-o", work / "out" / "b.onnx", "--rank", "8", "--data", work / "data.npz"
    )
    assert r.exit_code == 0 and "warning:" not in r.output, r.output


def test_help_texts_say_what_happens() -> None:
    compress_help = " ".join(invoke("compress", "--help").output.split())
    assert "Distil for this many epochs [default: 3" not in compress_help
    assert "compress distils only when --epochs or --steps is given" in compress_help
    assert "calibration samples included" in compress_help
    bench_help = " ".join(invoke("bench", "--help").output.split())
    assert "(PNG)" not in bench_help and "the extension picks the format" in bench_help


def test_no_compressible_layer_says_why(work: Path) -> None:
    _one_line_error(
        work,
        ["compress", T, "-o", f"{O}/a.onnx", "--rank-multiple", "64"],
        "none compressible); main reason (2 of 2 layers, e.g. fc1): no saving at any rank",
    )


SIGTERM_DURING_SAVE = """
import os, signal, sys, time
import onnx

real_save = onnx.save_model

def save_then_sigterm(*args, **kwargs):
    real_save(*args, **kwargs)  # the student now lies, whole, in the temp folder beside the output
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler interrupts this

onnx.save_model = save_then_sigterm
from inhercc.cli import main

sys.argv = ["inhercc", "compress", sys.argv[1], "-o", sys.argv[2], "--rank", "8", "--no-verify"]
main()
"""


def test_sigterm_during_save_cleans_up_like_ctrl_c(work: Path) -> None:
    out = work / "out" / "s.onnx"
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_DURING_SAVE), str(work / "teacher.onnx"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert p.returncode == 2, p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == ["error: aborted"], p.stderr
    assert list((work / "out").iterdir()) == []  # no student, no .s.onnx.XXXX temp folder


def test_python_api_checks_outputs_against_inputs_like_the_cli(work: Path) -> None:
    """compress_file / finetune_file (what the CLI calls) refuse the same clashes before any work."""
    from inhercc import Recipe, compress_file
    from inhercc.distill import DistillConfig, finetune_file
    from inhercc.errors import InherccError

    before = _snapshot(work)
    with pytest.raises(InherccError, match="`report` .* would overwrite the input `data`"):
        compress_file(work / "teacher.onnx", work / "out" / "a.onnx", Recipe.of(rank=8), data=work / "data.npz",
                      report_path=work / "data.npz")  # fmt: skip
    with pytest.raises(InherccError, match="`save_plan` .* would overwrite the input `plan.file`"):
        compress_file(work / "teacher.onnx", work / "out" / "a.onnx", Recipe.of(plan=work / "plan.json"),
                      save_plan=work / "plan.json")  # fmt: skip
    with pytest.raises(InherccError, match="`output` and `distill.checkpoint` are the same path"):
        finetune_file(work / "student.onnx", work / "teacher.onnx", work / "out" / "t.onnx", work / "data.npz",
                      config=DistillConfig(epochs=1, checkpoint=str(work / "out" / "t.onnx")))  # fmt: skip
    with pytest.raises(InherccError, match="`output` .* would overwrite the input `data`"):
        finetune_file(work / "student.onnx", work / "teacher.onnx", work / "data.npz", work / "data.npz", epochs=1)
    assert _snapshot(work) == before


def test_outputs_the_loader_does_not_read_may_sit_in_the_data_folder(work: Path) -> None:
    """Only .npz / .npy files in a --data folder are read as samples: a student or report there is fine."""
    r = invoke("compress", work / "teacher.onnx", "-o", work / "shards" / "s.onnx", "--rank", "8",
               "--data", work / "shards", "--report", work / "shards" / "r.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["a.npz", "r.json", "s.onnx"]


def test_no_verify_takes_no_samples_out_and_warns_of_nothing(work: Path) -> None:
    small = work / "small.npz"
    np.savez(small, x=np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32))
    r = invoke("compress", work / "teacher.onnx", "-o", work / "out" / "a.onnx", "--rank", "8", "--data", small,
               "--no-verify", "--report", work / "out" / "r.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
