"""The main job on a real built-in example: build the MiniLM-L6 sentence-embedding teacher (pretrained
weights shipped in a pip package), encode real English sentences, and run ``inhercc compress`` on it.

    python -m benchmarks.example [--ratio 0.5] [--workdir build/example]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.teachers import cached_teacher, encode, english_sentences


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=Path("build/example"))
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences (training split)")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    teacher = cached_teacher("minilm")
    calib, heldout = args.workdir / "calib.npz", args.workdir / "heldout.npz"
    np.savez(calib, **encode(english_sentences("train", n=args.calib), max_length=128))
    np.savez(heldout, **encode(english_sentences("heldout", n=64), max_length=128))
    student = args.workdir / "minilm-student.onnx"
    cmd = [
        sys.executable,
        "-m",
        "inhercc",
        "compress",
        str(teacher),
        "-o",
        str(student),
        "--ratio",
        str(args.ratio),
        "--data",
        str(calib),
        "--verify-data",
        str(heldout),
        "--report",
        str(args.workdir / "report.json"),
        "--save-plan",
        str(args.workdir / "plan.json"),
        "-v",
    ]
    print("$ inhercc " + shlex.join(cmd[3:]), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
