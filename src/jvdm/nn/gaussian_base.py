r"""A denoiser that is the training images' best linear one at high noise plus a network's residual.

``GaussianBase(net)`` outputs ``net(z, gamma) + w(lambda) g(z, gamma)``, where ``g`` is the
posterior estimate (:func:`jvdm.reference_denoisers.gaussian_prediction`, in the model's
parameterisation ``eps``, ``x0`` or ``v``) of a Gaussian ``N(mu, C)`` fitted to the training
images, and ``w = sigmoid(c - lambda)`` weights it by the log SNR ``lambda = -gamma`` (``c``:
``log_snr_center``, 0 by default). With the network's last layer initialised to zero (the U-Net's
is), the untrained model is that Gaussian's denoiser at high noise, the best affine function of
``z`` in squared error, where a trained network alone was measured worse than it
(``bench/denoiser_oracle.py``); the network learns the residual.

Why the weight. At low noise the Gaussian is the wrong start. Along the directions the training
images barely vary in (MNIST's borders; some pixels never vary) it calls every deviation of ``z``
noise, with a confidence up to ``1 / sigma``, ~800 at the schedule's low end. Those directions are
where a covariance fitted to finite data generalises worst. Without ``w`` (measured on the
validation slice, issue 17), the network learned to cancel that for the training images, but
slowly: 1.27 bpd against 1.15 at 3,300 steps. Held-out images got 4.3 bpd (median; 11.4 +- 6.1
mean over 500 images in the run's evaluation).

The fit is not trained: it lives in the variable collection :data:`COLLECTION` beside
``'params'`` (``mean [D]``, ``values [D]``, ``vectors [D, D]``, ``D = H W C``), is saved and
restored with the parameters, gets no gradient (``stop_gradient``) and no weight decay
(:mod:`jvdm.optimizer`), and every update and the EMA leave it as it was
(:func:`jvdm.model.keep_constants`). Initialisation puts ``N(0, I)``
there; :func:`jvdm.model.init` (``gaussian_fit=``) or :func:`jvdm.model.with_gaussian_fit` puts a
real fit, and the trainer fits the run's training split
(:func:`jvdm.reference_denoisers.fit_split`). Its cost is two ``[B, D] x [D, D]`` products per
call: with it the default's train step on MNIST went from 17.58 to 17.67 GFLOP (XLA's count) and
from 0.125 to 0.134 GiB per device (with the default mixture below, 100 components of rank 4:
17.64 GFLOP, 0.132 GiB). It holds ``D^2`` floats (and as many again of optimizer state and EMA),
so it is meant for images up to 32x32x3 (``D = 3,072``).

**A mixture** (``components = K``, ``rank = r >= 1``): the base is then the posterior estimate of a
mixture of ``K`` probabilistic PCA components (:class:`jvdm.reference_denoisers.MixtureFit`,
fitted by k-means and each cluster's PPCA), which knows the data's clusters at high noise where one
Gaussian averages them. Its collection holds ``log_weights [K]``, ``means [K, D]``, ``values [K,
r]``, ``vectors [K, D, r]`` and ``residual [K]`` (the isotropic variance outside each component's
``r`` directions, a floor that the full covariance's smallest eigenvalues do not have); the
placeholder is ``K`` copies of ``N(0, I)``. It costs about ``2 K D r`` multiply-adds per image,
holds ``K D (r + 1)`` values and forms no ``[K, B, D]`` array, so it has no size limit of its own.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jvdm import reference_denoisers as ref
from jvdm.errors import JvdmUserError

__all__ = ["COLLECTION", "MAX_DIMS", "GaussianBase"]

COLLECTION = "gaussian_base"
# D x D floats of the fit (and as many of optimizer state and EMA): 38 MB each at 32x32x3.
MAX_DIMS = 4096


class GaussianBase(nn.Module):
    """``net(z, gamma, train=) + sigmoid(log_snr_center + gamma) gaussian_prediction(z, gamma,
    fit, prediction)`` (``gamma = -log SNR``).

    Attributes:
      net: the residual network, ``(z [B,H,W,C], gamma [B], *, train) -> [B,H,W,C]``.
      prediction: what both output: ``"eps"``, ``"x0"`` or ``"v"``.
      log_snr_center: the log SNR where the base has half its weight; its weight is
        ``sigmoid(log_snr_center - log SNR)``, whole at high noise and gone at low noise.
      components: the number of mixture components ``K`` (1 with ``rank = 0``: one Gaussian of
        full covariance).
      rank: each component's rank ``r`` (0: full covariance, one component only).
    """

    net: nn.Module
    prediction: str = "eps"
    log_snr_center: float = 0.0
    components: int = 1
    rank: int = 0

    def _fit(self, dim: int):
        """The fit's variables (created with the placeholder ``N(0, I)``), without gradient."""
        if not ref.is_mixture(self.components, self.rank):
            if dim > MAX_DIMS:
                raise JvdmUserError(
                    f"a Gaussian base holds a {dim}x{dim} covariance; it is meant for images of "
                    f"at most {MAX_DIMS} values (32x32x3): set model.gaussian_base_rank (a "
                    "low-rank fit) or model.gaussian_base=False"
                )
            names = {
                "mean": (jnp.zeros, (dim,)),
                "values": (jnp.ones, (dim,)),
                "vectors": (lambda shape: jnp.eye(*shape), (dim, dim)),
            }
            kind = ref.GaussianFit
        else:
            k, r = self.components, self.rank
            if not 1 <= r < dim:
                raise JvdmUserError(
                    f"model.gaussian_base_rank={r} must be below the image's {dim} values"
                )
            names = {
                "log_weights": (lambda shape: jnp.full(shape, -math.log(k)), (k,)),
                "means": (jnp.zeros, (k, dim)),
                "values": (jnp.ones, (k, r)),
                "vectors": (lambda shape: jnp.tile(jnp.eye(*shape[1:]), (k, 1, 1)), (k, dim, r)),
                "residual": (jnp.ones, (k,)),
            }
            kind = ref.MixtureFit
        leaves = (
            self.variable(COLLECTION, name, lambda f=f, shape=shape: f(shape).astype(jnp.float32))
            for name, (f, shape) in names.items()
        )
        return kind(*(jax.lax.stop_gradient(v.value) for v in leaves))

    @nn.compact
    def __call__(self, z: jax.Array, gamma, *, train: bool) -> jax.Array:
        dim = math.prod(z.shape[1:])
        fit = self._fit(dim)
        gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), z.shape[:1])
        base = ref.gaussian_prediction(z.reshape(z.shape[0], dim), gamma, fit, self.prediction)
        base = base * jax.nn.sigmoid(self.log_snr_center + gamma)[:, None]  # gamma = -log SNR
        out = self.net(z, gamma, train=train)
        return out.astype(jnp.float32) + base.reshape(z.shape)
