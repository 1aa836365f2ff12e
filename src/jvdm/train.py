"""The training loop: resume, step, log, checkpoint, evaluate, on one CPU or a pod.

The host loop only feeds batches and reads numbers back at logging intervals; everything that
changes lives in :class:`TrainState` and changes only through the compiled
:func:`train_step` (see :mod:`jvdm.train_state`).

A work directory, written by :func:`train_and_evaluate` (a run resumes from it when it is reused):

* ``config.json`` — the config (a resumed run must not change the architecture);
* ``checkpoints/<step>/`` — orbax checkpoints of the whole state;
* ``metrics.jsonl`` — one JSON record per logging interval (``train/...``) and evaluation
  (``eval/...``), and ``tensorboard/`` — the same as TensorBoard events;
* ``samples_<step>.png``, ``gamma_<step>.png``, ``bpd.png`` — sample grids, the learned schedule
  and the bpd curves at every evaluation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jvdm import config as config_lib
from jvdm import model as model_lib
from jvdm import parallel, train_log, validate
from jvdm import train_state as state_lib
from jvdm import workdir as workdir_lib
from jvdm.train_state import TrainState, create_train_state, train_step

__all__ = [
    "NonFiniteError",
    "TrainState",
    "create_train_state",
    "run_keys",
    "train_and_evaluate",
    "train_step",
]


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive updates had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------
# Set-up checks.


def _check_image_shape(config, image_shape: tuple[int, ...]) -> None:
    """The dataset's images must fit the denoiser that the config describes."""
    validate.check_sides_divide(
        image_shape, config.model.channel_mult, f"dataset {config.data.name!r}"
    )


def _check_batch(batch: dict[str, np.ndarray], model: model_lib.VDM, name: str) -> None:
    validate.check_images(batch["image"], model.image_shape, f"the images of dataset {name!r}")


def _check_streak(host_metrics: list[dict], done: int, limit: int, manager) -> None:
    """Raises :class:`NonFiniteError` if ``limit`` updates in a row were skipped in the steps that
    ``host_metrics`` cover (the last of which is step ``done - 1``), naming the first such run."""
    consecutive = [int(m["skipped_consecutive"]) for m in host_metrics]
    for j, k in enumerate(consecutive):
        if k >= limit:
            after = done - len(consecutive) + j + 1  # steps done when the limit was reached
            kept = manager.latest_step()
            raise NonFiniteError(
                f"{k} consecutive updates had a non-finite loss or gradient (steps "
                f"{after - k}..{after - 1}), reaching config.train.max_consecutive_nonfinite="
                f"{limit}; stopped. The last good checkpoint is kept: "
                + (f"step {kept} in {manager.directory}" if kept is not None else "none saved")
            )


def _preflight(state, batch, train_key, grad_accum_steps, writer, step, mesh) -> None:
    """Compiles the step (the loop's calls then reuse it), prints and logs its parameters, FLOPs
    and memory per device, and raises :class:`jvdm.preflight.StepMemoryError` if a device that
    reports its memory cannot hold it: before any training time is spent."""
    from jvdm import preflight

    lowered = train_step.lower(state, batch, train_key, grad_accum_steps=grad_accum_steps)
    costs = preflight.step_costs(lowered.compile(), state.params)
    if jax.process_index() == 0:
        print(preflight.summary_line(costs), flush=True)
    writer.write(step, {f"setup/{k}": v for k, v in costs.items()})
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    preflight.check_fits(costs, local[0], grad_accum_steps=grad_accum_steps)


# --------------------------------------------------------------------------------------------
# Stopping on a signal.


class _StopFlag:
    """A signal handler that records the first SIGTERM/SIGINT; a second SIGINT interrupts."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals(flag: _StopFlag) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# The loop.


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys of a run, ``(init, train, eval)``, all derived from ``config.train.seed``."""
    root = jax.random.key(seed)
    k_init, k_train, k_eval = (jax.random.fold_in(root, i) for i in range(3))
    return k_init, k_train, k_eval


