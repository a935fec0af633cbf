r"""Gradient clipping with torch's numbers (``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``).

The arithmetic is written once, here; :mod:`groupopt.compat.clip_grad` gives it
torch's function signatures. torch's order of operations, which decides the
last bits::

    n_i   = vector_norm(g_i, p)                 per gradient, in its own dtype
                                                (float16/bfloat16 accumulate in float32)
    total = vector_norm(stack(n_1 .. n_k), p)   stack promotes: float32 + float64 -> float64
    coef  = min(reciprocal(total + 1e-6) * max_norm, 1)   in total's dtype
    g_i   = g_i * coef                          always (also when coef == 1); g_i keeps its dtype

``p`` is any float: ``2``, ``1``, ``inf`` (largest ``|g|``), ``-inf``
(smallest), ``0`` (the number of nonzero entries per gradient, then the
number of **gradients** with a nonzero entry), others ``(sum |g|^p)^(1/p)``.
A NaN total makes every gradient NaN; an infinite one makes them ``±0`` (and
their infinite entries NaN), as in torch. Value clipping is
``min(max(g, -v), v)``.

Optax transformations (usable in ``optax.chain`` before a grouped optimizer
and inside :func:`groupopt.accumulate`):

* :func:`clip_grad_norm` -- one norm over the whole gradient tree (torch's
  ``clip_grad_norm_(model.parameters(), max_norm)``);
* :func:`clip_grad_norm_per_group` -- one norm, and one ``max_norm``, per
  parameter group (torch's ``for g in opt.param_groups:
  clip_grad_norm_(g["params"], max_norm)``), with the groups of a
  :func:`groupopt.grouped` transformation or any selectors;
* :func:`clip_grad_value`.

``max_norm`` lives in the state as an array (float64 under x64, like torch's
Python float), so it can be changed between steps without recompiling
(``tx.set_max_norm(state, 0.5)``); the last total norm(s) before clipping are
in the state too (``state.total_norm``), for logging. ::

    clip = groupopt.clip_grad_norm(1.0)
    tx = optax.chain(clip, groupopt.adamw(1e-3, params=params, groups=[...]))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)   # inside jit
    state[0].total_norm                                 # the norm before clipping
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .groups import GroupPlan, as_param_tree, partition, path_str
from .optimizers.base import hparam_dtype

__all__ = [
    "ClipGradNormState",
    "ClipTransformation",
    "clip_grad_norm",
    "clip_grad_norm_per_group",
    "clip_grad_value",
    "tensor_norm",
    "total_norm",
    "clip_coefficient",
    "scale_by_coefficient",
    "clamp_by_value",
    "format_norm_type",
    "check_norm_type",
]

_HALF = (jnp.float16, jnp.bfloat16)


def _is_half(dtype) -> bool:
    return any(dtype == h for h in _HALF)


def format_norm_type(p: float) -> str:
    """``p`` as torch's C++ messages print it (``inf``, ``-inf``, ``-1``, ``0.5``)."""
    if math.isinf(p):
        return "inf" if p > 0 else "-inf"
    return str(int(p)) if float(p).is_integer() else repr(p)


def check_norm_type(norm_type) -> float:
    """``float(norm_type)`` (as torch: ``'inf'`` is accepted), with a clear error otherwise."""
    if isinstance(norm_type, bool):
        raise TypeError(f"norm_type must be a number, got {norm_type!r}")
    try:
        return float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number (or 'inf'), got {norm_type!r}") from None


