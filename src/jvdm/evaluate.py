"""Likelihood evaluation: per-image bits per dimension of a batch, and of a whole dataset split.

Loading a trained run is :mod:`jvdm.run`. The bound is the model's own
(:func:`jvdm.model.loss_terms`): continuous time when the model is continuous and no ``steps`` are
given, otherwise discrete time with ``T = steps`` (or the model's
``T``). Each image's diffusion term is a Monte Carlo estimate (one ``t``, one ``eps`` per draw);
``draws > 1`` averages independent draws per image and reports their standard error.

References: Kingma et al., *Variational Diffusion Models* (arXiv 2107.00630), eqs. 11-17 and
section 5 (bits per dimension).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jvdm import model as model_lib
from jvdm.errors import JvdmUserError

__all__ = ["TERMS", "bpd", "evaluate_split"]

TERMS = ("bpd", "recon_bpd", "prior_bpd", "diffusion_bpd")

# (batch shape, timesteps, draws) -> number of traces; tests read it to assert one compilation.
TRACE_COUNTS: dict[Any, int] = {}


def _check_steps(steps) -> int | None:
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps <= 0:
        raise JvdmUserError(
            f"steps={steps!r}; expected a positive number of discrete steps T, or None for the "
            "model's own bound"
        )
    return int(steps)


def _check_draws(draws) -> int:
    if isinstance(draws, bool) or not isinstance(draws, int | np.integer) or draws <= 0:
        raise JvdmUserError(f"draws={draws!r}; expected a positive integer")
    return int(draws)


def _check_images(model: model_lib.VDM, images) -> None:
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    expected = f"uint8 [B, {', '.join(map(str, model.image_shape))}] (pixel values 0..255)"
    if shape is None or dtype is None:
        raise JvdmUserError(f"images must be an array, {expected}; got {type(images)}")
    if len(shape) != 4 or tuple(shape[1:]) != tuple(model.image_shape) or shape[0] < 1:
        raise JvdmUserError(f"images have shape {tuple(shape)}; expected {expected}")
    if dtype != np.uint8:
        raise JvdmUserError(
            f"images have dtype {dtype}; expected {expected}. Pass the raw 8-bit images, not "
            "scaled floats"
        )


@functools.partial(jax.jit, static_argnames=("timesteps", "draws"))
def _bpd_batch(params, images, key, *, timesteps, draws):
    sig = (images.shape, timesteps, draws, params.model)
    TRACE_COUNTS[sig] = TRACE_COUNTS.get(sig, 0) + 1

    def one_draw(d):
        return model_lib.loss_terms(
            model_lib.with_timesteps(params, timesteps), images, jax.random.fold_in(key, d)
        )

    # lax.map (not vmap) keeps memory at one draw's worth whatever `draws` is.
    per_draw = jax.lax.map(one_draw, jnp.arange(draws))  # {term: [draws, B]}
    out = {k: jnp.mean(v, axis=0) for k, v in per_draw.items()}
    if draws > 1:
        out["bpd_sem_per_image"] = jnp.std(per_draw["bpd"], axis=0, ddof=1) / math.sqrt(draws)
    return out


def bpd(
    params: model_lib.VDMParams,
    images,
    key: jax.Array,
    *,
    steps: int | None = None,
    draws: int = 1,
) -> dict[str, jax.Array]:
    """Per-image bound in bits per dimension, with its terms.

    Args:
      params: the model's parameters (they carry the model).
      images: uint8 ``[B, H, W, C]`` of the model's image shape.
      key: randomness for the diffusion times and noise.
      steps: ``None`` for the model's own bound (continuous time for a continuous model); else the
        discrete-time bound with ``T = steps``.
      draws: independent noise draws per image, averaged.

    Returns:
      ``{'bpd', 'recon_bpd', 'prior_bpd', 'diffusion_bpd'}`` each ``[B]``, the mean over draws (and
      ``'bpd_sem_per_image'``, the standard error of that mean, when ``draws > 1``).

    Raises:
      ValueError: images of the wrong shape or dtype, ``steps <= 0`` or ``draws <= 0``.
    """
    if not isinstance(params, model_lib.VDMParams):
        raise JvdmUserError(f"params must be a jvdm VDMParams; got {type(params)}")
    _check_images(params.model, images)
    steps = _check_steps(steps)
    draws = _check_draws(draws)
    return _bpd_batch(params, jnp.asarray(images), key, timesteps=steps, draws=draws)


def _batch_layout(batch_size: int):
    """``(padded batch size, sharding)``: a local batch of at least one image per device is padded
    (with masked rows) to a multiple of the local device count and sharded on the batch axis."""
    devices = jax.local_devices()
    if len(devices) < 2 or batch_size < len(devices):
        return batch_size, None
    padded = -(-batch_size // len(devices)) * len(devices)
    return padded, NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))


def _gather(values: np.ndarray) -> np.ndarray:
    """Concatenates per-process values (multi-host); a no-op on one process."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values, tiled=True))


