"""At which noise levels are the samples' shapes lost? The model's chain started from real images.

Issue 17: the default's ancestral samples have clean backgrounds but score far from real digits in
the dataset classifier's features (FD about 65-85 against a floor of 12-19; confidence 0.78-0.81
against 0.96). This script localises the noise levels responsible. For ``N`` real training images
``x`` of ``train[:K]`` (the images a validation run trained on) and a start index ``k`` of the
default sampler's grid (``--steps`` points uniform in ``lambda = -gamma/2`` between the schedule's
end points), it draws ``z ~ q(z_k | x)``, runs the ancestral chain over the rest of that grid
(``steps - k`` steps, the default sampler's own path from there) and decodes. ``k = 0`` is sampling
from the prior's end; large ``k`` keeps almost all of ``x``. Each start is scored like
``bench/validation_quality.py`` (FD, confidence, precision, recall against ``train[K:]``), plus:

- ``label_kept``: the share of outputs the classifier gives the class it gives their source image,
  i.e. whether the chain keeps the digit the noisy start still holds;
- ``x0_label_kept``: the same for one denoiser call at the start level (``x0_hat`` rounded to
  pixels): whether the denoiser alone can still read the digit at that level;
- ``train_draw_share``: the share of training draws (``t ~ U(0, 1)`` through the run's schedule)
  whose ``log SNR`` lies between this start and the next larger one (less noise): how much of the
  training signal the denoiser gets at the levels between them. ``None`` for a run that drew its
  noise levels from the loss histogram or the band density (``model.noise_sampling`` other than
  ``"uniform_t"``): the schedule's interior did not set its draws.

The same per-image keys are used at every start (the starts are paired). The floor row is the
source images themselves. Prints one JSON record (appended to bench/results.jsonl)::

    python bench/shape_origin.py RUN [RUN ...] [--n 256] [--steps 50]
        [--starts 0 5 8 10 12 15 20 30 40] [--split-at 4000]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402

DEFAULT_STARTS = (0, 5, 8, 10, 12, 15, 20, 30, 40)


def _program(steps: int):
    import functools

    import jax
    import jax.numpy as jnp

    from jvdm import decoder, sampling
    from jvdm import model as model_lib
    from jvdm.samplers import SAMPLERS, _alpha_sigma, gamma_grid, run

    @functools.partial(jax.jit, static_argnames=("k",))
    def restart(params, pixels, keys, *, k):
        """Noise ``pixels`` to grid point ``k``, run ancestral to 0 and decode; and x0_hat at k.
        The per-image noise and the decoder are :func:`jvdm.sampling.sample`'s own."""
        x = decoder.scale_pixels(pixels, params.model.vocab_size)
        shape = x.shape[1:]
        normal = lambda tag: sampling._per_image_normal(keys, shape, tag)
        g = gamma_grid(params, steps, "lambda")[k:]
        alpha, sigma = _alpha_sigma(g[0])
        z = alpha * x + sigma * normal(0)
        _, x0_hat = model_lib.predict_eps_x0(params, z, g[0])
        if g.shape[0] > 1:
            z = run(params, SAMPLERS["ancestral"], z, g, 0.0, lambda i: normal(i + 1 + k))
        out = sampling._decode(params, z, keys, steps)
        x0_pixels = jnp.clip(jnp.round((x0_hat + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
        return out, x0_pixels, -g[0]

    return restart


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_restart_args(parser, starts=DEFAULT_STARTS)
    args = parser.parse_args()
    if any(not 0 <= k <= args.steps for k in args.starts):
        parser.error(f"--starts must lie in 0..{args.steps} (grid indices)")
    load_before = _common.loadavg()

    import jax
    import numpy as np

    from jvdm import model as model_lib
    from jvdm import run
    from jvdm.samplers import gamma_grid
    from validation_quality import _Scorer

    restart = _program(args.steps)
    results, scorer = [], None
    for workdir in args.runs:
        params, config = run.load_with_config(pathlib.Path(workdir))
        if scorer is None:
            scorer = _Scorer(config.data.name, config.data.data_dir, args.split_at)
            pick = np.random.default_rng(args.seed).choice(len(scorer.fit), args.n, replace=False)
            source = scorer.fit[pick]
            floor = scorer(source)
            source_label = np.argmax(scorer.clf.apply(source)[0], axis=-1)
        elif config.data.name != scorer.dataset:
            raise SystemExit(f"{workdir}: dataset {config.data.name!r}, not {scorer.dataset!r}")
        keys = jax.random.split(jax.random.key(args.seed + 1), args.n)
        # log SNR of the schedule on a fine grid of t: the density of training draws per level.
        t_fine = np.linspace(0.0, 1.0, 100_001, dtype=np.float32)
        log_snr_fine = -np.asarray(model_lib.gamma(params, jax.numpy.asarray(t_fine)))
        grid = -np.asarray(gamma_grid(params, args.steps, "lambda"))
        rows = []
        for k in args.starts:
            out, x0_pixels, log_snr = restart(params, source, keys, k=k)
            out, x0_pixels = np.asarray(out), np.asarray(x0_pixels)
            label = np.argmax(scorer.clf.apply(out)[0], axis=-1)
            x0_label = np.argmax(scorer.clf.apply(x0_pixels)[0], axis=-1)
            scores = scorer(out)
            rows.append(
                {
                    "start": k,
                    "log_snr_start": float(log_snr),
                    "chain_steps": args.steps - k,
                    **{
                        name: scores[name]
                        for name in ("fd", "fd_se", "confidence", "precision", "recall")
                    },
                    "zero_share": scores["zero_share"],
                    "label_kept": float(np.mean(label == source_label)),
                    "x0_label_kept": float(np.mean(x0_label == source_label)),
                    "train_draw_share": None,
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
        order = sorted(args.starts)
        schedule_sets_draws = config.model.noise_sampling == "uniform_t"
        for row in rows if schedule_sets_draws else ():
            k = row["start"]
            nxt = next((j for j in order if j > k), None)
            if nxt is not None:
                lo, hi = grid[k], grid[nxt]
                row["train_draw_share"] = float(np.mean((log_snr_fine >= lo) & (log_snr_fine < hi)))
        results.append({"run": str(workdir), "train_steps": config.train.steps, "rows": rows})
    result = {
        "n": args.n,
        "steps": args.steps,
        "sources": f"{args.n} of train[:{args.split_at}]",
        "reference": f"train[{args.split_at}:]",
        "floor": {k: floor[k] for k in ("fd", "fd_se", "confidence", "precision", "recall")},
        "runs": results,
    }
    _common.emit("shape_origin", result, load_before=load_before, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
