"""The variance of the diffusion-loss estimate at every kept checkpoint of one or more runs.

For each checkpoint step of each run (its EMA parameters, as ``jvdm.load`` reads them), the
per-example variance (bpd^2) of the one-sample estimate of the diffusion term with the noise
level drawn from each density (``jvdm.loss_variance``): the run's own schedule (``learned``), the
linear and cosine schedules with the same end points, the run's loss histogram (``adaptive``: for a
run that samples from it, or for any continuous-time run with ``--with-histogram``) and the
optimal density fitted to the same points (``optimal``, a lower bound); and the mean diffusion term.
The images are the first ``--images`` of the run's training split (default: its
``train.variance_images``), at ``--grid`` levels each (default: its ``train.variance_grid``), and
the key is the run's variance key, the one the trainer uses at every step, so at the steps where
the run measured itself these are its own ``variance/...`` records (on the same devices; runs
trained before 2026-12-04 folded the step into it, so theirs agree only to the draws' noise).
Runs trained with different schedules are compared at matched steps by passing them together.
Prints one JSON record (and appends it to bench/results.jsonl):

    python bench/schedule_variance.py --workdir runs/learned_snr runs/fixed_linear runs/cosine
        [--images 32] [--grid 64] [--steps 600 1200 1800] [--with-histogram]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402  (jvdm's CPU runtime defaults, before JAX)


def _run_rows(workdir: str, args) -> dict:
    """Every kept checkpoint step of one run, measured."""
    from jvdm import run, train_log
    from jvdm import train as train_lib
    from jvdm.workdir import CHECKPOINT_DIR

    root, _ = run.resolve_checkpoint(workdir)
    config = run.load_config(root)
    m, t = config.model, config.train
    use_histogram = m.noise_sampling == "adaptive" or (args.with_histogram and m.timesteps == 0)
    spec = train_log.VarianceSpec(
        every=0,
        num_images=args.images or int(t.variance_images),
        dataset=config.data.name,
        split=config.data.train_split,
        data_dir=config.data.data_dir,
        grid=args.grid or int(t.variance_grid),
    )
    key = train_lib.run_keys(t.seed)[3]
    rows = []
    for step in run.checkpoint_steps(root):
        if args.steps and step not in args.steps:
            continue
        step_dir = root / CHECKPOINT_DIR / str(step)
        params = run.load(step_dir)
        histogram = run.load_loss_histogram(step_dir) if use_histogram else None
        start = time.perf_counter()
        record = train_log.measure_variance(spec, params, histogram, key)
        row = {k.removeprefix("variance/"): v for k, v in record.items()}
        rows.append({"step": step, **row, "seconds": time.perf_counter() - start})
        print(workdir, rows[-1], file=sys.stderr, flush=True)
    return {
        "workdir": workdir,
        "schedule": config.gamma.schedule,
        "noise_sampling": m.noise_sampling,
        "weighting": m.weighting,
        "timesteps": m.timesteps,
        "images": spec.num_images,
        "grid": spec.grid,
        "split": spec.split,
        "steps": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", nargs="+", required=True)
    parser.add_argument("--images", type=int, default=0, help="0: the run's variance_images")
    parser.add_argument("--grid", type=int, default=0, help="0: the run's variance_grid")
    parser.add_argument("--steps", type=int, nargs="*", help="only these checkpoint steps")
    parser.add_argument("--with-histogram", action="store_true")
    args = parser.parse_args()
    load_before = _common.loadavg()
    runs = [_run_rows(w, args) for w in args.workdir]
    result = {"units": "bpd (diffusion_bpd), bpd^2 (variances)", "runs": runs}
    _common.emit("schedule_variance", result, load_before=load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
