"""The training state and the pure, compiled-once training step.

Training is a sequence of explicit transitions ``state -> train_step(state, batch, key) -> state``.
:class:`TrainState` holds everything that changes (step, parameters, their EMA, the optimizer's
state and the counters of skipped updates); the optimizer (:mod:`jvdm.optimizer`), its
learning-rate schedule and the EMA decay are static metadata, so a state and a batch are all the
step needs. Nothing here reads a config: a run's :class:`StateSpec` comes from
:func:`jvdm.train.state_spec`.

The step is data parallel without any explicit collective: the state is replicated and the batch
sharded over the mesh's ``'data'`` axis (:mod:`jvdm.parallel`), and XLA inserts the all-reduce of
the gradients when it compiles the ``jit``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jvdm import model as model_lib
from jvdm import noise_sampling, objective, parallel

__all__ = [
    "StateSpec",
    "TrainState",
    "abstract_train_state",
    "create_train_state",
    "train_step",
]


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes; a pytree of arrays plus static metadata.

    Attributes:
      step: int32 ``[]``, the number of steps taken (skipped ones included); step ``i`` uses batch
        ``i`` and key ``fold_in(key, i)``.
      params: the trained :class:`jvdm.model.VDMParams` (denoiser and schedule).
      ema_params: their exponential moving average, used for evaluation and sampling.
      opt_state: the optax state of ``tx``.
      skipped_total: int32 ``[]``, updates skipped because the loss or a gradient was not finite.
      skipped_consecutive: int32 ``[]``, how many of the most recent steps were skipped in a row.
      loss_histogram: float32 ``[2, K]``, the EMA of the training loss over ``lambda`` bins that
        ``noise_sampling="adaptive"`` draws noise levels from (:mod:`jvdm.noise_sampling`);
        computed from the global batch inside the step, so it is the same on every device.
      tx: the optimizer (static).
      lr_schedule: the learning rate as a function of the number of applied updates (static; the
        same schedule ``tx`` uses, kept for the ``lr`` metric).
      ema_decay: the EMA's decay per applied update (static).
    """

    step: jax.Array
    params: model_lib.VDMParams
    ema_params: model_lib.VDMParams
    opt_state: optax.OptState
    skipped_total: jax.Array
    skipped_consecutive: jax.Array
    loss_histogram: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lr_schedule: optax.Schedule = struct.field(pytree_node=False)
    ema_decay: float = struct.field(pytree_node=False)


class StateSpec(NamedTuple):
    """The static part of a run's :class:`TrainState`, which also fixes its shapes: equal specs
    share one compiled initialisation and one compiled step.

    Attributes:
      model: the :class:`jvdm.model.VDM` trained.
      tx: the optimizer (e.g. :func:`make_optimizer`'s).
      lr_schedule: the learning rate that ``tx`` uses, as a function of the applied updates.
      ema_decay: the EMA's decay per applied update (before :func:`ema_decay_at`'s warm-up).
    """

    model: model_lib.VDM
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    ema_decay: float


def _init_state_impl(model, tx, lr_schedule, ema_decay, key, gaussian_fit=None) -> TrainState:
    params = model_lib.init(model, key, gaussian_fit=gaussian_fit)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        # A distinct buffer, so that donating the state never donates one buffer twice.
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        skipped_total=zero,
        skipped_consecutive=zero,
        loss_histogram=noise_sampling.init_histogram(model.histogram_bins),
        tx=tx,
        lr_schedule=lr_schedule,
        ema_decay=ema_decay,
    )


