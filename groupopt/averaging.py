"""Weight averaging of a parameter tree (SWA / EMA), jit-able, with torch's numbers.

The functional counterpart of ``torch.optim.swa_utils.AveragedModel`` for
training loops written as pure functions, and the one implementation of the
averaging math that :mod:`groupopt.compat.swa_utils` uses::

    state = averaging.init(params)                 # SWA: the running mean
    state = averaging.init(params, decay=0.999)    # EMA (decay held as an array)
    ...
    state = averaging.update(state, params)        # inside or outside jit
    averaged_params = state.avg

State: ``AveragedState(avg, n, decay)``. ``avg`` is a copy of the tree, ``n``
the number of models averaged so far (an integer array, torch's
``n_averaged``), ``decay`` ``None`` (SWA) or a float array (EMA): editing it
(``state._replace(decay=jnp.asarray(.99))``) never recompiles.

``update`` follows torch's ``update_parameters``: when ``n == 0`` the tree is
copied (no averaging), afterwards each leaf ``a`` is averaged with the model's
``x`` by one of the rules below, called with ``n`` = the count *before* the
update; the result is stored in ``a``'s dtype (torch's ``copy_``: a float
result put in an integer leaf is truncated toward zero), and ``n`` grows by 1.

Averaging rules (``method``), each the arithmetic of one torch function:

* ``"swa"`` (torch's ``get_swa_avg_fn``, ``AveragedModel``'s default on
  CPU): ``a + (x - a) / (n + 1)``. An exact running mean in float64.
* ``"swa_lerp"`` (torch's ``get_swa_multi_avg_fn``, its default on CUDA):
  ``lerp(a, x, w)`` with ``w = 1 / (n + 1)`` computed in **float32** (torch's
  0-d tensor in the default dtype), so with float64 leaves the mean of 3 is off
  by ~1e-8, as in torch. Not defined for integer leaves (torch raises).
* ``"ema"`` (torch's ``get_ema_avg_fn``): ``decay * a + (1 - decay) * x``.
* ``"ema_lerp"`` (torch's ``get_ema_multi_avg_fn``, the default with a
  decay): ``lerp(a, x, 1 - decay)``; integer leaves ``a * decay + x * (1 - decay)``.

``lerp`` is torch's two-branch formula (``base.lerp``). Coefficients are cast
to the leaf dtype (torch's scalar handling). Integer leaves are averaged in
float32 (torch's default dtype: ``int_tensor / n`` and ``int_tensor * 0.9`` are
float32 there) and truncated back. ``1 - decay`` is formed in the decay's dtype
(float64 under ``jax_enable_x64``, like torch's Python float).

Also here: torch ``SWALR``'s learning-rate annealing (:func:`swa_anneal_factor`,
:func:`swa_lr_next`), evaluated on the host by the compat scheduler.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .groups import path_str
from .optimizers.base import lerp, stored

__all__ = [
    "AveragedState",
    "init",
    "update",
    "update_with",
    "swa_mean",
    "swa_lerp",
    "ema",
    "ema_lerp",
    "check_decay",
    "swa_anneal_factor",
    "swa_lr_next",
]

METHODS = ("swa", "swa_lerp", "ema", "ema_lerp")
INT_COMPUTE_DTYPE = jnp.float32  # torch's default dtype: where torch averages integer tensors


class AveragedState(NamedTuple):
    """The averaged tree ``avg``, the count ``n`` of models averaged, and ``decay`` (``None``: SWA)."""

    avg: Any
    n: jax.Array
    decay: Any = None


def _count_dtype():
    return jax.dtypes.canonicalize_dtype(jnp.int64)


def _float_dtype():
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def check_decay(decay) -> None:
    """torch's check of an EMA decay (when it is a concrete number): ``0 <= decay <= 1``."""
    if isinstance(decay, jax.core.Tracer):
        return
    value = float(np.asarray(decay))
    if value < 0.0 or value > 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")


def init(params, decay=None) -> AveragedState:
    """The state before the first update: a copy of ``params``, ``n = 0``, and ``decay`` as an array (or ``None``)."""
    avg = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    if decay is not None:
        check_decay(decay)
        decay = jnp.asarray(decay, dtype=_float_dtype())
    return AveragedState(avg=avg, n=jnp.zeros((), _count_dtype()), decay=decay)


