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
