"""Shared test set-up.

Several CPU devices are forced *before* jax is imported, so that every test can build a multi-device
mesh; single-device code simply uses the first device.
"""

import collections
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep tfds away from the user's real data directory and from the network.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "tfds_data"))

import jvdm  # noqa: E402

# The tests run as the `jvdm` command does: with jvdm's CPU runtime defaults, applied before JAX
# starts (`import jvdm` alone applies nothing; tests/test_runtime_defaults.py checks both).
jvdm.configure_cpu_runtime()

import jax  # noqa: E402
import pytest  # noqa: E402

# Silent broadcasting between ranks is a bug in this code base: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


# The test files that take longest, longest first. `make test` hands whole files to two workers in
# collection order (pytest-xdist --dist loadfile --no-loadscope-reorder), so starting these first
# keeps the last minutes from running on one worker while the other idles. Seconds are worker time
# in the default tier on the 2-core Xeon; a file missing here only runs later.
LONGEST_FIRST = (
    "test_train.py",  # 178 s
    "test_model.py",  # 85 s
    "test_sampling.py",  # 72 s
    "test_unet.py",  # 55 s
    "test_gaussian_base.py",  # 75 s (on the EPYC)
    "test_ode.py",  # 50 s
    "test_loss_variance.py",  # 45 s
    "test_evaluate.py",  # 35 s
    "test_gaussian_mixture.py",  # 35 s
    "test_norm.py",  # 33 s
    "test_losses.py",  # 30 s
    "test_accumulation.py",  # 29 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def count_traces(monkeypatch):
    """``count_traces(module, name, signature)`` counts the traces of a jitted program.

    It replaces ``module.name`` -- a plain function that the program calls while JAX traces it
    (``sampling._generate``, ``evaluate._bpd_draws``) -- by a wrapper that counts each call under
    ``signature(*args, **kwargs)``, and returns that ``Counter``. A call happens only when the
    program is traced, so each count is one compilation; a cached program adds none. (The library
    keeps no trace counters of its own.)
    """

    def install(module, name, signature):
        counts = collections.Counter()
        fn = getattr(module, name)

        def counting(*args, **kwargs):
            counts[signature(*args, **kwargs)] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return counts

    return install
