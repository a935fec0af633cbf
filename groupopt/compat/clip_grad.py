r"""torch.nn.utils' gradient clipping: ``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm``, ...

torch's signatures, defaults and messages over the arithmetic of :mod:`groupopt.clipping`
(per-gradient norms in each gradient's dtype, the norm of the stacked norms with type
promotion, ``coef = min(max_norm / (total + 1e-6), 1)`` in the total's dtype, always
multiplied). JAX arrays are immutable, so where torch clips ``p.grad`` in place these
functions take the **gradients** and **return** the clipped ones:

=================================================================  ==========================================
torch                                                              groupopt.compat
=================================================================  ==========================================
``total = clip_grad_norm_(model.parameters(), 1.0)``               ``grads, total = clip_grad_norm_(grads, 1.0)``
``clip_grad_value_(model.parameters(), 0.5)``                      ``grads = clip_grad_value_(grads, 0.5)``
``total = get_total_norm([p.grad for p in params])``               ``total = get_total_norm(grads)``
``clip_grads_with_norm_(params, 1.0, total)``                      ``grads = clip_grads_with_norm_(grads, 1.0, total)``
=================================================================  ==========================================

``grads`` may be a gradient pytree (a dict, an ``nnx.State`` from ``nnx.grad``), a
single array, or a list; ``None`` entries are skipped (torch skips ``p.grad is None``)
and returned as ``None``. The result has the input's structure and dtypes.

With a compat optimizer in place of the gradients, the functions clip the gradients it
has summed with :meth:`~groupopt.compat.Optimizer.accumulate_grad` (torch's ``.grad``)
in place, as torch does, so the next ``opt.step()`` uses them::

    opt.accumulate_grad(grads)                # loss.backward()
    total = clip_grad_norm_(opt, max_norm=1.0)  # torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

Inside ``jit`` these functions run without host synchronisation, except with
``error_if_nonfinite=True``: that check reads the total on the host -- torch's check does
the same (a device -> host copy) -- so it needs a concrete total and raises a
``TypeError`` on a traced one (check the returned total outside ``jit`` instead).
``foreach`` (``None``/``True``/``False``) is accepted for compatibility; all three give
the same numbers, as on torch's CPU.
"""

from __future__ import annotations

import types
import warnings
import jax
import jax.numpy as jnp
import numpy as np

from .. import clipping
from ..groups import path_str
from .optimizer import Optimizer

__all__ = ["clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]


def _check_foreach(foreach, where: str) -> None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"{where}: foreach must be None, True or False, got {foreach!r}")


def _flatten(tree, where: str):
    """``(leaves, treedef)`` of a gradient tree; every leaf must be a floating-point array."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for kp, g in flat:
        if not isinstance(g, (jax.Array, np.ndarray, np.generic)) or not jnp.issubdtype(g.dtype, jnp.inexact):
            what = f"an array of dtype {g.dtype}" if hasattr(g, "dtype") else f"a {type(g).__name__}"
            name = path_str(kp) or "<root>"
            raise TypeError(f"{where}: gradient {name!r} is {what}; expected a floating-point array")
        leaves.append(jnp.asarray(g))
    return leaves, treedef


def _max_norm(max_norm, where: str):
    """torch's ``float(max_norm)``; a (traced) 0-dim array is kept as an array (jit)."""
    if isinstance(max_norm, jax.core.Tracer) and max_norm.ndim == 0:
        return max_norm
    try:
        return float(max_norm)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: max_norm must be a number, got {max_norm!r}") from None


def _grads_of(opt: Optimizer):
    return opt.accumulated_grads


def _check_nonfinite(total, norm_type: float):
    if isinstance(total, jax.core.Tracer):
        raise TypeError(
            "error_if_nonfinite=True reads the total norm on the host (as torch does), which is not possible "
            "inside jit: pass error_if_nonfinite=False there and check the returned total norm outside"
        )
    if not bool(jnp.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None):
    """torch's ``get_total_norm``: the norm of the per-array norms (as if concatenated, except ``p = 0``).

    Args:
      tensors: the gradients (a pytree, one array, or a list; ``None`` entries skipped),
        or a compat optimizer (its accumulated gradients).
      norm_type: ``p`` (``2.0``, ``1.0``, ``float('inf')``, ``0``: the number of arrays with a
        nonzero entry, ...).
      error_if_nonfinite: raise torch's ``RuntimeError`` if the total is NaN or infinite (a
        host check, as in torch; not inside ``jit``).
      foreach: accepted for compatibility (no effect on the numbers).

    Returns:
      a 0-dim array in the promoted dtype of the per-array norms (``float32`` 0.0 without
      gradients).
    """
    where = "get_total_norm"
    _check_foreach(foreach, where)
    p = clipping.check_norm_type(norm_type)
    if isinstance(tensors, Optimizer):
        tensors = _grads_of(tensors)
    elif isinstance(tensors, types.GeneratorType):
        tensors = list(tensors)
    leaves, _ = _flatten(tensors, where)
    total = clipping.total_norm(leaves, p, foreach=foreach)
    if error_if_nonfinite:
        _check_nonfinite(total, p)
    return total


