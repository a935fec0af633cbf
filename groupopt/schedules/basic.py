"""Learning-rate schedules of torch's basic schedulers: pure, jit-able ``count -> value`` functions.

Each family is written once, in arithmetic that works on Python numbers (the
compat schedulers evaluate it on the host, in float64, like torch) and on JAX
arrays (inside ``jit``, per group). Where torch has two forms of a family both
live here, next to each other:

* the **closed form** ``*_factor(t, ...)`` (``base * factor``; cosine: ``*_value``),
  torch's ``_get_closed_form_lr``, used by the pure schedules and by
  ``scheduler.step(epoch)``;
* the **recursive form** ``*_ratio(t, ...)`` (cosine: :func:`cosine_next`),
  torch's chainable ``get_lr``: the new lr is the group's *current* lr times
  the ratio, so a user's edit of ``group["lr"]`` persists. A ratio of int
  ``1`` means "keep the lr as it is" (torch returns it unmultiplied).

=============================  ==================================================  =============================
family                         factor at count ``t`` (closed form)                 torch scheduler
=============================  ==================================================  =============================
:func:`constant`               ``f + (t >= T)(1 - f)``                             ``ConstantLR``
:func:`linear`                 ``s + (e - s) min(T, t) / T``                       ``LinearLR``
:func:`polynomial`             ``(1 - min(T, t) / T) ** p``                        ``PolynomialLR``
:func:`step`                   ``gamma ** (t // step_size)``                       ``StepLR``
:func:`multistep`              ``gamma ** #{m in milestones : m <= t}``            ``MultiStepLR``
:func:`exponential`            ``gamma ** t``                                      ``ExponentialLR``
:func:`multiplicative`         ``fn(1) fn(2) ... fn(t)``                           ``MultiplicativeLR``
:func:`cosine`                 value ``m + (b - m)(1 + cos(pi t / T_max)) / 2``    ``CosineAnnealingLR``
:func:`cosine_warm_restarts`   the same, with ``t``, ``T_max`` -> ``T_cur``, ``T_i``  ``CosineAnnealingWarmRestarts``
:func:`lambda_`                ``fn(t)``                                           ``LambdaLR``
=============================  ==================================================  =============================

``count`` is the number of optimizer updates already applied: a schedule
evaluated at ``count`` is the lr torch uses at optimizer step ``count + 1``
when its scheduler is stepped after each optimizer step (torch's value at
``last_epoch == count`` on an untouched run).

Every schedule returns ``value * factor(count)`` (cosine: its value form).
The pure schedules validate their arguments (torch's message where torch has
one); the compat schedulers validate exactly what torch validates.
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
    "linear",
    "polynomial",
    "step",
    "multistep",
    "exponential",
    "multiplicative",
    "cosine",
    "cosine_warm_restarts",
    "lambda_",
    # closed forms
    "constant_factor",
    "linear_factor",
    "polynomial_factor",
    "step_factor",
    "multistep_factor",
    "exponential_factor",
    "multiplicative_value",
    "cosine_value",
    "warm_restarts_cycle",
    # recursive forms (torch's chainable get_lr)
    "constant_ratio",
    "linear_ratio",
    "polynomial_ratio",
    "step_ratio",
    "multistep_ratio",
    "exponential_ratio",
    "multiplicative_ratio",
    "cosine_next",
    "warm_restarts_advance",
    "warm_restarts_at",
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


def _minimum(a, b):
    return jnp.minimum(a, b) if _traced(a, b) else min(a, b)


def _float_dtype():
    return jnp.result_type(float)


def _fdiv(a, b):
    """``a / b``; traced integers are first cast to the default float dtype (JAX's int32 / int is float32)."""
    if _traced(a, b):
        a, b = (jnp.asarray(x) for x in (a, b))
        a, b = (x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(_float_dtype()) for x in (a, b))
    return a / b


# ================================================================ closed forms (one formula each)


def constant_factor(t, factor: float, total_iters: int):
    """``factor`` before ``total_iters``, then 1: torch ``ConstantLR``'s closed form."""
    return factor + (t >= total_iters) * (1 - factor)


def linear_factor(t, start_factor: float, end_factor: float, total_iters: int):
    """From ``start_factor`` to ``end_factor`` linearly over ``total_iters``: torch ``LinearLR``'s closed form.

    Inside ``jit`` the factor is ``end_factor`` exactly from ``total_iters`` on
    (XLA's ``fma(d, m * (1/T), s)`` would leave e.g. ``±1e-17`` where torch's
    run reaches exactly 0).
    """
    if _traced(t):
        ramp = start_factor + _fdiv((end_factor - start_factor) * _minimum(total_iters, t), total_iters)
        return jnp.where(t >= total_iters, jnp.asarray(end_factor, ramp.dtype), ramp)
    return start_factor + (end_factor - start_factor) * min(total_iters, t) / total_iters


def polynomial_factor(t, total_iters: int, power: float):
    """``(1 - min(T, t) / T) ** power``: torch ``PolynomialLR``'s closed form.

    Inside ``jit`` it is evaluated as ``((T - min(T, t)) / T) ** power``: XLA
    contracts ``1 - m / T`` into ``fma(-m, 1/T, 1)``, which is not 0 at
    ``m == T`` (and a negative base to a fractional power is NaN).
    """
    if _traced(t):
        return _fdiv(total_iters - _minimum(total_iters, t), total_iters) ** power
    return (1.0 - min(total_iters, t) / total_iters) ** power


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


def multiplicative_value(t, value, fn: Callable):
    """``value * fn(1) * fn(2) * ... * fn(t)``, multiplied in torch's order (``MultiplicativeLR``).

    Costs ``t`` evaluations of ``fn`` (a ``fori_loop`` inside ``jit``).
    """
    if _traced(t):
        init = jnp.asarray(value, dtype=_float_dtype())
        return jax.lax.fori_loop(1, t + 1, lambda k, acc: acc * fn(k), init)
    acc = value
    for k in range(1, t + 1):
        acc = acc * fn(k)
    return acc


def cosine_value(t, base: float, T_max, eta_min: float = 0.0):
    """``eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2``: torch's closed form, periodic past ``T_max``.

    Also torch ``CosineAnnealingWarmRestarts``'s lr with ``t = T_cur``, ``T_max = T_i``.
    Inside ``jit`` an integer count is first reduced modulo the period
    ``2 T_max`` (exactly, in integers), so that float32 keeps its precision
    at large counts (``pi * t`` loses ``t`` ulps of the angle otherwise).
    """
    if not _traced(t, T_max):
        return eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / T_max)) / 2
    if isinstance(T_max, int) and jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
        t = t % (2 * T_max)
    return eta_min + (base - eta_min) * (1 + jnp.cos(math.pi * t / T_max)) / 2


