"""Loaders: uint8 NHWC batches whose content is a pure function of (seed, step).

The datasets themselves (tfds builders in array_record format, read without TensorFlow) live in
:mod:`jvdm.datasets`; their public functions are re-exported here.

Training order. Let N be the size of the split and B the global batch size. The examples of step k
are the flat positions ``i = k*B + j`` (``j < B``) of an endless sequence of epochs; position i is
example ``perm_e[i mod N]`` of epoch ``e = i // N``, where ``perm_e`` is
``np.random.default_rng([seed, e]).permutation(N)``. Batches may straddle two epochs, and each
epoch is a full permutation, so every example is seen exactly once per epoch. Process p of P loads
only rows ``[p*B/P, (p+1)*B/P)`` of that global batch, so a resumed run (``start_step=k``), or a run
on a different number of hosts, sees exactly the global batches of an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from jvdm.datasets import (
    DatasetNotPreparedError,
    dataset_info,
    get_data_dir,
    image_shape,
    known_datasets,
    list_datasets,
    open_split,
    prepare,
)
from jvdm.errors import JvdmUserError

__all__ = [
    "DatasetNotPreparedError",
    "EvalLoader",
    "TrainLoader",
    "dataset_info",
    "get_data_dir",
    "image_shape",
    "known_datasets",
    "list_datasets",
    "load_split_array",
    "make_eval_loader",
    "make_train_loader",
    "prepare",
]

Batch = dict[str, np.ndarray]
PathLike = str | os.PathLike


def _read(source: Sequence[Any], indices: np.ndarray) -> Batch:
    """Decoded examples ``indices`` of ``source`` as ``{'image': [n,H,W,C] uint8, 'label': [n]}``.

    Datasets without labels (imagenet32/64, an unlabelled image folder) get label -1.
    """
    # One batched read: array_record fetches the records in parallel in C++.
    examples = source.__getitems__([int(i) for i in indices])  # type: ignore[attr-defined]
    image = np.stack([np.asarray(e["image"], dtype=np.uint8) for e in examples])
    label = np.asarray([e.get("label", -1) for e in examples], dtype=np.int32)
    return {"image": image, "label": label}


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    # Cached: a batch straddles at most two epochs, and a permutation of ImageNet takes ~20 ms.
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def _prefetched(
    fn: Any, start: int, stop: int, *, num_threads: int, prefetch: int
) -> Iterator[Batch]:
    """``fn(start), fn(start + 1), ...``, computed ahead in grain's threads meanwhile."""
    ds = grain.MapDataset.range(start, stop).map(fn)
    if num_threads <= 0:
        return iter(ds)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1))
    return iter(ds.to_iter_dataset(options))


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
    if batch_size <= 0 or process_count <= 0:
        raise JvdmUserError(f"need positive sizes: {batch_size=}, {process_count=}")
    if batch_size % process_count:
        raise JvdmUserError(
            f"batch size must divide among processes: {batch_size=}, {process_count=}"
        )
    if not 0 <= process_index < process_count:
        raise JvdmUserError(
            f"need 0 <= process_index < process_count: {process_index=}, {process_count=}"
        )


class TrainLoader:
    """An endless, resumable sequence of this process's shards of the training batches.

    ``batch(step)`` is random access (a pure function of ``(seed, step)``); iterating yields
    ``batch(start_step), batch(start_step + 1), ...``, prepared ahead in background threads.
    """

    def __init__(
        self,
        source: Sequence[Any],
        *,
        global_batch_size: int,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        use_random_flip: bool = False,
        num_threads: int = 2,
        prefetch: int = 4,
    ):
        _check_sharding(global_batch_size, process_index, process_count)
        if seed < 0 or start_step < 0:
            raise JvdmUserError(f"need non-negative {seed=} and {start_step=}")
        if len(source) == 0:
            raise JvdmUserError("cannot train on an empty split")
        self.source = source
        self.num_examples = len(source)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = seed
        self.start_step = start_step
        self.process_index = process_index
        self.process_count = process_count
        self.use_random_flip = use_random_flip
        self.num_threads = num_threads
        self.prefetch = prefetch

    def indices(self, step: int) -> np.ndarray:
        """Split indices of this process's rows of global batch ``step``: ``[B/P]`` int64."""
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        position = first + np.arange(self.local_batch_size, dtype=np.int64)
        epoch, offset = np.divmod(position, self.num_examples)
        out = np.empty_like(position)
        for e in np.unique(epoch):
            rows = epoch == e
            out[rows] = _epoch_permutation(self.seed, int(e), self.num_examples)[offset[rows]]
        return out

    def batch(self, step: int) -> Batch:
        """This process's shard of global batch ``step``.

        Returns:
          ``{'image': [B/P, H, W, C] uint8, 'label': [B/P] int32}``.
        """
        batch = _read(self.source, self.indices(step))
        if self.use_random_flip:
            # Drawn for the whole global batch, then sliced, so that shards agree with one process.
            # The extra word in the seed keeps this stream apart from the epoch permutations.
            rng = np.random.default_rng([self.seed, step, 0x5EED])
            flip = rng.random(self.global_batch_size) < 0.5
            lo = self.process_index * self.local_batch_size
            flip = flip[lo : lo + self.local_batch_size]
            batch["image"][flip] = batch["image"][flip, :, ::-1, :]
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return _prefetched(
            self.batch,
            self.start_step,
            sys.maxsize,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
        )