def _scaled(leaves, treedef, max_norm, total):
    coef = clipping.clip_coefficient(max_norm, total)
    return jax.tree_util.tree_unflatten(treedef, [clipping.scale_by_coefficient(g, coef) for g in leaves])


def clip_grads_with_norm_(parameters, max_norm: float, total_norm, foreach: bool | None = None):
    """torch's ``clip_grads_with_norm_``: multiply every gradient by ``min(max_norm / (total_norm + 1e-6), 1)``.

    ``max_norm`` is not validated (as in torch: a negative one flips the gradients);
    ``total_norm`` must be an array (torch requires a Tensor), and its dtype is the one
    the coefficient is computed in.

    Returns:
      the clipped gradients (same structure and dtypes); with a compat optimizer, ``None``
      (its accumulated gradients are replaced).
    """
    where = "clip_grads_with_norm_"
    _check_foreach(foreach, where)
    if not isinstance(total_norm, (jax.Array, np.ndarray, np.generic)):
        raise TypeError(
            f"{where}: total_norm must be an array (torch requires a Tensor: clamp() received an invalid "
            f"combination of arguments), got {type(total_norm).__name__}"
        )
    mn = _max_norm(max_norm, where)
    opt = parameters if isinstance(parameters, Optimizer) else None
    tree = _grads_of(opt) if opt is not None else parameters
    leaves, treedef = _flatten(tree, where)
    if not leaves:
        return None if opt is not None else tree
    out = _scaled(leaves, treedef, mn, jnp.asarray(total_norm))
    if opt is not None:
        opt.accumulated_grads = out
        return None
    return out


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None):
    """torch's ``clip_grad_norm_``: scale the gradients so that their total norm is at most ``max_norm``.

    Every gradient is multiplied by ``min(max_norm / (total + 1e-6), 1)`` -- also when that is
    1 -- where ``total`` is :func:`get_total_norm` of the gradients, and keeps its dtype.

    Args:
      parameters: the gradients (a pytree such as ``nnx.grad``'s ``State``, one array, or a
        list; ``None`` entries are skipped and kept), or a compat optimizer: then its
        accumulated gradients (:meth:`~groupopt.compat.Optimizer.accumulate_grad`) are
        clipped in place.
      max_norm: the largest total norm (not validated, as in torch).
      norm_type: ``p`` of the norms.
      error_if_nonfinite: raise torch's ``RuntimeError`` (nothing clipped) if the total is
        NaN or infinite. This is a host check, as torch's is; inside ``jit`` it raises a
        ``TypeError`` (leave it ``False`` there).
      foreach: accepted for compatibility (no effect on the numbers).

    Returns:
      ``(clipped_grads, total_norm)``; with a compat optimizer, ``total_norm`` only (as torch).
      No gradients at all: ``float32`` 0.0 and nothing changed.
    """
    where = "clip_grad_norm_"
    _check_foreach(foreach, where)
    p = clipping.check_norm_type(norm_type)
    mn = _max_norm(max_norm, where)
    opt = parameters if isinstance(parameters, Optimizer) else None
    if opt is not None:
        tree = _grads_of(opt)
    elif isinstance(parameters, types.GeneratorType):
        tree = list(parameters)
        if not tree:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    else:
        tree = parameters
    leaves, treedef = _flatten(tree, where)
    total = clipping.total_norm(leaves, p, foreach=foreach)
    if error_if_nonfinite:
        _check_nonfinite(total, p)
    if not leaves:
        return total if opt is not None else (tree, total)
    out = _scaled(leaves, treedef, mn, total)
    if opt is not None:
        opt.accumulated_grads = out
        return total
    return out, total


def clip_grad_norm(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None):
    """Deprecated alias of :func:`clip_grad_norm_` (torch's ``FutureWarning``)."""
    warnings.warn(
        "`torch.nn.utils.clip_grad_norm` is now deprecated in favor of `torch.nn.utils.clip_grad_norm_`.",
        FutureWarning,
        stacklevel=2,
    )
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def clip_grad_value_(parameters, clip_value: float, foreach: bool | None = None):
    """torch's ``clip_grad_value_``: every gradient entry to ``[-clip_value, clip_value]``.

    ``clamp_min(-v)`` then ``clamp_max(v)`` with ``v = float(clip_value)``, not validated (as in
    torch: a negative ``v`` sets every entry to ``v``); NaN entries stay NaN.

    Returns:
      the clipped gradients; with a compat optimizer, ``None`` (its accumulated gradients
      are replaced).
    """
    where = "clip_grad_value_"
    _check_foreach(foreach, where)
    try:
        v = float(clip_value)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: clip_value must be a number, got {clip_value!r}") from None
    opt = parameters if isinstance(parameters, Optimizer) else None
    tree = _grads_of(opt) if opt is not None else parameters
    if isinstance(tree, types.GeneratorType):
        tree = list(tree)
    leaves, treedef = _flatten(tree, where)
    if not leaves:
        return None if opt is not None else tree
    out = jax.tree_util.tree_unflatten(treedef, [clipping.clamp_by_value(g, v) for g in leaves])
    if opt is not None:
        opt.accumulated_grads = out
        return None
    return out

