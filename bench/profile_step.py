"""Where the train step's time goes: per-op wall time from a ``jax.profiler`` trace, by category.

Runs the compiled train step a few times under ``jax.profiler.trace``, reads the XSpace back with
``jax.profiler.ProfileData`` and sums the durations of the XLA:CPU thunk events (one per HLO
instruction or fusion) by name and by category (convolution, dot, fusion, reduce, copy, rng,
other). Prints ONE JSON object (top ops and categories, ms per step) and appends it to the log.

Usage: ``python bench/profile_step.py [--config learned_snr] [--batch 64] [--top 25]``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402
import train_step  # noqa: E402

_CATEGORIES = (
    ("ynnpack (conv/dot)", re.compile(r"^ynn_|^xnn_")),
    ("onednn", re.compile(r"onednn")),
    ("convolution", re.compile(r"conv")),
    ("dot", re.compile(r"^dot|\.dot|gemm|matmul")),
    ("rng", re.compile(r"rng|threefry|random")),
    ("reduce", re.compile(r"reduce")),
    ("copy/transpose", re.compile(r"copy|transpose")),
    ("fusion", re.compile(r"fusion")),
)


_HLO_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")


def _op_names(dump_dir: str) -> dict[str, str]:
    """``{instruction name: metadata op_name}`` from the optimised HLO of the train step."""
    names = {}
    for path in glob.glob(f"{dump_dir}/*jit__train_step*after_optimizations.txt"):
        for m in re.finditer(
            r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", open(path).read(), re.M
        ):
            names.setdefault(m.group(1), m.group(2))
    return names


def _component(op_name: str) -> str:
    """The model part an HLO op comes from, by its JAX name stack."""
    if not op_name:
        return "(no metadata: layout copies, weight-gradient convs)"
    if "UNet" in op_name:
        parts = [p for p in op_name.split("/") if re.match(r"^[A-Z_a-z]+_\d+$", p)]
        mod = re.sub(r"_\d+$", "", parts[-1]) if parts else "UNet (top)"
        mod = {"down": "ResBlock (other)", "up": "ResBlock (other)", "mid": "ResBlock (other)"}.get(
            mod, mod
        )
        return ("bwd " if "transpose(" in op_name else "fwd ") + mod
    if "jvp(" in op_name or "transpose(" in op_name:
        return "loss outside UNet (decoder, prior, schedule)"
    return "optimizer / EMA / metrics"


def _category(name: str) -> str:
    for cat, pattern in _CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def profile(config, batch: int, *, steps: int) -> tuple[dict, float]:
    """``({op_name: total_seconds}, wall_seconds)`` over ``steps`` profiled steps."""
    import time

    import jax
    from jax.profiler import ProfileData

    step_fn, state, data, key, _, _ = train_step.build(config, batch)
    state, _, _ = train_step.time_steps(step_fn, state, data, key, steps=1)
    logdir = tempfile.mkdtemp(prefix="jvdm_prof_")
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            state, metrics = step_fn(state, data, key)
            jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - t0
    (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(path).planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            # Thunk events live on the XLA:CPU worker threads; skip the Python/dispatch lines.
            for ev in line.events:
                totals[ev.name] += ev.duration_ns * 1e-9
    return dict(totals), wall


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="learned_snr")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--dump", default=None, help="XLA dump dir: also group ops by model component")
    args = p.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    if args.dump:
        flags += f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
    os.environ["XLA_FLAGS"] = flags.strip()  # before jax initialises its backend
    load = _common.loadavg()
    config = _common.load_config(args.config, args.set)
    batch = args.batch or int(config.train.batch_size)
    totals, wall = profile(config, batch, steps=args.steps)
    ms = {k: 1e3 * v / args.steps for k, v in totals.items()}
    # Thunk events only: names of HLO instructions (XLA:CPU names them after the HLO), not the
    # Python frames ('$...') or the runtime's spans that enclose them ('PjitFunction(...)',
    # 'ThunkExecutor::Execute', ...), which on the synchronous CPU runtime cover the whole step.
    ops = {k: v for k, v in ms.items() if _HLO_NAME.match(k)}
    cats: dict[str, float] = collections.defaultdict(float)
    for name, v in ops.items():
        cats[_category(name)] += v
    top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
    comps: dict[str, float] = collections.defaultdict(float)
    if args.dump:
        names = _op_names(args.dump)
        for name, v in ops.items():
            kind = "conv " if name.startswith(("ynn_", "xnn_")) or "conv" in name else ""
            comps[kind + _component(names.get(name, ""))] += v
    res = {
        "config": args.config,
        "batch": batch,
        "overrides": args.set,
        "wall_ms_per_step": 1e3 * wall / args.steps,
        "categories_ms_per_step": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "components_ms_per_step": dict(sorted(comps.items(), key=lambda kv: -kv[1])),
        "top_ops_ms_per_step": dict(top),
        "all_event_names_ms": dict(sorted(ms.items(), key=lambda kv: -kv[1])[:15]),
    }
    return _common.emit("profile_step", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
