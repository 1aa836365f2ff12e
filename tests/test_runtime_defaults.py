"""The CPU runtime defaults of ``jvdm.configure_cpu_runtime``, each in a fresh interpreter.

Import order matters (XLA and JAX read these settings when the backend starts), so every case runs
in a subprocess that calls ``jvdm.configure_cpu_runtime()`` (or, to check that importing changes
nothing, only ``import jvdm``) first thing, and reports back as JSON.
"""

import json
import os
import subprocess
import sys

import pytest

# A jitted program whose 64 MiB intermediate (the [8192, 2048] product, the input of a second
# matmul) is a temporary buffer of each execution; the output is small. Reports the minor page
# faults of 5 executions after 3 warm-up executions.
_PROBE = """
import json, resource, sys
import jvdm
CONFIGURE
import jax, jax.numpy as jnp
a = jnp.ones((8192, 64), jnp.float32)
b = jnp.ones((64, 2048), jnp.float32)
c = jnp.ones((2048, 8), jnp.float32)
f = jax.jit(lambda a, b, c: jnp.sum((a @ b) @ c))
for _ in range(3):
    f(a, b, c).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    value = float(f(a, b, c))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({
    "faults": faults,
    "value": value,
    "async": jax.config.read("jax_cpu_enable_async_dispatch"),
    "xla_flags": __import__("os").environ.get("XLA_FLAGS", ""),
}))
"""


def _probe(configure: bool = True, **env) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "JVDM_NO_XLA_DEFAULTS"}
    full.update(env)
    code = _PROBE.replace("CONFIGURE", "jvdm.configure_cpu_runtime()" if configure else "")
    out = subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_configure_makes_repeated_executions_reuse_their_temporary_memory():
    res = _probe()
    assert res["async"] is False
    assert "--xla_cpu_experimental_ynn_fusion_type=" in res["xla_flags"]
    # Without the defaults each execution faults in its 64 MiB temporary afresh (16,384 pages,
    # ~82,000 for the 5 calls); with them the memory is reused.
    assert res["faults"] < 2_000, res
    assert res["value"] == pytest.approx(8192 * 8 * 2048 * 64.0, rel=1e-6)


def test_opt_out_leaves_the_runtime_untouched():
    res = _probe(JVDM_NO_XLA_DEFAULTS="1", XLA_FLAGS="")
    assert res["async"] is True
    assert res["xla_flags"] == ""
    assert res["value"] == pytest.approx(8192 * 8 * 2048 * 64.0, rel=1e-6)


def test_a_users_dispatch_setting_wins():
    res = _probe(JAX_CPU_ENABLE_ASYNC_DISPATCH="true")
    assert res["async"] is True


def test_host_memory_setting_only_where_jax_computes_on_the_cpu(monkeypatch):
    from jvdm import _xla_defaults

    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not _xla_defaults._cpu_backend_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not _xla_defaults._cpu_backend_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert _xla_defaults._cpu_backend_expected()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_import_alone_changes_no_process_state():
    res = _probe(configure=False, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert res["xla_flags"] == "--xla_force_host_platform_device_count=2"
    assert res["async"] is True
    # glibc's defaults, untouched: each execution maps its 64 MiB temporary afresh.
    assert res["faults"] > 50_000, res
    assert res["value"] == pytest.approx(8192 * 8 * 2048 * 64.0, rel=1e-6)


def test_import_imports_nothing_heavy():
    code = (
        "import os, sys; flags = os.environ.get('XLA_FLAGS'); import jvdm; "
        "heavy = sorted(m for m in ('jax', 'flax', 'grain', 'tensorflow_datasets', "
        "'jvdm._xla_defaults', 'jvdm.train') if m in sys.modules); "
        "print(heavy, os.environ.get('XLA_FLAGS') == flags, len(jvdm.__all__) > 30)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True", "True"], out.stdout


def test_public_names_resolve_lazily():
    import jvdm
    from jvdm import schedules

    assert jvdm.alpha_bar is schedules.alpha_bar
    assert set(jvdm.__all__) <= set(dir(jvdm))
    with pytest.raises(AttributeError, match="no attribute 'alpha_barr'"):
        _ = jvdm.alpha_barr


def test_the_cli_applies_the_defaults_before_jax_starts(tmp_path):
    # `jvdm sample` configures the runtime before it imports JAX (here it then fails to find a
    # run: exit status 2), and the process's JAX starts with jvdm's defaults.
    code = (
        "import os, sys; from jvdm import cli; "
        f"status = cli.main(['sample', '--workdir', {str(tmp_path / 'none')!r}]); "
        "import jax; print(status, jax.config.read('jax_cpu_enable_async_dispatch'), "
        "'--xla_cpu_experimental_ynn_fusion_type=' in os.environ.get('XLA_FLAGS', ''))"
    )
    env = {k: v for k, v in os.environ.items() if k != "JVDM_NO_XLA_DEFAULTS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("JAX_CPU_ENABLE_ASYNC_DISPATCH", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["2", "False", "True"], out.stdout
