"""Gradient accumulation (train.grad_accum_steps): k micro-batches in one step equal one batch.

The whole batch's times (stratified over all of it), noise and schedule values are drawn once and
split into strided micro-batches, so the accumulated gradient is the whole batch's up to the order
of floating-point sums. Measured on the tiny model below (float32, batch 16, continuous time,
k = 2): loss within 1.9e-6 bpd, max |gradient difference| 6.0e-6, relative norm error 2.8e-6.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm import build, objective, parallel
from jvdm import config as config_lib
from jvdm import data as data_lib
from jvdm import train as train_lib
from jvdm import train_state as state_lib
from jvdm.errors import JvdmUserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["model.channel_mult=(1,)", "model.attention_resolutions=()"]
GRAD_REL_TOL = 1e-5  # float32 sums in another order: 2.8e-6 measured
BPD_ATOL = 1e-5


def tiny(*overrides):
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    return config_lib.apply_overrides(config, [*FAST, *overrides])


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def rel_err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb, strict=True)))
    return float(num / np.sqrt(sum(np.sum(y**2) for y in lb)))


def max_abs(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)


@pytest.fixture(scope="module")
def images():
    loader = data_lib.make_train_loader("mnist_subset", global_batch_size=16, seed=0, num_threads=0)
    return loader.batch(0)["image"]


@pytest.mark.parametrize(
    ("timesteps", "ks", "objective_overrides"),
    [
        (0, (4,), ()),  # k = 2 in the slow tier's cases
        pytest.param(10, (2,), (), marks=pytest.mark.slow),
        pytest.param(
            0,
            (2,),
            ("model.weighting=sigmoid", "model.noise_sampling=adaptive"),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            0,
            (2,),
            ("model.weighting=elbo_sigmoid", "model.noise_sampling=band"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["continuous", "discrete", "adaptive_sigmoid", "band"],
)
def test_micro_batches_equal_the_whole_batch(images, timesteps, ks, objective_overrides):
    """Loss, metrics, gradients and the loss histogram of k micro-batches equal those of the batch
    of 16 in one piece: in continuous time (the schedule's interior on the variance gradient), in
    discrete time (every schedule parameter on the bound), with a weighting and adaptive noise
    levels drawn from a (non-uniform) histogram, and with the band density's noise levels."""
    config = tiny(f"model.timesteps={timesteps}", *objective_overrides)
    params = build.init_params(config, jax.random.key(0))
    key = jax.random.key(1)
    bins = config.model.histogram_bins
    hist = jnp.stack([jnp.linspace(1.0, 3.0, bins), jnp.ones((bins,))])  # a non-uniform density
    fn = jax.jit(objective.loss_and_grads, static_argnames=("train", "micro_batches"))
    loss, metrics, grads, new_hist = host(fn(params, images, key, micro_batches=1, histogram=hist))
    assert np.isfinite(loss)
    for k in ks:
        out = host(fn(params, images, key, micro_batches=k, histogram=hist))
        loss_k, metrics_k, grads_k, new_hist_k = out
        np.testing.assert_allclose(new_hist_k, new_hist, rtol=1e-5)
        assert abs(loss_k - loss) <= BPD_ATOL
        for name, value in metrics.items():
            assert metrics_k[name] == pytest.approx(value, abs=BPD_ATOL, rel=1e-5), name
        assert rel_err(grads_k.denoiser, grads.denoiser) <= GRAD_REL_TOL
        assert rel_err(grads_k.schedule, grads.schedule) <= GRAD_REL_TOL
        print(
            f"T={timesteps} k={k}: |dloss|={abs(loss_k - loss):.2e} max|dgrad|="
            f"{max_abs(grads_k, grads):.2e} rel={rel_err(grads_k, grads):.2e}"
        )


@pytest.mark.slow  # the train step on 4 devices, twice
def test_accumulated_train_step_matches_and_keeps_the_skip_logic(images):
    """On 4 devices (4 images each), two steps with k = 2 apply the same updates as k = 1; a
    poisoned state is skipped exactly as without accumulation."""
    config = tiny("train.batch_size=16")
    mesh = parallel.make_mesh()
    batch = {"image": parallel.shard_batch(images, mesh)}
    train_key = parallel.replicate(jax.random.key(1), mesh)
    spec, out = train_lib.state_spec(config), {}
    for k in (1, 2):
        state = state_lib.create_train_state(spec, jax.random.key(0), mesh=mesh)
        state, _ = state_lib.train_step(state, batch, train_key, grad_accum_steps=k)
        state, metrics = state_lib.train_step(state, batch, train_key, grad_accum_steps=k)
        out[k] = host((state.params, metrics))
    (p1, m1), (p2, m2) = out[1], out[2]
    assert m2["skipped"] == 0 and m2["bpd"] == pytest.approx(m1["bpd"], abs=BPD_ATOL)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=GRAD_REL_TOL)
    assert max_abs(p2, p1) <= 1e-5, max_abs(p2, p1)

    clean = state_lib.create_train_state(spec, jax.random.key(0), mesh=mesh)
    poisoned = clean.replace(
        params=clean.params.replace(
            schedule=jax.tree.map(lambda x: x * jnp.nan, clean.params.schedule)
        )
    )
    expected = host(poisoned.params)
    state, metrics = state_lib.train_step(poisoned, batch, train_key, grad_accum_steps=2)
    assert int(metrics["skipped"]) == 1 and int(state.skipped_consecutive) == 1
    for x, y in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(expected), strict=True):
        assert np.array_equal(x, y, equal_nan=True)


def test_grad_accum_must_divide_the_per_device_batch(tmp_path):
    mesh = parallel.make_mesh()  # 4 devices: a batch of 8 is 2 per device
    with pytest.raises(
        JvdmUserError, match=r"grad_accum_steps=4 must divide .* use one of \[1, 2\]"
    ):
        parallel.check_batch_size(8, mesh, grad_accum_steps=4)
    with pytest.raises(JvdmUserError, match="grad_accum_steps=3"):
        train_lib.train_and_evaluate(tiny("train.grad_accum_steps=3"), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    with pytest.raises(ValueError, match="train.grad_accum_steps=0"):
        config_lib.validate(tiny("train.grad_accum_steps=0"))


@pytest.mark.slow  # three training runs
def test_resume_mid_run_with_accumulation_is_bit_identical(tmp_path):
    """6 steps of k = 2 straight through vs stopped by SIGTERM after step 3 and resumed."""
    config = tiny(
        "train.grad_accum_steps=2",
        "train.steps=6",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.use_final_eval=False",
        "train.eval_every=1000",
    )
    straight = train_lib.train_and_evaluate(config, str(tmp_path / "straight"))

    def preempt(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"), step_callback=preempt)
    assert stopped["stopped_early"] and stopped["step"] == 3
    resumed = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["step"] == straight["step"] == 6
    from jvdm import checkpoint as ckpt

    mesh = parallel.make_mesh()
    abstract = state_lib.abstract_train_state(train_lib.state_spec(config), mesh)
    states = []
    for name in ("straight", "resumed"):
        manager = ckpt.make_manager(str(tmp_path / name), keep=10)
        try:
            states.append(host(ckpt.restore(manager, 6, abstract)))
        finally:
            ckpt.close(manager)
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
