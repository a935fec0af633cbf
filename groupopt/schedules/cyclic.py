"""Cyclical schedules: torch's ``CyclicLR`` and ``OneCycleLR``, lr and momentum.

Each family is written once here, in arithmetic that works on Python numbers
(the compat schedulers in :mod:`groupopt.compat.lr_scheduler.cyclic` evaluate
it on the host, in float64, with torch's operation order, so the numbers are
torch's bit for bit) and on JAX arrays (inside ``jit``, per group, in the
hyperparameter dtype).

CyclicLR (``t`` = count, ``T = up + down``, ``r = up / T``)::

    cycle = floor(1 + t / T);   x = 1 + t / T - cycle
    s     = x / r            if x <= r else (x - 1) / (r - 1)
    k     = scale_fn(cycle)  (scale_mode "cycle") or scale_fn(t) ("iterations")
    lr    = base_lr + (max_lr - base_lr) * s * k
    mom   = max_momentum - (max_momentum - base_momentum) * s * k

built-in ``scale_fn``: triangular ``1`` (cycle), triangular2 ``1 / 2 ** (cycle - 1)``
(cycle), exp_range ``gamma ** t`` (iterations).

OneCycleLR: phases end at (float) steps ``pct_start*T - 1`` and ``T - 1``
(three-phase: ``pct_start*T - 1``, ``2*pct_start*T - 2``, ``T - 1``); in the first
phase with ``t <= end`` (or the last), ``pct = (t - start) / (end - start)`` and the
value anneals between the phase's two named values (``initial_lr``, ``max_lr``,
``min_lr``, ``max_momentum``, ``base_momentum``):
cos ``end + (start - end) / 2 * (cos(pi * pct) + 1)``, linear ``(end - start) * pct + start``.

Pure schedules (``count -> value``; the count is the number of optimizer
updates already applied, torch's ``last_epoch``): :func:`cyclic`,
:func:`cyclic_momentum`, :func:`one_cycle`, :func:`one_cycle_momentum`. Give a
group ``lr=one_cycle(...)`` and ``momentum=one_cycle_momentum(...)`` (SGD) or
``betas=(one_cycle_momentum(...), 0.999)`` (Adam) to get what torch's
scheduler writes into ``param_groups``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "cyclic",
    "cyclic_momentum",
    "one_cycle",
    "one_cycle_momentum",
    "cyclic_geometry",
    "cyclic_scale_fn",
    "cyclic_position",
    "cyclic_scale",
    "cyclic_value",
    "cyclic_momentum_value",
    "one_cycle_total_steps",
    "one_cycle_phases",
    "one_cycle_check",
    "one_cycle_anneal",
    "one_cycle_value",
]


def _traced(*xs) -> bool:
    return any(isinstance(x, (jax.Array, jax.core.Tracer)) for x in xs)


def _floor(x):
    return jnp.floor(x) if _traced(x) else math.floor(x)


def _cos(x):
    return jnp.cos(x) if _traced(x) else math.cos(x)


# ---------------------------------------------------------------- CyclicLR


def cyclic_geometry(step_size_up=2000, step_size_down=None) -> tuple[float, float]:
    """``(total_size, step_ratio)`` as torch computes them (floats; ``down`` defaults to ``up``)."""
    up = float(step_size_up)
    down = float(step_size_down) if step_size_down is not None else up
    total_size = up + down
    return total_size, up / total_size


def _triangular_scale_fn(x):
    return 1.0


def _triangular2_scale_fn(x):
    return 1 / (2.0 ** (x - 1))


def _exp_range_scale_fn(gamma, x):
    return gamma**x


def cyclic_scale_fn(mode: str = "triangular", gamma: float = 1.0, scale_fn: Callable | None = None, scale_mode: str = "cycle"):
    """``(scale_fn, scale_mode)``: a custom ``scale_fn`` wins (``mode`` ignored); built-in modes force their scale mode."""
    if scale_fn is not None:
        return scale_fn, scale_mode
    if mode == "triangular":
        return _triangular_scale_fn, "cycle"
    if mode == "triangular2":
        return _triangular2_scale_fn, "cycle"
    if mode == "exp_range":
        return (lambda x: _exp_range_scale_fn(gamma, x)), "iterations"
    raise ValueError("mode is invalid and scale_fn is None")


def cyclic_position(t, total_size: float, step_ratio: float):
    """``(cycle, scale_factor)`` at count ``t``: the cycle number (from 1) and the position ``s`` in [0, 1]."""
    cycle = _floor(1 + t / total_size)
    x = 1.0 + t / total_size - cycle
    if _traced(x):
        return cycle, jnp.where(x <= step_ratio, x / step_ratio, (x - 1) / (step_ratio - 1))
    return cycle, (x / step_ratio if x <= step_ratio else (x - 1) / (step_ratio - 1))


def cyclic_scale(t, cycle, scale_fn: Callable, scale_mode: str):
    """``scale_fn(cycle)`` (scale_mode ``"cycle"``) or ``scale_fn(t)`` (``"iterations"``)."""
    return scale_fn(cycle) if scale_mode == "cycle" else scale_fn(t)


def cyclic_value(base, peak, scale_factor, scale):
    """The lr: ``base + (peak - base) * s * k`` (torch's order of operations)."""
    base_height = (peak - base) * scale_factor
    return base + base_height * scale


def cyclic_momentum_value(base_momentum, max_momentum, scale_factor, scale):
    """The momentum, cycled inversely: ``max_m - (max_m - base_m) * s * k``."""
    base_height = (max_momentum - base_momentum) * scale_factor
    return max_momentum - base_height * scale


def _cyclic_schedule(value_fn, low, high, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode):
    total_size, step_ratio = cyclic_geometry(step_size_up, step_size_down)
    fn, smode = cyclic_scale_fn(mode, gamma, scale_fn, scale_mode)

    def schedule(count):
        cycle, s = cyclic_position(count, total_size, step_ratio)
        return value_fn(low, high, s, cyclic_scale(count, cycle, fn, smode))

    return schedule


def cyclic(
    base_lr: float,
    max_lr: float,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable | None = None,
    scale_mode: str = "cycle",
):
    """torch ``CyclicLR``'s lr as a schedule: ``base_lr`` at count 0, ``max_lr`` after ``step_size_up`` counts, ...

    ``scale_fn`` must be jit-able to be used inside the step; in ``"cycle"``
    mode it receives the cycle number as a float array there (an int on the host).
    """
    return _cyclic_schedule(cyclic_value, base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode)


def cyclic_momentum(
    base_momentum: float = 0.8,
    max_momentum: float = 0.9,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable | None = None,
    scale_mode: str = "cycle",
):
    """torch ``CyclicLR``'s momentum (``cycle_momentum=True``) as a schedule: ``max_momentum`` at count 0."""
    return _cyclic_schedule(
        cyclic_momentum_value, base_momentum, max_momentum, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode
    )


# ---------------------------------------------------------------- OneCycleLR


def one_cycle_total_steps(total_steps=None, epochs=None, steps_per_epoch=None) -> int:
    """``total_steps``, or ``epochs * steps_per_epoch``, validated with torch's messages."""
    if total_steps is not None:
        if total_steps <= 0 or not isinstance(total_steps, int):
            raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
        return total_steps
    if epochs is not None and steps_per_epoch is not None:
        if not isinstance(epochs, int) or epochs <= 0:
            raise ValueError(f"Expected positive integer epochs, but got {epochs}")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ValueError(f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}")
        return epochs * steps_per_epoch
    raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")


def one_cycle_check(pct_start, anneal_strategy) -> None:
    """torch's checks of ``pct_start`` (a float in [0, 1]) and ``anneal_strategy``."""
    if pct_start < 0 or pct_start > 1 or not isinstance(pct_start, float):
        raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
    if anneal_strategy not in ["cos", "linear"]:
        raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")


def one_cycle_phases(total_steps: int, pct_start: float = 0.3, three_phase: bool = False) -> list[dict]:
    """The phases, in torch's ``_schedule_phases`` format (end steps are floats but the last)."""

    def phase(end_step, lr_from, lr_to, m_from, m_to):
        return {"end_step": end_step, "start_lr": lr_from, "end_lr": lr_to, "start_momentum": m_from, "end_momentum": m_to}

    if three_phase:
        return [
            phase(float(pct_start * total_steps) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
            phase(float(2 * pct_start * total_steps) - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
            phase(total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
        ]
    return [
        phase(float(pct_start * total_steps) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
        phase(total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
    ]


def one_cycle_anneal(anneal_strategy: str, start, end, pct):
    """Anneal from ``start`` to ``end`` as ``pct`` goes from 0 to 1 (torch's ``_annealing_cos`` / ``_annealing_linear``)."""
    if anneal_strategy == "cos":
        cos_out = _cos(math.pi * pct) + 1
        return end + (start - end) / 2.0 * cos_out
    if anneal_strategy == "linear":
        return (end - start) * pct + start
    raise ValueError(f"Unknown _anneal_func_type: {anneal_strategy}")


def one_cycle_value(t, phases: Sequence[dict], values: Mapping, which: str = "lr", anneal_strategy: str = "cos"):
    """The OneCycle value at count ``t``.

    Args:
      phases: from :func:`one_cycle_phases`.
      values: a mapping with the phase keys (``initial_lr``, ``max_lr``,
        ``min_lr``, ``max_momentum``, ``base_momentum``): a torch param group, or a dict.
      which: ``"lr"`` or ``"momentum"``.
    """
    n = len(phases)

    def at(i, start_step):
        phase = phases[i]
        end_step = phase["end_step"]
        pct = (t - start_step) / (end_step - start_step)
        return one_cycle_anneal(anneal_strategy, values[phase[f"start_{which}"]], values[phase[f"end_{which}"]], pct)

    starts = [0.0] + [p["end_step"] for p in phases[:-1]]
    if _traced(t):
        out = at(n - 1, starts[n - 1])
        for i in reversed(range(n - 1)):
            out = jnp.where(t <= phases[i]["end_step"], at(i, starts[i]), out)
        return out
    for i in range(n):
        if t <= phases[i]["end_step"] or i == n - 1:
            return at(i, starts[i])
    raise AssertionError("unreachable")


def _clamp(count, total_steps):
    return jnp.minimum(count, total_steps) if _traced(count) else min(count, total_steps)


def one_cycle(
    max_lr: float,
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
):
    """torch ``OneCycleLR``'s lr as a schedule (``max_lr / div_factor`` at count 0).

    torch allows ``total_steps`` scheduler steps, so it defines counts
    ``0..total_steps`` (the last one past the end of the cycle); a jitted
    schedule cannot raise, so later counts keep the value at ``total_steps``.
    """
    T = one_cycle_total_steps(total_steps, epochs, steps_per_epoch)
    one_cycle_check(pct_start, anneal_strategy)
    phases = one_cycle_phases(T, pct_start, three_phase)
    initial_lr = max_lr / div_factor
    values = {"initial_lr": initial_lr, "max_lr": max_lr, "min_lr": initial_lr / final_div_factor}
    return lambda count: one_cycle_value(_clamp(count, T), phases, values, "lr", anneal_strategy)


def one_cycle_momentum(
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    three_phase: bool = False,
):
    """torch ``OneCycleLR``'s momentum / beta1 (``cycle_momentum=True``) as a schedule (``max_momentum`` at count 0)."""
    T = one_cycle_total_steps(total_steps, epochs, steps_per_epoch)
    one_cycle_check(pct_start, anneal_strategy)
    phases = one_cycle_phases(T, pct_start, three_phase)
    values = {"max_momentum": max_momentum, "base_momentum": base_momentum}
    return lambda count: one_cycle_value(_clamp(count, T), phases, values, "momentum", anneal_strategy)
