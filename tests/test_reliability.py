"""Faults provoked for real: kill -9, corrupt checkpoints, two trainers, unwritable and full disks.

The trainers here are real ``python -m jvdm train`` subprocesses on one CPU device with the tiny
experiment cut to one resolution level. They share a persistent compilation cache, so only the
first one compiles; the kill -9 run and its restart are compared bit for bit with an uninterrupted
run of the same command. Each test prints what the fault cost (``pytest -s`` shows it).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jvdm
from jvdm import checkpoint as ckpt
from jvdm import cli, cli_commands, integrity, parallel
from jvdm import config as config_lib
from jvdm import train as train_lib
from jvdm import train_state as state_lib
from jvdm import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
KEEP = 3
OVERRIDES = [
    "model.channel_mult=(1,)",
    "model.attention_resolutions=()",
    f"train.steps={STEPS}",
    "train.checkpoint_every=1",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.use_final_eval=False",
    f"train.keep_checkpoints={KEEP}",
]


def tiny(*extra):
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    return config_lib.apply_overrides(config, [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        TFDS_DATA_DIR=os.path.abspath(os.environ["TFDS_DATA_DIR"]),
        PYTHONUNBUFFERED="1",
    )
    env.pop("JVDM_DEBUG", None)
    return env


def start_trainer(workdir, env, *extra):
    command = ["nice", "-n", "10", sys.executable, "-m", "jvdm", "train"]
    command += ["--config", "experiments/tiny.py", "--workdir", str(workdir), *OVERRIDES, *extra]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def steps_in(workdir):
    """``(verified steps, every step directory, temporary directories)`` of a work directory."""
    root = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    names = os.listdir(root) if os.path.isdir(root) else []
    steps = sorted(int(n) for n in names if n.isdigit())
    verified = [
        s for s in steps if os.path.isfile(os.path.join(root, str(s), "jvdm_checksum.json"))
    ]
    return verified, steps, sorted(n for n in names if not n.isdigit())


def restore_step(workdir, step):
    mesh = parallel.make_mesh(jax.devices()[:1])
    manager = ckpt.make_manager(str(workdir), keep=10)
    try:
        state = ckpt.restore(
            manager, step, state_lib.abstract_train_state(train_lib.state_spec(tiny()), mesh)
        )
        return jax.tree.map(np.asarray, jax.device_get(state))
    finally:
        ckpt.close(manager)


def assert_bit_identical(a, b):
    pairs = zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True)
    for (path, x), y in pairs:
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def logged_bpd(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["train/bpd"]) for r in map(json.loads, f) if "train/bpd" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted run (it also fills the compilation cache for the other trainers)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    code, out, err = finish(start_trainer(workdir, env))
    assert code == 0, err[-3000:]
    verified, steps, tmp = steps_in(workdir)
    assert verified == steps == list(range(STEPS - KEEP + 1, STEPS + 1)) and not tmp
    return workdir


# ------------------------------------------------------------------------------------------------
# 1 + 3. kill -9 at a random moment, a second trainer refused meanwhile, then a restart.


@pytest.mark.slow  # trainers in subprocesses
def test_kill9_then_restart_resumes_from_the_last_complete_checkpoint(reference, env, tmp_path):
    seed = int(os.environ.get("JVDM_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    print(f"\nkill -9 test seed {seed} (rerun with JVDM_KILL_SEED={seed})")
    workdir = str(tmp_path / "killed")
    proc = start_trainer(workdir, env)
    target = rng.randint(1, STEPS - 4)
    deadline = time.monotonic() + 180
    while not steps_in(workdir)[0] or steps_in(workdir)[0][-1] < target:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.005)

    # 3. While it runs, a second trainer on the same directory is refused at once, by PID.
    t0 = time.perf_counter()
    with pytest.raises(
        workdir_lib.WorkdirError, match=f"in use by another training run \\(PID {proc.pid} "
    ):
        train_lib.train_and_evaluate(tiny(), workdir)
    refused_in = time.perf_counter() - t0

    time.sleep(rng.uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    killed_at = time.monotonic()
    assert code == -signal.SIGKILL
    verified, steps, tmp = steps_in(workdir)
    last_logged = logged_bpd(workdir)[-1][0] if os.path.exists(f"{workdir}/metrics.jsonl") else 0
    assert verified and verified[-1] < STEPS, "the run finished before the kill"
    resume_from = verified[-1]  # the last COMPLETE (committed and checksummed) checkpoint
    killed_mid_save = bool(tmp) or steps[-1] > verified[-1]

    # Leave the remains of saves that a kill can interrupt, whatever this kill hit: a temporary
    # directory (killed inside orbax's write), and a newer step with a damaged array file.
    root = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    os.makedirs(os.path.join(root, f"{STEPS + 2}.orbax-checkpoint-tmp", "default"))
    bad = os.path.join(root, str(STEPS + 1))
    shutil.copytree(os.path.join(root, str(resume_from)), bad)
    flip_a_byte(bad)

    t0 = time.perf_counter()
    code, out, err = finish(start_trainer(workdir, env))
    recovery = time.perf_counter() - t0
    assert code == 0, err[-3000:]
    assert f"resuming {workdir} from step {resume_from}" in out
    assert f"checkpoint {STEPS + 1} in {root} is corrupt" in " ".join(err.split())
    verified, steps, tmp = steps_in(workdir)
    assert not tmp, tmp  # the interrupted save's temporary directory was cleaned up
    assert verified == steps == list(range(STEPS - KEEP + 1, STEPS + 1))
    assert_bit_identical(restore_step(workdir, STEPS), restore_step(reference, STEPS))
    # Each step logged once, with the same losses as the uninterrupted run.
    assert logged_bpd(workdir) == logged_bpd(reference)
    print(
        json.dumps(
            {
                "fault": "kill -9",
                "killed_after_steps_logged": last_logged,
                "resumed_from": resume_from,
                "steps_lost": last_logged - resume_from,
                "killed_mid_save": killed_mid_save,
                "second_trainer_refused_in_s": round(refused_in, 2),
                "restart_to_finish_s": round(recovery, 1),
                "since_kill_s": round(time.monotonic() - killed_at, 1),
            }
        )
    )


# ------------------------------------------------------------------------------------------------
# 2. A corrupt, truncated or unverified latest checkpoint.


def biggest_file(step_dir):
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
    files = [f for f in files if not f.endswith(integrity.CHECKSUM_FILE)]
    return max(files, key=os.path.getsize)


def flip_a_byte(step_dir):
    path = biggest_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def damage(step_dir, kind):
    if kind == "flipped_bit":
        flip_a_byte(step_dir)
    elif kind == "truncated":
        path = biggest_file(step_dir)
        os.truncate(path, os.path.getsize(path) // 2)
    elif kind == "deleted_file":
        os.remove(biggest_file(step_dir))
    elif kind == "no_checksum":  # killed between orbax's commit and the checksum
        os.remove(os.path.join(step_dir, integrity.CHECKSUM_FILE))


@pytest.mark.slow  # trainers in subprocesses
@pytest.mark.parametrize("kind", ["flipped_bit", "truncated", "deleted_file", "no_checksum"])
def test_a_bad_latest_checkpoint_falls_back_to_the_previous_good_one(reference, tmp_path, kind):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    latest = os.path.join(workdir, ckpt.CHECKPOINT_DIR, str(STEPS))
    damage(latest, kind)

    # jvdm.load never returns parameters from a damaged checkpoint.
    if kind == "no_checksum":
        with pytest.warns(UserWarning, match=f"{latest} is not verified yet"):
            params = jvdm.load(workdir)  # the newest verified step instead
        assert_bit_identical(
            jax.tree.map(np.asarray, params), restore_step(reference, STEPS - 1).ema_params
        )
    else:
        for path in (workdir, latest):
            with pytest.raises(
                integrity.CorruptCheckpointError, match=f"checkpoint {latest} is corrupt"
            ):
                jvdm.load(path)

    # Resuming restores the previous step, with a warning that names the bad one.
    mesh = parallel.make_mesh(jax.devices()[:1])
    manager = ckpt.make_manager(workdir, keep=KEEP)
    try:
        with pytest.warns(UserWarning, match=f"checkpoint {STEPS} in .* (is corrupt|has no)"):
            step, state = ckpt.restore_latest(
                manager, state_lib.abstract_train_state(train_lib.state_spec(tiny()), mesh)
            )
        assert step == STEPS - 1 and manager.latest_step() == STEPS - 1
    finally:
        ckpt.close(manager)
    assert_bit_identical(jax.tree.map(np.asarray, state), restore_step(reference, STEPS - 1))
    rejected = os.listdir(os.path.join(workdir, "checkpoints_rejected"))
    assert len(rejected) == 1 and rejected[0].startswith(f"{STEPS}-")
    assert not os.path.exists(latest)  # the resumed run can save this step again


def test_async_saves_are_checksummed_when_they_finish(tmp_path):
    """The checksum is written when a save finishes: at the next save, a poll, a wait or close."""
    mesh = parallel.make_mesh()
    state = parallel.replicate({"w": np.arange(1000, dtype=np.float32)}, mesh)
    manager = ckpt.make_manager(str(tmp_path), keep=2)
    try:
        for step in (1, 2, 3):
            ckpt.save(manager, step, jax.tree.map(lambda x, s=step: x + s, state))
        deadline = time.monotonic() + 30
        while manager.is_saving_in_progress() and time.monotonic() < deadline:
            time.sleep(0.01)
        ckpt.poll(manager)
        assert steps_in(str(tmp_path))[0] == [2, 3]  # 1 deleted only once 3 was verified
    finally:
        ckpt.close(manager)
    for step in (2, 3):
        assert integrity.check_step(str(tmp_path / "checkpoints" / str(step)))


# ------------------------------------------------------------------------------------------------
# 4. Unwritable work directories and a full disk.


def test_an_unwritable_workdir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, not a directory")
    workdir = str(blocker / "run")  # not even root can create a directory under a file
    t0 = time.perf_counter()
    with pytest.raises(workdir_lib.WorkdirError, match="is not writable .*Not a directory"):
        train_lib.train_and_evaluate(tiny(), workdir)
    assert time.perf_counter() - t0 < 5  # before any compile
    argv = ["train", "--config", os.path.join(REPO, "experiments/tiny.py"), "--workdir", workdir]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jvdm: error: the work directory")


def _not_asyncio(err: str) -> str:
    """stderr without the 'Event loop is closed' tracebacks orbax's threads print at exit."""
    keep = [
        line
        for line in err.splitlines()
        if "asyncio" not in line and "_check_closed" not in line and "Event loop" not in line
    ]
    return "\n".join(keep)[-4000:]


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()})")


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name, options):
        path = tmp_path / name
        _mount_tmpfs(path, options)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_file_system_fails_before_training(tmpfs):
    workdir = str(tmpfs("ro", "ro,size=1m") / "run")  # EROFS: root cannot write either
    with pytest.raises(workdir_lib.WorkdirError, match="not writable .*Read-only file system"):
        train_lib.train_and_evaluate(tiny(), workdir)


