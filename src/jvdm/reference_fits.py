"""Fits of the reference denoisers' distributions to data: one Gaussian, or a mixture of
probabilistic PCA Gaussians, in float64 NumPy, once; and the cached fit of a prepared split.

The denoisers themselves (their posterior means, in JAX) are :mod:`jvdm.reference_denoisers`,
which re-exports every name here: ``jvdm.reference_denoisers.fit_split`` is the same function.
The fits return float32 JAX arrays, ready to be a model's constants or a sampler's argument.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jvdm.errors import JvdmUserError

__all__ = [
    "GaussianFit",
    "MixtureFit",
    "fit_dim",
    "fit_gaussian",
    "fit_mixture",
    "fit_split",
    "is_mixture",
]


class GaussianFit(NamedTuple):
    """``N(mean, vectors diag(values) vectors^T)``: ``[dim]``, ``[dim]``, ``[dim, dim]``."""

    mean: jax.Array
    values: jax.Array
    vectors: jax.Array


def fit_gaussian(x) -> GaussianFit:
    """The mean and covariance (``1/N``, the maximum-likelihood fit) of ``x`` ``[N, dim]``, with
    the covariance's eigendecomposition done in float64 and negative round-off clipped to 0."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise JvdmUserError(
            f"fit_gaussian needs data of shape [N >= 2, dim], got {x.shape}: flatten the images"
        )
    mean = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    return GaussianFit(
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(np.maximum(values, 0.0), jnp.float32),
        jnp.asarray(vectors, jnp.float32),
    )


