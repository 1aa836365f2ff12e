"""The host side of a training run: the run object, the checkpoint cadence, signals, progress.

:mod:`jvdm.train` reads the config once and builds a :class:`Run`; its loop then needs nothing
else. Everything here runs on the host; the state changes only through the compiled train step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jvdm import train_log
from jvdm.train_state import TrainState

__all__ = ["Run", "Saver", "StopFlag", "every", "loop_settings", "progress", "should_stop"]
__all__ += ["print_final", "stop_on_signals", "summary"]


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run as the loop sees it: plain values that :mod:`jvdm.train` read from the
    config once, and what the run holds (mesh, checkpoint manager, metrics writer, keys)."""

    workdir: str
    mesh: Mesh
    manager: Any  # the checkpoint manager (jvdm.checkpoint.make_manager)
    writer: train_log.MetricsWriter
    train_key: jax.Array  # replicated on the mesh; each step folds in its number
    eval_key: jax.Array  # the same at every evaluation: they differ only by the model
    variance_key: jax.Array  # likewise for every measurement of the loss variance
    step_callback: Callable[[int, TrainState], None] | None
    image_shape: tuple[int, ...]
    steps: int
    batch_size: int
    grad_accum_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    max_consecutive_nonfinite: int
    eval_draws: int
    dataset: str
    budget_step_s: float  # the time budget's measured step time (0: no budget)
    eval_spec: train_log.EvalSpec
    variance_spec: train_log.VarianceSpec


def loop_settings(config) -> dict[str, Any]:
    """The plain values of ``config`` that the loop and its evaluations use (read once, here)."""
    t, e, d = config.train, config.eval, config.data
    return dict(
        steps=int(t.steps),
        batch_size=int(t.batch_size),
        grad_accum_steps=int(t.grad_accum_steps),
        log_every=int(t.log_every),
        checkpoint_every=int(t.checkpoint_every),
        eval_every=int(t.eval_every),
        max_consecutive_nonfinite=int(t.max_consecutive_nonfinite),
        eval_draws=int(e.draws),
        dataset=str(d.name),
        eval_spec=train_log.EvalSpec(
            dataset=d.name,
            split=d.eval_split,
            data_dir=d.data_dir,
            batch_size=int(e.batch_size),
            num_samples=int(e.num_samples),
            sample_steps=int(e.sample_steps),
            sampler=str(e.sampler),
            use_quality=bool(e.use_quality),
            sample_grid=e.sample_grid,
            gaussian_steps=int(e.sample_gaussian_steps),
            gaussian_components=int(e.sample_gaussian_components),
            gaussian_rank=int(e.sample_gaussian_rank),
            train_split=str(d.train_split),
        ),
        variance_spec=train_log.VarianceSpec(
            every=int(t.variance_every),
            num_images=int(t.variance_images),
            dataset=d.name,
            split=d.train_split,
            data_dir=d.data_dir,
            grid=int(t.variance_grid),
        ),
    )


def every(n: int, done: int, last: int | None = None) -> bool:
    """Whether ``done`` steps are due for something done every ``n`` steps (and at ``last``)."""
    return done % n == 0 or done == last


class Saver:
    """Checkpoints the state, never twice for one step and never inside a run of skipped updates."""

    def __init__(self, run: Run, start: int):
        self.run, self.last_saved = run, start

    def __call__(self, step: int, state: TrainState) -> None:
        from jvdm import checkpoint as ckpt

        if step == self.last_saved:
            return
        # The checkpoints that are kept (max_to_keep) must stay ones taken before a run of
        # skipped updates. One scalar read per save. The last step is always saved: a skipped
        # step leaves the parameters of the last good one.
        if step != self.run.steps and int(jax.device_get(state.skipped_consecutive)) > 0:
            return
        ckpt.save(self.run.manager, step, state)
        self.last_saved = step


class StopFlag:
    """A signal handler that records the first SIGTERM/SIGINT; a second SIGINT interrupts."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers need the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, flag)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _all_agree(flag: bool) -> bool:
    """Whether any process has ``flag`` set (every process must call this at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def should_stop(flag: StopFlag, at_log: bool) -> bool:
    # Signals are checked every step on one process; across processes at log steps only, where
    # all processes agree to stop at the same step.
    stop = flag.signum is not None
    if jax.process_count() > 1:
        stop = at_log and _all_agree(stop)
    return stop


def progress(run: Run, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=run.steps,
        initial=start,
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=1.0,
        file=sys.stderr,
    )


def summary(run: Run, state, done: int, stopped: bool, logged: dict) -> dict[str, Any]:
    """The run's summary before its final evaluation: the steps done, whether it stopped early,
    the updates skipped, the last logged train bpd, and where its newest checkpoint is."""
    from jvdm import checkpoint as ckpt

    latest = run.manager.latest_step()
    path = None if latest is None else os.path.join(run.workdir, ckpt.CHECKPOINT_DIR, str(latest))
    return {
        "step": done,
        "stopped_early": stopped,
        "skipped_total": int(jax.device_get(state.skipped_total)),
        "train_bpd": logged.get("train/bpd", float("nan")),
        "workdir": run.workdir,
        "checkpoint": path,
    }


def print_final(summary: dict[str, Any], split: str) -> None:
    """The final evaluation's lines: the bound, the files written and the sample-quality table."""
    print(
        f"final {split} bpd: {summary['bpd_mean']:.4f} ± {summary['bpd_sem']:.4f} (standard "
        f"error over {summary['num_images']} images, {summary['draws']} noise draws each)\n"
        f"  samples:    {summary['samples']}\n  gamma(t):   {summary['gamma_plot']}\n"
        f"  bpd curves: {summary['metrics_plot']}\n  checkpoint: {summary['checkpoint']}"
    )
    if "quality" in summary:
        from jvdm import quality

        print("sample quality in the dataset classifier's features, against the test split:")
        print(quality.format_table(summary["quality"]))
