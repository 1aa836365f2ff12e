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
  and the bpd curves at every evaluation;
* ``time_budget.json`` — the step count that ``train.time_budget_s`` chose
  (:mod:`jvdm.time_budget`);
* ``loss_variance.png`` — the variance of the diffusion-loss estimate under several densities of
  the noise level (``variance/...`` in the metrics; :mod:`jvdm.loss_variance`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jvdm import build, optimizer, parallel, time_budget, train_log, train_run, validate
from jvdm import config as config_lib
from jvdm import train_state as state_lib
from jvdm import workdir as workdir_lib
from jvdm.train_state import TrainState, create_train_state, train_step

__all__ = ["NonFiniteError", "TrainState", "create_train_state", "run_keys", "state_spec"]
__all__ += ["train_and_evaluate", "train_step"]


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive updates had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------
# Set-up checks.


def _check_image_shape(config, image_shape: tuple[int, ...]) -> None:
    """The dataset's images must fit the denoiser that the config describes."""
    validate.check_sides_divide(
        image_shape, config.model.channel_mult, f"dataset {config.data.name!r}"
    )


def _check_batch(batch: dict[str, np.ndarray], image_shape: tuple[int, ...], name: str) -> None:
    validate.check_images(batch["image"], image_shape, f"the images of dataset {name!r}")


def _check_streak(host_metrics: list[dict], done: int, limit: int, manager) -> None:
    """Raises :class:`NonFiniteError` if ``limit`` updates in a row were skipped in the steps that
    ``host_metrics`` cover (the last of which is step ``done - 1``), naming the first such run."""
    consecutive = [int(m["skipped_consecutive"]) for m in host_metrics]
    for j, k in enumerate(consecutive):
        if k >= limit:
            after = done - len(consecutive) + j + 1  # steps done when the limit was reached
            kept = manager.latest_step()
            raise NonFiniteError(
                f"{k} consecutive updates had a non-finite loss or gradient, or would have "
                f"reversed the noise schedule's end points (steps "
                f"{after - k}..{after - 1}), reaching config.train.max_consecutive_nonfinite="
                f"{limit}; stopped. The last good checkpoint is kept: "
                + (f"step {kept} in {manager.directory}" if kept is not None else "none saved")
            )


def _preflight(run: train_run.Run, state, batch, step: int) -> None:
    """Compiles the step (the loop's calls then reuse it), prints and logs its parameters, FLOPs
    and memory per device, and raises :class:`jvdm.preflight.StepMemoryError` if a device that
    reports its memory cannot hold it: before any training time is spent."""
    from jvdm import preflight

    accum = run.grad_accum_steps
    lowered = train_step.lower(state, batch, run.train_key, grad_accum_steps=accum)
    costs = preflight.step_costs(lowered.compile(), state.params)
    if jax.process_index() == 0:
        print(preflight.summary_line(costs), flush=True)
    run.writer.write(step, {f"setup/{k}": v for k, v in costs.items()})
    local = [d for d in run.mesh.devices.flat if d.process_index == jax.process_index()]
    preflight.check_fits(costs, local[0], grad_accum_steps=accum)


# --------------------------------------------------------------------------------------------
# The loop.


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The keys of a run, ``(init, train, eval, variance)``, all derived from
    ``config.train.seed`` (``fold_in(key(seed), i)``, ``i = 0..3``)."""
    root = jax.random.key(seed)
    return tuple(jax.random.fold_in(root, i) for i in range(4))


def state_spec(config) -> state_lib.StateSpec:
    """The static part of the training state of ``config``: its model, AdamW with the learning-rate
    schedule of ``config.optimizer`` over ``config.train.steps``, and the EMA decay."""
    o, g = config.optimizer, config.gamma
    tx, lr_schedule = optimizer.make_optimizer(
        learning_rate=float(o.learning_rate),
        warmup_steps=int(o.warmup_steps),
        total_steps=int(config.train.steps),
        decay=str(o.decay),
        final_lr_fraction=float(o.final_lr_fraction),
        b1=float(o.b1),
        b2=float(o.b2),
        eps=float(o.eps),
        weight_decay=float(o.weight_decay),
        grad_clip=float(o.grad_clip),
        schedule_lr_scales=(float(g.endpoint_lr_scale), float(g.interior_lr_scale)),
    )
    return state_lib.StateSpec(build.from_config(config), tx, lr_schedule, float(o.ema_decay))


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

    t = config.train
    spec = state_spec(config)
    # Traces the model's init (no compute): a config the denoiser rejects fails here, at once.
    abstract = state_lib.abstract_train_state(spec, mesh)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    workdir_lib.check_free_space(workdir, nbytes, keep=t.keep_checkpoints)
    manager = ckpt.make_manager(workdir, keep=t.keep_checkpoints, cleanup_tmp=True)
    writer = None
    try:
        init_key, train_key, eval_key, variance_key = run_keys(t.seed)  # the only derivation

        def fresh():  # the Gaussian base's fit (cached) only when a state is initialised
            return create_train_state(
                spec, init_key, mesh=mesh, gaussian_fit=build.gaussian_fit(config)
            )

        start, state = _resume_or_init(config, workdir, manager, abstract, fresh, is_main)
        loader = _make_loader(config, mesh, start)
        train_key = parallel.replicate(train_key, mesh)
        budget_step_s = 0.0
        if t.time_budget_s > 0:  # decides (or reads back) train.steps; config is a copy after
            step_fn = functools.partial(train_step, grad_accum_steps=int(t.grad_accum_steps))
            config, state, decision = time_budget.resolve(
                config,
                workdir,
                state,
                start,
                step_fn,
                fresh,
                loader.batch(0),
                train_key,
                mesh,
                respec=state_spec,
            )
            budget_step_s = decision.seconds_per_step
        writer = train_log.MetricsWriter(workdir, start)
        run = train_run.Run(
            workdir=workdir,
            mesh=mesh,
            manager=manager,
            writer=writer,
            train_key=train_key,
            eval_key=eval_key,
            variance_key=variance_key,
            step_callback=step_callback,
            image_shape=tuple(abstract.params.model.image_shape),
            budget_step_s=budget_step_s,
            **train_run.loop_settings(config),
        )
        state, done, stopped, logged, pace = _loop(run, state, loader, start)
        manager.wait_until_finished()
        summary = train_run.summary(run, state, done, stopped, logged)
        if pace:
            summary["time_budget_pace"] = pace
        if stopped or not t.use_final_eval:
            if is_main and stopped:
                print(f"stopped by a signal at step {done}; checkpoint {summary['checkpoint']}")
            return summary
        final, metrics_plot = _evaluate(run, state, done, draws=config.eval.final_draws)
        summary.update(final, metrics_plot=metrics_plot)
        if is_main:
            train_run.print_final(summary, config.data.eval_split)
        return summary
    finally:
        if writer is not None:
            writer.close()
        ckpt.close(manager)


def _resume_or_init(config, workdir, manager, abstract, fresh: Callable[[], TrainState], is_main):
    """``(start, state)``: the newest checkpoint that verifies (corrupt or unverified newer ones
    are set aside), or ``fresh()`` at step 0; then the config is saved next to it."""
    from jvdm import checkpoint as ckpt
    from jvdm import run_config

    # Only a run that has a checkpoint to resume is bound to its saved config.
    has_checkpoint = manager.latest_step() is not None
    changed = run_config.check_config(config, workdir) if has_checkpoint else {}
    start, state = ckpt.restore_latest(manager, abstract)
    if start is None:
        start, state = 0, fresh()
    elif is_main:
        notes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        print(f"resuming {workdir} from step {start}" + (f" ({notes})" if notes else ""))
    run_config.save_config(config, workdir)
    return start, state


def _make_loader(config, mesh: Mesh, start: int):
    """This process's rows of every global batch, from step ``start`` on (the resumable order)."""
    from jvdm import data as data_lib

    processes = sorted({d.process_index for d in mesh.devices.flat})
    return data_lib.make_train_loader(
        config.data.name,
        split=config.data.train_split,
        global_batch_size=config.train.batch_size,
        seed=config.train.seed,
        start_step=start,
        process_index=processes.index(jax.process_index()),
        process_count=len(processes),
        random_flip=config.data.random_flip,
        data_dir=config.data.data_dir,
    )


# --------------------------------------------------------------------------------------------
# The loop.


def _log(run: train_run.Run, log: train_log.IntervalLog, done: int, bar) -> dict[str, float]:
    host, record = log.flush()
    run.writer.write(done, record)
    bpd, rate = record["train/bpd"], record["train/images_per_sec"]
    bar.set_postfix(bpd=f"{bpd:.4f}", img_s=f"{rate:.0f}", refresh=False)
    _check_streak(host, done, run.max_consecutive_nonfinite, run.manager)
    return record


def _evaluate(run: train_run.Run, state, step: int, *, draws: int) -> tuple[dict, str]:
    """Evaluates and logs at ``step``; returns the result and the refreshed bpd curves' path."""
    result = train_log.evaluate_and_save(
        run.eval_spec, state, run.workdir, step, draws=draws, key=run.eval_key
    )
    run.writer.write(step, train_log.eval_scalars(result))
    return result, train_log.plot_curves(run.workdir)


def _loop(run: train_run.Run, state: TrainState, loader, start: int):
    """Steps from ``start`` to ``run.steps``; returns (state, done, stopped, last log record, the
    time budget's pace note or None)."""
    from jvdm import checkpoint as ckpt

    flag, save, log = (
        train_run.StopFlag(),
        train_run.Saver(run, start),
        train_log.IntervalLog(run.batch_size),
    )
    logged: dict[str, float] = {}
    done, stopped, pace, pace_due = start, False, None, bool(run.budget_step_s)
    batches = iter(loader)
    with train_run.stop_on_signals(flag), train_run.progress(run, start) as bar:
        while done < run.steps:
            local = next(batches)
            if done == start:
                _check_batch(local, run.image_shape, run.dataset)
            batch = {"image": parallel.shard_batch(local["image"], run.mesh)}
            if done == start:  # compiles the step: its costs are known before it first runs
                _preflight(run, state, batch, start)
            # The step must not move data implicitly: state, batch and key are already on the mesh.
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(
                    state, batch, run.train_key, grad_accum_steps=run.grad_accum_steps
                )
            done += 1
            log.add(metrics)
            bar.update(1)
            ckpt.poll(run.manager)  # checksums a finished save; raises if it failed
            if run.step_callback is not None:
                run.step_callback(done, state)
            at_log = train_run.every(run.log_every, done, run.steps)
            if at_log:
                logged = _log(run, log, done, bar)
                if pace_due and done - start >= 2 * run.log_every:  # an interval past the compile
                    pace, pace_due = _pace(run, logged, done, bar), False
            if train_run.should_stop(flag, at_log):
                stopped = True
                save(done, state)
                break
            if train_run.every(run.checkpoint_every, done, run.steps):
                save(done, state)
            if train_run.every(run.eval_every, done) and done < run.steps:
                _evaluate(run, state, done, draws=run.eval_draws)
            v = run.variance_spec
            if v.every and train_run.every(v.every, done, run.steps):
                train_log.log_variance(
                    v, state, run.workdir, done, key=run.variance_key, writer=run.writer
                )
    return state, done, stopped, logged, pace


def _pace(run: train_run.Run, logged: dict, done: int, bar) -> str | None:
    loop_s = run.batch_size / logged["train/images_per_sec"]
    note = time_budget.pace_note(run.budget_step_s, loop_s, run.steps - done)
    if note and jax.process_index() == 0:
        bar.write(note, file=sys.stderr)
    return note
