"""Small archives in the exact published layouts, with known random pixels and labels.

Each writer returns ``{split: (images uint8 [N, H, W, C], labels [N] or None)}``, the content the
archive holds, for the tests to compare with what jvdm's loaders read back.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np

Content = dict[str, tuple[np.ndarray, np.ndarray | None]]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _idx(array: np.ndarray) -> bytes:
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, sizes=(30, 12), seed=0) -> Content:
    """The four ``*-idx?-ubyte.gz`` files of MNIST in ``folder``."""
    rng, content = _rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix, n in (("train", "train", sizes[0]), ("test", "t10k", sizes[1])):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
        content[split] = (images[..., None], labels)
    return content


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: a label byte, then the R, G and B planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar10(path: Path, per_batch=(6, 6, 6, 6, 6, 10), seed=0, skip=()) -> Content:
    """``cifar-10-binary.tar.gz``: five train batches and a test batch (members in ``skip`` left
    out)."""
    rng = _rng(seed)
    batches = []
    for n in per_batch:
        batches.append(
            (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
        )
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-bin/batches.meta.txt", b"airplane\nautomobile\n")
        for name, (images, labels) in zip(names, batches, strict=True):
            if name not in skip:
                _add(tar, f"cifar-10-batches-bin/{name}", cifar_records(images, labels))
    train = [b for b in batches[:5]]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches[5],
    }


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_imagenet_png(folder: Path, size: int, sizes=(20, 8), seed=0) -> Content:
    """``train_SxS.tar`` and ``valid_SxS.tar`` of PNG files (van den Oord et al.)."""
    rng, content = _rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, stem, n in (("train", "train", sizes[0]), ("validation", "valid", sizes[1])):
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        with tarfile.open(folder / f"{stem}_{size}x{size}.tar", "w") as tar:
            for i, image in enumerate(images):
                _add(tar, f"{stem}_{size}x{size}/{i:07d}.png", _png(image))
        content[split] = (images, None)
    return content


def _npz(images: np.ndarray, labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    np.savez(buf, data=flat, labels=labels + 1, mean=flat.mean(0))  # published labels are 1..1000
    return buf.getvalue()


def write_imagenet_npz(folder: Path, size: int, per_batch=2, seed=0, skip=()) -> Content:
    """``Imagenet{S}_train_npz.zip`` (64: two parts) and ``Imagenet{S}_val_npz.zip``."""
    rng = _rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = (
        [f"Imagenet{size}_train_npz"]
        if size != 64
        else [
            "Imagenet64_train_part1_npz",
            "Imagenet64_train_part2_npz",
        ]
    )
    per_part = 10 // len(parts)
    train_images, train_labels = [], []
    for p, part in enumerate(parts):
        with zipfile.ZipFile(folder / f"{part}.zip", "w") as zf:
            for b in range(p * per_part + 1, (p + 1) * per_part + 1):
                images = rng.integers(0, 256, (per_batch, size, size, 3), dtype=np.uint8)
                labels = rng.integers(0, 1000, per_batch)
                if b not in skip:
                    zf.writestr(f"{part}/train_data_batch_{b}.npz", _npz(images, labels))
                    train_images.append(images)
                    train_labels.append(labels)
    images = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 5)
    with zipfile.ZipFile(folder / f"Imagenet{size}_val_npz.zip", "w") as zf:
        zf.writestr(f"Imagenet{size}_val_npz/val_data.npz", _npz(images, labels))
    return {
        "train": (np.concatenate(train_images), np.concatenate(train_labels)),
        "validation": (images, labels),
    }
