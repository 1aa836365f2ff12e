"""Memory and time of the mixture base's prediction, against the per-component form it replaced.

``jvdm.mixture_prediction`` sums over components through three matrix products with the fit
(``[batch, K]`` and ``[batch, K r]`` against ``[K, dim]`` and ``[K r, dim]``), so it never holds a
``[K, batch, dim]`` array. Until 2026-12-05 it formed each component's residual ``z - alpha mu_k``
and its estimate as ``[K, batch, dim]`` arrays; that form is kept here, as the baseline, written
from the same equations (its docstring's). For each shape the script compiles the value and
gradient (with respect to ``z`` and a per-latent ``gamma``, as the trainer differentiates through
the schedule) of ``sum v_hat^2`` both ways, reports XLA's temporary bytes, times the two
interleaved, and checks that they agree.

Shapes (``batch, dim, K, r``): ``mnist`` is the default's train step (16, 784, 30, 32);
``cifar10`` a batch of 128 of 32x32x3; ``imagenet64`` a batch of 64 of 64x64x3.

Usage: ``python bench/mixture_base.py [--shapes mnist cifar10 imagenet64] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402

SHAPES = {
    "mnist": (16, 784, 30, 32),
    "cifar10": (128, 3072, 30, 32),
    "imagenet64": (64, 12288, 30, 32),
}


def per_component(z, gamma, fit, prediction="v"):
    """The ``[K, batch, dim]`` form: each component's estimate, weighted by its posterior."""
    import jax
    import jax.numpy as jnp

    a2 = jax.nn.sigmoid(-gamma)[:, None]
    s2 = jax.nn.sigmoid(gamma)[:, None]
    a, s = jnp.sqrt(a2), jnp.sqrt(s2)
    hi = jax.lax.Precision.HIGHEST
    dim, rank = fit.vectors.shape[1:]
    values, tau2 = fit.values[:, None, :], fit.residual[:, None, None]
    y = z[None] - a[None] * fit.means[:, None, :]
    coords = jnp.einsum("kbd,kdr->kbr", y, fit.vectors, precision=hi)
    perp = y - jnp.einsum("kbr,kdr->kbd", coords, fit.vectors, precision=hi)
    d = a2[None] * values + s2[None]
    e = a2[None] * tau2 + s2[None]
    log_p = fit.log_weights[:, None] - 0.5 * (
        jnp.sum(coords * coords / d + jnp.log(d), axis=-1)
        + jnp.sum(perp * perp, axis=-1) / e[..., 0]
        + (dim - rank) * jnp.log(e[..., 0])
    )
    post = jax.nn.softmax(log_p, axis=0)[..., None]
    a, s = a[None], s[None]
    assert prediction == "v"
    gain = a * s * (1.0 - values) / d
    rest = a * s * (1.0 - tau2) / e
    each = -s * fit.means[:, None, :] + jnp.einsum(
        "kbr,kdr->kbd", coords * gain, fit.vectors, precision=hi
    )
    return jnp.sum(post * (each + perp * rest), axis=0)


def _fit(rng, dim, comps, rank):
    import jax.numpy as jnp
    import numpy as np

    from jvdm import reference_denoisers as ref

    vectors = np.linalg.qr(rng.standard_normal((comps, dim, rank)))[0]
    means = -0.8 + 0.2 * rng.standard_normal((comps, dim))  # MNIST-like: a shared dark background
    return ref.MixtureFit(
        jnp.full((comps,), -np.log(comps), jnp.float32),
        jnp.asarray(means, jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, (comps, rank)), jnp.float32),
        jnp.asarray(vectors, jnp.float32),
        jnp.asarray(rng.uniform(0.01, 0.05, comps), jnp.float32),
    )


def measure(name: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jvdm import reference_denoisers as ref

    batch, dim, comps, rank = SHAPES[name]
    rng = np.random.default_rng(0)
    fit = _fit(rng, dim, comps, rank)
    x = np.asarray(fit.means)[rng.integers(0, comps, batch)]
    gamma = jnp.asarray(np.linspace(-6.0, 3.0, batch), jnp.float32)
    a = np.sqrt(1.0 / (1.0 + np.exp(np.asarray(gamma))))[:, None]
    z = jnp.asarray(a * x + np.sqrt(1 - a * a) * rng.standard_normal(x.shape), jnp.float32)
    out = {"shape": name, "batch": batch, "dim": dim, "components": comps, "rank": rank}
    compiled, values = {}, {}
    for label, fn in (("products", ref.mixture_prediction), ("per_component", per_component)):

        def loss(g, zz, fn=fn):
            return jnp.sum(jnp.square(fn(zz, g, fit, "v")))

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        c = step.lower(gamma, z).compile()
        compiled[label] = c
        values[label] = jax.block_until_ready(c(gamma, z))
        out[f"{label}_temp_mib"] = c.memory_analysis().temp_size_in_bytes / 2**20
        out[f"{label}_gflop"] = _common.flops_of(c) / 1e9
    times = {label: [] for label in compiled}
    for _ in range(reps):  # interleaved, so the shared machine's drift hits both alike
        for label, c in compiled.items():
            times[label] += _common.time_calls(
                lambda c=c: jax.block_until_ready(c(gamma, z)), reps=1
            )
    for label in compiled:
        out[f"{label}_ms"] = _common.summary(times[label])
    out["time_ratio"] = out["products_ms"]["median_ms"] / out["per_component_ms"]["median_ms"]
    (v1, (g1, z1)), (v2, (g2, z2)) = values["products"], values["per_component"]
    out["max_rel_diff"] = {
        "value": float(abs(v1 - v2) / abs(v2)),
        "grad_gamma": float(jnp.max(jnp.abs(g1 - g2)) / jnp.max(jnp.abs(g2))),
        "grad_z": float(jnp.max(jnp.abs(z1 - z2)) / jnp.max(jnp.abs(z2))),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--label", default="", help="a note stored with the record")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    load = _common.loadavg()
    results = [measure(name, args.reps) for name in args.shapes]
    _common.emit(
        "mixture_base",
        {"label": args.label, "results": results},
        load_before=load,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