# ------------------------------------------------------------------ per-leaf rules


def _is_int(a) -> bool:
    return not jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _compute_dtype(a):
    """Floats at least float32 (torch's opmath for half types); integers in float32 (torch's default dtype)."""
    if _is_int(a):
        return INT_COMPUTE_DTYPE
    return jnp.promote_types(jnp.result_type(a), jnp.float32)


def swa_mean(a, x, n):
    """torch ``get_swa_avg_fn``: ``a + (x - a) / (n + 1)`` (``n`` = models averaged before this one)."""
    if _is_int(a):
        ct = INT_COMPUTE_DTYPE
        return a.astype(ct) + (x - a).astype(ct) / (jnp.asarray(n) + 1).astype(ct)
    return a + (x - a) / (jnp.asarray(n) + 1).astype(jnp.result_type(a))


def swa_lerp(a, x, n):
    """torch ``get_swa_multi_avg_fn`` on floats: ``lerp(a, x, 1 / (n + 1))`` with the weight in float32."""
    if _is_int(a):
        raise TypeError(
            f"swa_lerp is not defined for integer leaves (got {jnp.result_type(a)}); use swa_mean ('swa'), "
            "which truncates the mean as torch's get_swa_avg_fn does"
        )
    w = jnp.float32(1) / (jnp.asarray(n) + 1).astype(jnp.float32)
    ct = _compute_dtype(a)
    return lerp(a.astype(ct), x.astype(ct), w.astype(ct))


def ema(a, x, decay):
    """torch ``get_ema_avg_fn``: ``decay * a + (1 - decay) * x`` (each product rounded, as torch stores it)."""
    ct = _compute_dtype(a)
    d = jnp.asarray(decay)
    one_minus = (1 - decay) if isinstance(decay, (int, float)) else 1 - d
    first = stored(d.astype(ct) * a.astype(ct), a.astype(ct))
    return first + jnp.asarray(one_minus).astype(ct) * x.astype(ct)


def ema_lerp(a, x, decay):
    """torch ``get_ema_multi_avg_fn``: ``lerp(a, x, 1 - decay)``; integer leaves ``a * decay + x * (1 - decay)``."""
    if _is_int(a):
        return ema(a, x, decay)
    ct = _compute_dtype(a)
    one_minus = (1 - decay) if isinstance(decay, (int, float)) else 1 - jnp.asarray(decay)
    return lerp(a.astype(ct), x.astype(ct), jnp.asarray(one_minus).astype(ct))


# ------------------------------------------------------------------ tree update


def _leaf_paths(tree) -> tuple[list[str], list, Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(kp) for kp, _ in flat], [leaf for _, leaf in flat], treedef


def update_with(
    state: AveragedState,
    params,
    avg_fn: Callable | None = None,
    multi_avg_fn: Callable | None = None,
) -> AveragedState:
    """One averaging step with a custom rule (jit-able): copy at ``n == 0``, else the rule; ``n += 1``.

    ``avg_fn(a, x, n) -> new a`` is called per leaf; ``multi_avg_fn(as, xs, n)
    -> list of new as`` once per dtype (torch's per-(device, dtype) buckets, in
    tree order), returning the new values instead of writing in place. ``n`` is
    the count before this step (an integer array). Each result is stored in its
    leaf's dtype; a result of another shape is an error naming the leaf.
    Exactly one of the two must be given.
    """
    if (avg_fn is None) == (multi_avg_fn is None):
        raise ValueError("update_with: give exactly one of avg_fn and multi_avg_fn")
    paths, avg_leaves, treedef = _leaf_paths(state.avg)
    try:
        x_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"update: params do not have the structure of the averaged tree ({treedef}): {err}") from None
    for path, a, x in zip(paths, avg_leaves, x_leaves):
        if jnp.shape(a) != jnp.shape(x):
            raise ValueError(f"update: {path!r}: expected shape {jnp.shape(a)} (the averaged leaf), got {jnp.shape(x)}")
    n = state.n

    def stored_as(path, a, new):
        if jnp.shape(new) != jnp.shape(a):
            raise ValueError(f"update: the averaging function returned shape {jnp.shape(new)} for {path!r}, expected {jnp.shape(a)}")
        return jnp.asarray(new).astype(jnp.result_type(a))

    def copy(avg, xs):
        return [jnp.asarray(x).astype(jnp.result_type(a)) for a, x in zip(avg, xs)]

    def average(avg, xs):
        if avg_fn is not None:
            return [stored_as(p, a, avg_fn(a, x, n)) for p, a, x in zip(paths, avg, xs)]
        buckets: dict = {}
        for i, a in enumerate(avg):
            buckets.setdefault(jnp.result_type(a), []).append(i)
        out = list(avg)
        for idx in buckets.values():
            new = multi_avg_fn([avg[i] for i in idx], [xs[i] for i in idx], n)
            if new is None or len(new) != len(idx):
                raise ValueError(
                    "update: multi_avg_fn must return the list of new averaged values "
                    f"({len(idx)} arrays; JAX arrays cannot be updated in place), got {type(new).__name__}"
                )
            for i, v in zip(idx, new):
                out[i] = stored_as(paths[i], avg[i], v)
        return out

    avg_leaves = [jnp.asarray(a) for a in avg_leaves]
    x_leaves = [jnp.asarray(x) for x in x_leaves]
    if not avg_leaves:
        new = []
    else:
        new = jax.lax.cond(n == 0, copy, average, avg_leaves, x_leaves)
    return state._replace(avg=treedef.unflatten(new), n=n + 1)