@pytest.mark.slow  # trainers in subprocesses
def test_a_full_disk_stops_the_run_and_keeps_the_older_checkpoints(reference, env, tmpfs):
    # Room for the config, logs and three checkpoints of ~0.65 MB, not for a fourth.
    workdir = str(tmpfs("full", "size=2400k") / "run")
    t0 = time.perf_counter()
    code, out, err = finish(start_trainer(workdir, env, "train.keep_checkpoints=4"))
    elapsed = time.perf_counter() - t0
    lines = [line for line in err.splitlines() if line.startswith("jvdm: ")]
    assert code == 1, err[-3000:]
    assert len(lines) == 1 and "No space left on device" in lines[0], (lines, _not_asyncio(err))
    verified, steps, tmp = steps_in(workdir)
    assert verified == steps == list(range(1, len(steps) + 1)) and len(steps) >= 1
    assert f"No older checkpoint was deleted: steps {steps} are intact" in lines[0]
    assert not tmp  # the failed save's partial files were removed, freeing the space
    # Every kept checkpoint verifies and restores to the uninterrupted run's... own steps.
    for step in steps:
        assert integrity.check_step(os.path.join(workdir, "checkpoints", str(step)))
    state = restore_step(workdir, steps[-1])
    assert int(state.step) == steps[-1]
    print(
        json.dumps(
            {"fault": "full disk", "saved_before_failure": steps, "run_s": round(elapsed, 1)}
        )
    )


