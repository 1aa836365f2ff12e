"""Training for a time budget (``train.time_budget_s``, :mod:`jvdm.time_budget`).

The budget only chooses the step count: a budgeted run is the run of a fixed ``train.steps`` equal
to its decision, bit for bit, and resumes on the schedule it began with. The step time is measured
for real in one test; the others fix it (a monkeypatched measurement), so that the decision, and
hence the compiled programs, are the same on any machine.
"""

import functools
import json
import os
import signal

import jax
import numpy as np
import pytest

from jvdm import config as config_lib
from jvdm import parallel, time_budget
from jvdm import train as train_lib
from jvdm import train_state as state_lib
from jvdm.errors import JvdmUserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = 1000
BUDGET = 30.0
DECIDED = 100  # the steps that fit: BUDGET / SECONDS_PER_STEP = 150, rounded down to 100
SECONDS_PER_STEP = BUDGET / 150
BASE = [
    "model.channel_mult=(1,)",  # the loop, not the U-Net, is under test
    "model.attention_resolutions=()",
    "train.log_every=10",
    "train.checkpoint_every=40",
    "train.eval_every=100000",
    "train.use_final_eval=False",
]


def tiny(*overrides):
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    return config_lib.apply_overrides(config, [*BASE, *overrides])


def budgeted(*overrides):
    return tiny(f"train.steps={CAP}", f"train.time_budget_s={BUDGET}", *overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """With the measurement fixed at SECONDS_PER_STEP (after a 1-s 'compile'): a budgeted run
    straight through; the fixed run of its decision; a budgeted run stopped by SIGTERM at step 37
    and resumed. All share one compiled step (one schedule of 100 steps)."""
    calls = []

    def measure(step_fn, make_state, batch, key, *, blocks, per_block):
        calls.append(blocks * per_block)
        return 1.0, SECONDS_PER_STEP, (SECONDS_PER_STEP,) * blocks

    def preempt(step, state):
        if step == 37:
            os.kill(os.getpid(), signal.SIGTERM)

    dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("budget", "fixed", "resumed")}
    out = dict(dirs=dirs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time_budget, "measure", measure)
        out["budget"] = train_lib.train_and_evaluate(budgeted(), dirs["budget"])
        out["calls_after_first"] = list(calls)
        out["fixed"] = train_lib.train_and_evaluate(tiny(f"train.steps={DECIDED}"), dirs["fixed"])
        out["stopped"] = train_lib.train_and_evaluate(
            budgeted(), dirs["resumed"], step_callback=preempt
        )
        out["calls_before_resume"] = list(calls)
        out["resumed"] = train_lib.train_and_evaluate(budgeted(), dirs["resumed"])
        out["calls"] = list(calls)
    return out


def params(workdir, steps, config):
    from jvdm import checkpoint as ckpt

    manager = ckpt.make_manager(workdir, keep=10)
    try:
        abstract = state_lib.abstract_train_state(
            train_lib.state_spec(config), parallel.make_mesh()
        )
        state = ckpt.restore(manager, steps, abstract)
    finally:
        ckpt.close(manager)
    return jax.tree.map(np.asarray, jax.device_get((state.params, state.ema_params, state.step)))


def assert_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_decide_steps_rounds_down_caps_and_refuses_too_few():
    assert time_budget.decide_steps(30.0, 0.01, cap=10_000, minimum=3) == 3000
    assert time_budget.decide_steps(30.0, 0.0101, cap=10_000, minimum=3) == 2900  # 2970 fit
    assert time_budget.decide_steps(30.0, 0.01, cap=1234, minimum=3) == 1234
    with pytest.raises(
        JvdmUserError, match=r"fits 99 steps.*0 in whole hundreds.*raise train.time_budget_s"
    ):
        time_budget.decide_steps(9.9, 0.1, cap=10_000, minimum=3)  # 99 fit: 0 after rounding
    with pytest.raises(JvdmUserError, match="needs at least 201"):
        time_budget.decide_steps(20.0, 0.1, cap=10_000, minimum=201)
    with pytest.raises(ValueError, match="positive"):
        time_budget.decide_steps(10.0, float("nan"), cap=10, minimum=1)


