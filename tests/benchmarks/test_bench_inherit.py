"""bench_inherit's pieces on a tiny digits teacher (scikit-learn's 8×8 ``load_digits``): the budget bisection and
one inherited variant end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from benchmarks.bench_inherit import (
    Budget,
    Settings,
    accuracy,
    conventional_width,
    inherited_student,
    match_ratio,
    mean_std,
    onnx_params,
    set_bn_statistics,
    write_npz,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")


class TinyCnn(nn.Module):
    """Three 3×3 convs (the last two big enough to factorize), global average pooling, a linear classifier."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x).mean(dim=(2, 3)))


def export_tiny(model: nn.Module, path: Path) -> Path:
    model.eval()
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The digits split 1,400 / 397, a teacher trained on the first part (~95 % test), its ONNX file."""
    d = sklearn_datasets.load_digits()
    x = ((d.images / 16.0 - 0.5) / 0.5).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small kernels: one thread is fastest on a shared machine
    model = TinyCnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        idx = rng.integers(0, 1400, 64)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("digits")
    path = export_tiny(model, folder / "teacher.onnx")
    data = write_npz(folder / "train.npz", "images", x[:1400], y[:1400])
    return {"teacher": onnx.load(str(path)), "path": path, "data": data, "xt": x[1400:], "yt": y[1400:]}


def test_teacher_is_a_real_digits_classifier(digits: dict) -> None:
    assert accuracy(digits["path"], digits["xt"], digits["yt"], threads=1) > 0.9


def test_budget_bisection_hits_its_target_within_1_percent(digits: dict) -> None:
    teacher = digits["teacher"]
    target = 0.3 * onnx_params(teacher)
    found = match_ratio(teacher, target, str(digits["data"]), rank_multiple=1, threads=1)
    assert abs(found["params"] - target) <= 0.01 * target
    assert 0.0 < found["ratio"] < 1.0 and found["plan"].factorized()


def test_conventional_width_is_the_closest_in_params(digits: dict, tmp_path: Path) -> None:
    counts = {w: onnx_params(onnx.load(str(export_tiny(TinyCnn(w), tmp_path / f"{w}.onnx")))) for w in range(8, 26)}
    target = 0.3 * onnx_params(digits["teacher"])
    width = conventional_width(target, TinyCnn, export_tiny)
    assert width == min(counts, key=lambda w: abs(counts[w] - target))


def test_inherited_variant_end_to_end_beats_chance(digits: dict) -> None:
    teacher = digits["teacher"]
    target = 0.3 * onnx_params(teacher)
    plan = match_ratio(teacher, target, str(digits["data"]), rank_multiple=1, threads=1)
    budget = Budget(0.3, target, {1: plan}, 0, 0)
    s = Settings(seeds=1, epochs=2, lr=2e-3, batch_size=32, rank_multiple=1)
    student = inherited_student(teacher, digits["data"], budget, "inhernet", s, seed=0)
    assert onnx_params(student) == plan["params"]
    acc = accuracy(student, digits["xt"], digits["yt"], threads=1)
    assert acc > 0.5  # chance is 0.1


def test_mean_std_over_seeds() -> None:
    assert mean_std([0.9, 0.92]) == pytest.approx((0.91, 0.0141421356), abs=1e-9)
    assert mean_std([0.5]) == (0.5, 0.0)


def test_bn_statistics_are_the_exact_averages_over_the_images() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    images = np.random.default_rng(0).normal(2.0, 3.0, (600, 1, 6, 6)).astype(np.float32)
    set_bn_statistics(model, images)
    with torch.no_grad():
        conv = model[0](torch.from_numpy(images))
    assert not model.training
    assert torch.allclose(model[1].running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