class EvalLoader:
    """Every example of a split exactly once, in order, in batches padded at the end.

    Batch i covers split positions ``[i*B, (i+1)*B)``; process p holds rows ``[p*B/P, (p+1)*B/P)``
    of it. Rows past the end of the split are zeros with ``mask`` False. All processes yield the
    same number of batches, so collective operations stay in step.
    """

    def __init__(
        self,
        source: Sequence[Any],
        *,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 2,
        prefetch: int = 4,
    ):
        _check_sharding(batch_size, process_index, process_count)
        self.source = source
        self.num_examples = len(source)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.process_index = process_index
        self.num_threads = num_threads
        self.prefetch = prefetch

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def batch(self, i: int) -> Batch:
        """Batch ``i``: image ``[B/P, H, W, C]`` uint8, label ``[B/P]`` int32, mask ``[B/P]``."""
        first = i * self.batch_size + self.process_index * self.local_batch_size
        position = first + np.arange(self.local_batch_size, dtype=np.int64)
        mask = position < self.num_examples
        # Padding rows re-read example 0 (so shapes and dtypes come out right) and are then zeroed.
        batch = _read(self.source, np.where(mask, position, 0))
        batch["image"][~mask] = 0
        batch["label"][~mask] = 0
        batch["mask"] = mask
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return _prefetched(
            self.batch, 0, len(self), num_threads=self.num_threads, prefetch=self.prefetch
        )


def make_train_loader(
    name: str,
    *,
    split: str = "train",
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = False,
    data_dir: PathLike | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> TrainLoader:
    """A :class:`TrainLoader` over ``split`` of ``name`` (local datasets build on first use).

    Args:
      name: a name from :func:`known_datasets`.
      split: a tfds split string; select models on a slice such as ``'train[4000:]'``, never 'test'.
      global_batch_size: B, the batch size summed over all processes; divisible by process_count.
      seed: the order (and flips) are a pure function of (seed, step).
      start_step: the first step yielded by iteration (resume here).
      process_index, process_count: this process loads only its B/P rows of each global batch.
      random_flip: flip images horizontally with probability 1/2 (for CIFAR-10).
      data_dir: the tfds data directory; default $TFDS_DATA_DIR or ~/tensorflow_datasets.
      num_threads: background threads preparing batches; 0 loads synchronously.
      prefetch: how many batches may be prepared ahead.

    Raises:
      DatasetNotPreparedError: a standard dataset is not prepared under the data dir.
      ValueError: an unknown name or split, or a batch size that does not divide.
    """
    return TrainLoader(
        open_split(name, split, data_dir),
        global_batch_size=global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        use_random_flip=random_flip,
        num_threads=num_threads,
        prefetch=prefetch,
    )


def make_eval_loader(
    name: str,
    *,
    split: str = "test",
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: PathLike | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> EvalLoader:
    """An :class:`EvalLoader`: every example of ``split`` once, in order, with a ``mask`` key.

    ``batch_size`` is global (summed over processes) and must be divisible by ``process_count``.
    The ImageNet sets have no 'test' split: use ``split='validation'``.
    """
    return EvalLoader(
        open_split(name, split, data_dir),
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        num_threads=num_threads,
        prefetch=prefetch,
    )


def load_split_array(name: str, split: str, data_dir: PathLike | None = None) -> np.ndarray:
    """All images of a split in storage order, uint8 ``[N, H, W, C]``; for small datasets only."""
    source = open_split(name, split, data_dir)
    return _read(source, np.arange(len(source)))["image"]


def load_split(name: str, split: str, data_dir: PathLike | None = None) -> Batch:
    """A whole split in storage order: ``{'image': uint8 [N, H, W, C], 'label': int32 [N]}``
    (label -1 where the dataset has none); for small datasets only."""
    source = open_split(name, split, data_dir)
    return _read(source, np.arange(len(source)))
