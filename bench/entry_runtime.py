"""The default train step through the ``jvdm train`` command, this tree against an earlier commit.

``import jvdm`` used to apply jvdm's CPU runtime defaults as a side effect; now the command applies
them before JAX starts. This checks that the command still runs the step as fast: each variant runs
``jvdm train`` on the default experiment (``experiments/learned_snr.py``) at batch ``--batch`` (32
unless set, whatever the experiment's own) in a fresh process, and the ms/step are read from the
run's own ``metrics.jsonl`` (``train/images_per_sec`` of every logging interval after the first,
which holds the compilation). Variants alternate in pairs on one machine, and the result is the
ratio ``after / before`` per pair (< 1 is faster).

Usage::

  python bench/entry_runtime.py --before e958f73 --pairs 2 --steps 12 --log-every 4
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402

# What the `jvdm` console script runs, with the package imported from the given src/ directory.
_RUN = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from jvdm import cli; sys.exit(cli.main(sys.argv[2:]))"
)


def _export(commit: str, into: pathlib.Path) -> pathlib.Path:
    """``src/`` of ``commit`` (``git archive``) under ``into``; returns that ``src`` path."""
    into.mkdir(parents=True)
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "archive", commit, "src"], cwd=_common.ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _ms_per_step(src: pathlib.Path, workdir: pathlib.Path, args) -> list[float]:
    overrides = [
        f"train.batch_size={args.batch}",
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.use_final_eval=False",
        f"train.eval_every={10 * args.steps}",
        f"train.checkpoint_every={10 * args.steps}",
    ]
    argv = ["train", "--config", str(_common.EXPERIMENTS / "learned_snr.py")]
    argv += ["--workdir", str(workdir), *overrides]
    # The environment of `make train`: no runtime settings of the caller's own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_CPU", "JVDM_"))}
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(src), *argv], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/images_per_sec"] for r in records if "train/images_per_sec" in r]
    return [1e3 * args.batch / rate for rate in rates[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    load_before = _common.loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        srcs = {"before": _export(args.before, tmp / "before"), "after": _common.ROOT / "src"}
        ms: dict[str, list[list[float]]] = {"before": [], "after": []}
        for i in range(args.pairs):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for name in order:
                ms[name].append(_ms_per_step(srcs[name], tmp / f"{name}{i}", args))
    medians = {k: [statistics.median(v) for v in runs] for k, runs in ms.items()}
    ratios = [a / b for a, b in zip(medians["after"], medians["before"], strict=True)]
    _common.emit(
        "entry_runtime",
        {
            "config": "learned_snr",
            "batch": args.batch,
            "before": args.before,
            "ms_per_step": ms,
            "median_ms_per_pair": medians,
            "ratio_after_over_before": ratios,
        },
        load_before=load_before,
    )


if __name__ == "__main__":
    main()
