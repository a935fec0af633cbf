"""Learning-rate schedules: pure, jit-able ``count -> value`` functions.

Each family is written once, as a *factor* of the base value, in arithmetic
that works on Python numbers (the compat schedulers evaluate it on the host,
in float64, like torch) and on JAX arrays (inside ``jit``, per group):

=====================  ===============================================  ==================
family                 factor at count ``t``                            torch scheduler
=====================  ===============================================  ==================
:func:`constant`       ``1``                                            --
:func:`step`           ``gamma ** (t // step_size)``                    ``StepLR``
:func:`multistep`      ``gamma ** #{m in milestones : m <= t}``         ``MultiStepLR``
:func:`exponential`    ``gamma ** t``                                   ``ExponentialLR``
:func:`cosine`         value ``m + (b - m)(1 + cos(pi t / T_max)) / 2``  ``CosineAnnealingLR``
:func:`warmup_linear`  ``t / W`` for ``t < W``, then                    ``LambdaLR`` (HF)
                       ``max(0, (N - t) / max(1, N - W))``
:func:`lambda_`        ``fn(t)``                                        ``LambdaLR``
=====================  ===============================================  ==================

``count`` is the number of optimizer updates already applied, so an Optax
schedule evaluated at ``count`` gives the lr torch uses at optimizer step
``count + 1`` when its scheduler is stepped after each optimizer step.

Every schedule function returns ``value * factor(count)`` (cosine: its value
form); the ``*_factor`` / ``*_value`` functions are what the compat schedulers call.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "Schedule",
    "constant",
    "step",
    "multistep",
    "exponential",
    "cosine",
    "warmup_linear",
    "lambda_",
    "step_factor",
    "multistep_factor",
    "exponential_factor",
    "cosine_value",
    "warmup_linear_factor",
    "step_ratio",
    "multistep_ratio",
]

Schedule = Callable[[jax.Array], jax.Array]


def _traced(*xs) -> bool:
    return any(isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) for x in xs)


def _where(cond, a, b):
    if _traced(cond, a, b):
        return jnp.where(cond, a, b)
    return a if cond else b


def _maximum(a, b):
    return jnp.maximum(a, b) if _traced(a, b) else max(a, b)


# ---------------------------------------------------------------- factors (one formula each)


def step_factor(t, step_size: int, gamma: float):
    """``gamma ** (t // step_size)``."""
    return gamma ** (t // step_size)


def multistep_factor(t, milestones: Sequence[int], gamma: float):
    """``gamma ** (number of milestones <= t)`` (torch counts repeated milestones twice)."""
    ms = sorted(milestones)
    if _traced(t):
        n = jnp.sum(jnp.asarray(ms, dtype=jnp.int32) <= t) if ms else 0
    else:
        n = bisect.bisect_right(ms, t)
    return gamma**n


def exponential_factor(t, gamma: float):
    """``gamma ** t``."""
    return gamma**t


def cosine_value(t, base: float, T_max: int, eta_min: float = 0.0):
    """``eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2``: torch's closed form, periodic past ``T_max``."""
    cos = jnp.cos if _traced(t) else math.cos
    return eta_min + (base - eta_min) * (1 + cos(math.pi * t / T_max)) / 2


def warmup_linear_factor(t, warmup_steps: int, total_steps: int):
    """Linear warmup ``t / max(1, W)`` then linear decay ``max(0, (N - t) / max(1, N - W))``."""
    warm = t / max(1, warmup_steps)
    decay = _maximum(0.0, (total_steps - t) / max(1, total_steps - warmup_steps))
    return _where(t < warmup_steps, warm, decay)


# ------------------------------------------- recursive forms (torch's chainable get_lr)
# The same families, as the factor from count t-1 to t: torch's schedulers
# multiply the group's *current* lr by it, so a user's edit to the lr persists.


def step_ratio(t, step_size: int, gamma: float):
    """``gamma`` when ``t`` is a positive multiple of ``step_size``, else 1."""
    return gamma if t != 0 and t % step_size == 0 else 1.0


def multistep_ratio(t, milestones: Sequence[int], gamma: float):
    """``gamma ** (times t appears in milestones)``."""
    n = list(milestones).count(t)
    return gamma**n if n else 1.0


# ---------------------------------------------------------------- schedules


def _scaled(value, factor_fn) -> Schedule:
    def schedule(count):
        return value * factor_fn(count)

    return schedule


def constant(value: float) -> Schedule:
    """Always ``value``."""
    return lambda count: value * jnp.ones_like(count, dtype=jnp.result_type(float))


def step(value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """torch ``StepLR``: multiply by ``gamma`` every ``step_size`` steps."""
    if step_size <= 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return _scaled(value, lambda t: step_factor(t, step_size, gamma))


def multistep(value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """torch ``MultiStepLR``: multiply by ``gamma`` at each milestone."""
    if list(milestones) != sorted(milestones):
        raise ValueError("Milestones should be a list of increasing integers. Got {}".format(list(milestones)))
    return _scaled(value, lambda t: multistep_factor(t, milestones, gamma))


def exponential(value: float, gamma: float) -> Schedule:
    """torch ``ExponentialLR``: ``value * gamma ** t``."""
    return _scaled(value, lambda t: exponential_factor(t, gamma))


def cosine(value: float, T_max: int, eta_min: float = 0.0) -> Schedule:
    """torch ``CosineAnnealingLR`` (closed form): from ``value`` to ``eta_min`` over ``T_max`` steps."""
    if T_max <= 0:
        raise ValueError(f"T_max must be positive, got {T_max}")
    return lambda t: cosine_value(t, value, T_max, eta_min)


def warmup_linear(value: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warmup from 0 to ``value`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    The classic ``WarmupLinearSchedule`` / ``get_linear_schedule_with_warmup``.
    """
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps}, {total_steps}")
    return _scaled(value, lambda t: warmup_linear_factor(t, warmup_steps, total_steps))


def lambda_(value: float, fn: Callable) -> Schedule:
    """torch ``LambdaLR``: ``value * fn(t)``; ``fn`` must be jit-able to use it inside the step."""
    return _scaled(value, fn)
