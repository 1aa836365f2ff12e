"""jvdm.optimizer: AdamW's weight-decay mask, the learning-rate schedule, and the learning-rate
multipliers of the learned noise schedule."""

import jax
import numpy as np
import pytest

from jvdm import optimizer as optimizer_lib
from jvdm import parallel
from jvdm import train as train_lib
from jvdm import train_state as state_lib
from test_train import tiny


def test_weight_decay_mask_spares_biases_norms_and_the_schedule():
    abstract = state_lib.abstract_train_state(train_lib.state_spec(tiny()), parallel.make_mesh())
    mask = optimizer_lib.weight_decay_mask(abstract.params)
    flat = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask.denoiser)
    }
    assert flat["['params']['conv_in']['kernel']"] is True
    assert flat["['params']['conv_in']['bias']"] is False
    assert flat["['params']['norm_out']['scale']"] is False
    assert not any(jax.tree.leaves(mask.schedule))
    assert any(v for k, v in flat.items() if "DenseGeneral" in k)


def test_schedule_learning_rate_multipliers_scale_exactly_their_updates(key):
    """``gamma.endpoint_lr_scale`` / ``interior_lr_scale`` scale the AdamW update of the end points
    and of the schedule's interior (0 freezes it) and leave the denoiser's update alone."""
    from jvdm import build

    params = build.init_params(tiny(), key)
    # Host-side random gradients: jax.random.normal op by op compiles once per leaf shape (17 s).
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), params)

    def update(scales):
        spec = train_lib.state_spec(
            tiny(
                "optimizer.warmup_steps=0",  # else the first update has learning rate 0
                f"gamma.endpoint_lr_scale={scales[0]}",
                f"gamma.interior_lr_scale={scales[1]}",
            )
        )
        # One compiled update: op by op, the AdamW chain over every leaf took over a minute.
        updates, _ = jax.jit(spec.tx.update)(grads, spec.tx.init(params), params)
        return updates

    plain, scaled = update((1.0, 1.0)), update((0.25, 0.0))
    for name in ("gamma_min", "gamma_max"):
        got, want = scaled.schedule["params"][name], plain.schedule["params"][name]
        assert float(want) != 0.0 and float(got) == pytest.approx(0.25 * float(want), rel=1e-6)
    interior = jax.tree.leaves(scaled.schedule["params"]["net"])
    assert interior and all(not np.any(np.asarray(u)) for u in interior)
    assert any(np.any(np.asarray(u)) for u in jax.tree.leaves(plain.schedule["params"]["net"]))
    for a, b in zip(jax.tree.leaves(plain.denoiser), jax.tree.leaves(scaled.denoiser), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learning_rate_warms_up_then_decays():
    lr = optimizer_lib.learning_rate_schedule(
        learning_rate=1.0, warmup_steps=10, total_steps=110, decay="cosine", final_lr_fraction=0.1
    )
    assert [float(lr(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(lr(60)) == pytest.approx(0.55)
    assert float(lr(110)) == pytest.approx(0.1) and float(lr(500)) == pytest.approx(0.1)
    constant = optimizer_lib.learning_rate_schedule(
        learning_rate=2.0, warmup_steps=0, total_steps=5, decay="constant", final_lr_fraction=0.1
    )
    assert float(constant(0)) == float(constant(99)) == 2.0
