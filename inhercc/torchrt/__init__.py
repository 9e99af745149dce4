"""The "PyTorch round-trip": run an ONNX graph as a torch module whose parameters are its initializers,
train them, and write the values back into the same ONNX graph."""

from inhercc.torchrt.module import OnnxModule, UnsupportedModelError

__all__ = ["OnnxModule", "UnsupportedModelError"]