def _restart_starts(T_0: int, T_mult: int, limit: int):
    """Counts at which the warm-restart cycles begin (up to ``limit``) and their lengths."""
    starts, lengths, s, T_i = [], [], 0, T_0
    while s <= limit:
        starts.append(s)
        lengths.append(T_i)
        s, T_i = s + T_i, T_i * T_mult
    return starts, lengths


def warm_restarts_cycle(t, T_0: int, T_mult: int = 1):
    """``(T_cur, T_i)`` at integer count ``t``: exactly where torch's ``step()`` recursion lands.

    Cycles have lengths ``T_0, T_0 T_mult, T_0 T_mult^2, ...``; ``T_cur`` is
    the position in the current cycle, ``T_i`` its length.
    """
    if T_mult == 1:
        return t % T_0, T_0
    if _traced(t):
        t = jnp.asarray(t)
        starts, lengths = _restart_starts(T_0, T_mult, int(jnp.iinfo(t.dtype).max))
        n = jnp.sum(jnp.asarray(starts, dtype=t.dtype) <= t) - 1
        T_cur = t - jnp.asarray(starts, dtype=t.dtype)[n]
        T_i = jnp.asarray([float(x) for x in lengths], dtype=_float_dtype())[n]
        return T_cur, T_i
    s, T_i = 0, T_0
    while t >= s + T_i:
        s, T_i = s + T_i, T_i * T_mult
    return t - s, T_i