def test_measure_times_a_scratch_state_and_leaves_the_run_alone(runs):
    """The real measurement on the tiny step: positive, finite times; the state it steps is a
    scratch one (made and donated inside), so the caller's state keeps its buffers and values.
    (After ``runs``, whose program it reuses.)"""
    config = tiny(f"train.steps={DECIDED}")
    mesh = parallel.make_mesh()
    spec = train_lib.state_spec(config)
    key = train_lib.run_keys(0)[0]
    mine = state_lib.create_train_state(spec, key, mesh=mesh)
    before = jax.tree.map(np.asarray, jax.device_get(mine.params))
    made = []

    def scratch():
        made.append(1)
        return state_lib.create_train_state(spec, key, mesh=mesh)

    images = np.zeros((config.train.batch_size, 28, 28, 1), np.uint8)
    batch = {"image": parallel.shard_batch(images, mesh)}
    train_key = parallel.replicate(train_lib.run_keys(0)[1], mesh)
    compile_s, per_step, means = time_budget.measure(
        functools.partial(train_lib.train_step, grad_accum_steps=1),
        scratch,
        batch,
        train_key,
        blocks=3,
        per_block=2,
    )
    assert made == [1] and len(means) == 3 and per_step == np.median(means)
    assert 0 < per_step < compile_s + 60 and np.isfinite(per_step) and compile_s > 0
    assert not any(x.is_deleted() for x in jax.tree.leaves(mine.params))
    assert_identical(jax.device_get(mine.params), before)


