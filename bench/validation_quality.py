"""Sample quality on the validation slice, for choosing a config without the test split.

Runs trained with ``data.train_split='train[:K]' data.eval_split='train[K:]'`` are compared here:
for each run (its latest checkpoint, or ``RUN:STEP``) ``N`` samples are drawn with one key and
scored in the dataset classifier's features (:mod:`jvdm.quality`) against the *validation* images
``train[K:]``, never the test split. The floor is ``N`` images of ``train[:K]`` scored the same way
(its ``nn_distance`` and ``memorised``, against ``train[:K]`` like the samples', are of ``N``
validation images: a training image is its own nearest neighbour).
Each row also gives the share of exactly-zero pixels, the run's final validation bpd from its
``metrics.jsonl`` and the config fields that the comparison is usually about. ``--raw`` scores the
raw parameters beside the EMA ones (``jvdm.load`` gives the EMA).

The classifier is the cached one for the dataset (trained on the whole training split, labels
included, so it has seen the validation images' labels; it is a feature extractor, not a model
being selected).

Usage: ``python bench/validation_quality.py RUN[:STEP] [RUN ...] [--n 256] [--steps 50]
[--sampler ancestral] [--eta 1.0] [--grids default lambda time karras] [--split-at 4000] [--raw]
[--gaussian-steps 0 8]``.
``--grids`` scores each run on each grid (``default`` is the sampler's own, :func:`jvdm.sampling.
default_grid`); ``--sampler ddim --eta 1`` is the ancestral chain on the ``lambda`` grid.
``--gaussian-steps`` scores each run with each ``k`` of :func:`jvdm.sample`'s ``gaussian_steps``
(the first ``k`` steps take ``x0_hat`` from the Gaussian fitted to ``train[:K]``, or with
``--gaussian-components C --gaussian-rank R`` from a mixture of ``C`` PPCA Gaussians).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402
from jvdm import validate  # noqa: E402  (no JAX: the names a flag may take)


def _params(path: pathlib.Path, raw: bool):
    """The EMA (or raw) parameters of a run's checkpoint, its config and its step."""
    from jvdm import run

    params, config = run.load_with_config(path, raw=raw)
    return params, config, int(run.resolve_checkpoint(path)[1].name)


def _final_val_bpd(workdir: pathlib.Path) -> list[float] | None:
    """The last ``eval/bpd_mean`` ± ``eval/bpd_sem`` the run logged."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "eval/bpd_mean" in rec:
            last = [rec["eval/bpd_mean"], rec.get("eval/bpd_sem")]
    return last


class _Scorer:
    """Quality metrics in the dataset classifier's features against ``train[split_at:]``."""

    def __init__(self, dataset: str, data_dir, split_at: int):
        from jvdm import data, quality
        from jvdm.quality_classifier import Recipe, get_classifier

        self.dataset = dataset
        self.clf = get_classifier(Recipe(dataset), data_dir)
        train = data.load_split_array(dataset, "train", data_dir)
        self.fit, self.val = train[:split_at], train[split_at:]
        _, self.ref = self.clf.apply(self.val)
        self.copies = quality._pixel_copies(self.fit)

    def __call__(self, images, copy_probe=None) -> dict:
        """The metrics of ``images``; ``nn_distance`` and ``memorised`` (against ``train[:K]``)
        of ``copy_probe`` instead where given (the floor's training images would be their own
        nearest neighbours)."""
        import numpy as np

        from jvdm import quality

        logits, feats = self.clf.apply(images)
        out = quality._metrics(logits, feats, self.ref, self.clf.module.num_classes)
        copies = self.copies.scores(images if copy_probe is None else copy_probe)
        return {**out, **copies, "zero_share": float(np.mean(images == 0))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN or RUN:STEP")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ancestral")
    parser.add_argument("--eta", type=float, help="DDIM's eta (1: the ancestral chain)")
    parser.add_argument(
        "--grids", nargs="+", default=["default"], choices=["default", *validate.SAMPLER_GRIDS]
    )
    parser.add_argument("--split-at", type=int, default=4000)
    parser.add_argument("--raw", action="store_true", help="also score the raw parameters")
    parser.add_argument(
        "--gaussian-steps",
        type=int,
        nargs="+",
        default=[0],
        help="score each run with each k of sampling.sample's gaussian_steps (the Gaussian of "
        "train[:K] for the first k steps; 0: the model throughout)",
    )
    parser.add_argument(
        "--gaussian-components",
        type=int,
        default=1,
        help="with --gaussian-steps: a mixture of this many components instead of one Gaussian",
    )
    parser.add_argument("--gaussian-rank", type=int, default=0, help="the mixture's rank")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_before = _common.loadavg()

    import jax
    import numpy as np

    from jvdm import sampling

    rows, scorer, floor = [], None, None
    for spec in args.runs:
        workdir, _, step = spec.partition(":")
        workdir = pathlib.Path(workdir)
        path = workdir / "checkpoints" / step if step else workdir
        combos = itertools.product(
            (False, True) if args.raw else (False,), args.grids, args.gaussian_steps
        )
        for raw, grid, gaussian_steps in combos:
            params, config, at = _params(path, raw)
            if grid == "default":
                grid = sampling.default_grid(params.model, args.sampler)
            if scorer is None:
                scorer = _Scorer(config.data.name, config.data.data_dir, args.split_at)
                pick = np.random.default_rng(0).choice(len(scorer.fit), args.n, replace=False)
                floor = scorer(scorer.fit[pick], copy_probe=scorer.val[: args.n])
                fit = None
                if any(args.gaussian_steps):  # the fit of the images the runs trained on
                    from jvdm import reference_denoisers as ref

                    fit = ref.fit_split(
                        scorer.dataset,
                        f"train[:{args.split_at}]",
                        config.data.data_dir,
                        params.model.vocab_size,
                        components=args.gaussian_components,
                        rank=args.gaussian_rank,
                    )
            elif config.data.name != scorer.dataset:
                raise SystemExit(f"{spec}: dataset {config.data.name!r}, not {scorer.dataset!r}")
            start = time.perf_counter()
            eta = {} if args.eta is None else {"eta": args.eta}
            images = sampling.sample(
                params,
                jax.random.key(1),
                args.n,
                steps=args.steps,
                sampler=args.sampler,
                grid=grid,
                gaussian_fit=fit,
                gaussian_steps=gaussian_steps,
                **eta,
            )
            m = config.model
            rows.append(
                {
                    "run": str(workdir),
                    "step": at,
                    "params": "params" if raw else "ema_params",
                    "grid": grid,
                    "gaussian_steps": gaussian_steps,
                    "gaussian_fit": [args.gaussian_components, args.gaussian_rank],
                    "seconds": time.perf_counter() - start,
                    "final_val_bpd": _final_val_bpd(workdir),
                    "config": {
                        "prediction": m.prediction,
                        "weighting": m.weighting,
                        "sigmoid_scale": m.sigmoid_scale,
                        "sigmoid_bias": m.sigmoid_bias,
                        "fourier": [m.fourier_min, m.fourier_max],
                        "train_split": config.data.train_split,
                        "eval_split": config.data.eval_split,
                        "steps": config.train.steps,
                        "seed": config.train.seed,
                    },
                    **scorer(images),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "n": args.n,
        "sampler": args.sampler,
        "eta": args.eta,
        "sample_steps": args.steps,
        "reference": f"train[{args.split_at}:]",
        "floor": {"images": f"{args.n} of train[:{args.split_at}]", **floor},
        "rows": rows,
    }
    _common.emit("validation_quality", result, load_before=load_before, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
