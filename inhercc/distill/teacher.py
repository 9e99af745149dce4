"""The teacher in ONNX Runtime: its outputs (and feature tensors) per sample, cached when they fit, computed
one batch ahead in a worker thread when it has cores of its own; and the student's fidelity to it."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from onnx import ModelProto

from inhercc.data import Feed, Samples, batch_axes, cast_feeds, take_samples
from inhercc.distill.config import DEFAULT_CACHE_BYTES
from inhercc.distill.processes import Processes, local_batch
from inhercc.runtime import model_fixed_batch
from inhercc.verify import Scores, graph_class_axes, graph_output_kinds


class Teacher:
    """The teacher in ONNX Runtime with the feature tensors exposed. Its per-sample outputs are cached by
    sample index: validation samples always, training samples when ``cache`` is True, or — ``cache`` None —
    when those of the whole training set fit in ``DEFAULT_CACHE_BYTES`` (judged on the first batch)."""

    def __init__(
        self,
        model: ModelProto,
        features: Sequence[str],
        provider: str,
        device_id: int,
        cache: bool | None,
        train_samples: int,
        threads: int | None = None,
        spin: bool = True,
        output_kinds: Mapping[str, str] | None = None,
    ) -> None:
        from inhercc.calibrate import with_outputs
        from inhercc.runtime import make_session
        from inhercc.specs import mask_input

        self.model = model
        self.outputs = [o.name for o in model.graph.output]
        self.kinds = graph_output_kinds(model, output_kinds)
        self.class_axes = graph_class_axes(model)
        self.axes = batch_axes(model)
        self.fixed = model_fixed_batch(model)  # runs take exactly this many samples
        self.mask_name = mask_input(model)
        self.features = list(features)
        exposed, _ = with_outputs(model, self.outputs + self.features)
        options = [{"device_id": str(device_id)}] if provider == "cuda" else None
        self.session = make_session(exposed, [provider], threads=threads, provider_options=options, spin=spin)
        self.provider = provider
        self.train_samples = train_samples
        self.cache_train = cache
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def run(self, feeds: Feed, features: bool) -> list[np.ndarray]:
        """One ONNX Runtime run: the graph outputs, then (``features``) the feature tensors."""
        from inhercc.runtime import ort_failures

        names = self.outputs + (self.features if features else [])
        with ort_failures("distillation (the teacher)"):
            return list(self.session.run(names, cast_feeds(feeds, self.model)))

    def __call__(
        self, idx: np.ndarray, feeds: Feed, *, features: bool, train: bool = True
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Outputs and (when asked) feature tensors for the samples ``idx`` whose inputs are ``feeds``."""
        n_out = len(self.outputs)
        names = self.outputs + (self.features if features else [])
        rows: list[tuple[np.ndarray, ...] | None] = [self._cache.get(int(i)) for i in idx]
        rows = [r if r is not None and len(r) >= len(names) else None for r in rows]
        miss = [j for j, r in enumerate(rows) if r is None]
        if miss and self.fixed:
            miss = list(range(len(idx)))  # a fixed batch dim runs whole batches only
        if miss:
            sub = feeds if len(miss) == len(idx) else take_samples(feeds, self.axes, np.asarray(miss))
            values = self.run(sub, features)
            axes = [self._axis(n) for n in names]
            if not all(a is not None and v.ndim > a and v.shape[a] == len(miss) for v, a in zip(values, axes)):
                values = values if len(miss) == len(idx) else self.run(feeds, features)  # not per sample: no cache
                return values[:n_out], values[n_out:]
            if train and self.cache_train is None:
                per_sample = sum(v.nbytes for v in values) / len(miss)
                self.cache_train = per_sample * self.train_samples <= DEFAULT_CACHE_BYTES
            keep = not train or self.cache_train
            for r, j in enumerate(miss):
                rows[j] = tuple(np.take(v, r, axis=a) for v, a in zip(values, axes))
                if keep:
                    self._cache[int(idx[j])] = rows[j]
            if len(miss) == len(idx):
                return values[:n_out], values[n_out:]
        stacked = [np.stack([r[k] for r in rows], axis=self._axis(n)) for k, n in enumerate(names)]  # type: ignore[index]
        return stacked[:n_out], stacked[n_out:]

    def _axis(self, name: str) -> int | None:
        """The batch axis of an output (:func:`~inhercc.data.batch_axes`; None: shared by all samples) or of a
        feature tensor (axis 0, as the layers of a batch-major model compute)."""
        return self.axes.get(name, 0)

    def scores(self) -> Scores:
        """Empty fidelity sums for every output (its kind and batch axis known)."""
        return Scores(self.kinds, self.axes, self.class_axes)

    def mask(self, feeds: Feed) -> np.ndarray | None:
        """The batch's attention mask (padding left out of token-level scores), None without one."""
        return feeds.get(self.mask_name) if self.mask_name else None

    def batches(self, samples: Samples, indices: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, Feed]]:
        """Unshuffled batches of ``indices`` for scoring: with a fixed batch dim, whole batches only."""
        return (
            samples.batches(indices, batch_size, min_rows=batch_size if self.fixed else 1) if len(indices) else iter(())
        )

    @property
    def caching(self) -> bool:
        """Whether training samples' teacher outputs are cached."""
        return bool(self.cache_train)


Prefetched = tuple[int, Feed, list[np.ndarray], list[np.ndarray]]


def with_teacher(
    teacher: Teacher,
    batches: Iterable[tuple[np.ndarray, Feed]],
    features: bool,
    procs: Processes,
    skip: int,
    ahead: bool,
) -> Iterator[Prefetched]:
    """``(batch number, feeds, teacher outputs, teacher features)`` for this rank's slice of each batch
    from ``skip`` on. With ``ahead`` the teacher runs one batch ahead in a worker thread, so that ONNX Runtime
    works on the next batch while torch trains on this one; the results are the same either way."""
    todo = ((b, *local_batch(idx, feeds, procs, teacher.axes)) for b, (idx, feeds) in enumerate(batches) if b >= skip)
    if not ahead:
        for b, idx, feeds in todo:
            yield b, feeds, *teacher(idx, feeds, features=features)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inhercc-teacher") as pool:
        queue: deque[tuple[int, Feed, Future]] = deque()
        for b, idx, feeds in todo:
            queue.append((b, feeds, pool.submit(teacher, idx, feeds, features=features)))
            if len(queue) > 1:
                b0, feeds0, job = queue.popleft()
                yield b0, feeds0, *job.result()
        while queue:
            b0, feeds0, job = queue.popleft()
            yield b0, feeds0, *job.result()


def onnx_fidelity(
    teacher: Teacher,
    student: ModelProto,
    samples: Samples,
    indices: np.ndarray,
    batch_size: int,
    threads: int | None = None,
) -> Scores:
    """Teacher vs student in ONNX Runtime on the given samples (the exported student, not the torch one),
    pooled batch by batch (batches may differ in shape: length buckets)."""
    from inhercc.runtime import make_session, ort_failures

    sess = make_session(student, threads=threads)
    scores = teacher.scores()
    for idx, feeds in teacher.batches(samples, indices, batch_size):
        t_out, _ = teacher(idx, feeds, features=False, train=False)
        with ort_failures("fidelity of the student"):
            scores.add(t_out, sess.run(teacher.outputs, cast_feeds(feeds, student)), teacher.mask(feeds))
    return scores
