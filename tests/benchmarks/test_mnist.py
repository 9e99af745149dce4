"""Full MNIST from the cache (fetched at install time, sha256-checked) and the teacher's building blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.mnist import FILES, MnistResNet, have_mnist, load_mnist, read_idx, shifted


def test_idx_files_are_read_as_written(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    (tmp_path / "x.idx3-ubyte").write_bytes(header + data.tobytes())
    assert np.array_equal(read_idx(tmp_path / "x.idx3-ubyte"), data)


@pytest.mark.skipif(not have_mnist(), reason="MNIST not fetched (make install runs python -m benchmarks.mnist --fetch)")
def test_full_mnist_has_its_real_sizes_and_labels() -> None:
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert np.bincount(y).tolist()[:3] == [5923, 6742, 5958] and np.bincount(yt).tolist()[:3] == [980, 1135, 1032]
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3  # normalized with the train stats
    assert len(FILES) == 4


def test_shift_moves_the_digit_and_fills_background() -> None:
    img = torch.zeros(1, 1, 28, 28) - 0.4242
    img[..., 10, 10] = 5.0
    out = shifted(img, np.random.default_rng(3))
    assert out.shape == img.shape and float(out.max()) == 5.0 and int((out == 5.0).sum()) == 1


def test_teacher_architecture_runs_on_a_batch() -> None:
    logits = MnistResNet()(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)