# ================================================ recursive forms (torch's chainable get_lr)
# The factor from count t-1 to t: torch's schedulers multiply the group's
# *current* lr by it. ``1`` (an int) means torch keeps the lr as it is.


def constant_ratio(t, factor: float, total_iters: int):
    """``factor`` at 0, ``1 / factor`` at ``total_iters``, else keep."""
    if t == 0:
        return factor
    if t != total_iters:
        return 1
    return 1.0 / factor


def linear_ratio(t, start_factor: float, end_factor: float, total_iters: int):
    """``start_factor`` at 0, keep past ``total_iters``, else the step ``f(t) / f(t-1)``."""
    if t == 0:
        return start_factor
    if t > total_iters:
        return 1
    return 1.0 + (end_factor - start_factor) / (total_iters * start_factor + (t - 1) * (end_factor - start_factor))


def polynomial_ratio(t, total_iters: int, power: float):
    """Keep past ``total_iters``, else ``((1 - t/T) / (1 - (t-1)/T)) ** power``."""
    if t > total_iters:
        return 1
    return ((1.0 - t / total_iters) / (1.0 - (t - 1) / total_iters)) ** power


def step_ratio(t, step_size: int, gamma: float):
    """``gamma`` when ``t`` is a positive multiple of ``step_size``, else keep."""
    if t == 0 or t % step_size != 0:
        return 1
    return gamma


def multistep_ratio(t, milestones: Sequence[int], gamma: float):
    """``gamma ** (times t appears in milestones)``, keep when it does not appear."""
    n = list(milestones).count(t)
    return gamma**n if n else 1


def exponential_ratio(t, gamma: float):
    """``gamma`` at every step."""
    return gamma


def multiplicative_ratio(t, fn: Callable):
    """``fn(t)``."""
    return fn(t)


def cosine_next(lr, t, base: float, T_max, eta_min: float = 0.0):
    """torch ``CosineAnnealingLR``'s chainable step from the current ``lr`` at count ``t - 1`` to ``t``.

    At ``t = T_max + 1 (mod 2 T_max)`` (just past a minimum) it adds the first
    step of the closed form instead of dividing by ``1 + cos(pi) = 0``.
    """
    if (t - 1 - T_max) % (2 * T_max) == 0:
        return lr + (base - eta_min) * (1 - math.cos(math.pi / T_max)) / 2
    return (1 + math.cos(math.pi * t / T_max)) / (1 + math.cos(math.pi * (t - 1) / T_max)) * (lr - eta_min) + eta_min


def warm_restarts_advance(T_cur, T_i, T_mult: int):
    """torch ``CosineAnnealingWarmRestarts.step()``: one count further, restarting at the end of a cycle."""
    T_cur = T_cur + 1
    if T_cur >= T_i:
        T_cur = T_cur % T_i
        T_i = T_i * T_mult
    return T_cur, T_i


def warm_restarts_at(epoch, T_0: int, T_mult: int, T_i):
    """torch ``CosineAnnealingWarmRestarts.step(epoch)``: ``(T_cur, T_i)`` at a (possibly fractional) epoch.

    torch's own arithmetic (``int(log(...))`` for ``T_mult > 1``); with
    ``T_mult == 1`` the current ``T_i`` is kept, as in torch.
    """
    if epoch >= T_0:
        if T_mult == 1:
            return epoch % T_0, T_i
        n = int(math.log(epoch / T_0 * (T_mult - 1) + 1, T_mult))
        return epoch - T_0 * (T_mult**n - 1) / (T_mult - 1), T_0 * T_mult**n
    return epoch, T_0


# ================================================================ schedules


def _scaled(value, factor_fn) -> Schedule:
    def schedule(count):
        return value * factor_fn(count)

    return schedule


def _check_total_iters(total_iters, what: str) -> None:
    if isinstance(total_iters, bool) or not isinstance(total_iters, int) or total_iters <= 0:
        raise ValueError(f"{what}: total_iters must be a positive integer, got {total_iters!r}")