class MixtureFit(NamedTuple):
    """A mixture of ``K`` probabilistic PCA components in ``D`` dimensions, each of rank ``r``:
    ``log_weights [K]`` (``log pi_k``), ``means [K, D]``, ``values [K, r]`` (the variances along
    ``vectors [K, D, r]``, orthonormal columns) and ``residual [K]`` (``tau_k^2``, the variance in
    every direction orthogonal to them)."""

    log_weights: jax.Array
    means: jax.Array
    values: jax.Array
    vectors: jax.Array
    residual: jax.Array


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int) -> np.ndarray:
    """Lloyd's algorithm from a k-means++ start; the cluster of each row of ``x``."""
    sq = np.einsum("nd,nd->n", x, x)
    centers = [x[rng.integers(len(x))]]
    nearest = np.full(len(x), np.inf)
    for _ in range(1, k):  # k-means++: each new centre drawn by squared distance to the chosen
        nearest = np.minimum(nearest, np.sum(np.square(x - centers[-1]), axis=1))
        if not nearest.sum() > 0:
            raise JvdmUserError(
                f"the data has fewer distinct images than the {k} mixture components: use fewer"
            )
        centers.append(x[rng.choice(len(x), p=nearest / nearest.sum())])
    centers = np.stack(centers)
    assign = None
    for _ in range(iters):
        dist = sq[:, None] - 2.0 * x @ centers.T + np.einsum("kd,kd->k", centers, centers)[None]
        new = np.argmin(dist, axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        far = dist.min(axis=1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centers[j] = members.mean(axis=0)
            else:  # an emptied cluster restarts at the point farthest from every centre
                centers[j] = x[np.argmax(far)]
                far[np.argmax(far)] = -np.inf
    return assign


def fit_mixture(x, components: int, rank: int, *, seed: int = 0, iters: int = 100) -> MixtureFit:
    """A mixture of ``components`` probabilistic PCA Gaussians of rank ``rank`` fitted to ``x``
    ``[N, D]``: k-means clusters (k-means++ start, seeded by ``seed``, at most ``iters`` Lloyd
    steps), then each cluster's maximum-likelihood PPCA (Tipping & Bishop 1999): its mean, its
    covariance's ``rank`` largest eigenpairs, and the mean of the other ``D - rank`` eigenvalues as
    the isotropic variance of the rest; the weights are the clusters' shares. Float64 NumPy.

    Raises:
      JvdmUserError: ``x`` is not ``[N, D]``, ``rank`` not in ``[1, D)``, or a cluster has at most
        ``rank`` images (its covariance would have no rest to measure): fewer components or a lower
        rank.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise JvdmUserError(
            f"fit_mixture needs data of shape [N >= 2, dim], got {x.shape}: flatten the images"
        )
    n, dim = x.shape
    if not (isinstance(components, numbers.Integral) and 1 <= components <= n):
        raise JvdmUserError(f"components={components!r}: expected an integer in [1, {n}]")
    if not (isinstance(rank, numbers.Integral) and 1 <= rank < dim):
        raise JvdmUserError(f"rank={rank!r}: expected an integer in [1, {dim - 1}]")
    components, rank = int(components), int(rank)
    assign = _kmeans(x, components, np.random.default_rng(seed), iters)
    sizes = np.bincount(assign, minlength=components)
    if sizes.min() <= rank:
        raise JvdmUserError(
            f"a mixture cluster has {sizes.min()} images, not more than rank={rank}: use fewer "
            f"components (now {components}) or a lower rank for {n} images"
        )
    means, values, vectors, residual = [], [], [], []
    for j in range(components):
        members = x[assign == j]
        mean = members.mean(axis=0)
        # The covariance's eigenpairs from the centred members' SVD: s^2 / N_j are its eigenvalues.
        _, s, vt = np.linalg.svd(members - mean, full_matrices=False)
        eig = np.square(s) / len(members)
        means.append(mean)
        values.append(eig[:rank])
        vectors.append(vt[:rank].T)
        residual.append(eig[rank:].sum() / (dim - rank))  # the zero eigenvalues count too
    as32 = lambda a: jnp.asarray(np.stack(a), jnp.float32)  # noqa: E731
    return MixtureFit(
        jnp.asarray(np.log(sizes / n), jnp.float32),
        as32(means),
        as32(values),
        as32(vectors),
        as32(residual),
    )


def is_mixture(
    components: int,
    rank: int,
    *,
    names: tuple[str, str] = ("model.gaussian_base_components", "model.gaussian_base_rank"),
) -> bool:
    """Whether ``components`` and ``rank`` describe a mixture (``rank >= 1``) rather than one
    Gaussian of full covariance (``components = 1``, ``rank = 0``), the one rule that
    :func:`fit_split`, :class:`jvdm.nn.gaussian_base.GaussianBase` and the command line's
    ``--gaussian-components`` / ``--gaussian-rank`` follow (``names`` name the two in the error).

    Raises:
      JvdmUserError: a negative rank, or ``rank = 0`` with other than one component (no mixture
        of full covariances).
    """
    if rank < 0 or (rank == 0 and components != 1):
        raise JvdmUserError(
            f"{names[1]} {rank} with {names[0]} {components}: a mixture needs a rank >= 1 (0 is "
            "one Gaussian of full covariance, with one component)"
        )
    return rank != 0


def fit_dim(fit: GaussianFit | MixtureFit) -> int:
    """The number of values ``D`` of the flattened images ``fit`` describes."""
    return int(fit.vectors.shape[-2])


def fit_split(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    vocab_size: int = 256,
    components: int = 1,
    rank: int = 0,
):
    """:func:`fit_gaussian` (``rank = 0``: one Gaussian, full covariance) or :func:`fit_mixture`
    (``components`` of rank ``rank``) of a prepared dataset split's images, scaled to the model's
    [-1, 1] (:func:`jvdm.decoder.scale_pixels`) and flattened; the last few are kept in memory,
    keyed by the arguments' values however they are passed.

    One full Gaussian holds a ``dim x dim`` matrix (2.4 MB for 28x28x1, 38 MB for 32x32x3) and its
    float64 eigendecomposition costs ``O(dim^3)``: meant for images up to about 64x64x1 or 32x32x3.
    A mixture holds ``components x dim x (rank + 1)`` values.
    """
    is_mixture(components, rank)
    return _fit_split(dataset, split, data_dir, vocab_size, components, rank)


@functools.lru_cache(maxsize=4)
def _fit_split(dataset, split, data_dir, vocab_size, components, rank):
    from jvdm import data, decoder

    images = data.load_split_array(dataset, split, data_dir)
    flat = np.asarray(decoder.scale_pixels(images, vocab_size)).reshape(len(images), -1)
    if is_mixture(components, rank):
        return fit_mixture(flat, components, rank)
    return fit_gaussian(flat)
