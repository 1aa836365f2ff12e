"""Preparing a dataset: source files -> parsed examples -> array_record, renamed into place whole.

Every prepare runs under the dataset's lock, builds in a staging folder and commits with one
rename (:mod:`jvdm.datasets.store`), so a prepare that fails or is killed leaves no dataset behind
and the next one starts afresh.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jvdm.datasets import catalog, folder, formats, local, sources, store
from jvdm.datasets.errors import ArchiveError, DatasetError

__all__ = ["prepare_builtin", "prepare_images"]


def _warn(message: str) -> None:
    print(f"jvdm: warning: {message}", file=sys.stderr)


def _build(
    name: str,
    data_dir: Path,
    meta: dict[str, Any],
    check: Callable[[dict[str, int]], None],
    **kwargs,
) -> Path:
    """Builds in staging, lets ``check({split: num_examples})`` veto it, commits; returns the
    version dir."""
    from jvdm.datasets import builders  # Deferred: imports tfds.

    start = time.perf_counter()
    with store.staging(data_dir, name) as tmp:
        staged = builders.build(name, tmp, **kwargs)
        counts = _split_counts(staged)
        check(counts)
        meta = {**meta, "name": name, "splits": counts, "prepare_s": time.perf_counter() - start}
        return store.commit(staged, data_dir, name, meta)


def _split_counts(version_dir: Path) -> dict[str, int]:
    info = json.loads((version_dir / "dataset_info.json").read_text())
    return {s["name"]: sum(map(int, s["shardLengths"])) for s in info["splits"]}


def _local_splits(name: str):
    def examples(images, labels):
        def generate():
            for i, image in enumerate(images):
                yield f"{i:08d}", {"image": image, "label": int(labels[i])}

        return generate

    return {split: examples(*arrays) for split, arrays in local.load(name).items()}


def _size_check(name: str, spec: catalog.Spec, verified: bool, warn) -> Callable[[dict], None]:
    def check(counts: dict[str, int]) -> None:
        for split, expected in spec.sizes.items():
            if counts.get(split) != expected:
                message = f"{name} {split}: {counts.get(split)} examples, published {expected:,}"
                if verified:
                    raise ArchiveError(message)
                warn(message)

    return check


def prepare_builtin(
    name: str,
    data_dir: Path,
    *,
    source: Path | None = None,
    skip_checksum: bool = False,
    warn: Callable[[str], None] = _warn,
) -> Path:
    """Prepares a local or standard dataset (a no-op when prepared); returns its version dir."""
    with store.build_lock(data_dir, name):
        if (found := store.prepared_dir(name, data_dir)) is not None:
            return found
        if name in catalog.LOCAL:
            shape, note = catalog.LOCAL[name]
            meta = {"kind": "local", "shape": list(shape)}
            kwargs = dict(shape=shape, classes=10, splits=_local_splits(name), description=note)
            return _build(name, data_dir, meta, lambda counts: None, **kwargs)
        spec = catalog.STANDARD[name]
        paths, verified = sources.locate(
            name, spec, data_dir, source=source, skip_checksum=skip_checksum, warn=warn
        )
        hint = f"the {name} files are expected in their published layout ({spec.note})"
        splits = formats.parse(spec, paths, hint=hint)
        meta = {
            "kind": "standard",
            "shape": list(spec.shape),
            "sources": {k: str(p) for k, p in paths.items()},
            "verified_sha256": verified,
        }
        check = _size_check(name, spec, verified, warn)
        kwargs = dict(shape=spec.shape, classes=spec.num_classes, splits=splits)
        return _build(name, data_dir, meta, check, description=spec.note, **kwargs)


def prepare_images(
    name: str,
    images: Path,
    data_dir: Path,
    *,
    size: int,
    grayscale: bool,
    test_fraction: float,
    warn: Callable[[str], None] = _warn,
) -> Path:
    """Prepares a user's image folder as dataset ``name`` (a no-op when prepared)."""
    if not images.is_dir():
        raise DatasetError(f"--images {images}: not a folder")
    with store.build_lock(data_dir, name):
        if (found := store.prepared_dir(name, data_dir)) is not None:
            return found
        p = folder.plan(images, size=size, grayscale=grayscale, test_fraction=test_fraction)
        if sum(p.planned.values()) < 2:
            raise DatasetError(f"--images {images}: need at least 2 files, found none or one")

        def check(counts: dict[str, int]) -> None:
            empty = [s for s in p.planned if counts.get(s, 0) == 0]
            if empty:
                raise DatasetError(
                    f"--images {images}: no decodable image in split {', '.join(empty)} "
                    f"({p.skipped['not_decodable']} files skipped as not decodable)"
                )

        meta = {
            "kind": "images",
            "shape": list(p.shape),
            "classes": p.classes,
            "source": str(images),
            "skipped": p.skipped,  # filled in while the splits are generated
        }
        found = _build(
            name,
            data_dir,
            meta,
            check,
            shape=p.shape,
            classes=p.classes or 0,
            splits=p.splits,
            description=f"images from {images}, {size}x{size}, centre-cropped",
        )
        if sum(p.skipped.values()):
            warn(f"{name}: skipped {p.skipped} files of {images}")
        return found
