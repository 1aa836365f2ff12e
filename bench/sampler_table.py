"""The sampler table: sample quality against steps for ancestral, DDIM and DPM-Solver++.

For a trained run, each ``(sampler, steps)`` draws ``N`` images (the same key) and reports the time
it took (compilation included, stated separately where measured), the Fréchet distance and KID in
the dataset classifier's features against the test split (:mod:`jvdm.quality`), two pixel-level
checks a feature distance can miss -- the share of exactly-zero pixels and the model's own ELBO
(bpd) of its samples --, the samples' distance to the training images (``nn_distance``,
``memorised``; for the floor, of ``N`` test images) and, once, the same numbers for ``N`` real
training images (the floor at that ``N``) and for the test split. Optionally (``--ode-images M``)
the ELBO and ODE bpd of the first ``M`` test images, with the probes, evaluations and seconds.

Usage: ``python bench/sampler_table.py --workdir runs/learned_snr [--n 128]
[--steps 10 20 50 100 250 1000] [--samplers ancestral ddim dpm_solver] [--grid lambda|karras|time]
[--ode-images 0] [--gaussian-fraction 0.16]``; without ``--grid`` each sampler walks its default
grid (:func:`jvdm.sampling.default_grid`). ``--gaussian-fraction F`` gives every row
``gaussian_steps = round(F * steps)`` with the Gaussian of the run's training split
(:func:`jvdm.sample`; on the ``lambda`` grid the same switch point at every step count).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402
from jvdm import validate  # noqa: E402  (no JAX: the names a flag may take)


def _pixel_checks(params, images, key) -> dict:
    import numpy as np

    from jvdm import evaluate

    elbo = evaluate.bpd(params, images, key)["bpd"]
    return {"zero_share": float(np.mean(images == 0)), "elbo_bpd": float(np.mean(elbo))}


def _row(params, clf_feats, n, sampler, steps, key, sample_key, grid, gaussian) -> dict:
    from jvdm import quality, sampling

    grid = grid or sampling.default_grid(params.model, sampler)
    fit, fraction = gaussian
    k = round(fraction * steps)
    start = time.perf_counter()
    images = sampling.sample(
        params,
        sample_key,
        n,
        steps=steps,
        sampler=sampler,
        grid=grid,
        gaussian_fit=fit if k else None,
        gaussian_steps=k,
    )
    seconds = time.perf_counter() - start
    clf, ref, copies = clf_feats
    logits, feats = clf.apply(images)
    scores = quality._metrics(logits, feats, ref, clf.module.num_classes)
    return {
        "sampler": sampler,
        "steps": steps,
        "grid": grid,
        "gaussian_steps": k,
        "seconds": seconds,
        "fd": scores["fd"],
        "fd_se": scores["fd_se"],
        "kid": scores["kid"],
        "confidence": scores["confidence"],
        "confidence_se": scores["confidence_se"],
        **copies.scores(images),
        **_pixel_checks(params, images, key),
    }


def _ode(params, config, m: int, key) -> dict:
    import numpy as np

    from jvdm import data, evaluate, ode

    images = data.load_split_array(config.data.name, "test", config.data.data_dir)[:m]
    elbo = evaluate.bpd(params, images, key)["bpd"]
    start = time.perf_counter()
    result = ode.ode_bpd(params, images, key, probes=1)
    seconds = time.perf_counter() - start
    sem = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v)))
    return {
        "images": m,
        "elbo_bpd": [float(np.mean(elbo)), sem(elbo)],
        "ode_bpd": [float(np.mean(result.bpd)), sem(result.bpd)],
        "probes": 1,
        "rtol": 1e-5,
        "atol": 1e-5,
        "dequantization": "truncated_normal",
        "nfe": float(np.mean(result.nfe)),
        "seconds_with_compile": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 250, 1000])
    parser.add_argument("--samplers", nargs="+", default=["ancestral", "ddim", "dpm_solver"])
    parser.add_argument("--grid", choices=validate.SAMPLER_GRIDS, default=None)
    parser.add_argument("--ode-images", type=int, default=0)
    parser.add_argument("--gaussian-fraction", type=float, default=0.0)
    args = parser.parse_args()
    if not 0.0 <= args.gaussian_fraction < 1.0:
        parser.error("--gaussian-fraction must lie in [0, 1)")
    load_before = _common.loadavg()

    import jax
    import numpy as np

    from jvdm import data, quality, run
    from jvdm import reference_denoisers as ref_lib
    from jvdm.quality_classifier import Recipe, get_classifier

    params, config = run.load_with_config(args.workdir)
    name, data_dir = config.data.name, config.data.data_dir
    clf = get_classifier(Recipe(name), data_dir)
    test = data.load_split_array(name, "test", data_dir)
    train = data.load_split_array(name, "train", data_dir)
    _, ref = clf.apply(test)
    key = jax.random.key(0)
    real = train[np.random.default_rng(0).choice(len(train), args.n, replace=False)]
    copies = quality._pixel_copies(train)
    _, real_feats = clf.apply(real)
    floor = {
        "fd": quality.frechet_distance(real_feats, ref),
        "fd_se": quality.frechet_distance_se(real_feats, ref),
        "kid": quality.kernel_distance(real_feats, ref),
        # held-out images: a training image is its own nearest training image
        **copies.scores(test[: args.n]),
        **_pixel_checks(params, real, key),
    }
    fit = None
    if args.gaussian_fraction:
        d = config.data
        fit = ref_lib.fit_split(d.name, d.train_split, d.data_dir, params.model.vocab_size)
    rows, sample_key = [], jax.random.key(1)
    for sampler in args.samplers:
        for steps in args.steps:
            gaussian = (fit, args.gaussian_fraction)
            row = _row(
                params,
                (clf, ref, copies),
                args.n,
                sampler,
                steps,
                key,
                sample_key,
                args.grid,
                gaussian,
            )
            rows.append(row)
            print(rows[-1], file=sys.stderr, flush=True)
    result = {
        "workdir": args.workdir,
        "n": args.n,
        "classifier_test_accuracy": clf.test_accuracy,
        "real_train": floor,
        "test_split": _pixel_checks(params, test, key),
        "rows": rows,
    }
    if args.ode_images:
        result["ode"] = _ode(params, config, args.ode_images, key)
    _common.emit("sampler_table", result, load_before=load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
