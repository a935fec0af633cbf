r"""Gradient accumulation with torch's loop semantics.

torch accumulates by not zeroing: ``backward()`` adds into ``.grad``, so after
``k`` micro-batches the optimizer sees the **sum** of their gradients; one
``optimizer.step()``, one ``scheduler.step()`` and one ``zero_grad()`` follow.
Users whose loss is a mean divide each micro-batch loss by ``k`` so the sum
equals the full-batch mean gradient.

Functional core: :func:`accumulate` wraps any transformation (a grouped one
included): ``k`` calls of ``update`` sum the gradients (``average=True``
divides the sum by ``k`` at the end instead, like ``optax.MultiSteps``); the
``k``-th call runs the inner update once on the result, so the inner count
-- the argument of schedules -- advances once per ``k`` calls, as torch's
scheduler does per optimizer step. The other calls return zero updates and
leave the inner state as it is (``lax.cond``: the inner update is not computed
on those calls). ::

    tx = groupopt.accumulate(groupopt.adamw(groupopt.schedules.one_cycle(1e-3, total_steps=N)), 4)
    state = tx.init(params)

    @jax.jit
    def micro_step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)            # loss of one micro-batch
        updates, state = tx.update(grads, state, params)    # zeros on 3 calls out of 4
        return optax.apply_updates(params, updates), state

``tx.apply(params, grads, state)`` is the exact form when the wrapped
transformation has one (a grouped transformation): the parameters are returned
unchanged on the accumulating calls. ``tx.has_updated(state)`` says whether
the last call applied an update.

Relation to ``optax.MultiSteps``: with summed gradients and one accumulator
dtype, the numbers are MultiSteps' bit for bit (``accumulate(tx, k)`` equals
``optax.MultiSteps(tx, k, use_grad_mean=False, accumulator_dtype=...)``; tested).
What this module keeps is what MultiSteps does not do: the running sum in each
gradient leaf's own dtype (MultiSteps casts every leaf to one dtype, float32 by
default, and before optax 0.2.8 it has no ``accumulator_dtype``); ``average=True`` as
the sum divided by ``k`` (MultiSteps' running mean rounds differently); the
exact ``apply`` form; the inner update skipped on the accumulating calls
(MultiSteps computes it at every call and discards it); the grouped
transformation's ``hyperparams`` / ``set_hyperparams`` / ``plan`` passed through.

Compat (torch-shaped) loop: :class:`groupopt.compat.Optimizer` sums what
:meth:`~groupopt.compat.Optimizer.accumulate_grad` receives until
``zero_grad()``, like ``.grad``::

    for i, batch in enumerate(loader):
        grads = jax.grad(loss_fn)(opt.params, batch)     # loss / k for a mean loss
        opt.accumulate_grad(grads)                       # torch: loss.backward()
        if (i + 1) % k == 0:
            opt.step()                                   # uses the summed gradients
            scheduler.step()
            opt.zero_grad()
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .groups import as_param_tree

__all__ = ["AccumulationState", "AccumulatingTransformation", "accumulate"]


class AccumulationState(NamedTuple):
    """State of :func:`accumulate`.

    Attributes:
      mini_step: calls since the last inner update (0 .. k-1).
      updates: inner updates applied so far.
      acc: the gradients summed since the last inner update.
      inner: the wrapped transformation's state.
    """

    mini_step: jax.Array
    updates: jax.Array
    acc: Any
    inner: Any


class AccumulatingTransformation(optax.GradientTransformationExtraArgs):
    """What :func:`accumulate` returns: an Optax transformation with ``apply``, ``has_updated``, ``every_k``, ``inner``."""


def accumulate(tx, every_k: int, *, average: bool = False, accumulator_dtype=None) -> AccumulatingTransformation:
    """Accumulate ``every_k`` micro-batches' gradients, then apply ``tx`` once.

    Args:
      tx: the transformation to wrap (e.g. a :func:`groupopt.grouped` one).
      every_k: micro-batches per update (a positive Python int).
      average: divide the summed gradients by ``every_k`` before the update
        (default: the sum, as torch's ``backward()`` accumulates).
      accumulator_dtype: dtype of the running sum (default: each gradient leaf's).

    Extra keyword arguments of ``update`` (``value=`` for
    :func:`groupopt.reduce_on_plateau`) are passed to the inner update on the
    ``k``-th call and ignored on the others.
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"every_k must be a positive integer, got {every_k!r}")
    k = every_k
    inner_tx = optax.with_extra_args_support(tx)

    def zeros_acc(tree):
        return jax.tree.map(lambda g: jnp.zeros(jnp.shape(g), accumulator_dtype or jnp.result_type(g)), tree)

    def init_fn(params):
        return AccumulationState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), zeros_acc(as_param_tree(params)), inner_tx.init(params)
        )

    def add(acc, grads):
        return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)

    def finished(acc, grads):
        # the gradients the inner update sees, in the gradients' dtypes
        return jax.tree.map(lambda a, g: ((a / k) if average else a).astype(g.dtype), acc, grads)

    def step(state: AccumulationState, grads, run, skip):
        acc = add(state.acc, grads)
        emit = state.mini_step == k - 1
        out, inner = jax.lax.cond(emit, run, skip, finished(acc, grads), state.inner)
        new_state = AccumulationState(
            jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32),
            state.updates + emit.astype(jnp.int32),
            jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc),
            inner,
        )
        return out, new_state

    def update_fn(updates, state, params=None, **extra_args):
        def run(g, inner):
            return inner_tx.update(g, inner, params, **extra_args)

        shape = jax.eval_shape(run, updates, state.inner)[0]

        def skip(g, inner):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape), inner

        return step(state, updates, run, skip)

    def apply_fn(params, grads, state, **extra_args):
        def run(g, inner):
            return tx.apply(params, g, inner, **extra_args)

        def skip(g, inner):
            return params, inner

        return step(state, grads, run, skip)

    def has_updated(state: AccumulationState):
        """Whether the last call ran the inner update."""
        return jnp.logical_and(state.mini_step == 0, state.updates > 0)

    out = AccumulatingTransformation(init_fn, update_fn)
    out.every_k = k
    out.inner = tx
    out.has_updated = has_updated
    if hasattr(tx, "apply"):
        out.apply = apply_fn
    for name in ("configs", "plan"):
        if hasattr(tx, name):
            setattr(out, name, getattr(tx, name))
    if hasattr(tx, "hyperparams"):
        out.hyperparams = lambda state: tx.hyperparams(state.inner)
    if hasattr(tx, "set_hyperparams"):
        out.set_hyperparams = lambda state, group=0, **values: state._replace(inner=tx.set_hyperparams(state.inner, group, **values))
    return out
