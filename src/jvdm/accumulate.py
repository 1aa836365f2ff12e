"""Gradient accumulation: a batch in ``k`` micro-batches inside one compiled program.

A ``lax.scan`` runs a function on one micro-batch at a time, sums what is summed (the loss and the
gradients) in its carry and stacks the per-example outputs, so the peak memory is that of
``B / k`` examples while the result is the whole batch's, up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["scan_micro_batches", "split", "unsplit"]


def split(x: jax.Array, k: int) -> jax.Array:
    """``[B, ...] -> [k, B / k, ...]``, micro-batch ``i`` taking rows ``i, i + k, i + 2k, ...``.

    Strided, not contiguous: with the batch sharded in contiguous blocks over ``n`` devices, every
    micro-batch then takes ``B / (k n)`` rows from each device (which needs ``k`` to divide the
    per-device batch), so no device idles and no data moves between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def unsplit(x: jax.Array) -> jax.Array:
    """The inverse of :func:`split`: ``[k, B / k, ...] -> [B, ...]`` in the original order."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def scan_micro_batches(
    fn: Callable[[jax.Array, Any], tuple[Any, Any]], batched: Any, k: int, summed_like: Any
) -> tuple[Any, Any]:
    """``(sum over micro-batches of fn's first output, its second output for the whole batch)``.

    Args:
      fn: ``fn(i, micro) -> (summed, per_example)`` for micro-batch index ``i`` (int32 ``[]``) and
        ``micro``, the pytree ``batched`` cut to micro-batch ``i``; ``per_example`` leaves have a
        leading axis of ``B / k``.
      batched: a pytree of arrays ``[B, ...]``.
      k: the number of micro-batches; must divide ``B``.
      summed_like: a pytree of the structure, shapes and dtypes of ``fn``'s first output (zeros
        start the sum).
    """
    xs = (jnp.arange(k), jax.tree.map(lambda x: split(x, k), batched))

    def body(carry, xs):
        summed, per_example = fn(*xs)
        return jax.tree.map(jnp.add, carry, summed), per_example

    init = jax.tree.map(jnp.zeros_like, summed_like)
    summed, stacked = jax.lax.scan(body, init, xs)
    return summed, jax.tree.map(unsplit, stacked)
