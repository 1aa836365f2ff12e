"""Parsers of the original published archive formats, in NumPy (and Pillow for PNG).

Each parser maps the located source files to ``{split: examples}``, where ``examples()`` yields
``(key, {"image": uint8 [H, W, C], "label": int})`` (no ``label`` for unlabelled data). Layouts:

- IDX (MNIST): a big-endian header, magic ``0x00000803`` (uint8, 3 dims) for images or
  ``0x00000801`` for labels, then one big-endian int32 per dimension, then the bytes.
- CIFAR-10 binary: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin``; each
  record is 1 label byte and 3,072 pixel bytes, the R, G and B planes of 32x32 in row-major order.
- ImageNet of van den Oord et al.: ``train_SxS.tar`` holding ``train_SxS/*.png`` (RGB, SxS).
- ImageNet of Chrabaszcz et al.: zips of ``train_data_batch_{1..10}.npz`` / ``val_data.npz``, each
  with ``data`` uint8 [N, 3*S*S] (the three planes, as CIFAR) and ``labels`` 1..1000.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jvdm.datasets import archives
from jvdm.datasets.catalog import Spec
from jvdm.datasets.errors import ArchiveError

__all__ = ["parse"]

Example = tuple[str, dict[str, Any]]
Splits = dict[str, Callable[[], Iterator[Example]]]


def _idx(data: bytes, *, ndim: int, path: Path, hint: str) -> np.ndarray:
    magic = 0x0800 + ndim
    header = 4 + 4 * ndim
    got = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if got != magic:
        raise ArchiveError(
            f"{path} is not an IDX file of {ndim}-d uint8 ({got=}, {magic=}); {hint}"
        )
    dims = np.frombuffer(data[4:header], dtype=">i4").astype(np.int64)
    if len(data) != header + int(np.prod(dims)):
        raise ArchiveError(
            f"{path}: {len(data)} bytes, but its header {tuple(dims)} needs "
            f"{header + int(np.prod(dims))}; {hint}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(tuple(dims))


def _parse_idx(spec: Spec, paths: dict[str, Path], hint: str) -> Splits:
    out: Splits = {}
    for split, (image_file, label_file) in spec.files.items():
        ip, lp = paths[image_file.name], paths[label_file.name]
        images = _idx(archives.read_file(ip, hint=hint), ndim=3, path=ip, hint=hint)
        labels = _idx(archives.read_file(lp, hint=hint), ndim=1, path=lp, hint=hint)
        if images.shape[1:] != spec.shape[:2] or len(images) != len(labels):
            raise ArchiveError(
                f"{ip} and {lp} hold images {images.shape} and labels {labels.shape}; expected "
                f"[N, {spec.shape[0]}, {spec.shape[1]}] and [N]; {hint}"
            )
        out[split] = _array_examples(images[..., None], labels)
    return out


def _array_examples(images: np.ndarray, labels: np.ndarray | None) -> Callable[[], Iterator]:
    def examples() -> Iterator[Example]:
        for i, image in enumerate(images):
            example = {"image": image}
            if labels is not None:
                example["label"] = int(labels[i])
            yield f"{i:08d}", example

    return examples


def _planes_to_hwc(flat: np.ndarray, size: int) -> np.ndarray:
    """``[N, 3*S*S]`` R, G, B planes -> ``[N, S, S, 3]``."""
    return flat.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


_CIFAR_MEMBERS = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}


def _parse_cifar(spec: Spec, paths: dict[str, Path], hint: str) -> Splits:
    (path,) = set(paths.values())
    wanted = [m for members in _CIFAR_MEMBERS.values() for m in members]
    content = archives.read_members(path, wanted, hint=hint)
    out: Splits = {}
    for split, members in _CIFAR_MEMBERS.items():
        records = []
        for member in members:
            data = np.frombuffer(content[member], dtype=np.uint8)
            if data.size == 0 or data.size % 3073:
                raise ArchiveError(
                    f"{member} in {path} has {data.size} bytes, not a whole number of "
                    f"3,073-byte records; {hint}"
                )
            records.append(data.reshape(-1, 3073))
        table = np.concatenate(records)
        if table[:, 0].max() > 9:
            raise ArchiveError(f"{path}: a label above 9 in the {split} batches; {hint}")
        out[split] = _array_examples(_planes_to_hwc(table[:, 1:], 32), table[:, 0])
    return out


def _decode_png(content: bytes, name: str, path: Path, shape: tuple, hint: str) -> np.ndarray:
    from PIL import Image  # Deferred: only the ImageNet parsers need Pillow.

    try:
        with Image.open(io.BytesIO(content)) as im:
            # A grey or palette PNG among the colour ones holds the same pixels as RGB.
            image = np.asarray(im.convert("RGB") if im.mode in ("L", "P") else im)
    except (OSError, SyntaxError, ValueError) as err:
        raise ArchiveError(f"{name} in {path} is not a readable PNG ({err}); {hint}") from err
    if image.shape != shape or image.dtype != np.uint8:
        raise ArchiveError(
            f"{name} in {path} is {image.dtype} {image.shape}, expected uint8 {shape}; {hint}"
        )
    return image


def _parse_png_tar(spec: Spec, paths: dict[str, Path], hint: str) -> Splits:
    def split_examples(path: Path, folder: str) -> Callable[[], Iterator[Example]]:
        def examples() -> Iterator[Example]:
            count = 0
            for name, content in archives.iter_members(path, hint=hint):
                # An extracted folder holds the PNGs at its top; the tarball under `folder/`.
                inside = path.is_dir() and "/" not in name
                if name.endswith(".png") and (inside or name.startswith(f"{folder}/")):
                    count += 1
                    yield name, {"image": _decode_png(content, name, path, spec.shape, hint)}
            if count == 0:
                raise ArchiveError(f"{path} holds no {folder}/*.png images; {hint}")

        return examples

    return {split: split_examples(paths[f.name], f.extracted) for split, (f,) in spec.files.items()}


_NPZ_TRAIN = re.compile(r"train_data_batch_(\d+)\.npz$")


def _npz_members(path: Path, pattern: re.Pattern, hint: str) -> list[str]:
    if path.is_dir():
        names = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*.npz"))]
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise ArchiveError(f"{path} is truncated or not a zip archive ({err}); {hint}") from err
    return [n for n in names if pattern.search(n)]


def _parse_npz(spec: Spec, paths: dict[str, Path], hint: str) -> Splits:
    size = spec.shape[0]
    train = [paths[f.name] for f in spec.files["train"]]
    (val,) = [paths[f.name] for f in spec.files["validation"]]
    batches = sorted(
        int(_NPZ_TRAIN.search(n).group(1)) for p in train for n in _npz_members(p, _NPZ_TRAIN, hint)
    )
    if batches != list(range(1, 11)):
        missing = sorted(set(range(1, 11)) - set(batches))
        raise ArchiveError(
            f"{', '.join(map(str, train))}: expected train_data_batch_1..10.npz once each, "
            f"missing {missing or 'none'}, found {batches}; {hint}"
        )
    if len(_npz_members(val, re.compile(r"(^|/)val_data\.npz$"), hint)) != 1:
        raise ArchiveError(f"{val} lacks val_data.npz; {hint}")

    def examples(sources: list[Path]) -> Iterator[Example]:
        for path in sources:
            for name, content in archives.iter_members(path, hint=hint):
                if name.endswith(".npz"):
                    yield from _npz_examples(name, content, path, size, hint)

    return {"train": lambda: examples(train), "validation": lambda: examples([val])}


def _npz_examples(name: str, content: bytes, path: Path, size: int, hint: str):
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            flat, labels = npz["data"], np.asarray(npz["labels"]).reshape(-1)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ArchiveError(f"{name} in {path} is not a valid batch ({err}); {hint}") from err
    if flat.dtype != np.uint8 or flat.shape != (len(labels), 3 * size * size):
        raise ArchiveError(
            f"{name} in {path}: data {flat.dtype} {flat.shape} and {len(labels)} labels; "
            f"expected uint8 [N, {3 * size * size}]; {hint}"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise ArchiveError(f"{name} in {path}: labels outside 1..1000; {hint}")
    images = _planes_to_hwc(flat, size)
    for i in range(len(labels)):
        # The published labels count from 1.
        yield f"{name}:{i:06d}", {"image": images[i], "label": int(labels[i]) - 1}


_PARSERS = {"idx": _parse_idx, "cifar": _parse_cifar, "png_tar": _parse_png_tar, "npz": _parse_npz}


def parse(spec: Spec, paths: dict[str, Path], *, hint: str) -> Splits:
    """``{split: examples}`` of a standard dataset from its located files.

    Args:
      spec: the dataset's catalogue entry.
      paths: ``{published file name: path}``, an archive or what unpacking it gives.
      hint: appended to every error (what to do about it).
    Raises:
      ArchiveError: a file that is not in the published layout.
    """
    return _PARSERS[spec.fmt](spec, paths, hint)
