"""The train step under XLA:CPU / JAX option variants, each in a fresh subprocess.

XLA flags are read once, when the backend starts, so every variant runs ``bench/train_step.py``
in its own process with ``XLA_FLAGS`` (and JAX_* environment variables) set. Each variant runs on
top of jvdm's own defaults (``jvdm/_xla_defaults.py``) unless its environment sets
``JVDM_NO_XLA_DEFAULTS=1``; run the script with that variable set to compare against raw XLA.
The matmul peak is measured in each subprocess too (one size), so each ratio is against that
process's own peak.
Prints ONE JSON object with a row per variant (ms/step, % of peak, compile time).

Usage: ``python bench/flags.py [--only baseline fast_math] [--steps 4] [train_step args...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402

# name -> (XLA_FLAGS, extra environment). Flag names and values checked against jaxlib 0.10.2.
VARIANTS = {
    "baseline": ("", {}),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}),
    "vector_width_512": ("--xla_cpu_prefer_vector_width=512", {}),
    "ynn_conv_off": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", {}),
    "ynn_plus_eltwise_reduce": ("--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce", {}),
    "ynn_conv_off_fast_math": (
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
        " --xla_cpu_enable_fast_math=true",
        {},
    ),
    "ynn_all_off": ("--xla_cpu_experimental_ynn_fusion_type=", {}),
    "ynn_conv_off_plus_eltwise_reduce": (
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,+eltwise,+reduce",
        {},
    ),
    "ynn_conv_dot_off": (
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot",
        {},
    ),
    "ynn_conv_dot_reduce_off": (
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot,-reduce",
        {},
    ),
    # XLA:CPU's legacy emitters for loop fusions instead of its MLIR fusion emitters. On the
    # Xeon: 35% less compile time for the tests' tiniest train step, but 60% more for the default
    # config's and a 2-3% slower step (bench/RESULTS.md), so not a jvdm default.
    "fusion_emitters_off": ("--xla_cpu_use_fusion_emitters=false", {}),
    "concurrency_scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", {}),
    # jvdm's XLA flag without its host-memory and dispatch defaults (jvdm/_xla_defaults.py).
    "no_memory_reuse": (
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot",
        {"JVDM_NO_XLA_DEFAULTS": "1"},
    ),
    "onednn": ("--xla_cpu_use_onednn=true", {}),
    "eigen_single_thread": ("--xla_cpu_multi_thread_eigen=false", {}),
    "threefry_partitionable_off": ("", {"JAX_THREEFRY_PARTITIONABLE": "false"}),
}


def run_variant(name: str, extra_args: list[str]) -> dict:
    flags, env_extra = VARIANTS[name]
    env = {**os.environ, **env_extra}
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    cmd = [sys.executable, str(_common.BENCH_DIR / "train_step.py"), "--peak-sizes", "2048"]
    proc = subprocess.run(cmd + extra_args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": name, "flags": flags, "env": env_extra, "error": proc.stderr[-800:]}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = (
        "median_ms",
        "min_ms",
        "images_per_s",
        "compile_s",
        "fraction_of_peak",
        "fraction_of_interleaved_peak",
        "peak_gflops",
    )
    row = {k: rec.get(k) for k in keys}
    return {"variant": name, "flags": flags, "env": env_extra, **row, "load": rec["loadavg_after"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-write", action="store_true")
    args, rest = p.parse_known_args(argv)
    load = _common.loadavg()
    rows = []
    for name in args.only:
        rows.append(run_variant(name, rest))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return _common.emit("flags", {"rows": rows}, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
