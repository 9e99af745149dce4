"""The one atomic writer (:func:`inhercc.files.write_atomic`): whole files or none, no temp left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inhercc.files import write_atomic, write_json


def test_written_file_has_the_content_and_the_umask_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        out = write_atomic(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"\x00\x01abc"))
    finally:
        os.umask(umask)
    assert out.read_bytes() == b"\x00\x01abc"
    assert out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_companions_are_moved_beside_the_file(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text("model")
        (tmp.parent / "m.onnx.data").write_text("weights")

    write_atomic(tmp_path / "m.onnx", write, beside=["m.onnx.data"])
    assert (tmp_path / "m.onnx").read_text() == "model"
    assert (tmp_path / "m.onnx.data").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "r.json"
    write_json(target, {"old": 1})

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)):
        write_atomic(target, fail)
    assert target.read_text() == '{\n  "old": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
