"""Checkpoints with orbax, and the run's configuration next to them.

A work directory holds ``config.json`` (the config of the latest run in it) and
``checkpoints/<step>`` (orbax ``StandardSave`` of the whole training state). Saves are
asynchronous: ``save`` returns once the arrays are copied off the accelerator and the files are
written in the background; :func:`close` (or ``manager.wait_until_finished()``) waits for them.

Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` leaves carrying the shardings wanted
now), so a state saved on 4 devices restores onto 1 and vice versa. Before that, the requested
config is compared with the saved one: a change to the architecture is a ``ValueError`` that names
the fields, instead of a shape mismatch deep inside orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

__all__ = [
    "ARCHITECTURE_FIELDS",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "check_config",
    "close",
    "config_diff",
    "load_config",
    "make_manager",
    "restore",
    "save",
    "save_config",
]

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

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
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_as_json_dict(config), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)  # atomic: a crash never leaves half a config
    return path


def load_config(workdir: str) -> dict[str, Any] | None:
    """The saved config of ``workdir`` as a nested dict, or ``None`` if there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


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
    saved = load_config(workdir)
    if saved is None:
        return {}
    diff = config_diff(saved, config)
    bad = {k: v for k, v in diff.items() if k in ARCHITECTURE_FIELDS}
    if bad:
        changes = "; ".join(f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in bad.items())
        raise ValueError(
            f"the config changes the model of the run in {workdir!r}, so its checkpoints cannot "
            f"be resumed. Differing fields: {changes}. Use a new --workdir, or restore the "
            "saved values."
        )
    return diff


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    """An orbax manager for ``workdir/checkpoints``, keeping the ``keep`` latest, saving async."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Starts an asynchronous save of ``state`` as checkpoint ``step`` (all processes call it)."""
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def _key_path(path) -> tuple:
    """A pytree path as plain names and indices (orbax's metadata turns attributes into keys)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def _shape_mismatches(manager: ocp.CheckpointManager, step: int, abstract: Any) -> list[str]:
    """Leaves whose saved shape differs from the target's, as readable strings (best effort)."""
    try:
        saved = manager.item_metadata(step)
        saved_shapes = {
            _key_path(path): getattr(meta, "shape", None)
            for path, meta in jax.tree_util.tree_leaves_with_path(saved)
        }
    except Exception:  # metadata is optional: fall back to orbax's own error
        return []
    out = []
    for path, target in jax.tree_util.tree_leaves_with_path(abstract):
        shape = saved_shapes.get(_key_path(path))
        if shape is not None and tuple(shape) != tuple(target.shape):
            out.append(f"{jax.tree_util.keystr(path)}: saved {tuple(shape)}, now {target.shape}")
    return out


def restore(manager: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
    """Restores checkpoint ``step`` into the structure, dtypes and shardings of ``abstract``.

    Args:
      manager: from :func:`make_manager`.
      step: which checkpoint (e.g. ``manager.latest_step()``).
      abstract: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (``jax.eval_shape`` of
        the state's constructor); its static metadata is kept in the result.
    """
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, TypeError) as err:
        bad = _shape_mismatches(manager, step, abstract)
        if bad:
            raise ValueError(
                f"checkpoint {step} in {manager.directory} does not fit this config: "
                + "; ".join(bad[:5])
                + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            ) from err
        raise


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for pending asynchronous saves, then releases the manager."""
    manager.wait_until_finished()
    manager.close()
