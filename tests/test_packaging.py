"""`passes/` installs as `inhercc.passes`, never as a top-level `passes` package (wheel and editable)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_passes_into_inhercc(tmp_path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {p.stderr.strip().splitlines()[-1:]}")
    (wheel,) = tmp_path.glob("inhercc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "inhercc/passes/__init__.py" in names
    assert "inhercc/passes/factorize_conv.py" in names
    assert "inhercc/torchrt/ops/registry.py" in names
    assert not any(n.startswith("passes/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "inhercc = inhercc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_imports_passes_from_the_passes_folder() -> None:
    code = "import inhercc.passes, importlib.util as u; print(inhercc.passes.__file__, u.find_spec('passes'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    path, spec = out.split()
    assert Path(path).parent.name == "passes" and spec == "None"