def tensor_norm(x, norm_type: float, *, foreach: bool | None = None):
    """torch's ``vector_norm(x, norm_type)`` of one array, in ``x``'s dtype.

    float16/bfloat16 are accumulated in float32 and the result rounded back (torch's
    CPU kernels do the same). An empty array has norm 0 (``p >= 0``); torch's error
    for ``p < 0`` and ``inf`` is raised (at trace time: shapes are static).
    """
    x = jnp.asarray(x)
    dtype = x.dtype
    p = float(norm_type)
    if x.size == 0:
        if p < 0 or math.isinf(p):
            if p == math.inf and foreach is not False:
                raise RuntimeError("_foreach_norm cannot compute the infinity norm on an empty tensor because the "
                                   "operation does not have an identity")
            raise RuntimeError(f"linalg.vector_norm cannot compute the {format_norm_type(p)} norm on an empty tensor "
                               "because the operation does not have an identity")
        return jnp.zeros((), dtype if not jnp.iscomplexobj(x) else jnp.finfo(dtype).dtype)
    a = jnp.abs(x) if jnp.iscomplexobj(x) else x
    out_dtype = a.dtype
    if _is_half(out_dtype):
        a = a.astype(jnp.float32)
    if p == 2.0:
        n = jnp.sqrt(jnp.sum(a * a))
    elif p == math.inf:
        n = jnp.max(jnp.abs(a))
    elif p == -math.inf:
        n = jnp.min(jnp.abs(a))
    elif p == 0.0:
        n = jnp.sum(a != 0).astype(a.dtype)
    elif p == 1.0:
        n = jnp.sum(jnp.abs(a))
    else:
        n = jnp.power(jnp.sum(jnp.power(jnp.abs(a), p)), 1.0 / p)
    return n.astype(out_dtype)


def total_norm(leaves: Sequence[Any], norm_type: float = 2.0, *, foreach: bool | None = None):
    """torch's ``get_total_norm``: the norm of the per-array norms, in their promoted dtype.

    No arrays: ``float32`` 0.0 (torch's ``tensor(0.)``).
    """
    p = float(norm_type)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    norms = [tensor_norm(g, p, foreach=foreach) for g in leaves]
    dtype = jnp.result_type(*norms)
    return tensor_norm(jnp.stack([n.astype(dtype) for n in norms]), p, foreach=foreach)


def clip_coefficient(max_norm, total):
    """``min(max_norm / (total + 1e-6), 1)`` computed as torch does, in ``total``'s dtype.

    torch's ``max_norm / tensor`` is ``tensor.reciprocal() * max_norm``; on float16/bfloat16
    each operation is done in float32 and rounded (torch's CPU ``opmath``).
    """
    total = jnp.asarray(total)
    dtype = total.dtype
    if _is_half(dtype):
        f32 = jnp.float32
        s = (total.astype(f32) + f32(1e-6)).astype(dtype)
        r = (1 / s.astype(f32)).astype(dtype)
        coef = (r.astype(f32) * jnp.asarray(max_norm).astype(f32)).astype(dtype)
    else:
        coef = jnp.reciprocal(total + jnp.asarray(1e-6, dtype)) * jnp.asarray(max_norm).astype(dtype)
    return jnp.minimum(coef, jnp.asarray(1.0, dtype))


def scale_by_coefficient(g, coef):
    """``g * coef`` in ``g``'s dtype, as torch's ``g.mul_(coef)`` (a 0-dim ``coef`` of another dtype:
    cast to ``g``'s dtype; for float16/bfloat16 ``g`` the product is taken in float32 and rounded)."""
    g = jnp.asarray(g)
    if _is_half(g.dtype):
        return (g.astype(jnp.float32) * jnp.asarray(coef).astype(jnp.float32)).astype(g.dtype)
    return g * jnp.asarray(coef).astype(g.dtype)


def clamp_by_value(g, clip_value):
    """torch's ``clamp_min_(-v)`` then ``clamp_max_(v)``: ``min(max(g, -v), v)`` (NaN stays NaN)."""
    g = jnp.asarray(g)
    v = jnp.asarray(clip_value)
    lo = (-v).astype(g.dtype)
    hi = v.astype(g.dtype)
    return jnp.minimum(jnp.maximum(g, lo), hi)


# --------------------------------------------------------------------------- Optax transformations


class ClipGradNormState(NamedTuple):
    """State of :func:`clip_grad_norm` / :func:`clip_grad_norm_per_group`.

    Attributes:
      max_norm: the clip threshold, an array in the hyperparameter dtype (shape ``()``,
        or ``(groups,)`` per group); replace it with ``tx.set_max_norm``.
      total_norm: the norm(s) of the gradients of the last update, before clipping
        (0 before the first), same shape and dtype.
    """

    max_norm: jax.Array
    total_norm: jax.Array


class ClipTransformation(optax.GradientTransformationExtraArgs):
    """An Optax transformation with ``set_max_norm(state, value)`` (norm clipping) and ``norm_type``."""


