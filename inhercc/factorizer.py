"""The decomposition behind every factor pair: each layer's SVD (or whitened SVD) computed once, serving the
spectra the planner reads and the factors the passes write."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from inhercc import linalg
from inhercc.errors import InherccError
from inhercc.families import Layer, family_for

INITS = ("svd", "whitened", "random")


class Factorizer:
    """Computes each layer's decomposition once and serves spectra (for planning) and factors (for the
    passes) from it. ``init``: 'svd' (Eckart–Young optimal in the weights), 'whitened' (optimal in the
    layer outputs given per-layer Gram matrices) or 'random' (Kaiming; same architecture, no inheritance)."""

    def __init__(
        self, init: str = "svd", split: str = "output", grams: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> None:
        if init not in INITS:
            raise InherccError(f"unknown `factors.init` {init!r}; choose from {', '.join(INITS)}")
        if split not in linalg.SPLITS:
            raise InherccError(f"unknown `factors.split` {split!r}; choose from {', '.join(linalg.SPLITS)}")
        if init == "whitened" and grams is None:
            raise InherccError("`factors.init` whitened needs calibration data (`data`)")
        self.init, self.split, self.grams, self.seed = init, split, grams, seed
        self._cache: dict[str, Any] = {}

    def decomposition(self, layer: Layer) -> linalg.SVD | linalg.WhitenedSVD:
        if layer.name not in self._cache:
            self._cache[layer.name] = self._decompose(layer)
        return self._cache[layer.name]

    def spectrum(self, layer: Layer) -> np.ndarray:
        return self.decomposition(layer).s

    def spectra(self, layers: Iterable[Layer]) -> dict[str, np.ndarray]:
        """Spectra of the compressible layers; the decompositions run on a small thread pool (LAPACK
        releases the GIL; each call is single-threaded, see :func:`linalg.thin_svd`)."""
        todo = [layer for layer in layers if layer.compressible]
        workers = max(1, min(len(todo), os.cpu_count() or 1, 4))
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with linalg.single_threaded_torch(), ThreadPoolExecutor(workers) as pool:
                for layer, d in zip(todo, pool.map(self._decompose, todo)):
                    self._cache.setdefault(layer.name, d)
        return {layer.name: self.spectrum(layer) for layer in todo}

    def _decompose(self, layer: Layer) -> linalg.SVD | linalg.WhitenedSVD:
        if self.init == "whitened" and self.grams is not None and layer.name in self.grams:
            return family_for(layer.op).decompose(layer, self.grams[layer.name])
        return linalg.svd(layer.matrix())

    def __call__(self, layer: Layer, rank: int) -> tuple[np.ndarray, np.ndarray]:
        per_group = rank // layer.groups
        if self.init == "random":
            seed = self.seed + zlib.crc32(layer.name.encode()) % 1000  # hash() differs between processes
            return linalg.random_factors(layer.out_features, layer.in_features, per_group, layer.groups, seed=seed)
        return self.decomposition(layer).factors(per_group, self.split)  # no weight copy: the cached SVD suffices

    def release(self) -> None:
        self._cache.clear()
