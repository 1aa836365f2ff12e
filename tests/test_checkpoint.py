"""orbax checkpoints and the saved config (jvdm.checkpoint), on a small stand-in state.

The real TrainState is saved, resumed and moved between device counts in test_train.py; here a
small pytree of the same kind (a flax struct with static fields and an optax state) keeps these
tests free of model compilation.
"""

import gc
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import struct

from jvdm import checkpoint as ckpt
from jvdm import config as config_lib
from jvdm import parallel, run_config
from jvdm import run as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Toy(struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


_TX = optax.adamw(1e-3)


def make_toy(mesh, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
        "bias": rng.normal(size=(3,)).astype(np.float32),
    }
    state = Toy(step=np.int32(seed), params=params, opt_state=_TX.init(params), tx=_TX)
    state = state.replace(
        opt_state=jax.tree.map(lambda x: np.asarray(x) + np.float32(seed), state.opt_state)
    )
    return parallel.replicate(state, mesh)


def abstract(state, mesh):
    sharding = parallel.replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def leaves_equal(a, b):
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture
def manager(tmp_path):
    m = ckpt.make_manager(str(tmp_path), keep=2)
    yield m
    ckpt.close(m)


def test_round_trip_is_bit_identical_and_keeps_static_fields(manager):
    mesh = parallel.make_mesh()
    state = make_toy(mesh, seed=3)
    ckpt.save(manager, 3, state)
    manager.wait_until_finished()
    assert manager.latest_step() == 3
    restored = ckpt.restore(manager, 3, abstract(state, mesh))
    assert isinstance(restored, Toy) and restored.tx is _TX
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert leaves_equal(restored, state)


@pytest.mark.parametrize("saved_on, restored_on", [(4, 1), (1, 4), (4, 2)])
def test_restore_onto_another_device_count(manager, saved_on, restored_on):
    src = parallel.make_mesh(jax.devices()[:saved_on])
    dst = parallel.make_mesh(jax.devices()[:restored_on])
    state = make_toy(src, seed=1)
    ckpt.save(manager, 1, state)
    manager.wait_until_finished()
    restored = ckpt.restore(manager, 1, abstract(state, dst))
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.device_set == set(dst.devices.flat)
        assert leaf.sharding.is_fully_replicated
    assert leaves_equal(restored, state)


def test_keeps_only_the_latest_checkpoints(manager):
    mesh = parallel.make_mesh()
    for step in range(1, 6):
        ckpt.save(manager, step, make_toy(mesh, seed=step))
    manager.wait_until_finished()
    assert manager.all_steps() == [4, 5] and manager.latest_step() == 5
    restored = ckpt.restore(manager, 4, abstract(make_toy(mesh), mesh))
    assert leaves_equal(restored, make_toy(mesh, seed=4))


# The shapes are checked before orbax starts reading: a restore it starts and abandons leaves
# unfinished coroutines behind, which the garbage collector reports as unraisable exceptions.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_shape_mismatch_names_the_leaf(manager):
    mesh = parallel.make_mesh()
    state = make_toy(mesh)
    ckpt.save(manager, 0, state)
    manager.wait_until_finished()
    target = abstract(state, mesh)
    wider = jax.ShapeDtypeStruct((4, 5), np.float32, sharding=parallel.replicated_sharding(mesh))
    target = target.replace(params={**target.params, "dense": {"kernel": wider}})
    message = r"\.params\['dense'\]\['kernel'\]: saved \(4, 3\), now \(4, 5\)"
    with pytest.raises(ValueError, match=message):
        ckpt.restore(manager, 0, target)
    gc.collect()  # anything abandoned would be collected here, under this test's warning filter


def tiny(*overrides):
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    return config_lib.apply_overrides(config, list(overrides))


def test_config_is_saved_and_compared_on_resume(tmp_path):
    workdir = str(tmp_path)
    assert run_config.check_config(tiny(), workdir) == {}  # nothing saved yet
    path = run_config.save_config(tiny(), workdir)
    assert path == os.path.join(workdir, "config.json")
    saved = run_lib.read_saved_config(workdir)
    assert saved["model"]["channel_mult"] == [1, 2] and saved["data"]["data_dir"] is None

    assert run_config.check_config(tiny(), workdir) == {}
    # Training longer, with another learning rate or eval setting, is a resume.
    allowed = run_config.check_config(
        tiny("train.steps=8", "optimizer.learning_rate=1e-3", "eval.draws=2"), workdir
    )
    assert allowed == {
        "eval.draws": (1, 2),
        "optimizer.learning_rate": (tiny().optimizer.learning_rate, 1e-3),
        "train.steps": (4, 8),
    }
    # A different model is not: every differing architecture field is named.
    changed = tiny("model.channels=16", "model.channel_mult=(1, 2, 2)", "train.steps=8")
    with pytest.raises(ValueError) as err:
        run_config.check_config(changed, workdir)
    message = str(err.value)
    assert "model.channels: saved 8, requested 16" in message
    assert "model.channel_mult: saved [1, 2], requested [1, 2, 2]" in message
    assert "train.steps" not in message and workdir in message


def test_every_architecture_field_exists_in_the_config():
    flat = run_config._flat(tiny().to_dict())
    assert set(run_config.ARCHITECTURE_FIELDS) <= set(flat)


def test_a_run_saved_before_a_field_existed_loads_as_it_was_trained(tmp_path):
    """Runs saved before ``model.fourier_min`` / ``fourier_max`` existed used VDM's 6, 8: they
    load as that network, and resuming one with today's default names the difference. Runs saved
    before ``gamma.variance_gradient`` existed trained their schedule with the pathwise estimator:
    they load saying so, and may resume with another (it is not part of the architecture)."""
    workdir = str(tmp_path)
    run_config.save_config(tiny(), workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["model"]["fourier_min"], saved["model"]["fourier_max"]
    del saved["gamma"]["variance_gradient"]
    with open(path, "w") as f:
        json.dump(saved, f)
    loaded = run_lib.load_config(workdir)
    assert (loaded.model.fourier_min, loaded.model.fourier_max) == (6, 8)
    assert (tiny().model.fourier_min, tiny().model.fourier_max) == (0, 8)
    with pytest.raises(ValueError, match="model.fourier_min: saved 6, requested 0"):
        run_config.check_config(tiny(), workdir)
    assert loaded.gamma.variance_gradient == "pathwise"
    assert tiny().gamma.variance_gradient == "density"
    assert run_config.check_config(tiny("model.fourier_min=6"), workdir) == {
        "gamma.variance_gradient": ("pathwise", "density")
    }
    resumed = tiny("model.fourier_min=6", "gamma.variance_gradient=pathwise")
    assert run_config.check_config(resumed, workdir) == {}
