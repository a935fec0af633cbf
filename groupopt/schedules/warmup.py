"""Warmup schedules (the HuggingFace ``transformers`` formulas), pure and jit-able.

=========================  =====================================================================
family                     factor at count ``t`` (``W`` warmup steps, ``N`` training steps)
=========================  =====================================================================
:func:`warmup_linear`      ``t / max(1, W)`` for ``t < W``, then ``max(0, (N - t) / max(1, N - W))``
:func:`warmup_cosine`      ``t / max(1, W)`` for ``t < W``, then
                           ``max(0, (1 + cos(pi * num_cycles * 2 * p)) / 2)``,
                           ``p = (t - W) / max(1, N - W)``
:func:`warmup_constant`    ``t / max(1, W)`` for ``t < W``, then 1
=========================  =====================================================================

These are ``transformers``' ``get_linear_schedule_with_warmup``,
``get_cosine_schedule_with_warmup`` and ``get_constant_schedule_with_warmup``
lambdas, written once: :mod:`groupopt.compat.lr_scheduler.warmup` wraps the
same ``*_factor`` functions in a compat ``LambdaLR``. Note that the lr at
count 0 is 0 when ``W > 0``: the first update does nothing.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .basic import Schedule, _fdiv, _maximum, _scaled, _traced, _where

__all__ = [
    "warmup_linear",
    "warmup_cosine",
    "warmup_constant",
    "warmup_linear_factor",
    "warmup_cosine_factor",
    "warmup_constant_factor",
]


def _ramp(t, warmup_steps):
    return _fdiv(t, max(1, warmup_steps))


def warmup_linear_factor(t, warmup_steps: int, total_steps: int):
    """Linear warmup ``t / max(1, W)`` then linear decay ``max(0, (N - t) / max(1, N - W))``."""
    decay = _maximum(0.0, _fdiv(total_steps - t, max(1, total_steps - warmup_steps)))
    return _where(t < warmup_steps, _ramp(t, warmup_steps), decay)


def warmup_cosine_factor(t, warmup_steps: int, total_steps: int, num_cycles: float = 0.5):
    """Linear warmup, then ``max(0, (1 + cos(pi * num_cycles * 2 * progress)) / 2)`` (HF's operation order)."""
    cos = jnp.cos if _traced(t) else math.cos
    progress = _fdiv(t - warmup_steps, max(1, total_steps - warmup_steps))
    decay = _maximum(0.0, 0.5 * (1.0 + cos(math.pi * float(num_cycles) * 2.0 * progress)))
    return _where(t < warmup_steps, _ramp(t, warmup_steps), decay)


def warmup_constant_factor(t, warmup_steps: int):
    """Linear warmup ``t / max(1, W)``, then 1."""
    return _where(t < warmup_steps, _fdiv(t, max(1.0, warmup_steps)), 1.0)


def _check(warmup_steps, total_steps=None):
    if warmup_steps < 0:
        raise ValueError(f"need warmup_steps >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps <= 0:
        raise ValueError(f"need total_steps > 0, got {total_steps}")


def warmup_linear(value: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warmup from 0 to ``value`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    The classic ``WarmupLinearSchedule`` / ``get_linear_schedule_with_warmup``.
    """
    _check(warmup_steps, total_steps)
    return _scaled(value, lambda t: warmup_linear_factor(t, warmup_steps, total_steps))


def warmup_cosine(value: float, warmup_steps: int, total_steps: int, num_cycles: float = 0.5) -> Schedule:
    """Linear warmup to ``value``, then cosine decay (``get_cosine_schedule_with_warmup``).

    ``num_cycles=0.5`` decays to 0 at ``total_steps``; more cycles oscillate
    (the factor is clipped at 0).
    """
    _check(warmup_steps, total_steps)
    return _scaled(value, lambda t: warmup_cosine_factor(t, warmup_steps, total_steps, num_cycles))


def warmup_constant(value: float, warmup_steps: int) -> Schedule:
    """Linear warmup to ``value`` over ``warmup_steps``, then constant (``get_constant_schedule_with_warmup``)."""
    _check(warmup_steps)
    return _scaled(value, lambda t: warmup_constant_factor(t, warmup_steps))
