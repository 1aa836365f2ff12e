r"""Noise schedules gamma(t) = -log SNR(t), increasing on t in [0, 1], as Flax Linen modules.

Every schedule maps t elementwise (any shape) to gamma, exposes its end points
(``endpoints(module, params) -> (gamma_0, gamma_1)``), and is differentiated in t with
``gamma_and_derivative`` (forward mode, one jvp, no finite differences).

References:
  Kingma et al., *Variational Diffusion Models* (arXiv 2107.00630), section 5 and appendix H
  (the monotone network); Nichol & Dhariwal (arXiv 2102.09672) for the cosine schedule; Ho et al.
  (arXiv 2006.11239) for the linear-beta table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jvdm import validate

__all__ = [
    "CosineGamma",
    "DDPMGamma",
    "FixedLinearGamma",
    "LearnedGamma",
    "endpoints",
    "gamma_and_derivative",
]


def _as_float(t) -> jax.Array:
    """t as a float array; float64 stays float64 (for float64 tests), anything else -> float32."""
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)


def _lerp(lo: jax.Array, hi: jax.Array, s: jax.Array) -> jax.Array:
    """(1 - s) lo + s hi: unlike lo + (hi - lo) s it returns lo and hi *exactly* at s = 0 and 1."""
    return (1.0 - s) * lo + s * hi


class _MonotoneNet(nn.Module):
    """VDM's NoiseNet h(t) (appendix H), without the biases that the normalisation cancels.

    h(t) = w1 t + (1/hidden) sum_j |w3_j| phi(|w2_j| (2t - 1) + b2_j),
    phi(u) = 2 (sigmoid(u) - 1/2),

    with w1 = |k1| + min_slope. Every term is non-decreasing in t and the linear one strictly
    increasing, so h(1) - h(0) >= min_slope > 0 for all parameter values.
    """

    hidden: int
    init_slope: float
    min_slope: float = 1e-3

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        k1 = self.param("l1", nn.initializers.constant(self.init_slope - self.min_slope), ())
        k2 = self.param("l2_kernel", nn.initializers.normal(1.0), (self.hidden,))
        b2 = self.param("l2_bias", nn.initializers.zeros, (self.hidden,))
        k3 = self.param("l3_kernel", nn.initializers.normal(1.0), (self.hidden,))
        # Positive weights through abs() as VDM's DenseMonotone: the gradient keeps its scale
        # (softplus would shrink it for negative raw weights and let slopes freeze near zero).
        u = (2.0 * t - 1.0)[:, None] * jnp.abs(k2)[None, :] + b2[None, :]
        phi = 2.0 * (jax.nn.sigmoid(u) - 0.5)  # tanh(u/2), but stabler in VDM's experience
        # An elementwise product and a row reduction (not a matmul), so that every row is computed
        # by the same arithmetic and h(t) for t == 0 or 1 equals h(0), h(1) bit for bit.
        nonlinear = jnp.sum(phi * jnp.abs(k3)[None, :], axis=-1) / self.hidden
        return (jnp.abs(k1) + self.min_slope) * t + nonlinear


class LearnedGamma(nn.Module):
    r"""VDM's learned monotone schedule with learnable end points.

    gamma(t) = gamma_min + (gamma_max - gamma_min) (h(t) - h(0)) / (h(1) - h(0)),

    with h the monotone network of VDM (``_MonotoneNet``: a positive linear term plus
    positive-weight sigmoid features). The normalised shape s(t) = (h(t) - h(0)) / (h(1) - h(0))
    is strictly increasing from exactly 0 to exactly 1 for *any* interior parameters, so
    gamma(0) = ``gamma_min`` and gamma(1) = ``gamma_max`` exactly. The parameters are
    ``{'gamma_min': (), 'gamma_max': (), 'net': {...}}``: the end points at the top level (trained
    on the ELBO), the interior under ``'net'`` (trained to minimise the variance of the loss, VDM
    appendix I.2; the continuous-time ELBO does not depend on it).

    At initialisation h is VDM's NoiseNet at its initialisation (linear slope gamma_max -
    gamma_min, plus the same small sigmoid wiggle), so the schedule starts as VDM's does.

    The end points are the raw parameter values, so that they receive the plain ELBO gradient and
    match the parameters exactly. As a consequence gamma is increasing if and only if
    gamma_max > gamma_min. This is validated at initialisation, where they are 18.3 apart; in
    training the prior term pushes gamma_max up and the reconstruction term gamma_min down, against
    the diffusion loss, which grows with the gap. A reparameterisation that forbids crossing (e.g.
    gamma_max = gamma_min + softplus(.)) would break "the parameter is the end point" that the
    training step relies on, so instead the training step checks ``gamma_max > gamma_min`` alongside
    its finiteness checks and skips an update that would break it (:mod:`jvdm.train_state`): were
    they to cross, gamma' < 0 and the diffusion loss 0.5 gamma' ||eps - eps_hat||^2 would be
    unbounded below.

    Attributes:
      gamma_min_init, gamma_max_init: initial end points (VDM: -13.3 and 5.0).
      hidden: width of the sigmoid layer (VDM: 1024).

    References: VDM (arXiv 2107.00630) appendix H, ``NoiseSchedule_NNet`` in google-research/vdm.
    """

    gamma_min_init: float = -13.3
    gamma_max_init: float = 5.0
    hidden: int = 1024

    def setup(self):
        validate.check_gamma_order(self.gamma_min_init, self.gamma_max_init, suffix="_init")
        self.gamma_min = self.param("gamma_min", nn.initializers.constant(self.gamma_min_init), ())
        self.gamma_max = self.param("gamma_max", nn.initializers.constant(self.gamma_max_init), ())
        self.net = _MonotoneNet(self.hidden, init_slope=self.gamma_max_init - self.gamma_min_init)

    def __call__(self, t: jax.Array) -> jax.Array:
        t = _as_float(t)
        flat = t.reshape(-1)
        # h(0) and h(1) in the same call as h(t), so rows with t == 0 or 1 match them bitwise.
        h = self.net(jnp.concatenate([flat, jnp.array([0.0, 1.0], flat.dtype)]))
        h_t, h_0, h_1 = h[:-2], h[-2], h[-1]
        s = (h_t - h_0) / (h_1 - h_0)  # h_1 - h_0 >= min_slope > 0, see _MonotoneNet
        return _lerp(self.gamma_min, self.gamma_max, s).reshape(t.shape)

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        return self.gamma_min, self.gamma_max


class FixedLinearGamma(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t, linear in log-SNR (VDM's fixed baseline).

    No parameters: ``init`` returns an empty dict.
    """

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __call__(self, t: jax.Array) -> jax.Array:
        validate.check_gamma_order(self.gamma_min, self.gamma_max)
        t = _as_float(t)
        return _lerp(jnp.asarray(self.gamma_min, t.dtype), jnp.asarray(self.gamma_max, t.dtype), t)

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        return jnp.float32(self.gamma_min), jnp.float32(self.gamma_max)