def evaluate_split(
    params: model_lib.VDMParams,
    *,
    dataset: str,
    split: str,
    key: jax.Array,
    draws: int = 1,
    batch_size: int = 250,
    steps: int | None = None,
    data_dir: str | None = None,
) -> dict[str, float]:
    """The bound over every image of a split: mean bpd, its standard error over images, and terms.

    The loader pads the last batch; padded rows are masked out, so each image counts exactly once.
    One program is compiled for the (fixed) batch shape. Batch ``b`` uses ``fold_in(key, b)``. Each
    process's batch is padded to a multiple of its device count and sharded over those devices.

    Args:
      params: the model's parameters.
      dataset, split, data_dir: as for :func:`jvdm.data.make_eval_loader`.
      key: randomness for the Monte Carlo terms.
      draws: noise draws per image (averaged per image before the statistics over images).
      batch_size: global batch size (divisible by the process count).
      steps: as for :func:`bpd`.

    Returns:
      ``{'bpd_mean', 'bpd_sem', 'recon_bpd', 'prior_bpd', 'diffusion_bpd', 'num_images',
      'draws'}``; the SEM is ``std(per-image bpd, ddof=1) / sqrt(num_images)``.
    """
    from jvdm import data as data_lib  # local: keeps the maths importable without tfds

    if not isinstance(params, model_lib.VDMParams):
        raise JvdmUserError(f"params must be a jvdm VDMParams; got {type(params)}")
    steps = _check_steps(steps)
    draws = _check_draws(draws)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise JvdmUserError(f"batch_size={batch_size!r}; expected a positive integer")
    loader = data_lib.make_eval_loader(
        dataset,
        split=split,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_dir=data_dir,
    )
    padded, sharding = _batch_layout(loader.local_batch_size)
    if sharding is not None:
        params = jax.device_put(params, NamedSharding(sharding.mesh, PartitionSpec()))
    else:
        # One local device; parameters replicated over a mesh would run the program on each.
        params = jax.device_put(params, jax.local_devices()[0])
    per_term: dict[str, list[np.ndarray]] = {k: [] for k in TERMS}
    if jax.process_count() > 1:
        # Each process holds different images: give each its own noise (the same key would draw
        # the same noise for row i of every process, correlating the Monte Carlo estimates).
        key = jax.random.fold_in(key, jax.process_index())
    for b, batch in enumerate(loader):
        images = batch["image"]
        _check_images(params.model, images)
        mask = np.asarray(batch["mask"], bool)
        if padded != images.shape[0]:
            extra = padded - images.shape[0]
            images = np.concatenate([images, np.zeros((extra, *images.shape[1:]), images.dtype)])
            mask = np.concatenate([mask, np.zeros((extra,), bool)])
        if sharding is not None:
            images = jax.device_put(images, sharding)
        out = _bpd_batch(params, images, jax.random.fold_in(key, b), timesteps=steps, draws=draws)
        for k in TERMS:
            per_term[k].append(np.asarray(out[k], np.float64)[mask])
    values = {k: _gather(np.concatenate(v)) for k, v in per_term.items()}
    n = int(values["bpd"].shape[0])
    if n == 0:
        raise JvdmUserError(f"split {split!r} of dataset {dataset!r} holds no images")
    sem = float(np.std(values["bpd"], ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "bpd_mean": float(np.mean(values["bpd"])),
        "bpd_sem": sem,
        "recon_bpd": float(np.mean(values["recon_bpd"])),
        "prior_bpd": float(np.mean(values["prior_bpd"])),
        "diffusion_bpd": float(np.mean(values["diffusion_bpd"])),
        "num_images": n,
        "draws": draws,
    }
