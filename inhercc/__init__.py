"""inhercc — an ONNX graph-rewriting compiler for neural network inheritance.

Public API::

    from inhercc import Recipe, compress, load_model, save_model
    result = compress("teacher.onnx", Recipe.of(ratio=0.5))
    save_model(result.model, "student.onnx")
    print(result.report["fidelity"])
"""

from inhercc._version import __version__
from inhercc.distill import DistillConfig, finetune_file
from inhercc.errors import InherccError
from inhercc.layers import Layer, find_layers
from inhercc.model import load_model, save_model
from inhercc.pipeline import CompressResult, compress, compress_file, inspect_model
from inhercc.plan import RankPlan
from inhercc.recipe import Recipe
from inhercc.reskd import ResKDOptions, reskd_file  # (reskd(): from inhercc.reskd; the name is the package)

__all__ = [
    "CompressResult",
    "DistillConfig",
    "InherccError",
    "Layer",
    "RankPlan",
    "Recipe",
    "ResKDOptions",
    "__version__",
    "compress",
    "compress_file",
    "finetune_file",
    "find_layers",
    "inspect_model",
    "load_model",
    "reskd_file",
    "save_model",
]
