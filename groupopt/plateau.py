r"""Reduce the learning rate on a plateau of a monitored metric, in the graph or on the host.

The decision rule of torch's ``ReduceLROnPlateau`` is written once, in
:func:`plateau_decide` and :func:`plateau_reduce_lr`, in arithmetic that works on
Python numbers (the compat scheduler
:class:`groupopt.compat.lr_scheduler.ReduceLROnPlateau` calls it on the host,
with torch's Python floats) and on JAX arrays (inside ``jit``, via
:func:`reduce_on_plateau`). At each step, with the metric ``m``::

    better  = m < best * (1 - th)   (min, rel)     m < best - th   (min, abs)
              m > best * (1 + th)   (max, rel)     m > best + th   (max, abs)
    best, bad = (m, 0) if better else (best, bad + 1)
    if cooldown_counter > 0:  cooldown_counter -= 1;  bad = 0
    if bad > patience:        reduce;  cooldown_counter = cooldown;  bad = 0
    reduce, per group:        new = max(lr * factor, min_lr);  lr = new if lr - new > eps

``best`` starts at ``+inf`` (min) or ``-inf`` (max), so the first metric is
better unless it is NaN; a NaN metric is never better.

In the graph, :func:`reduce_on_plateau` wraps a grouped transformation and
takes the metric as an extra argument of ``update``, like
``optax.contrib.reduce_on_plateau``::

    tx = groupopt.reduce_on_plateau(groupopt.sgd(0.1, momentum=0.9, params=p, groups=[...]),
                                    factor=0.5, patience=3, min_lr=[1e-4, 0.0])
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

Each ``update(grads, state, params, value=m)`` is torch's pair
``optimizer.step(); scheduler.step(m)``: the update uses the current lrs, then
the rule sees ``m`` and, on a plateau, scales every group's ``lr``
hyperparameter in the state (``state.inner.hyperparams[g]["lr"]``), which the
next update uses. No host sync, no recompilation. To observe a metric without
an update (an epoch-end validation loss), call ``tx.plateau_step(state, m)``
(jit-able too). ``lr`` must be a number in every group, not a schedule (the
schedule would overwrite the reduced value).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from .optimizers.base import hparam_dtype

__all__ = [
    "PlateauState",
    "ReduceLROnPlateauState",
    "PlateauTransformation",
    "plateau_check",
    "plateau_init",
    "plateau_is_better",
    "plateau_decide",
    "plateau_reduce_lr",
    "reduce_on_plateau",
]


def _traced(*xs) -> bool:
    return any(isinstance(x, (jax.Array, jax.core.Tracer)) for x in xs)


def _where(cond, a, b):
    if _traced(cond, a, b):
        return jnp.where(cond, a, b)
    return a if cond else b


def _maximum(a, b):
    return jnp.maximum(a, b) if _traced(a, b) else max(a, b)


class PlateauState(NamedTuple):
    """The rule's state (torch's attributes of the same names)."""

    best: Any
    num_bad_epochs: Any
    cooldown_counter: Any
    last_epoch: Any


# ---------------------------------------------------------------- the rule (one formula)


def plateau_check(mode: str, factor: float, threshold_mode: str) -> None:
    """torch's constructor checks (messages included)."""
    if factor >= 1.0:
        raise ValueError("Factor should be < 1.0.")
    if mode not in {"min", "max"}:
        raise ValueError("mode " + mode + " is unknown!")
    if threshold_mode not in {"rel", "abs"}:
        raise ValueError("threshold mode " + threshold_mode + " is unknown!")


def mode_worse(mode: str) -> float:
    """The initial ``best``: ``inf`` for min, ``-inf`` for max."""
    return math.inf if mode == "min" else -math.inf