def constant(value: float, factor: float = 1.0, total_iters: int = 0) -> Schedule:
    """``value``; with ``factor``/``total_iters``, torch ``ConstantLR``: ``value * factor`` for the first ``total_iters`` counts.

    (torch's ``ConstantLR`` defaults are ``factor=1/3, total_iters=5``.)
    """
    if factor > 1.0 or factor < 0:
        raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")
    if factor != 1.0:
        # torch's recursion divides by factor at total_iters, and with total_iters == 0
        # it never undoes the factor (its recursive and closed forms disagree)
        _check_total_iters(total_iters, "constant")
        if factor == 0:
            raise ValueError("constant: factor 0 makes torch's ConstantLR divide by zero at total_iters")
    return _scaled(value, lambda t: constant_factor(t, factor, total_iters))


def linear(value: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5) -> Schedule:
    """torch ``LinearLR``: ``value`` times a factor going linearly from ``start_factor`` to ``end_factor`` over ``total_iters``."""
    if start_factor > 1.0 or start_factor <= 0:
        raise ValueError("Starting multiplicative factor expected to be greater than 0 and less or equal to 1.")
    if end_factor > 1.0 or end_factor < 0:
        raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
    _check_total_iters(total_iters, "linear")
    return _scaled(value, lambda t: linear_factor(t, start_factor, end_factor, total_iters))


def polynomial(value: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    """torch ``PolynomialLR``: ``value * (1 - min(T, t) / T) ** power``, 0 from ``total_iters`` on."""
    _check_total_iters(total_iters, "polynomial")
    return _scaled(value, lambda t: polynomial_factor(t, total_iters, power))


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


def multiplicative(value: float, fn: Callable) -> Schedule:
    """torch ``MultiplicativeLR``: ``value * fn(1) * ... * fn(t)``; ``fn`` must be jit-able.

    Costs ``count`` evaluations of ``fn`` per call; for a constant factor use
    :func:`exponential`.
    """
    if not callable(fn):
        raise TypeError(f"lr_lambda should be a function, but got {type(fn).__name__}")
    return lambda t: multiplicative_value(t, value, fn)


def cosine(value: float, T_max: int, eta_min: float = 0.0) -> Schedule:
    """torch ``CosineAnnealingLR`` (closed form): from ``value`` to ``eta_min`` over ``T_max`` steps, periodic after."""
    if T_max <= 0:
        raise ValueError(f"T_max must be positive, got {T_max}")
    return lambda t: cosine_value(t, value, T_max, eta_min)


def cosine_warm_restarts(value: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0) -> Schedule:
    """torch ``CosineAnnealingWarmRestarts``: cosine from ``value`` to ``eta_min`` over cycles ``T_0, T_0 T_mult, ...``."""
    if T_0 <= 0 or not isinstance(T_0, int):
        raise ValueError(f"Expected positive integer T_0, but got {T_0}")
    if T_mult < 1 or not isinstance(T_mult, int):
        raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
    if not isinstance(eta_min, (float, int)):
        raise ValueError(f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}")

    def schedule(t):
        T_cur, T_i = warm_restarts_cycle(t, T_0, T_mult)
        return cosine_value(T_cur, value, T_i, eta_min)

    return schedule


def lambda_(value: float, fn: Callable) -> Schedule:
    """torch ``LambdaLR``: ``value * fn(t)``; ``fn`` must be jit-able to use it inside the step.

    torch calls ``fn`` with a Python int and computes in Python floats (float64). Inside
    ``jit`` with x64 enabled, ``fn`` therefore receives the count as a **float64** array
    holding an integer, so that a ported lambda (``lambda e: 0.1 * e``, ``e / 10``)
    computes in float64 as in torch, not in the float32 that JAX gives integer arrays
    (``0.30000001`` instead of ``0.3``). Without x64 it receives the integer count. On the
    host (a Python int, the compat ``LambdaLR``) ``fn`` gets the int as in torch.
    """
    def schedule(t):
        if not _traced(t):
            return value * fn(t)
        if _float_dtype() == jnp.float64 and jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
            t = jnp.asarray(t).astype(jnp.float64)
        # the barrier keeps XLA from folding ``value`` into fn's constants ((c * t) * value -> (c * value) * t),
        # which would round differently from torch's ``base_lr * lmbda(epoch)``
        return value * jax.lax.optimization_barrier(jnp.asarray(fn(t)))

    return schedule