# ------------------------------------------------------------------------------------------------
# 6. Bad input: the public maths under random shapes, and random command lines.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=50, deadline=None, derandomize=True)


def _maths_cases(b, event):
    """``name -> (call(arrays, schedules), same-shape array count, schedules, is per example)``."""
    s = (b, *event)
    rng = np.random.default_rng(0)

    def x(shape=s):
        return rng.normal(size=shape).astype(np.float32)

    return {
        "q_sample": (lambda a, k: jvdm.q_sample(a[0], k[0], a[1]), 2, [0.5], False),
        "posterior_mean_var": (
            lambda a, k: jvdm.posterior_mean_var(a[0], a[1], k[0], k[1]),
            2,
            [0.3, 0.6],
            False,
        ),
        "gaussian_kl": (
            lambda a, k: jvdm.gaussian_kl(a[0], np.abs(a[1]) + 0.1, a[2], np.abs(a[3]) + 0.1),
            4,
            [],
            False,
        ),
        "denoising_matching_kl": (
            lambda a, k: jvdm.denoising_matching_kl(a[0], a[1], a[2], k[0], k[1]),
            3,
            [0.3, 0.6],
            True,
        ),
        "snr_weighted_loss": (
            lambda a, k: jvdm.snr_weighted_loss(a[0], a[1], k[0], k[1]),
            2,
            [2.0, 1.0],
            True,
        ),
        "continuous_diffusion_loss": (
            lambda a, k: jvdm.continuous_diffusion_loss(a[0], a[1], k[0]),
            2,
            [3.0],
            True,
        ),
        "prior_kl": (lambda a, k: jvdm.prior_kl(a[0], k[0]), 1, [1e-3], True),
        "decoder_log_likelihood": (
            lambda a, k: jvdm.decoder_log_likelihood(
                np.clip(np.abs(a[0]) * 60, 0, 255).astype(np.uint8), a[1], k[0]
            ),
            2,
            [-5.0],
            True,
        ),
    }, x


