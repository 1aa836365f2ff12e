"""A run's config on disk: ``config.json`` written once per run, compared when a run resumes.

The work directory's layout is :mod:`jvdm.workdir`; reading a saved config back (for loading a
trained run) is :func:`jvdm.run.read_saved_config`. Resuming compares the requested config with the
saved one: any field may change (``train.steps``, the optimizer, eval settings) except those of
:data:`ARCHITECTURE_FIELDS`, whose change is a :class:`jvdm.errors.JvdmUserError` naming every
such field, instead of a shape mismatch deep inside orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jvdm.errors import JvdmUserError
from jvdm.run import read_saved_config
from jvdm.workdir import CONFIG_FILE, write_json

__all__ = ["ARCHITECTURE_FIELDS", "check_config", "config_diff", "save_config"]


# Fields that change the shapes of the saved state, or what the saved weights compute. Every other
# field (train.steps, the optimizer, eval settings, ...) may change when a run is resumed.
ARCHITECTURE_FIELDS = (
    "data.name",  # the image shape
    "model.channels",
    "model.channel_mult",
    "model.num_res_blocks",
    "model.attention_resolutions",
    "model.num_heads",
    "model.num_groups",
    "model.use_fourier_features",
    "model.fourier_min",
    "model.fourier_max",
    "model.prediction",
    "gamma.schedule",
    "gamma.hidden",
    "gamma.gamma_min",  # also the denoiser's normalisation of its gamma input
    "gamma.gamma_max",
    "gamma.ddpm_timesteps",
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_json_dict(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists), so saved and live configs compare."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(tree, default=str))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes ``workdir/config.json`` (from process 0 only); returns its path."""
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0:
        write_json(path, _as_json_dict(config))
    return path


def config_diff(saved: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """``{field: (saved value, requested value)}`` for every field that differs."""
    old, new = _flat(_as_json_dict(saved)), _flat(_as_json_dict(config))
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


def check_config(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple]:
    """Compares ``config`` with the one saved in ``workdir``.

    Returns:
      the fields that differ but may (``{field: (saved, requested)}``; empty for a new workdir).

    Raises:
      ValueError: a field of :data:`ARCHITECTURE_FIELDS` differs, naming every such field.
    """
    saved = read_saved_config(workdir)
    if saved is None:
        return {}
    diff = config_diff(saved, config)
    bad = {k: v for k, v in diff.items() if k in ARCHITECTURE_FIELDS}
    if bad:
        changes = "; ".join(f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in bad.items())
        raise JvdmUserError(
            f"the config changes the model of the run in {workdir!r}, so its checkpoints cannot "
            f"be resumed. Differing fields: {changes}. Use a new --workdir, or restore the "
            "saved values."
        )
    return diff
