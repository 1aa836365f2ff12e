"""Stand-ins with known answers, shared by the model, sampling and evaluation tests.

For data x ~ N(m, s^2 I) the optimal denoiser is exact: ``E[eps | z_t] = sigma (z - alpha m) /
(alpha^2 s^2 + sigma^2)`` with ``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jvdm.nn import gamma as gamma_lib


class GaussianDenoiser(nn.Module):
    """The exact posterior-mean denoiser of N(m, s^2 I) data, in eps, x0 or v form; no params."""

    m: float
    s: float
    prediction: str = "eps"

    @nn.compact
    def __call__(self, z, gamma, *, train=False):
        del train
        g = gamma.reshape(-1, 1, 1, 1)
        a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
        alpha, sigma = jnp.sqrt(a2), jnp.sqrt(s2)
        eps = sigma * (z - alpha * self.m) / (a2 * self.s**2 + s2)
        if self.prediction == "eps":
            return eps
        x0 = (z - sigma * eps) / alpha
        if self.prediction == "x0":
            return x0
        return alpha * eps - sigma * x0


def perturbed_learned(key, *, gamma_min: float, gamma_max: float, hidden: int = 4):
    """A LearnedGamma with a random, strongly non-linear interior (end points kept): most of its
    rise happens for t in [0.35, 0.75]."""
    sched = gamma_lib.LearnedGamma(
        gamma_min_init=gamma_min, gamma_max_init=gamma_max, hidden=hidden
    )
    params = sched.init(key, jnp.zeros((1,)))
    k1, k2, k3 = jax.random.split(key, 3)
    net = {
        "l1": jnp.float32(0.05),
        "l2_kernel": 25.0 * jax.random.normal(k1, (hidden,)),
        "l2_bias": 8.0 * jax.random.normal(k2, (hidden,)),
        "l3_kernel": 20.0 * jax.random.normal(k3, (hidden,)),
    }
    return sched, {"params": {**params["params"], "net": net}}


class CorrelatedGaussianDenoiser(nn.Module):
    """The exact eps-denoiser of N(m, Sigma) data with ``Sigma = U diag(lam) U^T`` over the
    flattened image: ``E[eps | z] = sigma C^{-1} (z - alpha m)``, ``C = alpha^2 Sigma + sigma^2 I``.
    Its Jacobian is not diagonal, so Hutchinson's estimate has a variance."""

    m: float
    u: tuple  # [D][D] orthogonal, as nested tuples (a hashable module field)
    lam: tuple  # [D] eigenvalues of Sigma

    @nn.compact
    def __call__(self, z, gamma, *, train=False):
        del train
        u, lam = jnp.asarray(self.u, jnp.float32), jnp.asarray(self.lam, jnp.float32)
        g = gamma.reshape(-1, 1)
        a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
        r = z.reshape(z.shape[0], -1) - jnp.sqrt(a2) * self.m
        w = (r @ u) / (a2 * lam[None, :] + s2)  # C^{-1} in the eigenbasis of Sigma
        return (jnp.sqrt(s2) * (w @ u.T)).reshape(z.shape)


def gaussian_base_model(prediction, *, shape=(8, 8, 1), center=-2.0, components=1, rank=0):
    """A tiny U-Net under a Gaussian base (one full Gaussian, or a mixture of ``components`` of
    rank ``rank``) on a fixed linear schedule, for the base's tests."""
    from jvdm import model as model_lib
    from jvdm.nn.gaussian_base import GaussianBase
    from jvdm.nn.unet import UNet

    net = UNet(
        channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), num_groups=4
    )
    base = GaussianBase(
        net=net, prediction=prediction, log_snr_center=center, components=components, rank=rank
    )
    return model_lib.VDM(
        denoiser=base,
        schedule=gamma_lib.FixedLinearGamma(gamma_min=-13.3, gamma_max=5.0),
        image_shape=shape,
        prediction=prediction,
    )