def train_and_evaluate(
    config,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    step_callback: Callable[[int, TrainState], None] | None = None,
) -> dict[str, Any]:
    """Trains (or resumes training) the model of ``config``, writing everything to ``workdir``.

    Resumes from the latest checkpoint in ``workdir`` if there is one (its config must describe the
    same model), with the data order continuing where it stopped. Saves a checkpoint every
    ``config.train.checkpoint_every`` steps, at the end, and on SIGTERM/SIGINT (after which it
    returns with ``stopped_early=True``). Evaluates every ``config.train.eval_every`` steps and at
    the end (``config.eval.final_draws`` noise draws per image of the whole eval split).

    Args:
      config: an experiment config (:mod:`jvdm.config`).
      workdir: the run's directory; a stable path, reused to resume.
      mesh: the device mesh (default: every device of every process,
        :func:`jvdm.parallel.make_mesh`).
      step_callback: called on the host as ``step_callback(step, state)`` after each step is
        dispatched (``step`` = steps done). The next step donates ``state``: read what you need
        (which waits for the device) rather than keeping it.

    Returns:
      ``step`` (steps done), ``stopped_early``, ``skipped_total``, the last logged ``train_bpd``,
      and, after the final evaluation, ``bpd_mean``, ``bpd_sem``, ``recon_bpd``, ``prior_bpd``,
      ``diffusion_bpd``, ``num_images``, ``draws`` and the paths ``samples``, ``gamma_plot``,
      ``metrics_plot``, ``checkpoint`` and ``workdir``.

    Raises:
      ValueError: a bad config, a batch size that does not divide among the devices, images that
        do not fit the model, or a config that changes the model of an existing run.
      jvdm.workdir.WorkdirError (a ValueError): ``workdir`` is not writable, has no room for a
        checkpoint, or another run holds it (naming that run's PID).
      NonFiniteError: ``config.train.max_consecutive_nonfinite`` updates in a row were skipped.
      jvdm.checkpoint.CheckpointSaveError: a checkpoint could not be written (a full disk); the
        older checkpoints are intact and the run resumes from them.
    """
    # Local imports: orbax and tfds load only when training, not on `import jvdm`.
    from jvdm import data as data_lib

    config = config_lib.validate(config)
    t = config.train
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(t.batch_size, mesh, grad_accum_steps=t.grad_accum_steps)
    workdir = os.path.abspath(workdir)
    workdir_lib.check_writable(workdir)  # before anything slow: a bad path fails in a second
    image_shape, _ = data_lib.dataset_info(config.data.name, data_dir=config.data.data_dir)
    _check_image_shape(config, image_shape)
    is_main = jax.process_index() == 0
    # One trainer per work directory, for the life of the run (process 0 holds it for all).
    with workdir_lib.lock(workdir) if is_main else contextlib.nullcontext():
        return _train(config, workdir, mesh, step_callback, is_main)


def _train(config, workdir, mesh, step_callback, is_main) -> dict[str, Any]:
    from jvdm import checkpoint as ckpt
    from jvdm import run_config

    t = config.train
    # Traces the model's init (no compute): a config the denoiser rejects fails here, at once.
    abstract = state_lib.abstract_train_state(config, mesh)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    workdir_lib.check_free_space(workdir, nbytes, keep=t.keep_checkpoints)
    manager = ckpt.make_manager(workdir, keep=t.keep_checkpoints, cleanup_tmp=True)
    writer = None
    try:
        # Only a run that has a checkpoint to resume is bound to its saved config.
        has_checkpoint = manager.latest_step() is not None
        changed = run_config.check_config(config, workdir) if has_checkpoint else {}
        model = abstract.params.model
        init_key, train_key, eval_key = run_keys(t.seed)
        # The newest checkpoint that verifies; corrupt or unverified newer ones are set aside.
        start, state = ckpt.restore_latest(manager, abstract)
        if start is None:
            start = 0
            state = create_train_state(config, init_key, mesh=mesh)
        else:
            if is_main:
                notes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                print(f"resuming {workdir} from step {start}" + (f" ({notes})" if notes else ""))
        run_config.save_config(config, workdir)
        train_key = parallel.replicate(train_key, mesh)
        writer = train_log.MetricsWriter(workdir, start)
        result = _loop(
            config, state, mesh, manager, writer, workdir, start, model, train_key, step_callback
        )
        state, done, stopped, last_logged = result
        manager.wait_until_finished()
        latest = manager.latest_step()
        summary: dict[str, Any] = {
            "step": done,
            "stopped_early": stopped,
            "skipped_total": int(jax.device_get(state.skipped_total)),
            "train_bpd": last_logged.get("train/bpd", float("nan")),
            "workdir": workdir,
            "checkpoint": (
                None if latest is None else os.path.join(workdir, ckpt.CHECKPOINT_DIR, str(latest))
            ),
        }
        if stopped or not t.use_final_eval:
            if is_main and stopped:
                print(f"stopped by a signal at step {done}; checkpoint {summary['checkpoint']}")
            return summary
        final = train_log.evaluate_and_save(
            config, state, workdir, done, draws=config.eval.final_draws, key=eval_key
        )
        writer.write(done, train_log.eval_scalars(final))
        summary.update(final, metrics_plot=train_log.plot_curves(workdir))
        if is_main:
            print(
                f"final {config.data.eval_split} bpd: {final['bpd_mean']:.4f} ± "
                f"{final['bpd_sem']:.4f} (standard error over {final['num_images']} images, "
                f"{final['draws']} noise draws each)\n"
                f"  samples:    {final['samples']}\n  gamma(t):   {final['gamma_plot']}\n"
                f"  bpd curves: {summary['metrics_plot']}\n  checkpoint: {summary['checkpoint']}"
            )
            if "quality" in final:
                from jvdm import quality

                print(
                    "sample quality in the dataset classifier's features, against the test split:"
                )
                print(quality.format_table(final["quality"]))
        return summary
    finally:
        if writer is not None:
            writer.close()
        ckpt.close(manager)


