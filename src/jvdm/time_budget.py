"""Training for a time budget rather than a step count (``config.train.time_budget_s``).

The learning-rate schedule decays over the run's steps, so they must be known before the first
update. With a budget, a fresh run first times its own compiled train step on a scratch copy of
its initial state, on its first real batch, and decides the step count once:

    steps = min(train.steps, floor(time_budget_s / seconds_per_step / ROUND) * ROUND)

``train.steps`` is then the cap (a fast machine does not train for ever), and the budget covers
the steps' compute only: the loop's logging, checkpoints and variance records come on top, as do
the compile and the timed scratch steps. The decision is written to ``time_budget.json`` in the
work directory before the first update and read back when the run resumes, so an interrupted run
finishes on the schedule it began with. The run is then the same as one started with
``train.time_budget_s=0 train.steps=<steps>`` (tested): the budget only chooses the step count.
With several processes, every process times its own steps and all take the slowest.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from jvdm import parallel
from jvdm.errors import JvdmUserError
from jvdm.workdir import BUDGET_FILE, write_json

__all__ = ["BUDGET_FILE", "ROUND", "Decision", "decide", "decide_steps", "load", "measure"]
__all__ += ["resolve", "save"]

ROUND = 100  # the step count is a multiple of this: logs and checkpoints fall on round steps
_WARM_CALLS = 2  # untimed calls before timing: the first compiles, the second settles caches
BLOCKS, PER_BLOCK = 4, 8  # timed steps: the median of 4 blocks' means, 8 steps each


@dataclasses.dataclass(frozen=True)
class Decision:
    """The step count a time budget chose, and the measurement it came from.

    Attributes:
      steps: the run's step count.
      budget_s: ``train.time_budget_s`` when it was decided.
      cap: ``train.steps`` when it was decided (the most steps).
      seconds_per_step: the slowest process's measured time of one step.
      timed_steps: how many steps were timed (after the warm calls).
      compile_s: the first call's time (mostly the compile), on process 0.
      decided_at: UTC time of the decision, ISO 8601.
      block_means: process 0's seconds a step in each timed block (their spread is the noise).
    """

    steps: int
    budget_s: float
    cap: int
    seconds_per_step: float
    timed_steps: int
    compile_s: float
    decided_at: str
    block_means: tuple[float, ...] = ()

    def summary(self) -> str:
        return (
            f"time budget {self.budget_s:g} s at {self.seconds_per_step:.4f} s a step "
            f"(median of {len(self.block_means) or 1} blocks, {self.timed_steps} timed steps, "
            f"after a {self.compile_s:.1f}-s compile): "
            f"{self.steps:,} steps (cap {self.cap:,}); the same run again: "
            f"train.time_budget_s=0 train.steps={self.steps}"
        )


def decide_steps(budget_s: float, seconds_per_step: float, *, cap: int, minimum: int) -> int:
    """The most steps, a multiple of :data:`ROUND` and at most ``cap``, that fit in ``budget_s``.

    Raises:
      JvdmUserError: fewer than ``minimum`` steps fit (the warm-up's), naming what to change.
    """
    if not (budget_s > 0 and seconds_per_step > 0 and math.isfinite(seconds_per_step)):
        raise ValueError(
            f"need a positive budget and step time, got {budget_s=}, {seconds_per_step=}"
        )
    fit = int(budget_s / seconds_per_step // ROUND) * ROUND
    steps = min(cap, fit)
    if steps < max(minimum, 1):
        raise JvdmUserError(
            f"train.time_budget_s={budget_s:g} fits {int(budget_s / seconds_per_step)} steps at "
            f"the measured {seconds_per_step:.4f} s a step, {fit} in whole hundreds, and the run "
            f"needs at least {max(minimum, 1)} (optimizer.warmup_steps + 1): raise "
            "train.time_budget_s, or set it to 0 and choose train.steps"
        )
    return steps


def _slowest(seconds: float) -> float:
    """The largest of every process's ``seconds`` (all processes must call this)."""
    if jax.process_count() == 1:
        return seconds
    from jax.experimental import multihost_utils

    return float(np.max(multihost_utils.process_allgather(np.asarray(seconds, np.float64))))


def measure(step_fn, make_state, batch, key, *, blocks: int = 4, per_block: int = 8):
    """``(compile_s, seconds_per_step, block_means)`` of a step function
    ``step_fn(state, batch, key) -> (state, metrics)``.

    ``make_state()`` gives a scratch state (donated and discarded: never the run's own). After
    :data:`_WARM_CALLS` untimed calls, ``blocks`` blocks of ``per_block`` steps are timed, each
    ended by waiting for the result; ``seconds_per_step`` is the median of the blocks' means (a
    block slowed by something else on the machine does not move it), the slowest process's;
    ``block_means`` are this process's.
    """
    state = make_state()
    compile_s = 0.0
    for i in range(_WARM_CALLS):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch, key)
        jax.block_until_ready(metrics)
        if i == 0:
            compile_s = time.perf_counter() - start
    means = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            state, metrics = step_fn(state, batch, key)
        jax.block_until_ready((state, metrics))
        means.append((time.perf_counter() - start) / per_block)
    del state
    return compile_s, _slowest(float(np.median(means))), tuple(means)


