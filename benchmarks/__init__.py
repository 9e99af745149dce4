"""Benchmarks: real teachers (ONNX exports of pretrained models) and their data."""
