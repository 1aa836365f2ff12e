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

import jax
import jax.numpy as jnp
import numpy as np

from jvdm import model as model_lib
from jvdm import parallel, validate
from jvdm.errors import JvdmUserError

__all__ = ["TERMS", "bpd", "evaluate_split"]

TERMS = ("bpd", "recon_bpd", "prior_bpd", "diffusion_bpd")


def _check_steps(steps) -> int | None:
    if steps is None:
        return None
    return validate.positive_int(
        steps, "steps", " number of discrete steps T, or None for the model's own bound"
    )


@functools.partial(jax.jit, static_argnames=("timesteps", "draws"))
def _bpd_batch(params, images, key, *, timesteps, draws):
    return _bpd_draws(params, images, key, timesteps=timesteps, draws=draws)


def _bpd_draws(params, images, key, *, timesteps, draws):
    """The traced body of :func:`_bpd_batch`: ``draws`` bounds per image, their mean and SEM."""

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
    validate.check_params(params, model_lib.VDMParams)
    validate.check_images(images, params.model.image_shape)
    steps = _check_steps(steps)
    draws = validate.positive_int(draws, "draws")
    return _bpd_batch(params, jnp.asarray(images), key, timesteps=steps, draws=draws)


def _gather(values: np.ndarray) -> np.ndarray:
    """Concatenates per-process values (multi-host); a no-op on one process."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values, tiled=True))


def _per_image_terms(params, loader, key, *, steps, draws) -> dict[str, list[np.ndarray]]:
    """``{term: [per-image values of each batch]}`` over this process's batches, float64, the
    padding rows masked out. Batch ``b`` uses ``fold_in(key, b)``; one program for all batches."""
    padded, sharding = parallel.local_batch_layout(loader.local_batch_size)
    if sharding is not None:
        params = jax.device_put(params, parallel.replicated_sharding(sharding.mesh))
    else:
        # One local device; parameters replicated over a mesh would run the program on each.
        params = jax.device_put(params, jax.local_devices()[0])
    per_term: dict[str, list[np.ndarray]] = {k: [] for k in TERMS}
    for b, batch in enumerate(loader):
        images = batch["image"]
        validate.check_images(images, params.model.image_shape)
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
    return per_term


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

    validate.check_params(params, model_lib.VDMParams)
    steps = _check_steps(steps)
    draws = validate.positive_int(draws, "draws")
    batch_size = validate.positive_int(batch_size, "batch_size")
    loader = data_lib.make_eval_loader(
        dataset,
        split=split,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_dir=data_dir,
    )
    if jax.process_count() > 1:
        # Each process holds different images: give each its own noise (the same key would draw
        # the same noise for row i of every process, correlating the Monte Carlo estimates).
        key = jax.random.fold_in(key, jax.process_index())
    per_term = _per_image_terms(params, loader, key, steps=steps, draws=draws)
    values = {k: _gather(np.concatenate(v)) for k, v in per_term.items()}
    if values["bpd"].shape[0] == 0:
        raise JvdmUserError(f"split {split!r} of dataset {dataset!r} holds no images")
    return {**_statistics(values), "draws": draws}


def _statistics(values: dict[str, np.ndarray]) -> dict[str, float]:
    """The means over images, the bpd's standard error over images, and their number."""
    n = int(values["bpd"].shape[0])
    sem = float(np.std(values["bpd"], ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    means = {k: float(np.mean(values[k])) for k in ("recon_bpd", "prior_bpd", "diffusion_bpd")}
    return {"bpd_mean": float(np.mean(values["bpd"])), "bpd_sem": sem, **means, "num_images": n}
