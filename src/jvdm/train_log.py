"""What a training run writes: metrics, TensorBoard events, evaluations and their pictures, and
the measurements of the loss estimate's variance.

All files go to the run's work directory and are written by process 0 only; every process takes
part in the computations (evaluation gathers across processes), except the measurement of the loss
variance, which process 0 makes alone on its own devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from jvdm import loss_variance, parallel, validate
from jvdm import model as model_lib
from jvdm.workdir import METRICS_FILE

__all__ = [
    "METRICS_FILE",
    "VARIANCE_PLOT",
    "EvalSpec",
    "IntervalLog",
    "MetricsWriter",
    "VarianceSpec",
    "eval_scalars",
    "evaluate_and_save",
    "log_variance",
    "measure",
    "measure_variance",
    "plot_curves",
    "summarise",
]

VARIANCE_PLOT = "loss_variance.png"

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
      sample_grid: the sampler's grid (``config.eval.sample_grid``; ``None``: its default).
      gaussian_steps: :func:`jvdm.sample`'s ``gaussian_steps`` (``config.eval.
        sample_gaussian_steps``), with the Gaussian of ``train_split`` (``config.data``).
      gaussian_components, gaussian_rank: that fit's (``config.eval.sample_gaussian_*``; 1 and
        0: one Gaussian; more: :func:`jvdm.fit_mixture`).
    """

    dataset: str
    split: str
    data_dir: str | None
    batch_size: int
    num_samples: int
    sample_steps: int
    sampler: str
    use_quality: bool
    sample_grid: str | None = None
    gaussian_steps: int = 0
    train_split: str = "train"
    gaussian_components: int = 1
    gaussian_rank: int = 0


def evaluate_and_save(spec: EvalSpec, state, workdir: str, step: int, *, draws: int, key) -> dict:
    """Eval-split bpd with the EMA parameters, a sample grid and the schedule plot.

    ``key`` is the run's evaluation key, the same at every step: two evaluations of one run (and
    the final ones of two runs with one seed) draw the same noise for each image and sample from
    the same latents, so their difference is the model's alone. (Folding the step in, as before,
    added about +-0.018 bpd of draw noise to every step-to-step difference of a 4-draw evaluation
    of the default.) ``step`` names the output files only.
    """
    from jvdm import evaluate, sampling, viz
    from jvdm import reference_denoisers as ref

    params = state.ema_params
    if jax.process_count() > 1:
        # Each process works on a local copy (evaluate_split gathers the per-image values itself).
        params = parallel.local_copy(params)
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
        params,
        k_sample,
        spec.num_samples,
        steps=spec.sample_steps,
        sampler=spec.sampler,
        grid=spec.sample_grid,
        gaussian_fit=(
            ref.fit_split(
                spec.dataset,
                spec.train_split,
                spec.data_dir,
                params.model.vocab_size,
                components=spec.gaussian_components,
                rank=spec.gaussian_rank,
            )
            if spec.gaussian_steps
            else None
        ),
        gaussian_steps=spec.gaussian_steps,
    )
    # Two pixel-level checks that a feature distance can miss: the share of exactly-zero pixels
    # (the data's backgrounds; 80% of mnist's pixels) and the model's own ELBO of its samples
    # (far above the test bpd when the sampled distribution is wider than the data's).
    own = evaluate.bpd(params, images, jax.random.fold_in(k_sample, 1))["bpd"]
    result = {
        **result,
        "samples_zero_share": float(np.mean(np.asarray(images) == 0)),
        "samples_bpd": float(np.mean(np.asarray(own))),
    }
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
    out.update(
        {f"eval/{k}": result[k] for k in ("samples_zero_share", "samples_bpd") if k in result}
    )
    scores = result.get("quality", {}).get("samples", {})
    out.update({f"quality/{k}": v for k, v in scores.items()})
    return out


def plot_curves(workdir: str) -> str:
    from jvdm import viz

    path = os.path.join(workdir, "bpd.png")
    if jax.process_index() == 0:
        viz.plot_metrics(os.path.join(workdir, METRICS_FILE), path)
    return path


# --------------------------------------------------------------------------------------------
# The variance of the diffusion-loss estimate.


@dataclasses.dataclass(frozen=True)
class VarianceSpec:
    """What a measurement of the loss variance during training does (``config.train``).

    Attributes:
      every: steps between measurements (``variance_every``; 0: none); one is also taken at the
        end of the run.
      num_images: the first ``variance_images`` images of the training split, the same every time.
      dataset, split, data_dir: the training split (``config.data``).
      grid: noise levels per image (``variance_grid``).
    """

    every: int
    num_images: int
    dataset: str
    split: str
    data_dir: str | None
    grid: int = loss_variance.DEFAULT_GRID