class CosineGamma(nn.Module):
    r"""The cosine schedule in log-SNR form, stretched to hit gamma_min at t=0 and gamma_max at t=1.

    With alpha_bar = cos^2(theta) and 1 - alpha_bar = sin^2(theta), SNR = cot^2(theta) and so
    gamma = -log SNR = 2 log tan(theta). Taking theta = a t + b linear in t (Nichol & Dhariwal use
    theta = (t + s)/(1 + s) pi/2) with
    b = arctan(exp(gamma_min / 2)), a = arctan(exp(gamma_max / 2)) - b
    gives gamma(0) = gamma_min, gamma(1) = gamma_max and gamma'(t) = 4a / sin(2 theta) > 0
    (a > 0 whenever gamma_max > gamma_min).
    No parameters.
    """

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __call__(self, t: jax.Array) -> jax.Array:
        validate.check_gamma_order(self.gamma_min, self.gamma_max)
        t = _as_float(t)
        b = math.atan(math.exp(self.gamma_min / 2))
        c = math.atan(math.exp(-self.gamma_max / 2))  # pi/2 - theta(1)
        a = math.pi / 2 - b - c
        # tan(theta) = sin(theta) / sin(pi/2 - theta), with pi/2 - theta formed as c + a (1 - t)
        # rather than by subtraction: near theta = pi/2 (large gamma_max) cos(theta) would lose
        # most digits in float32. (1 - t is exact in float32 for t in [1/2, 1].)
        return 2.0 * (jnp.log(jnp.sin(a * t + b)) - jnp.log(jnp.sin(a * (1.0 - t) + c)))

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        return jnp.float32(self.gamma_min), jnp.float32(self.gamma_max)