def _loop(config, state, mesh, manager, writer, workdir, start, model, train_key, step_callback):
    """Steps from ``start`` to ``config.train.steps``; returns (state, done, stopped, last log)."""
    from tqdm.auto import tqdm

    from jvdm import checkpoint as ckpt
    from jvdm import data as data_lib

    t = config.train
    processes = sorted({d.process_index for d in mesh.devices.flat})
    loader = data_lib.make_train_loader(
        config.data.name,
        split=config.data.train_split,
        global_batch_size=t.batch_size,
        seed=t.seed,
        start_step=start,
        process_index=processes.index(jax.process_index()),
        process_count=len(processes),
        random_flip=config.data.random_flip,
        data_dir=config.data.data_dir,
    )
    eval_key = run_keys(t.seed)[2]
    flag = _StopFlag()
    last_saved = start
    pending: list[dict[str, jax.Array]] = []
    logged: dict[str, float] = {}
    done = start
    stopped = False
    t_log, n_log = time.perf_counter(), 0

    def save(step: int) -> None:
        nonlocal last_saved
        if step == last_saved:
            return
        # Never save in the middle of a run of skipped updates: the checkpoints that are kept
        # (max_to_keep) must stay ones taken before it. One scalar read per save. The last step
        # is always saved: a skipped step leaves the parameters of the last good one.
        if step != t.steps and int(jax.device_get(state.skipped_consecutive)) > 0:
            return
        ckpt.save(manager, step, state)
        last_saved = step

    bar = tqdm(
        total=t.steps,
        initial=start,
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=1.0,
        file=sys.stderr,
    )
    batches = iter(loader)
    with _stop_on_signals(flag), bar:
        while done < t.steps:
            local = next(batches)
            if done == start:
                _check_batch(local, model, config.data.name)
            batch = {"image": parallel.shard_batch(local["image"], mesh)}
            if done == start:  # compiles the step: its costs are known before it first runs
                _preflight(state, batch, train_key, t.grad_accum_steps, writer, start, mesh)
            # The step must not move data implicitly: state, batch and key are already on the mesh.
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(
                    state, batch, train_key, grad_accum_steps=t.grad_accum_steps
                )
            done += 1
            pending.append(metrics)
            n_log += 1
            bar.update(1)
            ckpt.poll(manager)  # checksums a finished save; raises if it failed
            if step_callback is not None:
                step_callback(done, state)

            at_log = done % t.log_every == 0 or done == t.steps
            if at_log:
                now = time.perf_counter()
                host = jax.device_get(pending)  # the only device-to-host reads of the loop
                pending.clear()
                summary = train_log.summarise(host)
                rate = n_log * t.batch_size / max(now - t_log, 1e-9)
                t_log, n_log = now, 0
                logged = {f"train/{k}": v for k, v in summary.items()}
                logged["train/images_per_sec"] = rate
                writer.write(done, logged)
                bar.set_postfix(bpd=f"{summary['bpd']:.4f}", img_s=f"{rate:.0f}", refresh=False)
                _check_streak(host, done, t.max_consecutive_nonfinite, manager)
            # Signals are checked every step on one process; across processes at log steps only,
            # where all processes agree to stop at the same step.
            stop = flag.signum is not None
            if jax.process_count() > 1:
                stop = at_log and _all_agree(stop)
            if stop:
                stopped = True
                save(done)
                break
            if done % t.checkpoint_every == 0 or done == t.steps:
                save(done)
            if done % t.eval_every == 0 and done < t.steps:
                draws = config.eval.draws
                result = train_log.evaluate_and_save(
                    config, state, workdir, done, draws=draws, key=eval_key
                )
                writer.write(done, train_log.eval_scalars(result))
                train_log.plot_curves(workdir)
    return state, done, stopped, logged