def create_train_state(
    spec: StateSpec, key: jax.Array, *, mesh: Mesh | None = None, gaussian_fit=None
) -> TrainState:
    """A fresh state of ``spec``, initialised from ``key`` and replicated over ``mesh`` (default:
    all devices).

    The parameters are initialised once on a local device (one compiled program, reused by every
    call with an equal spec) and then copied onto the mesh. A denoiser with a Gaussian base gets
    ``gaussian_fit`` as its base (:func:`jvdm.model.init`).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    state = parallel.jit_run_once(_init_state_impl, (0, 1, 2, 3))(*spec, key, gaussian_fit)
    return parallel.replicate(state, mesh)


def abstract_train_state(spec: StateSpec, mesh: Mesh) -> TrainState:
    """The shapes, dtypes and (replicated) shardings of :func:`create_train_state`'s result,
    computed without allocating anything (``jax.eval_shape``): the restore target."""
    abstract = jax.eval_shape(functools.partial(_init_state_impl, *spec), jax.random.key(0))
    sharding = parallel.replicated_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )


def ema_decay_at(applied: jax.Array, ema_decay: float) -> jax.Array:
    """The EMA's decay after ``applied`` updates: ``min(ema_decay, (1 + n) / (10 + n))``.

    Without this warm-up the average starts at the initial parameters and keeps a weight of
    ``ema_decay ** n`` on them: 45% after 800 steps at 0.999, enough to ruin a short run's
    evaluation (a step-400 EMA scored 3.18 bpd where the raw parameters scored about 2.0). With it,
    the average covers roughly the last ``n / 10`` updates early on and ``1 / (1 - ema_decay)``
    later (as in the Flax, DDPM and big_vision trainers).
    """
    n = jnp.asarray(applied, jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + n) / (10.0 + n))


def _gamma_in_order(params: model_lib.VDMParams) -> jax.Array:
    """Whether ``gamma(1) > gamma(0)``: the invariant of :class:`jvdm.nn.gamma.LearnedGamma`, whose
    end points are trained parameters (a fixed schedule's are checked once, at construction)."""
    g_0, g_1 = model_lib.gamma(params, jnp.array([0.0, 1.0], jnp.float32))
    return g_1 > g_0


def _apply_or_keep(state: TrainState, *, grads, applied, histogram) -> tuple[TrainState, jax.Array]:
    """``(state after the update, its norm)``, or ``(state, NaN)`` when the update is not finite
    or would leave ``gamma_max <= gamma_min``."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = model_lib.keep_constants(optax.apply_updates(state.params, updates), state.params)
    decay = ema_decay_at(applied, state.ema_decay)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)
    ema_params = model_lib.keep_constants(ema_params, params)
    new = state.replace(
        params=params, ema_params=ema_params, opt_state=opt_state, loss_histogram=histogram
    )
    update_norm = optax.tree.norm(updates)
    # Finite gradients can still overflow in the update (huge Adam ratios), and an update can
    # reverse a learned schedule's end points: either keeps the old state.
    ok = jnp.isfinite(update_norm) & _gamma_in_order(params)
    return jax.lax.cond(ok, lambda: new, lambda: state), jnp.where(ok, update_norm, jnp.nan)


def _keep(state: TrainState) -> tuple[TrainState, jax.Array]:
    """The skipped step's ``(state, update norm)``: the old state, and NaN."""
    return state, jnp.asarray(jnp.nan, jnp.float32)


def _count_step(old: TrainState, new: TrainState, update_norm) -> tuple[TrainState, jax.Array]:
    """``new`` with the step and skip counters advanced (a NaN ``update_norm`` marks a skip)."""
    is_finite = jnp.isfinite(update_norm)
    skipped = jnp.where(is_finite, 0, 1).astype(jnp.int32)
    new = new.replace(
        step=old.step + 1,
        skipped_total=old.skipped_total + skipped,
        skipped_consecutive=jnp.where(is_finite, 0, old.skipped_consecutive + 1),
    )
    return new, skipped


def _train_step(
    state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *, grad_accum_steps: int = 1
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step: ``(state, batch, key) -> (state, metrics)``.

    Pure and compiled once per run (the state is donated, so its buffers are reused in place).
    The step's randomness is ``fold_in(key, state.step)``. Gradients come from
    :func:`jvdm.objective.loss_and_grads` (the objective for the denoiser and the schedule's end
    points, the loss variance for the schedule's interior); they are clipped by global norm and
    applied by AdamW, and the EMA follows with ``optax.incremental_update``. A step whose loss,
    gradients or update are not finite, or whose update would leave ``gamma_max <= gamma_min``
    (the learned schedule's order), changes nothing but ``step`` and the skip counters (the loss
    histogram included).

    With ``grad_accum_steps = k``, ``k`` micro-batches of ``B / k`` images (``lax.scan``), then one
    update: the whole batch's update (same times and noise) in the memory of ``B / k``.

    Args:
      state: the :class:`TrainState`, replicated over the mesh.
      batch: ``{'image': uint8 [B, H, W, C]}``, sharded along ``'data'``.
      key: the run's training key (replicated); never split by the caller.
      grad_accum_steps: micro-batches per step (static); must divide the per-device batch.

    Returns:
      the new state and scalar metrics: ``bpd`` (the ELBO estimate) and its terms, ``loss`` (the
      training objective), ``grad_norm`` (before clipping), ``param_norm``, ``update_norm``,
      ``lr``, ``skipped`` (this step), ``skipped_total``, ``skipped_consecutive`` and more.
    """
    step_key = jax.random.fold_in(key, state.step)
    loss, terms, grads, histogram = objective.loss_and_grads(
        state.params,
        batch["image"],
        step_key,
        train=True,
        micro_batches=grad_accum_steps,
        histogram=state.loss_histogram,
    )
    grad_norm = optax.tree.norm(grads)
    applied = state.step - state.skipped_total  # updates applied so far (optax's own count)

    # A non-finite loss, gradient or update (one inf or NaN anywhere makes a global norm
    # non-finite) keeps the old state. `lax.cond` over the whole update, decided on device so the
    # host never waits: cheaper than a `where` per parameter (bench/RESULTS.md), and a skipped
    # step does not even run the optimizer.
    apply = functools.partial(_apply_or_keep, grads=grads, applied=applied, histogram=histogram)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state, update_norm = jax.lax.cond(ok, apply, _keep, state)
    new_state, skipped = _count_step(state, new_state, update_norm)
    metrics = dict(terms)
    metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        param_norm=optax.tree.norm(new_state.params),
        update_norm=update_norm,
        lr=jnp.asarray(state.lr_schedule(applied), jnp.float32),
        skipped=skipped,
        skipped_total=new_state.skipped_total,
        skipped_consecutive=new_state.skipped_consecutive,
    )
    return new_state, metrics


train_step = jax.jit(_train_step, donate_argnums=0, static_argnames="grad_accum_steps")
