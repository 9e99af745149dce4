"""ONNX Runtime sessions: from in-memory models of any size, with provider checks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.errors import InherccError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def provider_name(provider: str) -> str:
    """``cuda`` → ``CUDAExecutionProvider`` (full names pass through)."""
    if provider in PROVIDER_ALIASES.values():
        return provider
    try:
        return PROVIDER_ALIASES[provider.lower()]
    except KeyError:
        raise InherccError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDER_ALIASES)}") from None


def provider_usable(provider: str) -> bool:
    """True when onnxruntime offers ``provider`` (cpu/cuda/tensorrt or a full EP name) *and* a session
    really runs on it: ONNX Runtime lists CUDA even when its libraries cannot be loaded."""
    import onnxruntime as ort

    name = provider_name(provider)
    if name not in ort.get_available_providers():
        return False
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    probe = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y]),
        opset_imports=[onnx.helper.make_opsetid("", 13)],
    )
    try:
        sess = ort.InferenceSession(_clamp_ir_version(probe).SerializeToString(), providers=[name])
    except Exception:
        return False
    return sess.get_providers()[0] == name


def cuda_available() -> bool:
    """True when onnxruntime offers the CUDA provider *and* a session can actually use it."""
    return provider_usable("cuda")


def make_session(
    model: ModelProto | str | os.PathLike[str],
    providers: Sequence[str] = ("cpu",),
    *,
    threads: int | None = None,
    opt_level: str | None = None,
    provider_options: Sequence[Mapping[str, str]] | None = None,
    require: bool = True,
    profile_prefix: str | os.PathLike[str] | None = None,
    spin: bool = True,
):  # -> onnxruntime.InferenceSession
    """An InferenceSession on the given providers. With ``require`` the first requested provider must be
    the one the session really uses — ONNX Runtime silently falls back to CPU when CUDA libraries are
    missing, and CPU numbers must never pass for CUDA numbers. ``profile_prefix``: ONNX Runtime's profiler
    on, its trace written by ``end_profiling()`` to ``<prefix>_<date>.json``. ``spin=False``: idle intra-op
    threads sleep instead of spinning (for a session that runs beside other work, e.g. torch training)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if opt_level:
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if opt_level not in levels:
            raise InherccError(f"unknown --opt-level {opt_level!r}; choose from {', '.join(levels)}")
        so.graph_optimization_level = levels[opt_level]
    names = [provider_name(p) for p in providers]
    if names[-1] != "CPUExecutionProvider":
        names.append("CPUExecutionProvider")
    options = list(provider_options or [{} for _ in providers])
    while len(options) < len(names):
        options.append({})
    if isinstance(model, ModelProto):
        model = _clamp_ir_version(model)
    try:
        if isinstance(model, ModelProto):
            if model.ByteSize() < 2**31 - (1 << 24):
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=names, provider_options=options)
            else:
                with tempfile.TemporaryDirectory() as d:
                    p = os.path.join(d, "model.onnx")
                    onnx.save_model(model, p, save_as_external_data=True, location="model.onnx.data")
                    sess = ort.InferenceSession(p, so, providers=names, provider_options=options)
        else:
            sess = ort.InferenceSession(str(model), so, providers=names, provider_options=options)
    except Exception as e:
        raise InherccError(f"ONNX Runtime cannot load the model: {str(e).strip().splitlines()[0]}") from e
    if require and sess.get_providers()[0] != names[0]:
        raise InherccError(
            f"requested {names[0]} but ONNX Runtime runs this session on {sess.get_providers()[0]} "
            "(missing CUDA/cuDNN libraries or no GPU?); refusing to report numbers for the wrong device"
        )
    return sess


def _max_ir_version() -> int:
    import onnxruntime as ort

    known = {(1, 20): 10, (1, 21): 11, (1, 22): 11}
    major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    return known.get((major, minor), 10 if (major, minor) < (1, 20) else 13)


def _clamp_ir_version(model: ModelProto) -> ModelProto:
    """New onnx releases stamp IR versions ONNX Runtime may not know yet although the graph uses nothing
    newer; run such in-memory models with the IR version ORT supports (the caller's model is untouched)."""
    limit = _max_ir_version()
    if model.ir_version <= limit:
        return model
    clamped = ModelProto()
    clamped.CopyFrom(model)
    clamped.ir_version = limit
    return clamped


def run_session(sess, feeds: Mapping[str, np.ndarray], batch_size: int | None = None) -> list[np.ndarray]:
    """Run a session on feeds (optionally in batches, concatenated along axis 0); returns all outputs."""
    names = [i.name for i in sess.get_inputs()]
    feed = {k: feeds[k] for k in names}
    if not batch_size:
        return list(sess.run(None, feed))
    n = len(feed[names[0]])
    parts: list[list[np.ndarray]] = []
    for i in range(0, n, batch_size):
        parts.append(sess.run(None, {k: v[i : i + batch_size] for k, v in feed.items()}))
    return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]