def _ddpm_gamma_table(timesteps: int, beta_1: float, beta_T: float) -> np.ndarray:
    """gamma_i, i = 0..timesteps, for timesteps + 1 betas linear from beta_1 to beta_T (float64)."""
    betas = np.linspace(beta_1, beta_T, timesteps + 1, dtype=np.float64)
    log_alpha_bar = np.cumsum(np.log1p(-betas))
    # gamma = log(1 - alpha_bar) - log(alpha_bar), with 1 - alpha_bar = -expm1(log alpha_bar):
    # no subtraction from 1, which would lose every digit where alpha_bar ~ 1 (beta_1 = 1e-4).
    return np.log(-np.expm1(log_alpha_bar)) - log_alpha_bar


class DDPMGamma(nn.Module):
    """DDPM's linear-beta schedule as a table of gamma, interpolated piecewise linearly in t.

    The table has ``timesteps + 1`` entries gamma_i at t_i = i / timesteps, i = 0..timesteps, from
    betas linearly spaced from ``beta_1`` to ``beta_T`` over those ``timesteps + 1`` entries and
    gamma_i = -log(alpha_bar_i / (1 - alpha_bar_i)). A discrete-time model with ``timesteps``
    steps (latents z_0 .. z_T, T + 1 noise levels) thus evaluates the table exactly. Entry 0 is
    DDPM's first noisy latent x_1 (alpha_bar = 1 - beta_1, gamma ~ -9.2), the input of its
    decoder; the noiseless data (gamma = -inf) is not on the table. Compared with DDPM's
    T-entry table, the betas are spaced by (beta_T - beta_1)/T rather than /(T - 1).

    Between grid points gamma is linear, so gamma'(t) is piecewise constant and jumps at the grid
    points (where jvp returns the right-hand slope, the left-hand one at t = 1). The table is
    computed once in float64 NumPy and stored as a float32 constant (float64 for float64 t);
    there are no parameters.
    """

    timesteps: int = 1000
    beta_1: float = 1e-4
    beta_T: float = 0.02

    def _table(self, dtype=jnp.float32) -> jax.Array:
        if self.timesteps < 1 or not 0 < self.beta_1 <= self.beta_T < 1:
            raise ValueError(
                f"need timesteps >= 1 and 0 < beta_1 <= beta_T < 1, got {self.timesteps=}, "
                f"{self.beta_1=}, {self.beta_T=}"
            )
        return jnp.asarray(_ddpm_gamma_table(self.timesteps, self.beta_1, self.beta_T), dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        t = _as_float(t)
        table = self._table(jnp.promote_types(t.dtype, jnp.float32))
        x = t * self.timesteps
        i = jnp.clip(jnp.floor(x), 0, self.timesteps - 1)
        frac = x - i  # jvp: d frac / dt = timesteps, d i / dt = 0
        i = i.astype(jnp.int32)
        return _lerp(table[i], table[i + 1], frac)

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        table = self._table()
        return table[0], table[-1]


def gamma_and_derivative(
    fn: Callable[[jax.Array], jax.Array], t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """gamma(t) and d gamma / dt, elementwise, in one forward-mode pass.

    Args:
      fn: maps t elementwise to gamma, e.g. ``lambda t: module.apply(params, t)``.
      t: times in [0, 1], any shape (a float array).

    Returns:
      ``(gamma, dgamma_dt)``, both of t's shape.

    Forward mode with tangent ones_like(t) gives the diagonal of the (diagonal) Jacobian exactly,
    for the cost of about one extra evaluation (VDM eq. 17 needs gamma'(t)).
    """
    t = _as_float(t)
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))


def endpoints(module: nn.Module, params) -> tuple[jax.Array, jax.Array]:
    """``(gamma(0), gamma(1))`` of a schedule: for LearnedGamma, its two end-point parameters."""
    return module.apply(params, method="endpoints")
