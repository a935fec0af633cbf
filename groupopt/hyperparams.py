"""Per-group hyperparameters held in the optimizer state as arrays.

A hyperparameter value is a number, a schedule (a jit-able ``count -> value``
function), or a tuple of those (``betas``). Numbers are stored in the state as
scalar arrays of the hyperparameter dtype, so the host can replace them
between steps without a recompile; schedules are evaluated in the graph from
the transformation's update count and their current value is written to the
state too, so it can be read back.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from .optimizers.base import hparam_dtype

__all__ = ["is_schedule", "initial_state", "current", "replace"]


def is_schedule(value) -> bool:
    return callable(value)


def _leaf_map(fn, value):
    if isinstance(value, (tuple, list)):
        return tuple(_leaf_map(fn, v) for v in value)
    return fn(value)


def _to_array(v):
    # None: an optional value the rule resolves itself (Adafactor's eps1), held as NaN
    return jnp.asarray(jnp.nan if v is None else v, dtype=hparam_dtype())


def initial_state(spec: dict[str, Any]) -> dict[str, Any]:
    """Arrays for a group's hyperparameters; schedules evaluated at count 0."""
    zero = jnp.zeros((), jnp.int32)
    return {k: _leaf_map(lambda v: _to_array(v(zero) if is_schedule(v) else v), val) for k, val in spec.items()}


def current(spec: dict[str, Any], stored: dict[str, Any], count) -> dict[str, Any]:
    """The values to use at this update: stored arrays, or schedules evaluated at ``count``."""

    def pick(s, a):
        if isinstance(s, (tuple, list)):
            return tuple(pick(si, ai) for si, ai in zip(s, a))
        return jnp.asarray(s(count)).astype(a.dtype) if is_schedule(s) else a

    return {k: pick(spec[k], stored[k]) for k in spec}


def has_schedule(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(has_schedule(v) for v in value)
    return is_schedule(value)


def replace(stored: dict[str, Any], updates: dict[str, Any], where: str) -> dict[str, Any]:
    """Return ``stored`` with some values replaced, keeping each array's dtype and shape."""
    out = dict(stored)
    for k, v in updates.items():
        if k not in stored:
            raise KeyError(f"{where} has no hyperparameter {k!r}; it has {sorted(stored)}")
        old = stored[k]
        if isinstance(old, tuple):
            if not isinstance(v, (tuple, list)) or len(v) != len(old):
                raise ValueError(f"{where}: {k} must be a sequence of {len(old)} values, got {v!r}")
            out[k] = tuple(replace({k: o}, {k: vi}, where)[k] for vi, o in zip(v, old))
        else:
            new = jnp.asarray(jnp.nan if v is None else v, dtype=old.dtype)
            if new.shape != old.shape:
                raise ValueError(f"{where}: {k} has shape {old.shape}; got a value of shape {new.shape}")
            out[k] = new
    return out