def _rule(method: str, decay) -> Callable:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method.startswith("swa"):
        if decay is not None:
            raise ValueError(f"method {method!r} averages equally: the state has a decay (EMA); use 'ema' or 'ema_lerp'")
        return swa_mean if method == "swa" else swa_lerp
    if decay is None:
        raise ValueError(f"method {method!r} needs a decay: init(params, decay=...)")
    fn = ema if method == "ema" else ema_lerp
    return lambda a, x, n: fn(a, x, decay)


def update(state: AveragedState, params, method: str | None = None) -> AveragedState:
    """One averaging step (jit-able; ``method`` is static): SWA mean, or EMA when the state has a decay.

    ``method``: ``"swa"`` (default without decay), ``"swa_lerp"``, ``"ema"``,
    ``"ema_lerp"`` (default with a decay); see the module docstring.
    """
    if method is None:
        method = "swa" if state.decay is None else "ema_lerp"
    return update_with(state, params, avg_fn=_rule(method, state.decay))


# ------------------------------------------------------------------ SWALR annealing


def swa_anneal_factor(t, strategy: str) -> float:
    """SWALR's annealing curve at ``t`` in [0, 1]: ``(1 - cos(pi t)) / 2`` ('cos') or ``t`` ('linear')."""
    if strategy == "cos":
        return (1 - math.cos(math.pi * t)) / 2
    if strategy == "linear":
        return t
    raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {strategy}")


def swa_lr_next(lr, swa_lr, step: int, anneal_epochs: int, anneal_func: Callable) -> float:
    """torch ``SWALR.get_lr`` for one group: the lr after ``step`` SWALR steps, rebased on the current ``lr``.

    ``s = max(1, step)`` when ``anneal_epochs == 0``; with ``f = anneal_func``::

        a_prev = f(clamp((s - 1) / max(1, E), 0, 1)); a = f(clamp(s / max(1, E), 0, 1))
        start  = swa_lr if a_prev == 1 else (lr - a_prev * swa_lr) / (1 - a_prev)
        lr     = swa_lr * a + start * (1 - a)

    i.e. ``swa_lr * f(s/E) + L0 * (1 - f(s/E))`` with ``L0`` the lr at the first
    step; another scheduler's changes to ``lr`` are absorbed into ``start``.
    Python arithmetic in torch's order (so the floats are torch's).
    """
    if anneal_epochs == 0:
        step = max(1, step)
    prev_t = max(0, min(1, (step - 1) / max(1, anneal_epochs)))
    prev_alpha = anneal_func(prev_t)
    start = swa_lr if prev_alpha == 1 else (lr - prev_alpha * swa_lr) / (1 - prev_alpha)
    t = max(0, min(1, step / max(1, anneal_epochs)))
    alpha = anneal_func(t)
    return swa_lr * alpha + start * (1 - alpha)
