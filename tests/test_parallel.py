"""Meshes, shardings and multi-process start-up (jvdm.parallel).

The training-level comparisons (1 vs 4 devices, 2 processes vs 1) are in test_train.py, where they
share the compiled model with the other training tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm import parallel

_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


@pytest.fixture
def clean_env(monkeypatch):
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_mesh_spans_every_device_or_a_subset():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count() == 4
    assert list(mesh.devices.flat) == jax.devices()
    sub = parallel.make_mesh(jax.devices()[1:3])
    assert list(sub.devices.flat) == jax.devices()[1:3]
    with pytest.raises(ValueError, match="at least one device"):
        parallel.make_mesh([])


def test_shard_batch_puts_contiguous_rows_on_each_device():
    mesh = parallel.make_mesh()
    x = np.arange(8 * 3, dtype=np.uint8).reshape(8, 3)
    g = parallel.shard_batch({"image": x}, mesh)["image"]
    assert g.shape == (8, 3) and g.dtype == np.uint8
    assert g.sharding == parallel.batch_sharding(mesh)
    for shard in g.addressable_shards:
        i = mesh.devices.flat[:].tolist().index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i : 2 * i + 2])
    np.testing.assert_array_equal(np.asarray(g), x)


def test_global_batch_must_divide_by_the_device_count():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="must divide by the number of devices.*6.*4 devices"):
        parallel.check_batch_size(6, mesh)
    with pytest.raises(ValueError, match="divide by the number of devices"):
        parallel.shard_batch(np.zeros((6, 2)), mesh)
    parallel.check_batch_size(6, parallel.make_mesh(jax.devices()[:2]))  # fine on 2 devices


def test_replicate_and_local_copy():
    mesh = parallel.make_mesh()
    tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "key": jax.random.key(3)}
    rep = parallel.replicate(tree, mesh)
    for leaf in jax.tree.leaves(rep):
        assert leaf.sharding.is_fully_replicated
        assert leaf.sharding.device_set == set(jax.devices())
    np.testing.assert_array_equal(np.asarray(rep["w"]), tree["w"])
    assert jax.dtypes.issubdtype(rep["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(rep["key"]), jax.random.key_data(tree["key"]))
    local = parallel.local_copy(rep)
    assert len(local["w"].devices()) == 1
    np.testing.assert_array_equal(np.asarray(local["w"]), tree["w"])


def test_a_data_parallel_jit_needs_no_collectives_by_hand():
    # The pattern of train_step: replicated parameters, a sharded batch, a mean over the batch.
    mesh = parallel.make_mesh()
    w = parallel.replicate(jnp.float32(2.0), mesh)
    x = parallel.shard_batch(np.arange(8, dtype=np.float32), mesh)
    out = jax.jit(lambda w, x: jnp.mean(w * x))(w, x)
    assert float(out) == pytest.approx(7.0)


def test_initialize_distributed_is_a_noop_for_one_process(clean_env):
    calls = []
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(num_processes=1) is False
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    assert parallel.initialize_distributed() is False
    assert calls == []


def test_initialize_distributed_reads_flags_and_environment(clean_env):
    calls = []
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert parallel.initialize_distributed("10.0.0.1:1234", 2, 1) is True
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
    clean_env.setenv("JAX_NUM_PROCESSES", "4")
    clean_env.setenv("JAX_PROCESS_ID", "3")
    assert parallel.initialize_distributed() is True
    assert calls == [
        dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1),
        dict(coordinator_address="10.0.0.2:99", num_processes=4, process_id=3),
    ]


def test_initialize_distributed_auto_detects_a_cluster(clean_env):
    calls = []
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    clean_env.setenv("SLURM_JOB_ID", "7")
    clean_env.setenv("SLURM_NTASKS", "8")
    assert parallel.initialize_distributed() is True
    assert calls == [{}]


def test_initialize_distributed_rejects_partial_settings(clean_env):
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("called"))
    with pytest.raises(ValueError, match="coordinator address.*number of processes"):
        parallel.initialize_distributed(coordinator_address="127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id=None"):
        parallel.initialize_distributed(num_processes=2)
