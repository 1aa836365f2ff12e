"""Images/s of candidate model configurations, to size the default 15-minute CPU experiment.

Each candidate is the default config (``experiments/learned_snr.py``) with a few overrides: base
channels 16/24/32/48, 1 or 2 ResNet blocks per level, attention at 7x7 or only in the middle
block, batch 32/64/128. Not the full product (each point is a ~45 s compile on 2 cores): the
default plus one-at-a-time changes plus a few promising combinations. Reported per candidate:
parameters, FLOPs per image, ms/step, images/s, compile time and images in a 15-minute budget
(``(900 s - compile) * images/s``).

Usage: ``python bench/configs.py [--only c32_r2_b64 ...] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402
import train_step  # noqa: E402


def _cand(ch: int, res: int, attn: bool, batch: int) -> tuple[str, list[str]]:
    name = f"c{ch}_r{res}_{'attn' if attn else 'noattn'}_b{batch}"
    sets = [f"model.channels={ch}", f"model.num_res_blocks={res}", f"train.batch_size={batch}"]
    sets.append("model.attention_resolutions=(7,)" if attn else "model.attention_resolutions=()")
    return name, sets


CANDIDATES = dict(
    _cand(*c)
    for c in [
        (32, 2, True, 64),  # the default
        (16, 2, True, 64),
        (24, 2, True, 64),
        (48, 2, True, 64),
        (32, 1, True, 64),
        (32, 2, False, 64),
        (32, 2, True, 32),
        (32, 2, True, 128),
        (24, 1, False, 64),
        (16, 1, False, 128),
        (32, 1, False, 128),
    ]
)


def measure(name: str, steps: int, budget_s: float) -> dict:
    from jvdm.nn import unet

    config = _common.load_config("learned_snr", CANDIDATES[name])
    batch = int(config.train.batch_size)
    fn, state, data, key, compile_s, flops = train_step.build(config, batch)
    _, times, _ = train_step.time_steps(fn, state, data, key, steps=steps)
    med = statistics.median(times)
    return {
        "candidate": name,
        "overrides": CANDIDATES[name],
        "params": unet.count_params(state.params.denoiser),
        "gflops_per_image": flops / batch / 1e9,
        "median_ms": 1e3 * med,
        "images_per_s": batch / med,
        "compile_s": compile_s,
        "images_in_budget": max(budget_s - compile_s, 0.0) * batch / med,
        "steps_in_budget": int(max(budget_s - compile_s, 0.0) / med),
        "achieved_gflops": flops / med / 1e9,
        "load": _common.loadavg(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=900.0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load = _common.loadavg()
    rows = []
    for name in args.only:
        rows.append(measure(name, args.steps, args.budget_s))
        print(rows[-1], file=sys.stderr, flush=True)
    res = {"rows": sorted(rows, key=lambda r: -r["images_per_s"]), "budget_s": args.budget_s}
    return _common.emit("configs", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
