"""What a training run writes: metrics, TensorBoard events, evaluations and their pictures.

All files go to the run's work directory and are written by process 0 only; every process takes
part in the computations (evaluation gathers across processes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from jvdm import parallel
from jvdm.workdir import METRICS_FILE

__all__ = [
    "METRICS_FILE",
    "EvalSpec",
    "IntervalLog",
    "MetricsWriter",
    "eval_scalars",
    "evaluate_and_save",
    "plot_curves",
    "summarise",
]

# Metrics that are counters (report the last value of an interval, not the mean).
_LAST_VALUE = ("lr", "skipped_total", "skipped_consecutive")


class MetricsWriter:
    """``metrics.jsonl`` (one JSON record per call) and TensorBoard events, from process 0 only.

    Opening it for a run resumed at ``start_step`` drops the records of later steps, which the
    run is about to repeat.
    """

    def __init__(self, workdir: str, start_step: int):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.is_writer = jax.process_index() == 0
        self.tb = None
        if not self.is_writer:
            return
        self._truncate(start_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate(self, start_step: int) -> None:
        # A run stopped after its last checkpoint logged steps that the resumed run repeats.
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= start_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a partial line from a killed run
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.is_writer:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_number(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf
    return v


def summarise(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Means over a logging interval (last values for counters)."""
    host = jax.device_get(pending)  # a no-op for values already on the host
    out = {}
    for k in host[0]:
        values = np.asarray([m[k] for m in host], np.float64)
        out[k] = float(values[-1] if k in _LAST_VALUE else np.mean(values))
    return out


class IntervalLog:
    """The metrics of the steps since the last log, read from the device once per interval."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: list[dict[str, jax.Array]] = []
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)

    def flush(self) -> tuple[list[dict], dict[str, float]]:
        """``(per-step host metrics, the interval's record)``: the ``train/...`` summary and
        ``train/images_per_sec`` since the last flush."""
        now = time.perf_counter()
        host = jax.device_get(self.pending)  # the only device-to-host reads of the loop
        rate = len(self.pending) * self.batch_size / max(now - self.started, 1e-9)
        self.pending, self.started = [], now
        record = {f"train/{k}": v for k, v in summarise(host).items()}
        record["train/images_per_sec"] = rate
        return host, record


# --------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What an evaluation during training does; :mod:`jvdm.train` reads it from the config once.

    Attributes:
      dataset, split, data_dir: the eval split (``config.data``).
      batch_size: images per evaluation batch (``config.eval.batch_size``).
      num_samples, sample_steps, sampler: the sample grid (``config.eval``).
      use_quality: whether to score the samples in a dataset classifier's features.
    """

    dataset: str
    split: str
    data_dir: str | None
    batch_size: int
    num_samples: int
    sample_steps: int
    sampler: str
    use_quality: bool


def evaluate_and_save(spec: EvalSpec, state, workdir: str, step: int, *, draws: int, key) -> dict:
    """Eval-split bpd with the EMA parameters, a sample grid and the schedule plot."""
    from jvdm import evaluate, sampling, viz

    params = state.ema_params
    if jax.process_count() > 1:
        # Each process works on a local copy (evaluate_split gathers the per-image values itself).
        params = parallel.local_copy(params)
    key = jax.random.fold_in(key, step)
    k_eval, k_sample = jax.random.split(key)
    result = evaluate.evaluate_split(
        params,
        dataset=spec.dataset,
        split=spec.split,
        key=k_eval,
        draws=draws,
        batch_size=spec.batch_size,
        data_dir=spec.data_dir,
    )
    images = sampling.sample(
        params, k_sample, spec.num_samples, steps=spec.sample_steps, sampler=spec.sampler
    )
    paths = {
        "samples": os.path.join(workdir, f"samples_{step:07d}.png"),
        "gamma_plot": os.path.join(workdir, f"gamma_{step:07d}.png"),
    }
    if spec.use_quality:
        paths.update(_quality(images, dataset=spec.dataset, data_dir=spec.data_dir))
    if jax.process_index() == 0:
        viz.save_image_grid(images, paths["samples"])
        viz.plot_gamma(params, paths["gamma_plot"])
    return {**result, **paths}


def _quality(images, *, dataset: str, data_dir: str | None) -> dict:
    from jvdm import quality
    from jvdm.errors import JvdmUserError

    try:
        scores = quality.sample_quality(images, dataset=dataset, data_dir=data_dir)
    except JvdmUserError as err:  # e.g. a dataset without labels: training goes on
        return {"quality_skipped": str(err)}
    return {"quality": scores}


def eval_scalars(result: dict) -> dict[str, float]:
    """The scalars of an evaluation to log: the bound, and the sample scores if computed."""
    out = {f"eval/{k}": result[k] for k in ("bpd_mean", "bpd_sem")}
    scores = result.get("quality", {}).get("samples", {})
    out.update({f"quality/{k}": v for k, v in scores.items()})
    return out


def plot_curves(workdir: str) -> str:
    from jvdm import viz

    path = os.path.join(workdir, "bpd.png")
    if jax.process_index() == 0:
        viz.plot_metrics(os.path.join(workdir, METRICS_FILE), path)
    return path