def _variance_images(spec: VarianceSpec) -> np.ndarray:
    from jvdm import data as data_lib

    loader = data_lib.make_eval_loader(
        spec.dataset, split=spec.split, batch_size=spec.num_images, data_dir=spec.data_dir
    )
    batch = loader.batch(0)
    return batch["image"][batch["mask"]]  # a split smaller than num_images: all of it


_points = jax.jit(loss_variance.points, static_argnames=("grid",))
_combine = jax.jit(loss_variance.combine, static_argnames=("objective",))


def _host_points(params, images: np.ndarray, key, *, grid: int, histogram=None):
    """:func:`jvdm.loss_variance.points` of host images on this process's devices, on the host.

    The examples are sharded over the local devices (padded to a multiple of their number, the
    padding dropped: each row's values do not depend on the others), the parameters, histogram
    and key replicated; :func:`jvdm.loss_variance.combine` then runs on the gathered values on one
    device. So the arithmetic is one device's, except that XLA may round a convolution differently
    at another per-device batch size (3e-6 relative, at most, on the tiny U-Net's variances).
    """
    validate.check_params(params, model_lib.VDMParams)
    n = images.shape[0]
    padded, sharding = parallel.local_batch_layout(n)
    if padded != n:
        images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])
    if sharding is None:
        place = jax.local_devices()[0]
    else:
        place = parallel.replicated_sharding(sharding.mesh)
        images = jax.device_put(images, sharding)
    params, histogram, key = jax.device_put((params, histogram, key), place)
    pts = jax.device_get(_points(params, images, key, grid=grid, histogram=histogram))
    return jax.tree.map(lambda v: v[:n], pts)


def _combined(pts, objective: bool = False):
    return jax.tree.map(np.asarray, jax.device_get(_combine(pts, objective=objective)))


def measure(params, images: np.ndarray, key, *, grid: int, histogram=None):
    """:func:`jvdm.loss_variance.per_example` of host images on this process's devices, as NumPy
    arrays (a :class:`jvdm.loss_variance.LossVariance`); see :func:`_host_points` for the
    layout."""
    return _combined(_host_points(params, images, key, grid=grid, histogram=histogram))


def variance_record(params, images: np.ndarray, key, *, grid: int, histogram=None):
    """``variance/<density>`` (bpd^2), the mean over ``images`` of the per-example variance of
    the ELBO's one-sample diffusion estimate, and ``variance/diffusion_bpd``, their mean diffusion
    term; for a model trained on a weighting also ``objective_variance/<density>`` and
    ``objective_variance/diffusion_bpd``, the same for the training objective's weighted term
    (what the learned schedule's interior is trained on), from the same evaluations."""
    pts = _host_points(params, images, key, grid=grid, histogram=histogram)
    results = {"variance": _combined(pts)}
    if params.model.weighting != "elbo":
        results["objective_variance"] = _combined(pts, objective=True)
    mean = lambda v: float(np.mean(np.asarray(v, np.float64)))
    out = {}
    for prefix, result in results.items():
        names = [k for k in loss_variance.DENSITIES if k in result.variance]
        out.update({f"{prefix}/{k}": mean(result.variance[k]) for k in names})
        out[f"{prefix}/diffusion_bpd"] = mean(result.diffusion_bpd)
    return out


def measure_variance(spec: VarianceSpec, params, histogram, key) -> dict[str, float]:
    """One measurement on this process's devices: the :func:`variance_record` of the spec's images
    (:mod:`jvdm.loss_variance`; ``adaptive`` with a ``histogram``). The trainer passes the run's
    variance key at every step, so that measurements at different steps, and those of two runs
    with one seed at the same step, use the same noise draws."""
    return variance_record(params, _variance_images(spec), key, grid=spec.grid, histogram=histogram)


def log_variance(spec: VarianceSpec, state, workdir: str, step: int, *, key, writer) -> str:
    """Measures with the EMA parameters (and the loss histogram, for a run that samples from it),
    logs the record and refreshes ``loss_variance.png``; returns the plot's path. Process 0 alone
    measures and writes: the measurement is local (no collectives), the others go on."""
    from jvdm import viz

    path = os.path.join(workdir, VARIANCE_PLOT)
    if jax.process_index() != 0:
        return path
    params = state.ema_params
    adaptive = params.model.noise_sampling == "adaptive"
    histogram = state.loss_histogram if adaptive else None
    if jax.process_count() > 1:
        params, histogram = parallel.local_copy((params, histogram))
    writer.write(step, measure_variance(spec, params, histogram, key))
    viz.plot_loss_variance(os.path.join(workdir, METRICS_FILE), path)
    return path
