"""Shared helpers of the bench scripts: machine facts, timing, and the append-only results log.

Every bench script prints ONE JSON object to stdout and appends the same object (one line) to
``bench/results.jsonl``. The record always carries the date, the machine (CPU model, cores, JAX
backend and devices), the git commit and the load average before and after the measurement, so
that figures taken on a busy shared machine can be recognised as such.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jvdm

# Every bench script imports this module before JAX: it measures what the `jvdm` command runs, with
# jvdm's CPU runtime defaults (`JVDM_NO_XLA_DEFAULTS=1` in the environment measures raw XLA).
jvdm.configure_cpu_runtime()

BENCH_DIR = pathlib.Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.jsonl"
EXPERIMENTS = ROOT / "experiments"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``); empty where unavailable."""
    try:
        return [float(x) for x in pathlib.Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def machine() -> dict:
    """CPU model, core count, JAX version, backend and devices, and the XLA flags in force."""
    import jax

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_memory() -> dict | None:
    """``memory_stats()`` of the first device, where the backend has it (not XLA:CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without the call raise various errors
        return None
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: stats[k] for k in keys if k in stats}


def time_calls(fn: Callable[[], object], *, reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    """Median, min and max of a list of seconds, in milliseconds."""
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "reps": len(times),
    }


def flops_of(compiled) -> float:
    """The ``'flops'`` of a compiled program's cost analysis (a multiply-add counts as 2)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        return float(sum(c.get("flops", 0.0) for c in cost))
    return float(cost.get("flops", 0.0))


def load_config(name_or_path: str, overrides: list[str] | None = None):
    """An experiment config by name (``learned_snr``) or path, with ``section.field=value``
    overrides applied."""
    from jvdm import config as config_lib

    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = EXPERIMENTS / f"{name_or_path}.py"
    config = config_lib.load_config_file(path)
    return config_lib.apply_overrides(config, list(overrides or []))


def emit(bench: str, result: dict, *, load_before: list[float], write: bool = True) -> dict:
    """Adds the common fields, prints the record as one JSON line and appends it to the log."""
    record = {
        "bench": bench,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "argv": sys.argv[1:],
        **result,
    }
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if write:
        with RESULTS.open("a") as f:
            f.write(line + "\n")
    return record


def allow_unprepared_datasets() -> None:
    """Lets ``build.from_config`` build models of datasets not prepared on this machine.

    The model needs only the image shape, which :func:`jvdm.datasets.list_datasets` knows without
    the data; the benchmarks feed synthetic uint8 batches of that shape.
    """
    from jvdm import data, datasets

    real = data.dataset_info
    shapes = {name: shape for name, _, shape in datasets.list_datasets()}

    def dataset_info(name, data_dir=None):
        try:
            return real(name, data_dir=data_dir)
        except datasets.DatasetNotPreparedError:
            return tuple(shapes[name]), {}

    data.dataset_info = dataset_info


def add_restart_args(parser, *, starts) -> None:
    """The arguments of the scripts that restart a validation run's chain from real images
    (``shape_origin.py``, ``denoiser_oracle.py``): runs, sample count, grid, start indices."""
    parser.add_argument("runs", nargs="+", help="run directories (trained on train[:K])")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--starts", type=int, nargs="+", default=list(starts))
    parser.add_argument("--split-at", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