def _check_max_norm(value, where: str):
    """Host values: real numbers >= 0 (torch does not check; a negative one would flip the gradients)."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or isinstance(value, bool) or np.any(np.isnan(arr)) or np.any(arr < 0):
        raise ValueError(f"{where}: max_norm must be a number >= 0, got {value!r}")


def _flat(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(kp) for kp, _ in flat], [x for _, x in flat], treedef


def _check_leaves(paths, leaves, where: str):
    for path, g in zip(paths, leaves):
        if not hasattr(g, "dtype") or not jnp.issubdtype(g.dtype, jnp.inexact):
            what = f"dtype {g.dtype}" if hasattr(g, "dtype") else type(g).__name__
            raise TypeError(f"{where}: gradient {path!r} is {what}; expected a floating-point array")


def _set_max_norm(state: ClipGradNormState, value, where: str) -> ClipGradNormState:
    _check_max_norm(value, where)
    old = state.max_norm
    new = jnp.asarray(value, dtype=old.dtype)
    if new.shape != old.shape:
        if new.ndim == 0:
            new = jnp.broadcast_to(new, old.shape)
        else:
            raise ValueError(f"{where}: max_norm has shape {old.shape}; got a value of shape {new.shape}")
    return state._replace(max_norm=new)


def clip_grad_norm(max_norm: float, norm_type: float = 2.0) -> ClipTransformation:
    """Clip the gradients' total norm to ``max_norm``: torch's ``clip_grad_norm_`` as an Optax transformation.

    Every gradient is multiplied by ``min(max_norm / (total + 1e-6), 1)`` (see the module
    docstring for torch's exact order of operations; optax's ``clip_by_global_norm`` has no
    ``1e-6``, uses ``max_norm / total`` only when ``total > max_norm``, and only ``p = 2``).

    Args:
      max_norm: the largest total norm (a number >= 0). Kept in the state as an array:
        ``state = tx.set_max_norm(state, 0.5)`` changes it without recompiling.
      norm_type: ``p`` of the norms (``2.0``, ``1.0``, ``float('inf')``, ``0``, ...).

    The state (:class:`ClipGradNormState`) also holds ``total_norm``, the norm of the last
    gradients before clipping. No host synchronisation: usable inside ``jit``.
    """
    where = "clip_grad_norm"
    p = check_norm_type(norm_type)
    _check_max_norm(max_norm, where)
    if np.ndim(max_norm) != 0:
        raise ValueError(f"{where}: max_norm must be a scalar; for one per group use clip_grad_norm_per_group")

    def init_fn(params):
        del params
        dt = hparam_dtype()
        return ClipGradNormState(jnp.asarray(max_norm, dt), jnp.zeros((), dt))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        paths, leaves, treedef = _flat(updates)
        _check_leaves(paths, leaves, where)
        total = total_norm(leaves, p)
        coef = clip_coefficient(state.max_norm, total)
        out = [scale_by_coefficient(g, coef) for g in leaves]
        return jax.tree_util.tree_unflatten(treedef, out), state._replace(total_norm=total.astype(state.total_norm.dtype))

    tx = ClipTransformation(init_fn, update_fn)
    tx.norm_type = p
    tx.set_max_norm = lambda state, value: _set_max_norm(state, value, where)
    return tx


def _plan_from(groups, params) -> GroupPlan:
    """A :class:`GroupPlan` from a grouped transformation (its ``plan``), a plan, or selectors + params."""
    if isinstance(groups, GroupPlan):
        return groups
    plan = getattr(groups, "plan", None)
    if isinstance(plan, GroupPlan) or hasattr(groups, "configs"):
        if plan is None:
            raise ValueError("clip_grad_norm_per_group: this grouped transformation was built without params, so it "
                             "has no groups to clip by; pass groups= selectors and params=")
        return plan
    if isinstance(groups, (str, dict)) or not isinstance(groups, Sequence):
        raise TypeError("clip_grad_norm_per_group: groups must be a groupopt.grouped(...) transformation, a GroupPlan, "
                        f"or a list of selectors / groupopt.group(...) specs / dicts with 'params'; got {type(groups).__name__}")
    if params is None:
        raise ValueError("clip_grad_norm_per_group: selectors need the parameter tree to match against: pass params=")
    selectors, names = [], []
    for i, spec in enumerate(groups):
        if isinstance(spec, dict):
            if "params" not in spec:
                raise KeyError(f"clip_grad_norm_per_group: group {i} has no 'params' selector")
            selectors.append(spec["params"])
            names.append(spec.get("name"))
        elif hasattr(spec, "select") and hasattr(spec, "hparams"):  # groupopt.group(...)
            selectors.append(spec.select)
            names.append(spec.name)
        else:
            selectors.append(spec)
            names.append(None)
    if not selectors:
        raise ValueError("clip_grad_norm_per_group: groups is empty")
    return partition(as_param_tree(params), selectors, names)


def clip_grad_norm_per_group(max_norm, groups, *, params=None, norm_type: float = 2.0) -> ClipTransformation:
    """Clip each parameter group's gradients to its own total norm (torch users' per-group loop).

    torch::

        for g in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], max_norm)

    is ``groupopt.clip_grad_norm_per_group(max_norm, tx)`` for a :func:`groupopt.grouped`
    transformation ``tx`` (its groups; also those of frozen groups, whose updates ``tx``
    ignores), or ``clip_grad_norm_per_group(max_norm, ["encoder", groupopt.rest()], params=p)``
    with the selectors of :mod:`groupopt.groups` (``groupopt.group(...)`` specs and torch-style
    dicts with ``"params"`` too). Each group is clipped exactly like :func:`clip_grad_norm` on
    its own members, in tree order; leaves in no group are returned unchanged.

    Args:
      max_norm: a number for every group, or one per group (a sequence).
      groups: a grouped transformation (or one wrapping it, e.g. :func:`groupopt.accumulate`'s),
        a :class:`~groupopt.GroupPlan`, or a list of selectors (needs ``params``).
      params: the parameter tree, for selectors.
      norm_type: ``p`` of the norms.

    The state (:class:`ClipGradNormState`) holds ``max_norm`` and the last ``total_norm`` per
    group as vectors of shape ``(groups,)``; ``tx.set_max_norm(state, values)``.
    """
    where = "clip_grad_norm_per_group"
    p = check_norm_type(norm_type)
    plan = _plan_from(groups, params)
    ng = plan.num_groups
    _check_max_norm(max_norm, where)
    mn = np.asarray(max_norm, dtype=np.float64)
    if np.ndim(mn) == 0:
        mn = np.full((ng,), float(mn))
    elif np.shape(mn) != (ng,):
        raise ValueError(f"{where}: max_norm needs one value per group ({ng}: {list(plan.names)}), got {np.shape(mn)[0] if np.ndim(mn) == 1 else np.shape(mn)}")

    def init_fn(params):
        del params
        dt = hparam_dtype()
        return ClipGradNormState(jnp.asarray(mn, dt), jnp.zeros((ng,), dt))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        paths, leaves, treedef = _flat(updates)
        plan.check_paths(paths, "grads")
        out = list(leaves)
        totals = []
        for g, members in enumerate(plan.members):
            sel = [leaves[i] for i in members]
            _check_leaves([paths[i] for i in members], sel, f"{where} (group {g}: {plan.names[g]})")
            total = total_norm(sel, p)
            coef = clip_coefficient(state.max_norm[g], total)
            for i in members:
                out[i] = scale_by_coefficient(leaves[i], coef)
            totals.append(total.astype(state.total_norm.dtype))
        tn = jnp.stack(totals) if totals else state.total_norm
        return jax.tree_util.tree_unflatten(treedef, out), state._replace(total_norm=tn)

    tx = ClipTransformation(init_fn, update_fn)
    tx.norm_type = p
    tx.plan = plan
    tx.set_max_norm = lambda state, value: _set_max_norm(state, value, where)
    return tx


def clip_grad_value(clip_value: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_value_`` as an Optax transformation: every entry to ``[-clip_value, clip_value]``.

    ``clip_value`` must be >= 0 here (torch does not check; a negative value would set every
    entry to it). Stateless (``optax.EmptyState``).
    """
    if isinstance(clip_value, bool) or not isinstance(clip_value, (int, float, np.floating, np.integer)) or not clip_value >= 0:
        raise ValueError(f"clip_grad_value: clip_value must be a number >= 0, got {clip_value!r}")
    v = float(clip_value)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        paths, leaves, treedef = _flat(updates)
        _check_leaves(paths, leaves, "clip_grad_value")
        return jax.tree_util.tree_unflatten(treedef, [clamp_by_value(g, v) for g in leaves]), state

    return optax.GradientTransformation(init_fn, update_fn)
