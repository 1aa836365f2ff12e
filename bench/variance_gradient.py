"""How noisy each estimator of the schedule's variance gradient is, on a trained run.

For the run's parameters (EMA, as ``jvdm.load`` reads them) and the first ``--images`` images of
its training split, each estimator of ``d E[L^2] / d eta`` for the schedule's interior
(``gamma.variance_gradient``: ``density`` and VDM's ``pathwise``, :mod:`jvdm.objective`) is drawn
``--draws`` times (independent noise levels and noise, one batch of all the images each), under
the run's own weighting or ``--weighting``. Reported per estimator: the mean |z| of its
coordinates (mean over draws / standard error), the share beyond 2 standard errors, and the norm
of the mean against one draw's; then each estimator's mean projected on the density estimator's
mean direction, and (``--fd``) a central difference of the measured variance
(:mod:`jvdm.loss_variance`, ``--grid`` levels, one key) along that direction, a third route to
the same derivative. Prints one JSON record (and appends it to bench/results.jsonl):

    python bench/variance_gradient.py runs/learned_snr [--weighting elbo] [--images 64]
        [--draws 32] [--fd 0.5] [--grid 128] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402  (jvdm's CPU runtime defaults, before JAX)

ESTIMATORS = ("density", "pathwise")


def _interior_vector(tree):
    import jax
    import numpy as np

    from jvdm import model as model_lib

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return np.concatenate(
        [np.ravel(np.asarray(v, np.float64)) for p, v in leaves if not model_lib.is_endpoint(p)]
    )


def _shift_interior(tree, direction, h):
    """``tree`` with ``h direction`` added to its interior leaves (in :func:`_interior_vector`
    order)."""
    import jax
    import jax.numpy as jnp

    from jvdm import model as model_lib

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out, i = [], 0
    for path, v in leaves:
        if model_lib.is_endpoint(path):
            out.append(v)
            continue
        step = jnp.asarray(direction[i : i + v.size].reshape(v.shape), v.dtype)
        out.append(v + h * step)
        i += v.size
    return jax.tree_util.tree_unflatten(treedef, out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--weighting", help="default: the run's own model.weighting")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--fd", type=float, default=0.0, help="finite-difference step; 0: none")
    parser.add_argument("--grid", type=int, default=128, help="levels per image for --fd")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_before = _common.loadavg()

    import jax
    import numpy as np

    from jvdm import data, loss_variance, objective, run

    params, config = run.load_with_config(args.workdir)
    model = params.model
    if model.timesteps or not model.use_variance_gradient:
        raise SystemExit(f"{args.workdir}: no variance gradient (discrete time, or turned off)")
    if args.weighting:
        model = dataclasses.replace(model, weighting=args.weighting)
    images = data.load_split_array(
        config.data.name, config.data.train_split, data_dir=config.data.data_dir
    )[: args.images]

    draws = {}
    for name in ESTIMATORS:
        p = params.replace(model=dataclasses.replace(model, variance_gradient=name))
        fn = jax.jit(lambda p, k: objective.loss_and_grads(p, images, k).grads.schedule)
        draws[name] = np.stack(
            [_interior_vector(fn(p, jax.random.key(i))) for i in range(args.draws)]
        )
    mean = {k: g.mean(0) for k, g in draws.items()}
    direction = mean["density"] / np.linalg.norm(mean["density"])
    rows = {}
    for name, g in draws.items():
        se = g.std(0, ddof=1) / np.sqrt(len(g))
        z = np.abs(mean[name])[se > 0] / se[se > 0]
        proj = g @ direction
        rows[name] = {
            "mean_abs_z": float(z.mean()),
            "share_z_above_2": float(np.mean(z > 2)),
            "mean_norm_over_draw_norm": float(
                np.linalg.norm(mean[name]) / np.linalg.norm(g, axis=1).mean()
            ),
            "along_density_mean": float(proj.mean()),
            "along_density_mean_se": float(proj.std(ddof=1) / np.sqrt(len(proj))),
        }
        print(name, rows[name], file=sys.stderr, flush=True)
    result = {
        "workdir": args.workdir,
        "weighting": model.weighting,
        "images": int(len(images)),
        "draws": args.draws,
        "interior_parameters": int(direction.size),
        "units": "bpd^2 per unit of the interior parameters",
        "estimators": rows,
    }
    if args.fd:
        measure = jax.jit(loss_variance.per_example, static_argnames=("grid", "objective"))
        weighted = model.weighting != "elbo"
        base = params.replace(model=model)

        def variance(h):
            shifted = base.replace(schedule=_shift_interior(base.schedule, direction, h))
            out = measure(shifted, images, jax.random.key(99), grid=args.grid, objective=weighted)
            return float(np.mean(np.asarray(out.variance["learned"], np.float64)))

        plus, minus = variance(args.fd), variance(-args.fd)
        result["finite_difference"] = {
            "step": args.fd,
            "grid": args.grid,
            "variance_plus": plus,
            "variance_minus": minus,
            "derivative": (plus - minus) / (2 * args.fd),
        }
    _common.emit("variance_gradient", result, load_before=load_before, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
