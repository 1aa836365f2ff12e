"""Fixed noise schedules and conversions between alpha_bar, SNR and gamma.

Notation (DESIGN.md section 1): ``alpha_bar_t = prod_{i<=t} (1 - beta_i)``,
``SNR = alpha_bar / (1 - alpha_bar)``, ``gamma = -log SNR`` (increasing in t), so
``alpha_bar = sigmoid(-gamma)`` and ``sigma_sq = 1 - alpha_bar = sigmoid(gamma)``.

All functions are pure and jit-able. Parameter checks run only when the values are concrete
(not tracers), so they cost nothing under ``jax.jit`` and never break tracing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = [
    "alpha_bar",
    "alpha_bar_from_gamma",
    "cosine_alpha_bar",
    "gamma_from_alpha_bar",
    "linear_betas",
    "sigma_sq_from_gamma",
    "snr",
    "snr_from_gamma",
]


def _at(name: str, a: np.ndarray, i: tuple[int, ...]) -> str:
    """``name=value`` (scalars) or ``name[i, j]=value``, for error messages."""
    index = f"[{', '.join(map(str, i))}]" if i else ""
    return f"{name}{index}={a[i].item()!r}"


def _concrete(x) -> np.ndarray | None:
    """The value of ``x`` as a NumPy array, or None while tracing."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_T(T) -> None:
    if isinstance(T, jax.core.Tracer):
        raise ValueError("T must be a static Python int (it sets the output shape), got a tracer")
    if int(T) != T or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T=}")


def _check_betas(betas, name: str = "betas") -> None:
    b = _concrete(betas)
    if b is None:
        return
    bad = ~((b > 0) & (b < 1))
    if bad.any():
        i = tuple(int(j) for j in np.argwhere(bad)[0])
        raise ValueError(f"every beta must lie in (0, 1); got {_at(name, b, i)}")


def _check_alpha_bar_sequence(ab, name: str = "alpha_bar") -> None:
    """A valid alpha_bar sequence lies in (0, 1) and strictly decreases along the last axis.

    With alpha_bar_0 = 1 implied, this also rejects betas so small that float32 rounds
    alpha_bar_1 to exactly 1 (which would make gamma = -inf).
    """
    a = _concrete(ab)
    if a is None or a.size == 0:
        return
    outside = ~((a > 0) & (a < 1))
    if outside.any():
        i = tuple(int(j) for j in np.argwhere(outside)[0])
        raise ValueError(f"alpha_bar must lie in (0, 1); got {_at(name, a, i)}")
    if a.ndim >= 1:
        not_decreasing = np.diff(a, axis=-1) >= 0
        if not_decreasing.any():
            i = tuple(int(j) for j in np.argwhere(not_decreasing)[0])
            j = i[:-1] + (i[-1] + 1,)
            raise ValueError(
                "alpha_bar must be strictly decreasing in t; "
                f"got {_at(name, a, j)} >= {_at(name, a, i)}"
            )


