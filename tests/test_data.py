"""Training data sources (inhercc.data): .npz, folders of shards (streamed), iterables, ORT readers,
synthetic samples; the validation split; shuffled batching; one-line errors for bad data."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from inhercc.data import LABELS_KEY, Samples, check_feeds, open_samples, split_indices
from inhercc.errors import InherccError
from tests.helpers import make_model


@pytest.fixture(scope="module")
def model():
    """Two inputs (float x [batch, 4], int64 ids [batch, 3]) → one float output."""
    w = np.ones((4, 2), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["idf"], ["s"], keepdims=1),
        helper.make_node("Add", ["y0", "s"], ["y"]),
    ]
    m = make_model(nodes, {"x": ["batch", 4]}, ["y"], {"w": w})
    m.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]))
    return m


def feeds(n: int, start: int = 0, labels: bool = True) -> dict[str, np.ndarray]:
    """Sample i has x = [i, i, i, i]: the values say which samples a batch holds."""
    i = np.arange(start, start + n)
    out = {"x": np.repeat(i[:, None], 4, 1).astype(np.float32), "ids": np.zeros((n, 3), np.int64)}
    if labels:
        out[LABELS_KEY] = (i % 10).astype(np.int64)
    return out


def ids_of(batch: dict[str, np.ndarray]) -> list[int]:
    return batch["x"][:, 0].astype(int).tolist()


def all_batches(samples: Samples, indices: np.ndarray, batch: int, seed: int | None = None) -> list[list[int]]:
    rng = np.random.default_rng(seed) if seed is not None else None
    out = []
    for idx, b in samples.batches(indices, batch, rng):
        assert ids_of(b) == idx.tolist()  # global indices match the rows
        out.append(ids_of(b))
    return out


def test_npz_file(tmp_path, model):
    np.savez(tmp_path / "d.npz", **feeds(10))
    s = open_samples(tmp_path / "d.npz", model)
    assert len(s) == 10 and s.labels and not s.synthetic
    assert all_batches(s, np.arange(10), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_folder_of_npz_shards_is_streamed(tmp_path, model, monkeypatch):
    for k in range(3):
        np.savez(tmp_path / f"part{k}.npz", **feeds(5, start=5 * k))
    (tmp_path / "README.txt").write_text("not data")
    s = open_samples(tmp_path, model)
    assert len(s) == 15 and [sh.size for sh in s.shards] == [5, 5, 5]
    loaded: list[int] = []
    original = Samples.load

    def spy(self, i):
        loaded.append(i)
        return original(self, i)

    monkeypatch.setattr(Samples, "load", spy)
    seen = []
    for _, b in s.batches(np.arange(15), 5):
        seen.append(ids_of(b))
        assert len(loaded) == len(seen)  # one shard read per batch: never all at once
    assert seen == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]


def test_folder_of_npy_arrays_and_subfolders(tmp_path, model):
    top = feeds(6, labels=False)
    for k, v in top.items():
        np.save(tmp_path / f"{k}.npy", v)
    sub = tmp_path / "shard1"
    sub.mkdir()
    for k, v in feeds(4, start=6, labels=False).items():
        np.save(sub / f"{k}.npy", v)
    s = open_samples(tmp_path, model)
    assert len(s) == 10 and not s.labels
    assert isinstance(s.load(0)["x"], np.memmap)  # rows are read from disk as batches need them
    assert sorted(sum(all_batches(s, np.arange(10), 3), [])) == list(range(10))


def test_iterable_of_feed_dicts_and_reader(model):
    items = [feeds(1, start=i) for i in range(7)]
    s = open_samples(iter(items), model)  # a one-shot generator is read once
    assert len(s) == 7 and len(s.shards) == 1  # consecutive same-shape dicts merged
    unbatched = [{k: v[0] for k, v in it.items()} for it in items]
    assert len(open_samples(unbatched, model)) == 7  # single samples without batch axis

    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(items)

        def get_next(self):
            return next(self.it, None)

    r = open_samples(Reader(), model)
    assert len(r) == 7 and r.labels
    assert all_batches(r, np.arange(7), 7) == [list(range(7))]


def test_synthetic_with_warning(model):
    with pytest.warns(UserWarning, match="synthetic"):
        s = open_samples(None, model, synthetic=12)
    assert s.synthetic and len(s) == 12 and not s.labels


def test_split_is_seeded_disjoint_and_held_out():
    train, val = split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert np.array_equal(val, split_indices(100, 0.1, seed=3)[1])
    assert not np.array_equal(val, split_indices(100, 0.1, seed=4)[1])
    assert len(split_indices(100, 0.0)[1]) == 0
    with pytest.raises(InherccError, match="too few"):
        split_indices(1, 0.5)
    with pytest.raises(InherccError, match=r"held-out fraction must be in \[0, 1\), got 1.0"):
        split_indices(10, 1.0)


def test_shuffled_batches_cover_each_sample_once(tmp_path, model):
    for k in range(4):
        np.savez(tmp_path / f"s{k}.npz", **feeds(7, start=7 * k))
    s = open_samples(tmp_path, model)
    train, _ = split_indices(len(s), 0.25, seed=0)
    a = all_batches(s, train, 5, seed=1)
    flat = sum(a, [])
    assert sorted(flat) == train.tolist()  # every training sample exactly once
    assert flat != sorted(flat)  # shuffled
    assert a == all_batches(s, train, 5, seed=1)  # reproducible from the seed
    assert len(a) == s.count_batches(train, 5)
    assert [len(b) for b in a[:-1]] == [5] * (len(a) - 1)  # shards fill batches together


def test_shards_of_different_shapes_never_share_a_batch(tmp_path, model):
    np.savez(tmp_path / "a.npz", **feeds(5))
    other = feeds(3, start=5)
    other["ids"] = np.zeros((3, 3), np.int32)  # another dtype: another signature
    np.savez(tmp_path / "b.npz", **other)
    s = open_samples(tmp_path, model)
    batches = all_batches(s, np.arange(8), 4, seed=0)
    assert all(set(b) <= set(range(5)) or set(b) <= set(range(5, 8)) for b in batches)
    assert len(batches) == s.count_batches(np.arange(8), 4) == 3  # 4+1 and 3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("ids"), "lacks model input"),
        (lambda f: f.__setitem__("x", f["x"].astype(np.int64)), "expects float32"),
        (lambda f: f.__setitem__("x", f["x"][:, :3]), "expects dim 1 = 4"),
        (lambda f: f.__setitem__("x", f["x"][:, :, None]), "dims"),
        (lambda f: f["x"].__setitem__((2, 1), np.nan), "NaN"),
        (lambda f: f.__setitem__(LABELS_KEY, f[LABELS_KEY][:3]), "sample counts"),
        (lambda f: f.__setitem__(LABELS_KEY, f[LABELS_KEY] + 0.5), "whole class ids"),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, model, change, message):
    f = feeds(6)
    change(f)
    np.savez(tmp_path / "d.npz", **f)
    with pytest.raises(InherccError, match=message):
        open_samples(tmp_path / "d.npz", model)
    with pytest.raises(InherccError, match=message):
        open_samples([f], model)


def test_bad_values_in_a_shard_are_caught_when_read(tmp_path, model):
    np.savez(tmp_path / "a.npz", **feeds(4))
    bad = feeds(4, start=4)
    bad["x"][0, 0] = np.inf
    np.savez(tmp_path / "b.npz", **bad)
    s = open_samples(tmp_path, model)  # headers only: fine
    with pytest.raises(InherccError, match=r"b\.npz.*NaN or Inf"):
        list(s.batches(np.arange(8), 4))


def test_empty_sources(tmp_path, model):
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(InherccError, match="cannot read"):
        open_samples(tmp_path / "empty.npz", model)
    np.savez(tmp_path / "none.npz")
    with pytest.raises(InherccError, match="holds no arrays"):
        open_samples(tmp_path / "none.npz", model)
    (tmp_path / "dir").mkdir()
    with pytest.raises(InherccError, match="holds no .npz"):
        open_samples(tmp_path / "dir", model)
    with pytest.raises(InherccError, match="holds no samples"):
        open_samples([], model)
    with pytest.raises(InherccError, match="no such data file"):
        open_samples(tmp_path / "missing.npz", model)
    with pytest.raises(InherccError, match="unsupported data"):
        open_samples(42, model)


def test_check_feeds_shapes_only(model):
    f = feeds(3)
    f["x"][0, 0] = np.nan
    check_feeds(f, model, check_finite=False)  # header checks do not read values
    with pytest.raises(InherccError, match="NaN"):
        check_feeds(f, model)


def test_sample_count_reads_each_array_at_its_batch_axis():
    from inhercc.data import sample_count

    feeds = {"sr": np.array(16000), "state": np.zeros((2, 5, 3)), "x": np.zeros((5, 4))}
    assert sample_count(feeds, {"sr": None, "state": 1, "x": 0}) == 5  # the unbatched scalar is skipped
    assert sample_count({"state": feeds["state"]}) == 2  # no axes: axis 0
    assert sample_count({"sr": feeds["sr"]}, {"sr": None}) == 0
