"""Composing schedules: torch's ``SequentialLR`` and ``ChainedScheduler`` as pure functions.

* :func:`join` -- ``SequentialLR``: schedule ``i`` runs from boundary ``i-1``
  on, restarted from its own count 0 (``optax.join_schedules`` semantics).
* :func:`multiply` -- ``ChainedScheduler`` of chainable (multiplicative)
  schedulers: the product of the factors.

A separate ``sequence`` is not provided: ``SequentialLR`` has exactly one
semantics (restart at each milestone), which is :func:`join`.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import jax.numpy as jnp

from .basic import Schedule, _maximum, _traced, _where

__all__ = ["join", "multiply"]


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule ``i`` from ``boundaries[i-1]`` on, evaluated at ``count - boundaries[i-1]``.

    torch ``SequentialLR(optimizer, schedulers, milestones=boundaries)`` on an
    untouched run: at its milestone a scheduler restarts from its value at 0
    (torch's ``_update_lr(0)``, its closed form). Children without a closed
    form that are chainable (``MultiplicativeLR``) restart from the current lr
    in torch instead; they have no pure equivalent inside :func:`join`.

    Same result as ``optax.join_schedules(schedules, boundaries)``.

    torch quirk: a ``SequentialLR`` or ``ChainedScheduler`` given as the
    *first* child of a ``SequentialLR`` is stepped once more by the outer
    construction. A nested ``SequentialLR`` then switches children one count
    early (``join([join([a, b], [m - 1]), c], ...)`` reproduces torch's
    ``SequentialLR([SequentialLR([A, B], [m]), C], ...)``); in a nested
    ``ChainedScheduler`` each child not in its construction mode applies its
    count-0 recursive step once more (an ``ExponentialLR(gamma)`` child: one
    extra factor ``gamma``). Nested composites at a later milestone raise
    ``NotImplementedError`` in torch.
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if len(schedules) < 1:
        raise ValueError("join expects at least one schedule, but got no schedule.")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            "join expects number of schedules provided to be one more than the number of boundaries, "
            f"but got number of schedules {len(schedules)} and the number of boundaries to be equal to {len(boundaries)}"
        )
    if boundaries != sorted(boundaries) or any(b < 0 for b in boundaries):
        raise ValueError(f"boundaries must be non-negative and increasing, got {boundaries}")

    def schedule(count):
        if not _traced(count):
            i = bisect.bisect_right(boundaries, count)
            return schedules[i](count - boundaries[i - 1] if i else count)
        out = schedules[0](count)
        for b, s in zip(boundaries, schedules[1:]):
            # children not yet active are evaluated at 0, never at a negative count
            out = _where(count < b, out, s(_maximum(count - b, jnp.zeros_like(count))))
        return out

    return schedule


def multiply(*schedules: Schedule) -> Schedule:
    """The product ``s_1(count) * s_2(count) * ...``.

    torch ``ChainedScheduler`` of chainable schedulers whose steps are pure
    ratios (Constant, Linear, Polynomial, Step, MultiStep, Exponential,
    Multiplicative; CosineAnnealing with ``eta_min=0`` up to ``T_max`` only:
    past its minimum torch *adds* a step computed from the base lr): give the
    lr to one schedule and ``1.0`` to the others, e.g.
    ``multiply(constant(0.1, factor=0.5, total_iters=3), exponential(1.0, 0.9))``.
    """
    if len(schedules) < 1:
        raise ValueError("multiply expects at least one schedule, but got no schedule.")

    def schedule(count):
        out = schedules[0](count)
        for s in schedules[1:]:
            out = out * s(count)
        return out

    return schedule
