"""Models exported with a fixed batch dim distil (issue 13, item 6): training, validation, scoring, the
teacher cache and the probes run in batches of exactly that size (batch 1 included); the batch size option
gives way with a warning, and samples beyond whole batches are left out with one. A teacher whose inputs
differ from the student's is refused before any work, naming both."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from inhercc import compress
from inhercc.cli import cli
from inhercc.distill import DistillConfig, distill
from inhercc.errors import InherccError
from inhercc.recipe import Recipe
from inhercc.runtime import DataWarning, model_fixed_batch
from inhercc.verify import fidelity


class Mlp(torch.nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(width, 128), torch.nn.Linear(128, 128), torch.nn.Linear(128, 10)
        with torch.no_grad():
            self.fc3.weight.mul_(8.0)  # confident logits, as a trained classifier's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def exported(batch: int, path: Path, width: int = 64) -> onnx.ModelProto:
    """The MLP exported by torch at a fixed batch (no dynamic axes), as downloaded models often are."""
    torch.manual_seed(0)
    torch.onnx.export(
        Mlp(width).eval(),
        (torch.randn(batch, width),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        opset_version=17,
    )
    return onnx.load(str(path))


@pytest.mark.parametrize("batch", [1, 4])
def test_a_fixed_batch_model_distils(batch, tmp_path) -> None:
    teacher = exported(batch, tmp_path / "t.onnx")
    assert model_fixed_batch(teacher) == batch
    x = np.random.default_rng(0).standard_normal((43, 64)).astype(np.float32)
    losses: list[float] = []
    cfg = DistillConfig(steps=24, lr=3e-3, threads=1, quiet=True, val_split=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = (
            compress(teacher, Recipe.of(rank=8, init="svd", distill=cfg, verify=False), data={"x": x})
            if batch > 1
            else None
        )
        student = compress(teacher, Recipe.of(rank=8, init="svd", verify=False)).model
        tuned = distill(student, teacher, {"x": x}, config=cfg, callback=lambda e: losses.append(e["loss"]))
    notes = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert f"distilling in batches of {batch}, not 32" in " ".join(notes)
    rep = tuned.report
    assert rep["training"]["batch_size"] == batch and rep["training"]["steps"] == 24
    history = rep["training"]["history"]  # the validation loss: the same samples before and after
    assert len(losses) == 24 and all(np.isfinite(losses)) and history[-1]["val_loss"] < 0.8 * history[0]["val_loss"]
    val = rep["training"]["val_samples"]
    scored = val - val % batch
    assert rep["fidelity_inputs"] == f"validation split ({val} samples)" and scored > 0
    # the report's fidelity is the ONNX student's on the whole batches of the validation split
    assert rep["fidelity"]["logits"]["cosine"] > rep["fidelity_before"]["logits"]["cosine"]
    if batch > 1:
        assert any("left out" in n for n in notes)
        assert res is not None and res.report["training"]["batch_size"] == batch
        assert 0.0 <= res.report["fidelity"]["logits"]["top1_agreement"] <= 1.0


def test_fixed_batch_scores_equal_a_direct_verification(tmp_path) -> None:
    teacher = exported(4, tmp_path / "t.onnx")
    x = np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32)
    student = compress(teacher, Recipe.of(rank=8, init="svd", verify=False)).model
    cfg = DistillConfig(steps=2, batch_size=4, threads=1, quiet=True, val_split=0.2)
    res = distill(student, teacher, {"x": x}, config=cfg)
    from inhercc.data import split_indices

    _, val_idx = split_indices(40, 0.2, 0)
    assert len(val_idx) == 8
    expected = fidelity(teacher, res.model, {"x": x[val_idx]})["logits"]
    assert res.report["fidelity"]["logits"] == pytest.approx(expected, rel=1e-6)


def test_finetune_refuses_a_teacher_that_takes_other_inputs(tmp_path) -> None:
    """Same input name, another width: once caught by torch mid-training and blamed on the student."""
    teacher = exported(4, tmp_path / "t.onnx")
    other = exported(4, tmp_path / "other.onnx", width=32)
    onnx.save(compress(teacher, Recipe.of(rank=8, init="svd", verify=False)).model, str(tmp_path / "s.onnx"))
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 64), np.float32))
    with pytest.raises(InherccError, match=r"student inputs x float32 \[4, 64\] differ from teacher inputs x float32"):
        distill(str(tmp_path / "s.onnx"), other, None)
    args = ["finetune", str(tmp_path / "s.onnx"), "--teacher", str(tmp_path / "other.onnx"), "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(cli, args + ["--data", str(tmp_path / "d.npz"), "-q"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "[4, 32]" in r.output and "s.onnx" in r.output and "other.onnx" in r.output


def test_synthetic_samples_for_a_fixed_batch_model(tmp_path) -> None:
    """Without data, one synthetic draw gives only the fixed batch: enough draws make the sample count."""
    teacher = exported(4, tmp_path / "t.onnx")
    student = compress(teacher, Recipe.of(rank=8, init="svd", verify=False)).model
    with pytest.warns(UserWarning, match="synthetic inputs"):
        res = distill(student, teacher, None, config=DistillConfig(steps=2, threads=1, quiet=True))
    t = res.report["training"]
    assert t["train_samples"] + t["val_samples"] == 256 and t["batch_size"] == 4
    assert res.report["fidelity_inputs"] == "synthetic validation split (26 samples)"
    assert 0.0 < res.report["fidelity"]["logits"]["cosine"] <= 1.0


def test_a_validation_split_smaller_than_the_fixed_batch_goes_back_to_training(tmp_path) -> None:
    """18 samples, a 10 % split (2) and a fixed batch of 4: the 2 validation samples join the training
    samples (all 18, sorted), 2 of which are left out each epoch; no validation, the last weights are kept,
    and the report's fidelity is scored on the 16 training samples of whole batches."""
    from inhercc.data import open_samples, split_indices
    from inhercc.distill import fixed_batch_split

    teacher = exported(4, tmp_path / "t.onnx")
    x = np.random.default_rng(2).standard_normal((18, 64)).astype(np.float32)
    samples = open_samples({"x": x}, teacher)
    train_idx, val_idx = split_indices(18, 0.1, 0)
    assert (len(train_idx), len(val_idx)) == (16, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train2, val2 = fixed_batch_split(samples, train_idx, val_idx, 4)
    notes = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert train2.tolist() == list(range(18)) and val2.dtype == val_idx.dtype and len(val2) == 0
    assert notes == [
        "the validation split (2 samples) is smaller than the model's fixed batch of 4: no validation, the last "
        "weights are kept",
        "the model's batch dim is fixed at 4, so 2 of 18 training samples (other ones each epoch) are left out",
    ]
    assert fixed_batch_split(samples, train_idx, val_idx, None) == (train_idx, val_idx)
    student = compress(teacher, Recipe.of(rank=8, init="svd", verify=False)).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        res = distill(student, teacher, {"x": x}, config=DistillConfig(steps=3, threads=1, quiet=True))
    t = res.report["training"]
    assert (t["train_samples"], t["val_samples"], t["steps_per_epoch"], t["best_step"]) == (18, 0, 4, None)
    assert res.report["fidelity_inputs"] == "training samples (18 samples)"
    expected = fidelity(teacher, res.model, {"x": x[:16]})["logits"]
    assert res.report["fidelity"]["logits"] == pytest.approx(expected, rel=1e-6)
