"""One training step of experiments/tiny.py on each prepared dataset shape, on 1 and 4 devices.

The datasets are the synthetic archives of tests/synthetic_archives.py in the published layouts
(28x28x1 MNIST, 32x32x3 CIFAR-10, 64x64x3 ImageNet PNG), prepared with --skip-checksum.
"""

import os

import jax
import numpy as np
import pytest

import synthetic_archives as sa
from jvdm import config as config_lib
from jvdm import data, datasets, parallel
from jvdm import train as train_lib
from jvdm import train_state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "imagenet64": (64, 64, 3)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    sa.write_mnist(root / "src_mnist")
    (root / "src_cifar").mkdir()
    sa.write_cifar10(root / "src_cifar" / "cifar-10-binary.tar.gz")
    sa.write_imagenet_png(root / "src_imagenet64", 64)
    for name, src in (("mnist", "mnist"), ("cifar10", "cifar"), ("imagenet64", "imagenet64")):
        datasets.prepare(name, root / "dd", source=root / f"src_{src}", skip_checksum=True)
    return root / "dd"


# Each case compiles its own train step (about 15 s on an idle 2-core CPU): every shape on 1 device
# and on 4. All in the slow tier: the default tier trains on mnist_subset's shape in test_train.py.
pytestmark = pytest.mark.slow
CASES = [(name, n) for name in ("mnist", "cifar10", "imagenet64") for n in (1, 4)]


@pytest.mark.parametrize(("name", "num_devices"), CASES)
def test_one_train_step_on_each_shape(data_dir, name, num_devices):
    """The model takes its shape from the dataset name, and the loader's batches train it."""
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    # Smaller than tiny.py itself (one resolution, no attention) so that each shape compiles fast.
    small = ["model.channels=4", "model.channel_mult=(1,)", "model.attention_resolutions=()"]
    config = config_lib.apply_overrides(
        config, [f"data.name={name}", f"data.data_dir={data_dir}", "model.num_groups=2", *small]
    )
    assert datasets.image_shape(name) == SHAPES[name]
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    key = jax.random.key(0)
    state = state_lib.create_train_state(train_lib.state_spec(config), key, mesh=mesh)
    local = data.make_train_loader(
        name, global_batch_size=config.train.batch_size, seed=0, data_dir=data_dir, num_threads=0
    ).batch(0)
    assert local["image"].shape == (config.train.batch_size, *SHAPES[name])
    batch = {"image": parallel.shard_batch(local["image"], mesh)}
    state, metrics = state_lib.train_step(state, batch, key)
    assert int(state.step) == 1 and int(state.skipped_total) == 0
    assert np.isfinite(float(metrics["bpd"])) and float(metrics["bpd"]) > 0
    assert float(metrics["grad_norm"]) > 0  # the batch reached the parameters
