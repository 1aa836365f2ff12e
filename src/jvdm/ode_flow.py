"""The compiled half of :mod:`jvdm.ode`: the probability-flow ODE in gamma form, its divergence,
the dequantized start and the diffrax solve, each chunk of images one jitted program.

See :mod:`jvdm.ode` for the maths and its references.
"""

from __future__ import annotations

import functools
import math

import diffrax
import jax
import jax.numpy as jnp

from jvdm import losses
from jvdm import model as model_lib

SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
# Tsit5 and Dopri5 are FSAL (7 stages, the first reused from the step before): 6 evaluations per
# step, plus one at the start (counted in tests/test_ode.py).
_EVALS_PER_STEP = 6
_EVALS_AT_START = 1


def _drift(params, z, g):
    """``dz/dgamma = (sigma eps_hat - sigma^2 z) / 2``."""
    eps_hat, _ = model_lib.predict_eps_x0(params, z, g)
    sigma_sq = jax.nn.sigmoid(g)  # accurate at both ends, unlike 1 - sigmoid(-g)
    return 0.5 * (jnp.sqrt(sigma_sq) * eps_hat - sigma_sq * z)


def _divergence(vjp, z, probes, *, exact: bool):
    """Per-image ``div f``: exactly (one VJP per dimension) or averaged over the probes."""
    b, dims = z.shape[0], math.prod(z.shape[1:])
    if exact:

        def row(j):
            e = jnp.broadcast_to(jax.nn.one_hot(j, dims, dtype=z.dtype), (b, dims))
            (r,) = vjp(e.reshape(z.shape))
            return r.reshape(b, dims)[:, j]

        return jnp.sum(jax.lax.map(row, jnp.arange(dims), batch_size=min(dims, 64)), axis=0)
    vj = jax.vmap(lambda v: vjp(v)[0])(probes)  # [P, B, ...]: v^T df/dz for each probe
    quad = jnp.sum((vj * probes).reshape(probes.shape[0], b, dims), axis=-1)
    return jnp.mean(quad, axis=0)  # the Hutchinson average: divided by the number of probes


def _max_image_rms(tree) -> jax.Array:
    """The controller's norm: the largest per-image RMS error over the global batch."""
    leaves = jax.tree.leaves(tree)
    b = leaves[0].shape[0]
    sq = sum(jnp.sum(jnp.square(x.reshape(b, -1)), axis=1) for x in leaves)
    n = sum(math.prod(x.shape[1:]) for x in leaves)
    return jnp.sqrt(jnp.max(sq) / n)


def _solve(fn, y0, g_from, g_to, *, solver, rtol, atol, max_steps):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(fn),
        SOLVERS[solver](),
        t0=g_from,
        t1=g_to,
        dt0=None,
        y0=y0,
        stepsize_controller=diffrax.PIDController(
            rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4, norm=_max_image_rms
        ),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        adjoint=diffrax.ForwardMode(),
        throw=False,
    )
    y1 = jax.tree.map(lambda x: x[0], sol.ys)
    ok = sol.result == diffrax.RESULTS.successful
    nfe = _EVALS_PER_STEP * sol.stats["num_steps"] + _EVALS_AT_START
    return y1, nfe, ok


def _ends(params):
    g = model_lib.gamma(params, jnp.array([0.0, 1.0], jnp.float32))
    return g[0], g[1]


def _log_likelihood(params, z0, probes, *, exact, solver, rtol, atol, max_steps):
    """``(log p_0(z_0) [B], z_1, nfe, ok)`` for continuous latents ``z_0`` at ``gamma(0)``."""
    g0, g1 = _ends(params)

    def field(g, y, args):
        z, _ = y
        f, vjp = jax.vjp(lambda u: _drift(params, u, g), z)
        return f, _divergence(vjp, z, probes, exact=exact)

    y0 = (z0, jnp.zeros(z0.shape[:1], jnp.float32))
    (z1, delta), nfe, ok = _solve(
        field, y0, g0, g1, solver=solver, rtol=rtol, atol=atol, max_steps=max_steps
    )
    dims = math.prod(z0.shape[1:])
    prior = -0.5 * jnp.sum(jnp.square(z1).reshape(z1.shape[0], -1), 1)
    prior = prior - 0.5 * dims * math.log(2 * math.pi)
    return prior + delta, z1, nfe, ok


def _dequantize(params, images, keys, dequantization):
    """``(z_0, log q(z_0 | x))`` per image: see the module docstring."""
    vocab = params.model.vocab_size
    g0, _ = _ends(params)
    x = losses.scale_pixels(images, vocab)
    half = 1.0 / vocab  # half a bin in [-1, 1]
    log_alpha0 = 0.5 * jax.nn.log_sigmoid(-g0)
    shape = images.shape[1:]
    dims = math.prod(shape)
    if dequantization == "uniform":
        u = jax.vmap(lambda k: jax.random.uniform(k, shape, minval=-half, maxval=half))(keys)
        log_q = -dims * (log_alpha0 + math.log(2 * half))
        return jnp.exp(log_alpha0) * (x + u), jnp.full(images.shape[:1], log_q)
    tau = half * jnp.exp(-0.5 * g0)  # alpha_0 half / sigma_0
    e = jax.vmap(lambda k: jax.random.truncated_normal(k, -tau, tau, shape))(keys)
    log_sigma0 = 0.5 * jax.nn.log_sigmoid(g0)
    log_z = jnp.log(jax.scipy.special.erf(tau / math.sqrt(2.0)))
    per_dim = -0.5 * jnp.square(e) - 0.5 * math.log(2 * math.pi) - log_sigma0 - log_z
    z0 = jnp.exp(log_alpha0) * x + jnp.exp(log_sigma0) * e
    return z0, jnp.sum(per_dim.reshape(images.shape[0], -1), axis=1)


def _probes(keys, shape, probes: int):
    """Rademacher probes ``[P, B, ...]``, per image from its own key."""
    draw = lambda k: jax.random.rademacher(jax.random.fold_in(k, 0), (probes, *shape), jnp.float32)
    return jnp.swapaxes(jax.vmap(draw)(keys), 0, 1)


def _image_keys(key, indices):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)


_STATIC = ("probes", "exact", "solver", "rtol", "atol", "max_steps", "dequantization", "out")


@functools.partial(jax.jit, static_argnames=_STATIC)
def bpd_chunk(params, images, key, indices, *, dequantization, out, **solve):
    keys = _image_keys(key, indices)
    z0, log_q = _dequantize(
        params, images, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), dequantization
    )
    probes = _probes(keys, images.shape[1:], solve.pop("probes"))
    log_p, _, nfe, ok = _log_likelihood(params, z0, probes, **solve)
    bpd = losses.bpd_from_nats(log_q - log_p, params.model.num_dims)
    return jax.lax.with_sharding_constraint((bpd, nfe, ok), out)


@functools.partial(jax.jit, static_argnames=_STATIC[:6] + ("out",))
def loglik_chunk(params, z0, key, indices, *, out, **solve):
    keys = _image_keys(key, indices)
    probes = _probes(keys, z0.shape[1:], solve.pop("probes"))
    return jax.lax.with_sharding_constraint(_log_likelihood(params, z0, probes, **solve), out)


@functools.partial(jax.jit, static_argnames=("solver", "rtol", "atol", "max_steps", "out", "up"))
def flow_chunk(params, z, *, up, out, **solve):
    g0, g1 = _ends(params)
    field = lambda g, y, args: _drift(params, y, g)
    ends = (g0, g1) if up else (g1, g0)
    return jax.lax.with_sharding_constraint(_solve(field, z, *ends, **solve), out)
