"""Data-parallel throughput on 1, 2 and 4 XLA:CPU devices at the same global batch.

Each device count runs ``bench/train_step.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set before JAX starts).
The state is replicated and the batch sharded over the ``'data'`` mesh axis, exactly as in
training. On a 2-core machine, N > 2 devices share the cores, so more devices cannot help; the
figure shows what the split and the gradient all-reduce cost.

Usage: ``python bench/devices.py [--counts 1 2 4] [--batch 64] [--steps 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402


def run(count: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--x")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    cmd = [sys.executable, str(_common.BENCH_DIR / "train_step.py"), "--no-peak", "--no-write"]
    cmd += ["--config", args.config, "--batch", str(args.batch), "--steps", str(args.steps)]
    for item in args.set:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"devices": count, "error": proc.stderr[-800:]}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = ("median_ms", "min_ms", "images_per_s", "compile_s", "achieved_gflops", "peak_rss_mb")
    return {"devices": count, "n_devices_seen": len(rec["machine"]["devices"])} | {
        k: rec[k] for k in keys
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--config", default="learned_snr")
    p.add_argument("--batch", type=int, default=64, help="global batch, same for every count")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load = _common.loadavg()
    rows = [run(c, args) for c in args.counts]
    base = rows[0].get("images_per_s")
    for r in rows:
        if base and r.get("images_per_s"):
            r["speedup_vs_first"] = r["images_per_s"] / base
    res = {"config": args.config, "batch": args.batch, "overrides": args.set, "rows": rows}
    return _common.emit("devices", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
