"""Shared measurement code: step timing, compile timing, state bytes, compiled-memory statistics.

Every implementation reduces to a ``step()`` closure that advances its own
state by one step and returns something to wait on; :func:`time_steps` runs
it ``warmup`` times, then ``steps`` times, each timed separately with a wait
for the result (``jax.block_until_ready``; torch on CPU is synchronous).
Python's garbage collector is paused during the timed loop (it is collected
before) so a collection does not land inside one step.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["Timing", "CompileTime", "time_steps", "compile_jit", "tree_nbytes", "memory_stats", "device_kind"]


@dataclasses.dataclass
class Timing:
    """Wall times in seconds: the first call (includes any compilation), the warm-up calls, the timed steps."""

    first_s: float
    warmup_s: list
    step_s: list

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.step_s)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.step_s)

    def first_call_overhead_s(self) -> float:
        """First call minus a typical later call: compilation and first-call setup of a jit-on-call API."""
        return max(self.first_s - statistics.median(self.step_s), 0.0)


def _wait(out):
    jax.block_until_ready(out)
    return out


def time_steps(step: Callable[[], Any], *, warmup: int, steps: int, sync: Callable[[Any], Any] = _wait) -> Timing:
    """Run ``step`` ``warmup`` + ``steps`` times (at least one warm-up), timing each call to completion."""
    times = []
    gc.collect()
    was_enabled = gc.isenabled()
    try:
        for i in range(max(warmup, 1) + steps):
            if i == max(warmup, 1):
                gc.collect()
                gc.disable()
            t0 = time.perf_counter()
            sync(step())
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    n_warm = max(warmup, 1)
    return Timing(first_s=times[0], warmup_s=times[:n_warm], step_s=times[n_warm:])


@dataclasses.dataclass
class CompileTime:
    """Seconds spent in ``jax.jit(fn).lower(*args)`` (tracing + lowering to StableHLO) and in ``.compile()`` (XLA)."""

    lower_s: float
    xla_s: float

    @property
    def total_s(self) -> float:
        return self.lower_s + self.xla_s


def compile_jit(fn: Callable, args: tuple, donate_argnums: tuple = ()) -> tuple[Any, CompileTime]:
    """``jax.jit(fn).lower(*args).compile()`` and its wall times."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, CompileTime(t1 - t0, time.perf_counter() - t1)


def _nbytes(x) -> int:
    if hasattr(x, "nbytes"):
        return int(x.nbytes)
    if hasattr(x, "element_size") and hasattr(x, "numel"):  # torch tensor
        return int(x.element_size() * x.numel())
    return 0


def tree_nbytes(tree) -> int:
    """Bytes of every array in a pytree (jax, numpy; NNX Variables are looked into)."""
    return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def memory_stats(compiled, param_bytes: int) -> dict | None:
    """What XLA's ``compiled.memory_analysis()`` reports, in bytes, and the extra memory a step needs.

    ``extra_bytes = temp + output - alias``: memory the step allocates beyond its
    (donated) arguments. With donation of params and state, outputs alias
    their inputs, so this is the scratch space; ``extra_param_copies`` is it
    divided by the bytes of the parameters. ``None`` where the backend gives
    no analysis.
    """
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if ma is None:
        return None
    arg, out, alias, temp = (
        int(ma.argument_size_in_bytes),
        int(ma.output_size_in_bytes),
        int(ma.alias_size_in_bytes),
        int(ma.temp_size_in_bytes),
    )
    extra = temp + out - alias
    return {
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "param_bytes": int(param_bytes),
        "extra_bytes": extra,
        "extra_param_copies": round(extra / param_bytes, 4) if param_bytes else None,
    }


def device_kind() -> str:
    return jax.devices()[0].device_kind


def as_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a jax array or a torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