def test_a_budgeted_run_is_the_fixed_run_of_its_decision(runs):
    """Decided 100 steps of a cap of 1000: the learning rate decays over 100 (the last logged rate
    is the schedule's final value), and the parameters are bit-identical to train.steps=100
    without a budget. The decision is on disk with what it came from."""
    budget_dir, fixed_dir = runs["dirs"]["budget"], runs["dirs"]["fixed"]
    assert runs["budget"]["step"] == DECIDED and runs["calls_after_first"] == [32]
    with open(os.path.join(budget_dir, time_budget.BUDGET_FILE)) as f:
        record = json.load(f)
    assert record["steps"] == DECIDED and record["cap"] == CAP and record["budget_s"] == BUDGET
    assert record["seconds_per_step"] == SECONDS_PER_STEP and record["timed_steps"] == 32
    assert record["block_means"] == [SECONDS_PER_STEP] * 4
    assert time_budget.load(budget_dir).steps == DECIDED
    # The saved config is the one asked for (the cap), so the run resumes with the same request.
    with open(os.path.join(budget_dir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == CAP

    assert runs["fixed"]["step"] == DECIDED
    config = tiny(f"train.steps={DECIDED}")
    assert_identical(params(budget_dir, DECIDED, config), params(fixed_dir, DECIDED, config))
    with open(os.path.join(budget_dir, "metrics.jsonl")) as f:
        last_lr = [r["train/lr"] for r in map(json.loads, f) if "train/lr" in r][-1]
    o = config.optimizer
    # The rate of the last update (step 99) on a cosine over 98 steps after 2 of warm-up.
    cosine = 0.5 * (1 + np.cos(np.pi * 97 / 98))
    final = o.learning_rate * (o.final_lr_fraction + (1 - o.final_lr_fraction) * cosine)
    assert last_lr == pytest.approx(final, rel=1e-5)


def test_a_budgeted_run_resumes_on_its_decision(runs):
    """Stopped by SIGTERM at step 37 and resumed: the resumed run reads its decision back (it does
    not measure again) and ends where the straight budgeted run does, bit for bit."""
    assert runs["stopped"]["stopped_early"] and runs["stopped"]["step"] == 37
    assert runs["calls_before_resume"] == [32, 32] and runs["calls"] == [32, 32]
    assert runs["resumed"]["step"] == DECIDED
    config = tiny(f"train.steps={DECIDED}")
    dirs = runs["dirs"]
    assert_identical(
        params(dirs["budget"], DECIDED, config), params(dirs["resumed"], DECIDED, config)
    )


def test_the_pace_note_speaks_only_past_the_tolerance():
    assert time_budget.pace_note(0.10, 0.109, 1000) is None  # +9%
    assert time_budget.pace_note(0.10, 0.091, 1000) is None  # -9%
    slow = time_budget.pace_note(0.10, 0.15, 2000)
    assert "0.1500 s a step, +50% against the 0.1000 s" in slow
    assert "remaining 2,000 steps will take about 300 s" in slow
    assert "-40%" in time_budget.pace_note(0.10, 0.06, 10)
    assert time_budget.pace_note(0.10, float("nan"), 10) is None


def test_a_budgeted_loop_far_from_its_measured_pace_says_so(runs):
    """The fixture's measurement is fixed at SECONDS_PER_STEP (0.2 s), far slower than the tiny
    step: the budgeted runs report it once, at the first log two intervals past their start (the
    first holds the compile), in their summary; the fixed run, which has no budget, says
    nothing."""
    note = runs["budget"]["time_budget_pace"]
    assert note.startswith("time budget: the loop runs at ") and "% against the 0.2000 s" in note
    assert f"remaining {DECIDED - 20:,} steps" in note  # checked at step 2 x log_every
    # Resumed at 37: its second logging interval after the restart ends at step 60.
    assert f"remaining {DECIDED - 60:,} steps" in runs["resumed"]["time_budget_pace"]
    assert "time_budget_pace" not in runs["fixed"]


def test_bad_budgets_fail_with_one_line_and_write_nothing(tmp_path, monkeypatch):
    with pytest.raises(JvdmUserError, match="train.time_budget_s"):
        config_lib.validate(tiny("train.time_budget_s=-1.0"))
    with pytest.raises(JvdmUserError, match="train.time_budget_s"):
        config_lib.validate(tiny("train.time_budget_s=inf"))

    # A budget that fits no steps: a one-line error before the first update, no checkpoint and
    # no decision written.
    monkeypatch.setattr(time_budget, "measure", lambda *a, **kw: (1.0, 10.0, (10.0,)))
    workdir = str(tmp_path / "small")
    with pytest.raises(JvdmUserError, match="fits 3 steps") as err:
        train_lib.train_and_evaluate(budgeted(), workdir)
    assert "\n" not in str(err.value)
    assert not os.path.exists(os.path.join(workdir, time_budget.BUDGET_FILE))
    assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints")
    )


def test_resuming_without_or_with_a_broken_decision_is_refused(runs, tmp_path):
    """A run started without a budget cannot be resumed with one (its learning rate decays over
    its own steps), nor can a run whose decision file is corrupt; the message says what to do."""
    workdir = str(tmp_path / "plain")

    def preempt(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    plain = tiny(f"train.steps={DECIDED}")  # the program of `runs`, stopped at step 3
    assert train_lib.train_and_evaluate(plain, workdir, step_callback=preempt)["step"] == 3
    with pytest.raises(JvdmUserError, match="started without a time budget.*time_budget_s=0"):
        train_lib.train_and_evaluate(budgeted(), workdir)
    with open(os.path.join(workdir, time_budget.BUDGET_FILE), "w") as f:
        f.write('{"steps": 8, "budget_s"')  # cut off mid-write by something else
    with pytest.raises(JvdmUserError, match="unreadable.*time_budget_s=0"):
        time_budget.load(workdir)


@pytest.mark.slow  # two processes through jax.distributed
@pytest.mark.multiprocess
def test_two_processes_agree_on_the_slowest(tmp_path):
    """2 processes x 2 CPU devices, the real measurement, process 1 slowed by 0.5 s a timed step:
    both decide the step count from the slower time (a disagreement would leave one process
    waiting in a collective the other never joins) and train exactly that many steps. (Process 0
    alone measures 0.12 s a step on the 2-core EPYC: 1,200 steps of this budget.)"""
    from processes import cpu_env, run_ranks

    workdir = str(tmp_path / "two")
    env = cpu_env(2)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    budget = 150
    overrides = [*BASE, "train.steps=100000", f"train.time_budget_s={budget}"]
    args = ["--workdir", workdir, "--slow-measure", "0.5", *overrides, "eval.use_quality=False"]
    outputs = run_ranks("multiprocess_train.py", 2, args, env)
    results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]
    decision = time_budget.load(workdir)
    assert decision.seconds_per_step >= 0.5  # process 1's: process 0 does not sleep
    assert decision.steps == int(budget / decision.seconds_per_step / 100) * 100 <= 300
    assert results[0]["step"] == results[1]["step"] == decision.steps
    assert f"{decision.steps:,} steps (cap 100,000)" in outputs[0]
