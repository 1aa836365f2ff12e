"""A user's folder of images as a dataset: centre crop, resize, fixed-seed train/test split.

``DIR/<class>/.../*.png`` gives one class per top-level sub-folder (files deeper down belong to
their top-level folder; files lying directly in ``DIR`` then belong to no class and are skipped);
a folder without sub-folders gives unlabelled images. Every file is tried: what Pillow cannot
decode (a text file, a truncated JPEG) is skipped and counted, never an error half way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FolderPlan", "load_image", "plan"]


def load_image(path: Path, *, size: int, grayscale: bool) -> np.ndarray | None:
    """``uint8 [size, size, C]`` (C = 1 or 3), or None when ``path`` is not a decodable image.

    The largest centred square is cut out and resized with Pillow's BOX filter: each output pixel
    is the mean over its footprint (antialiased for any factor), computed as a horizontal then a
    vertical pass, each rounded to 8 bits.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # JPEG camera orientation
            im = im.convert("L" if grayscale else "RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            im = im.resize((size, size), Image.Resampling.BOX)
            image = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return image[..., None] if grayscale else image


@dataclasses.dataclass
class FolderPlan:
    """What :func:`plan` found; ``skipped`` is filled in while the splits are generated."""

    shape: tuple[int, int, int]
    classes: list[str]
    splits: dict[str, Callable[[], Iterator[tuple[str, dict[str, Any]]]]]
    planned: dict[str, int]
    skipped: dict[str, int]


def _scan(root: Path) -> tuple[list[tuple[str, int]], list[str], int]:
    """``([(relative path, class index or -1)], classes, files outside any class folder)``."""
    visible = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    classes = [p.name for p in visible if p.is_dir()]
    if not classes:
        return [(p.name, -1) for p in visible if p.is_file()], [], 0
    files = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                files.append((path.relative_to(root).as_posix(), label))
    return files, classes, sum(p.is_file() for p in visible)


def plan(root: Path, *, size: int, grayscale: bool, test_fraction: float) -> FolderPlan:
    """The splits of the images under ``root``: a ``default_rng(0)`` permutation of the sorted
    file list puts ``max(1, round(test_fraction * N))`` files in ``test``, the rest in ``train``;
    each split keeps the sorted order."""
    files, classes, outside = _scan(root)
    perm = np.random.default_rng(0).permutation(len(files))
    num_test = max(1, round(test_fraction * len(files)))
    is_test = np.zeros(len(files), bool)
    is_test[perm[:num_test]] = True
    skipped = {"not_decodable": 0, "outside_class_folders": outside}

    def examples(chosen: list[tuple[str, int]]):
        def generate():
            for rel, label in chosen:
                image = load_image(root / rel, size=size, grayscale=grayscale)
                if image is None:
                    skipped["not_decodable"] += 1
                    continue
                yield rel, {"image": image} if label < 0 else {"image": image, "label": label}

        return generate

    chosen = {
        "train": [f for f, t in zip(files, is_test, strict=True) if not t],
        "test": [f for f, t in zip(files, is_test, strict=True) if t],
    }
    return FolderPlan(
        shape=(size, size, 1 if grayscale else 3),
        classes=classes,
        splits={split: examples(c) for split, c in chosen.items()},
        planned={split: len(c) for split, c in chosen.items()},
        skipped=skipped,
    )