def decide(config, step_fn, make_state, local_batch: dict[str, np.ndarray], key, mesh) -> Decision:
    """Times ``step_fn`` on a scratch state and ``local_batch`` (this process's rows), then
    decides the step count for ``config.train.time_budget_s``."""
    batch = {"image": parallel.shard_batch(local_batch["image"], mesh)}
    compile_s, per_step, means = measure(
        step_fn, make_state, batch, key, blocks=BLOCKS, per_block=PER_BLOCK
    )
    t = config.train
    steps = decide_steps(
        float(t.time_budget_s),
        per_step,
        cap=int(t.steps),
        minimum=int(config.optimizer.warmup_steps) + 1,
    )
    return Decision(
        steps=steps,
        budget_s=float(t.time_budget_s),
        cap=int(t.steps),
        seconds_per_step=per_step,
        timed_steps=BLOCKS * PER_BLOCK,
        block_means=means,
        compile_s=compile_s,
        decided_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


PACE_TOLERANCE = 0.10  # the loop's step time may differ from the decision's by this much, silently


def pace_note(decided_s: float, loop_s: float, steps_left: int) -> str | None:
    """One line when the loop's step time ``loop_s`` differs from the ``decided_s`` the step count
    was chosen at by more than :data:`PACE_TOLERANCE` (a machine busier or calmer than while it
    was measured); ``None`` otherwise. The decision stands: the line says what it now costs."""
    change = loop_s / decided_s - 1.0
    if not math.isfinite(change) or abs(change) <= PACE_TOLERANCE:
        return None
    return (
        f"time budget: the loop runs at {loop_s:.4f} s a step, {change:+.0%} against the "
        f"{decided_s:.4f} s its {BUDGET_FILE} was decided at; the remaining {steps_left:,} steps "
        f"will take about {steps_left * loop_s:.0f} s (train.time_budget_s=0 train.steps=N "
        "sets the count yourself)"
    )


def save(decision: Decision, workdir: str) -> str:
    """Writes ``workdir/time_budget.json`` atomically (process 0 only); returns its path."""
    path = os.path.join(workdir, BUDGET_FILE)
    if jax.process_index() == 0:
        write_json(path, dataclasses.asdict(decision))
    return path


def load(workdir: str) -> Decision:
    """The decision of the run in ``workdir``, for resuming it.

    Raises:
      JvdmUserError: there is none (the run was started without a budget) or it does not parse.
    """
    path = os.path.join(workdir, BUDGET_FILE)
    try:
        with open(path) as f:
            fields: dict[str, Any] = json.load(f)
        fields["block_means"] = tuple(fields.get("block_means", ()))
        decision = Decision(**fields)
    except FileNotFoundError:
        raise JvdmUserError(
            f"{workdir!r} holds a run that was started without a time budget, so it has no "
            f"{BUDGET_FILE} to resume with; resume it with train.time_budget_s=0 (and its "
            "train.steps), or start the budgeted run in a new --workdir"
        ) from None
    except (OSError, ValueError, TypeError) as err:
        raise JvdmUserError(
            f"{path} is unreadable ({err}); restore it, or resume with train.time_budget_s=0 "
            "and the train.steps it recorded"
        ) from None
    if not (isinstance(decision.steps, int) and decision.steps > 0):
        raise JvdmUserError(f"{path} records steps={decision.steps!r}; expected a positive int")
    return decision


def resolve(config, workdir, state, start, step_fn, scratch, local_batch, key, mesh, *, respec):
    """``(config, state, decision)`` with ``train.steps`` set by ``config.train.time_budget_s``.

    A fresh run (``start == 0``) times ``step_fn`` on a ``scratch()`` state and ``local_batch``
    and saves the :class:`Decision`; a resumed one reads it back. The returned config is a copy
    with ``train.steps`` set, and ``state`` carries the optimizer of ``respec(config)`` (its
    learning rate decays over those steps; the optimizer's state has the same structure).
    """
    if start > 0:
        decision = load(workdir)
    else:
        decision = decide(config, step_fn, scratch, local_batch, key, mesh)
        save(decision, workdir)
    if jax.process_index() == 0:
        print(decision.summary(), flush=True)
    config = copy.deepcopy(config)
    config.train.steps = decision.steps
    spec = respec(config)
    return config, state.replace(tx=spec.tx, lr_schedule=spec.lr_schedule), decision