def linear_betas(T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> Float[Array, " T"]:
    """Linearly spaced betas of Ho et al. (2020), ``beta_t`` for t = 1..T.

    Args:
      T: number of diffusion steps (static int >= 1).
      beta_1: first beta, in (0, 1).
      beta_T: last beta, in (0, 1).

    Returns:
      float32 array ``[T]`` with ``beta_t = beta_1 + (beta_T - beta_1) (t - 1) / (T - 1)``.

    Raises:
      ValueError: if ``T < 1`` or a beta lies outside (0, 1) (checked when concrete).

    References:
      Ho, Jain, Abbeel 2020 (arXiv 2006.11239), section 4.
    """
    _check_T(T)
    _check_betas(beta_1, "beta_1")
    _check_betas(beta_T, "beta_T")
    return jnp.linspace(beta_1, beta_T, T, dtype=jnp.float32)


def cosine_alpha_bar(T: int, s: float = 0.008) -> Float[Array, " T"]:
    """The cosine schedule of Nichol & Dhariwal, ``alpha_bar_t`` for t = 1..T.

    ``alpha_bar_t = f(t) / f(0)`` with ``f(t) = cos^2(pi/2 (t/T + s) / (1 + s))``. As in the paper,
    ``beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}`` is clipped to at most 0.999 (otherwise
    ``beta_T = 1`` and ``alpha_bar_T = 0``), and alpha_bar is the product of the clipped
    ``1 - beta_t``; only the last step or two are affected.

    Args:
      T: number of diffusion steps (static int >= 1).
      s: small offset (>= 0) that keeps beta_1 away from 0.

    Returns:
      float32 array ``[T]``, strictly decreasing in (0, 1).

    Raises:
      ValueError: if ``T < 1`` or ``s < 0`` (checked when concrete).

    References:
      Nichol & Dhariwal 2021 (arXiv 2102.09672), eq. 17 and section 3.2.
    """
    _check_T(T)
    s_val = _concrete(s)
    if s_val is not None and not s_val >= 0:
        raise ValueError(f"the cosine offset must be >= 0, got {s=}")
    t = jnp.arange(T + 1, dtype=jnp.float32)
    # cos(pi/2 u) = sin(pi/2 (1 - u)), and 1 - u = (T - t) / (T (1 + s)) is computed without
    # cancellation (T - t is an exact integer), whereas cos of an argument near pi/2 loses
    # relative accuracy near t = T, where alpha_bar is smallest.
    log_f = 2.0 * jnp.log(jnp.sin(0.5 * jnp.pi * (T - t) / (T * (1.0 + s))))
    # log(1 - beta_t) = log f(t) - log f(t-1), clipped at log(1 - 0.999); log f(T) = -inf is
    # clipped too. Summing logs keeps alpha_bar relatively accurate down to tiny values.
    log_alpha = jnp.maximum(log_f[1:] - log_f[:-1], math.log(1.0 - 0.999))
    out = jnp.exp(jnp.cumsum(log_alpha))
    _check_alpha_bar_sequence(out, "cosine_alpha_bar")
    return out


def alpha_bar(betas: Float[ArrayLike, "... T"]) -> Float[Array, "... T"]:
    """Cumulative product ``alpha_bar_t = prod_{i<=t} (1 - beta_i)`` over the last axis.

    Computed as ``exp(cumsum(log1p(-betas)))``: ``log1p`` keeps the tiny early betas (1e-4) that
    ``1 - beta`` would round, and a sum of logs accumulates error additively (relative error of
    alpha_bar ~ T eps at worst) instead of through T rounded multiplications that can also
    underflow.

    Args:
      betas: ``[..., T]`` betas in (0, 1).

    Returns:
      ``[..., T]`` alpha_bar, same shape and dtype as ``betas``.

    Raises:
      ValueError: if a beta lies outside (0, 1), or the result is not strictly decreasing in
        (0, 1) (e.g. betas so small that float32 rounds alpha_bar to 1); checked when concrete.

    References:
      Ho et al. 2020 eq. 4; Luo 2022 (arXiv 2208.11970) eq. 61.
    """
    _check_betas(betas)
    betas = jnp.asarray(betas)
    out = jnp.exp(jnp.cumsum(jnp.log1p(-betas), axis=-1))
    _check_alpha_bar_sequence(out)
    return out


def snr(alpha_bar: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)``.

    ``1 - alpha_bar`` is a single correctly rounded subtraction of the given input (exact for
    alpha_bar >= 0.5 by Sterbenz's lemma), so the result is accurate to a few ulp. The warning in
    DESIGN.md applies to alpha_bar *derived* from gamma: use ``snr_from_gamma`` then.

    References:
      Kingma et al. 2021 (arXiv 2107.00630) eq. 3; Luo 2022 eq. 87.
    """
    alpha_bar = jnp.asarray(alpha_bar)
    return alpha_bar / (1.0 - alpha_bar)


def alpha_bar_from_gamma(gamma: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
    """``alpha_bar = alpha^2 = sigmoid(-gamma)``; accurate over the whole range of gamma.

    References:
      Kingma et al. 2021 eq. 4.
    """
    return jax.nn.sigmoid(-jnp.asarray(gamma))


def sigma_sq_from_gamma(gamma: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
    """``sigma^2 = 1 - alpha_bar = sigmoid(gamma)``, never by subtraction (it would lose every
    digit near alpha_bar = 1).

    References:
      Kingma et al. 2021 eq. 4.
    """
    return jax.nn.sigmoid(jnp.asarray(gamma))


def snr_from_gamma(gamma: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
    """``SNR = exp(-gamma)``.

    References:
      Kingma et al. 2021 eq. 3; Luo 2022 eq. 96.
    """
    return jnp.exp(-jnp.asarray(gamma))


def gamma_from_alpha_bar(alpha_bar: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
    """``gamma = -log SNR = log(1 - alpha_bar) - log(alpha_bar)``, computed stably.

    Away from gamma = 0 we use ``log1p(-a) - log(a)``: log1p keeps small ``a`` exact, and
    ``1 - a`` is exact for ``a >= 0.5``. Near gamma = 0 (a near 1/2) that difference of two
    nearly equal logs would lose relative accuracy, so for ``a`` in [1/4, 3/4] we use
    ``log1p((1 - 2a) / a)`` instead, where ``1 - 2a`` is exact (Sterbenz) and log1p is accurate.

    References:
      Kingma et al. 2021 eq. 3.
    """
    a = jnp.asarray(alpha_bar)
    is_mid = (a >= 0.25) & (a <= 0.75)
    # Clip each branch's argument to its own domain so the unused branch never yields inf/nan
    # (which would poison gradients through jnp.where).
    a_mid = jnp.clip(a, 0.25, 0.75)
    mid = jnp.log1p((1.0 - 2.0 * a_mid) / a_mid)
    a_out = jnp.where(is_mid, 0.5, a)
    out = jnp.log1p(-a_out) - jnp.log(a_out)
    return jnp.where(is_mid, mid, out)
