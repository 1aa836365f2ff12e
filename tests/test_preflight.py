"""The costs of a compiled step (jvdm.preflight) and the trainer's check before its first step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm import config as config_lib
from jvdm import preflight, train_log
from jvdm import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_costs_of_a_matmul_are_exact():
    """A [64, 128] @ [128, 32] product: 2 m n k FLOPs, the inputs' and output's bytes."""
    a = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    b = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    costs = preflight.step_costs(compiled, {"w": np.zeros((3, 5)), "b": np.zeros(7)})
    assert costs["params"] == 22
    assert costs["flops_per_step"] == 2 * 64 * 128 * 32
    assert costs["memory_argument_bytes"] == (64 * 128 + 128 * 32) * 4
    assert costs["memory_output_bytes"] == 64 * 32 * 4
    peak = sum(costs[f"memory_{k}_bytes"] for k in ("argument", "output", "temp"))
    assert costs["memory_peak_bytes"] == peak - costs["memory_alias_bytes"]


def test_a_gaussian_base_fit_is_counted_as_constants_not_parameters():
    compiled = jax.jit(jnp.sin).lower(jax.ShapeDtypeStruct((4,), jnp.float32)).compile()
    denoiser = {"params": {"w": np.zeros((3, 5))}, "gaussian_base": {"vectors": np.zeros((4, 4))}}
    costs = preflight.step_costs(compiled, {"denoiser": denoiser, "schedule": np.zeros(2)})
    assert (costs["params"], costs["constants"]) == (17, 16)
    assert "1.7e-05M parameters (+1.6e-05M constant)," in preflight.summary_line(costs)
    plain = preflight.step_costs(compiled, {"w": np.zeros(3)})
    assert plain["constants"] == 0 and "constant" not in preflight.summary_line(plain)


def test_cpu_reports_no_limit():
    assert preflight.device_bytes_limit(jax.devices()[0]) is None


@pytest.mark.slow  # a training run
def test_a_step_that_cannot_fit_fails_before_the_first_step(tmp_path, monkeypatch, capsys):
    """With a device that says it holds 1 MiB, train() stops after compiling the step: one line
    naming grad_accum_steps, remat and bf16; no step run, no checkpoint; the costs are logged."""
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    config = config_lib.apply_overrides(
        config, ["model.channel_mult=(1,)", "model.attention_resolutions=()"]
    )
    monkeypatch.setattr(preflight, "device_bytes_limit", lambda device: 2**20)
    steps = []
    workdir = str(tmp_path / "run")
    with pytest.raises(preflight.StepMemoryError) as info:
        train_lib.train_and_evaluate(
            config, workdir, step_callback=lambda step, state: steps.append(step)
        )
    message = str(info.value)
    assert "\n" not in message and "GiB per device" in message
    for hint in ("train.grad_accum_steps (now 1)", "use_remat=True", "dtype='bfloat16'"):
        assert hint in message
    assert steps == []
    checkpoints = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)
    with open(os.path.join(workdir, train_log.METRICS_FILE)) as f:
        (record,) = [json.loads(line) for line in f]
    n_params = record["setup/params"]
    assert record["step"] == 0 and 1e3 < n_params < 1e6
    assert record["setup/flops_per_step"] > 2 * n_params * config.train.batch_size
    assert record["setup/memory_peak_bytes"] > 2**20
    assert "train step:" in capsys.readouterr().out
