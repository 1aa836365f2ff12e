"""The variance of the diffusion-loss estimate under each way of choosing the noise level.

On Gaussian data x ~ N(m, s^2 I_D) (D = 28 x 28, the size of an MNIST digit) with the exact
denoiser (tests/gaussian_models.py), the per-example variance of the one-sample estimate of the
weighted diffusion loss, for:

* ``uniform_linear``: t uniform (stratified), the linear schedule;
* ``uniform_learned``: t uniform, a learned schedule whose interior was trained by the variance
  gradient (Adam on ``E[L^2]``, end points fixed; VDM appendix I.2);
* ``adaptive``: the noise level drawn from the loss histogram learned online (VDM++ section 5);
  it does not depend on the schedule's interior.

Each estimator's mean is printed with its standard error next to the closed form. Prints one JSON
record (and appends it to bench/results.jsonl):

    python bench/objective_variance.py [--weighting elbo] [--steps 400]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common  # noqa: F401  (jvdm's CPU runtime defaults, before JAX)

sys.path.insert(0, str(_common.ROOT / "tests"))
from gaussian_models import GaussianDenoiser  # noqa: E402
from jvdm import model as model_lib  # noqa: E402
from jvdm import noise_sampling, objective, weighting  # noqa: E402
from jvdm.nn import gamma as gamma_lib  # noqa: E402

M, S = 0.0, 0.5
SHAPE = (28, 28, 1)
G_MIN, G_MAX = -13.3, 5.0


def _model(schedule, name, sampling):
    return model_lib.VDM(
        denoiser=GaussianDenoiser(M, S),
        schedule=schedule,
        image_shape=SHAPE,
        weighting=name,
        noise_sampling=sampling,
    )


def _batch(params, sched, hist, key, batch):
    model = params.model
    adaptive = model.noise_sampling == "adaptive"
    kx, kn = jax.random.split(key)
    x = M + S * jax.random.normal(kx, (batch, *SHAPE))
    noise = model_lib.draw_noise(model, kn, x.shape, hist if adaptive else None)
    sv = model_lib.schedule_values(model, noise, adaptive=adaptive)(sched)
    diff = model_lib._diffusion_term(model, params.denoiser, x, noise.eps, sv, None, train=False)
    loss = weighting.weighted_diffusion_loss(diff, sv.g_t, weighting=model.weighting)
    return loss, objective._updated_histogram(model, hist, noise, sv, loss, adaptive)


def _train_schedule(params, steps, batch, key):
    """The learned schedule's interior trained on E[L^2] (its end points fixed)."""
    tx = optax.adam(1e-2)
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: 0.0 if model_lib.is_endpoint(p) else 1.0, params.schedule
    )
    hist = noise_sampling.init_histogram(params.model.histogram_bins)

    def step(carry, k):
        sched, opt = carry
        g = jax.grad(lambda s: jnp.mean(_batch(params, s, hist, k, batch)[0] ** 2))(sched)
        g = jax.tree.map(jnp.multiply, g, mask)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(sched, upd), opt), None

    (sched, _), _ = jax.lax.scan(
        step, (params.schedule, tx.init(params.schedule)), jax.random.split(key, steps)
    )
    return sched


def _estimate(params, key, *, steps, batch=64, batches=200):
    hist = noise_sampling.init_histogram(params.model.histogram_bins)
    k_warm, k_est = jax.random.split(key)
    learn = lambda h, k: (_batch(params, params.schedule, h, k, batch)[1], None)
    hist, _ = jax.lax.scan(learn, hist, jax.random.split(k_warm, steps))
    keys = jax.random.split(k_est, batches)
    est = jax.lax.map(lambda k: _batch(params, params.schedule, hist, k, batch)[0], keys)
    est = np.asarray(est, np.float64).reshape(-1)
    return {
        "mean": float(est.mean()),
        "sem": float(est.std(ddof=1) / np.sqrt(est.size)),
        "var": float(est.var(ddof=1)),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weighting", default="elbo", choices=weighting.WEIGHTINGS)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    load = _common.loadavg()
    d = int(np.prod(SHAPE))
    lam = np.linspace(-G_MAX, -G_MIN, 400001)
    w = np.exp(np.asarray(weighting.log_diffusion_weight(lam, weighting=args.weighting)))
    exact = 0.5 * np.trapezoid(w * d * S**2 * np.exp(lam) / (1 + S**2 * np.exp(lam)), lam)

    linear = gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX)
    learned = gamma_lib.LearnedGamma(gamma_min_init=G_MIN, gamma_max_init=G_MAX, hidden=64)
    key = jax.random.key(0)
    rows = {}
    p = model_lib.init(_model(linear, args.weighting, "uniform_t"), key)
    rows["uniform_linear"] = _estimate(p, jax.random.key(1), steps=1)
    p = model_lib.init(_model(learned, args.weighting, "uniform_t"), key)
    p = p.replace(schedule=_train_schedule(p, args.steps, 64, jax.random.key(2)))
    rows["uniform_learned"] = _estimate(p, jax.random.key(1), steps=1)
    p = model_lib.init(_model(linear, args.weighting, "adaptive"), key)
    rows["adaptive"] = _estimate(p, jax.random.key(1), steps=args.steps)
    base = rows["uniform_linear"]["var"]
    for row in rows.values():
        row["var_ratio_to_uniform_linear"] = row["var"] / base
    result = {"weighting": args.weighting, "exact": float(exact), "D": d, "estimators": rows}
    _common.emit("objective_variance", result, load_before=load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
