"""The dataset classifier whose penultimate features :mod:`jvdm.quality` measures samples in.

Inception-v3 weights cannot be fetched or checked offline, so jvdm trains its own small CNN on the
dataset's *train* split and labels, once, and caches it in the data directory under a hash of its
recipe (``<data_dir>/jvdm_classifiers/<dataset>-<hash>/``): the same recipe is reused, a changed
recipe (architecture, steps, learning rate, seed, ...) trains a new one. Its accuracy on the
*test* split is stored with it and reported beside every score.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jvdm.errors import JvdmUserError

__all__ = ["CNN", "Classifier", "Recipe", "cache_dir", "get_classifier"]

CACHE_DIR = "jvdm_classifiers"
_VERSION = 1  # bump when the training code changes what a recipe produces


class CNN(nn.Module):
    """Two conv blocks and a dense layer; ``features`` is the penultimate layer.

    Returns ``(logits [B, K], features [B, features])`` for images in ``[-1, 1]``.
    """

    num_classes: int
    channels: tuple[int, ...] = (32, 64)
    features: int = 64

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            # Pool only while the image is large enough: 8x8 digits keep a 2x2 map.
            if x.shape[1] >= 4:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        feats = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(feats), feats


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained classifier; its hash names the cache entry."""

    dataset: str
    channels: tuple[int, ...] = (32, 64)
    features: int = 64
    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0

    def digest(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "version": _VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained classifier: ``apply(images uint8) -> (logits, features)`` as NumPy."""

    module: CNN
    params: dict
    scale: tuple[float, float]  # (mean, std) of the training pixels: inputs are standardised
    test_accuracy: float
    path: str
    trained_now: bool

    def apply(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        outs = [
            _apply(self.module, self.params, jnp.asarray(images[i : i + batch_size]), self.scale)
            for i in range(0, len(images), batch_size)
        ]
        return tuple(np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(2))


def _standardise(images, scale):
    # Per-dataset, so digits' 17 levels and 8-bit images both reach unit scale.
    return (images.astype(jnp.float32) - scale[0]) / scale[1]


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, images, scale):
    return module.apply(params, _standardise(images, scale))


def cache_dir(recipe: Recipe, data_dir=None) -> pathlib.Path:
    from jvdm.datasets import get_data_dir

    name = recipe.dataset.replace("/", "_")
    return get_data_dir(data_dir) / CACHE_DIR / f"{name}-{recipe.digest()}"


def _labelled(dataset: str, split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    from jvdm import data as data_lib

    batch = data_lib.load_split(dataset, split, data_dir)
    if np.any(batch["label"] < 0):
        raise JvdmUserError(
            f"dataset {dataset!r} has no labels, and sample quality needs a labelled dataset to "
            "train its classifier on (mnist_subset, digits, mnist, cifar10)"
        )
    return batch["image"], batch["label"]


def _train(recipe: Recipe, images, labels, num_classes: int, scale) -> tuple[CNN, dict]:
    module = CNN(num_classes=num_classes, channels=recipe.channels, features=recipe.features)
    key = jax.random.key(recipe.seed)
    params = module.init(key, jnp.zeros((1, *images.shape[1:]), jnp.float32))
    steps_per_epoch = max(len(images) // recipe.batch_size, 1)
    schedule = optax.cosine_decay_schedule(recipe.learning_rate, recipe.steps)
    tx = optax.adam(schedule)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = module.apply(p, _standardise(x, scale))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    rng = np.random.default_rng(recipe.seed)
    for i in range(recipe.steps):
        if i % steps_per_epoch == 0:
            order = rng.permutation(len(images))
        j = i % steps_per_epoch
        idx = order[j * recipe.batch_size : (j + 1) * recipe.batch_size]
        params, opt_state = step(params, opt_state, images[idx], labels[idx])
    return module, params


def _save(path: pathlib.Path, params, meta: dict) -> None:
    """Writes the entry into a temporary sibling and renames it: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        (tmp / "params.msgpack").write_bytes(serialization.to_bytes(params))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path)  # a concurrent trainer of the same recipe wrote the same thing
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_classifier(recipe: Recipe, data_dir=None) -> Classifier:
    """The cached classifier of ``recipe``, training (and caching) it first if there is none."""
    path = cache_dir(recipe, data_dir)
    meta_path = path / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        module = CNN(meta["num_classes"], channels=recipe.channels, features=recipe.features)
        template = module.init(jax.random.key(0), jnp.zeros((1, *meta["image_shape"]), jnp.float32))
        params = serialization.from_bytes(template, (path / "params.msgpack").read_bytes())
        scale = tuple(meta["scale"])
        return Classifier(module, params, scale, meta["test_accuracy"], str(path), False)
    images, labels = _labelled(recipe.dataset, "train", data_dir)
    num_classes = int(labels.max()) + 1
    scale = (float(images.mean()), float(images.std()) or 1.0)
    start = time.perf_counter()
    module, params = _train(recipe, images, labels, num_classes, scale)
    seconds = time.perf_counter() - start
    test_images, test_labels = _labelled(recipe.dataset, "test", data_dir)
    clf = Classifier(module, params, scale, 0.0, str(path), trained_now=True)
    logits, _ = clf.apply(test_images)
    accuracy = float(np.mean(np.argmax(logits, -1) == test_labels))
    meta = {
        "recipe": dataclasses.asdict(recipe),
        "digest": recipe.digest(),
        "num_classes": num_classes,
        "image_shape": list(images.shape[1:]),
        "scale": list(scale),
        "test_accuracy": accuracy,
        "train_seconds": seconds,
    }
    _save(path, params, meta)
    return dataclasses.replace(clf, test_accuracy=accuracy)
