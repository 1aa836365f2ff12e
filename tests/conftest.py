"""Shared test set-up.

Several CPU devices are forced *before* jax is imported, so that every test can build a multi-device
mesh; single-device code simply uses the first device.
"""

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


@pytest.fixture
def key():
    return jax.random.key(0)