shapes = st.tuples(st.integers(1, 3), st.lists(st.integers(1, 4), max_size=3).map(tuple))


@settings(max_examples=20, deadline=None, derandomize=True)  # each new shape compiles: ~0.4 s
@given(
    shape=shapes,
    batched_schedule=st.booleans(),
    name=st.sampled_from(sorted(_maths_cases(1, ())[0])),
)
def test_maths_with_matching_shapes_return_finite_values_of_the_documented_shape(
    shape, batched_schedule, name
):
    b, event = shape
    cases, x = _maths_cases(b, event)
    call, n, sched, per_example = cases[name]
    sched = [np.full((b,), v, np.float32) if batched_schedule else v for v in sched]
    out = call([x() for _ in range(n)], sched)
    for value in out if isinstance(out, tuple) else (out,):
        assert value.shape == ((b,) if per_example else (b, *event)), (name, value.shape)
        assert np.all(np.isfinite(np.asarray(value))), name


@FUZZ
@given(
    shape=shapes,
    name=st.sampled_from(sorted(_maths_cases(1, ())[0])),
    which=st.integers(0, 5),
    how=st.sampled_from(["longer_axis", "extra_axis", "missing_axis", "schedule"]),
)
def test_maths_with_mismatched_shapes_raise_value_error(shape, name, which, how):
    b, event = shape
    cases, x = _maths_cases(b, event)
    call, n, sched, _ = cases[name]
    arrays = [x() for _ in range(n)]
    s = (b, *event)
    if how == "schedule" or n == 1:
        if not sched:
            return
        sched = list(sched)
        sched[which % len(sched)] = np.full((b + 1,), sched[which % len(sched)], np.float32)
    else:
        bad = {
            "longer_axis": s[:-1] + (s[-1] + 1,),
            "extra_axis": (2, *s),
            "missing_axis": s[1:] if len(s) > 1 else (b + 1,),
        }[how]
        arrays[which % n] = x(bad)
    with pytest.raises(ValueError):
        call(arrays, sched)


def test_bpd_from_nats_rejects_a_non_positive_dimension_count():
    for d in (0, -3):
        with pytest.raises(ValueError, match="num_dims"):
            jvdm.bpd_from_nats(np.ones((2,), np.float32), d)


TOKENS = st.sampled_from(
    [
        "train",
        "sample",
        "eval",
        "data",
        "prepare",
        "list",
        "--config",
        "--workdir",
        "--n",
        "--steps",
        "--sampler",
        "--seed",
        "--split",
        "--draws",
        "0",
        "-1",
        "3",
        "x",
        "=",
        "ddim",
        "foo",
        "--config.train.steps=2",
        "--config.model.channels",
        "model.channels=abc",
        "train.steps=-1",
        "model.nope=1",
        "modell.x=1",
        "gamma.schedule=cosine",
        "--help-me",
        "-",
        "--",
        "experiments/tiny.py",
        "experiments/nothing.py",
        "/nonexistent/dir",
        "a=b=c",
        "train.steps=",
        "==",
    ]
)


@FUZZ
@given(argv=st.lists(TOKENS, max_size=8))
def test_random_command_lines_parse_or_fail_in_one_line(argv):
    import contextlib
    import io

    # Nothing may run for real: the commands' bodies are stubbed; parsing and configs are real.
    def train_stub(args, extra):
        cli_commands.load_config(args.config, cli_commands.split_overrides(extra))
        return 0

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("sample", "eval_", "data"):
            mp.setattr(cli_commands, name, lambda args: 0)
        mp.setattr(cli_commands, "train", train_stub)
        mp.chdir(REPO)
        mp.delenv("JVDM_DEBUG", raising=False)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
    assert code in (0, 2), (argv, code, err.getvalue())
    if code == 2:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jvdm: error: "), (argv, err.getvalue())