def plateau_init(mode: str = "min", *, traced: bool = True) -> PlateauState:
    """The initial state: arrays (``best`` in the hyperparameter dtype), or Python numbers with ``traced=False``."""
    if not traced:
        return PlateauState(mode_worse(mode), 0, 0, 0)
    return PlateauState(
        jnp.asarray(mode_worse(mode), hparam_dtype()),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def plateau_is_better(a, best, mode: str, threshold: float, threshold_mode: str):
    """Whether ``a`` improves on ``best`` (strictly, beyond the threshold)."""
    if mode == "min" and threshold_mode == "rel":
        return a < best * (1.0 - threshold)
    if mode == "min" and threshold_mode == "abs":
        return a < best - threshold
    if mode == "max" and threshold_mode == "rel":
        return a > best * (threshold + 1.0)
    return a > best + threshold


def plateau_decide(
    state: PlateauState,
    metric,
    *,
    mode: str = "min",
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    epoch=None,
):
    """One observation of ``metric``: returns ``(new_state, reduce)`` (``reduce``: whether to scale the lrs now).

    Host (Python numbers in ``state`` and ``metric``) or traced (arrays).
    """
    best, bad, cooldown_counter, last_epoch = state
    last_epoch = last_epoch + 1 if epoch is None else epoch
    better = plateau_is_better(metric, best, mode, threshold, threshold_mode)
    best = _where(better, metric, best)
    bad = _where(better, 0, bad + 1)
    in_cooldown = cooldown_counter > 0
    cooldown_counter = _where(in_cooldown, cooldown_counter - 1, cooldown_counter)
    bad = _where(in_cooldown, 0, bad)
    reduce = bad > patience
    cooldown_counter = _where(reduce, cooldown, cooldown_counter)
    bad = _where(reduce, 0, bad)
    return PlateauState(best, bad, cooldown_counter, last_epoch), reduce


def plateau_reduce_lr(lr, factor: float, min_lr, eps: float):
    """One group's reduced lr: ``max(lr * factor, min_lr)``, kept only if it lowers the lr by more than ``eps``."""
    new_lr = _maximum(lr * factor, min_lr)
    return _where(lr - new_lr > eps, new_lr, lr)


# ---------------------------------------------------------------- the transformation


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau`: the rule's state and the wrapped grouped transformation's."""

    plateau: PlateauState
    inner: Any


class PlateauTransformation(optax.GradientTransformationExtraArgs):
    """What :func:`reduce_on_plateau` returns: an Optax transformation with a few helpers as attributes."""


def reduce_on_plateau(
    tx,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: float | Sequence[float] = 0,
    eps: float = 1e-8,
):
    """Wrap a grouped transformation so that a plateau of ``value`` scales each group's lr, in the graph.

    Args:
      tx: a :class:`groupopt.GroupedTransformation` (e.g. ``groupopt.sgd(...)``,
        ``groupopt.grouped(...)``) whose groups have a numeric ``lr``.
      mode: ``"min"`` or ``"max"`` (torch's ``ReduceLROnPlateau`` argument, as are the next ones:
        torch's defaults and checks).
      factor: the lr is multiplied by it on a plateau (``< 1``).
      patience: updates without improvement tolerated before a reduction.
      threshold: the least change that counts as an improvement.
      threshold_mode: ``"rel"`` or ``"abs"``.
      cooldown: updates to wait after a reduction before counting again.
      min_lr: a lower bound for every group, or one per group (in ``tx.configs`` order).
      eps: a reduction smaller than this is skipped.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
      params, *, value)`` is torch's ``optimizer.step(); scheduler.step(value)``,
      with ``apply(params, grads, state, *, value)`` (exact new parameters),
      ``plateau_step(state, value)`` (observe without updating),
      ``lrs(state)``, ``hyperparams(state)``, ``set_hyperparams(state, group, **values)``,
      ``configs`` and ``plan``.
    """
    if factor >= 1.0:  # torch's order of checks: factor, optimizer, min_lr, mode, threshold_mode
        raise ValueError("Factor should be < 1.0.")
    configs = getattr(tx, "configs", None)
    if configs is None:
        raise TypeError(f"reduce_on_plateau wraps a groupopt grouped transformation, got {type(tx).__name__}")
    n = len(configs)
    if isinstance(min_lr, (list, tuple)):
        if len(min_lr) != n:
            raise ValueError(f"expected {n} min_lrs, got {len(min_lr)}")
        min_lrs = tuple(min_lr)
    else:
        min_lrs = (min_lr,) * n
    plateau_check(mode, factor, threshold_mode)
    active = []
    for g, c in enumerate(configs):
        if c.frozen:
            continue
        if "lr" not in c.spec:
            raise ValueError(f"group {g} ({c.name}): {type(c.rule).name} has no lr hyperparameter")
        if callable(c.spec["lr"]):
            raise ValueError(
                f"group {g} ({c.name}): lr follows a schedule; reduce_on_plateau needs a numeric lr "
                "(the schedule would overwrite the reduced value)"
            )
        active.append(g)
    decide_kw = dict(mode=mode, patience=patience, threshold=threshold, threshold_mode=threshold_mode, cooldown=cooldown)

    def init_fn(params):
        return ReduceLROnPlateauState(plateau_init(mode), tx.init(params))

    def plateau_step(state: ReduceLROnPlateauState, value) -> ReduceLROnPlateauState:
        pstate = state.plateau
        metric = jnp.asarray(value).astype(pstate.best.dtype)
        if metric.shape != ():
            raise ValueError(f"value must be a scalar, got shape {metric.shape}")
        new_p, reduce = plateau_decide(pstate, metric, **decide_kw)
        hps = list(state.inner.hyperparams)
        for g in active:
            lr = hps[g]["lr"]
            hps[g] = {**hps[g], "lr": jnp.where(reduce, plateau_reduce_lr(lr, factor, min_lrs[g], eps), lr).astype(lr.dtype)}
        return ReduceLROnPlateauState(new_p, state.inner._replace(hyperparams=tuple(hps)))

    def update_fn(updates, state, params=None, *, value, **extra_args):
        new_updates, inner = tx.update(updates, state.inner, params, **extra_args)
        return new_updates, plateau_step(ReduceLROnPlateauState(state.plateau, inner), value)

    def apply_fn(params, grads, state, *, value):
        new_params, inner = tx.apply(params, grads, state.inner)
        return new_params, plateau_step(ReduceLROnPlateauState(state.plateau, inner), value)

    def set_hyperparams(state, group=0, **values):
        return state._replace(inner=tx.set_hyperparams(state.inner, group, **values))

    def lrs(state) -> list:
        """Each group's current lr: a Python float (a list for per-slice lrs; None for frozen groups)."""
        out = []
        for g, c in enumerate(configs):
            lr = None if c.frozen else state.inner.hyperparams[g]["lr"]
            out.append(None if lr is None else float(lr) if jnp.ndim(lr) == 0 else [float(x) for x in lr])
        return out

    out = PlateauTransformation(init_fn, update_fn)
    out.configs = configs
    out.plan = getattr(tx, "plan", None)
    out.inner = tx
    out.apply = apply_fn
    out.plateau_step = plateau_step
    out.set_hyperparams = set_hyperparams
    out.hyperparams = lambda state: tx.hyperparams(state.inner)
    out.lrs = lrs
    out.min_lrs = min_lrs
    return out
