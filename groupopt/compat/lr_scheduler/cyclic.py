"""torch's ``CyclicLR`` and ``OneCycleLR``: host drivers over ``groupopt/schedules/cyclic.py``.

Both are absolute schedulers (the lr comes from the schedule, not from the
group's current lr) and, with ``cycle_momentum=True``, rewrite each group's
``momentum`` (SGD) or ``betas[0]`` (Adam family, as a new tuple) at every
step; the optimizer reads these keys at its next ``step()`` as data, so the
cycling never recompiles. The formulas are ``groupopt/schedules/cyclic.py``'s,
evaluated here on Python floats (torch's numbers).

Construction validates everything before it writes anything into the
optimizer's groups (torch writes ``lr`` before checking ``max_lr``, ``mode``
and momentum support); the messages are torch 2.13's.
"""

from __future__ import annotations

import types
from typing import Any, Callable

from ...schedules.cyclic import (
    cyclic_geometry,
    cyclic_momentum_value,
    cyclic_position,
    cyclic_scale,
    cyclic_scale_fn,
    cyclic_value,
    one_cycle_check,
    one_cycle_phases,
    one_cycle_total_steps,
    one_cycle_value,
)
from ..optimizer import Optimizer
from .base import LRScheduler, _atomic, _update_param_group_val, _warn_get_lr_called_within_step

__all__ = ["CyclicLR", "OneCycleLR"]

_NO_MOMENTUM = "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"


def _format_param(name: str, optimizer: Optimizer, param) -> list:
    """One value per group (torch's ``_format_param``)."""
    if isinstance(param, (list, tuple)):
        if len(param) != len(optimizer.param_groups):
            raise ValueError(
                f"{name} must have the same length as optimizer.param_groups. "
                f"{name} has {len(param)} values, param_groups has {len(optimizer.param_groups)}."
            )
        return list(param)
    return [param] * len(optimizer.param_groups)


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")


def _momentum_values(optimizer: Optimizer, base_momentum, max_momentum) -> tuple[bool, list, list]:
    if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
        raise ValueError(_NO_MOMENTUM)
    use_beta1 = "betas" in optimizer.defaults
    return use_beta1, _format_param("base_momentum", optimizer, base_momentum), _format_param("max_momentum", optimizer, max_momentum)


def _write_momentum(group: dict, momentum, use_beta1: bool) -> None:
    if use_beta1:
        group["betas"] = (momentum, *group["betas"][1:])
    else:
        group["momentum"] = momentum


class CyclicLR(LRScheduler):
    """torch.optim.lr_scheduler.CyclicLR (torch 2.13 signature, state and side effects).

    ``group["lr"]`` cycles between ``base_lr`` and ``max_lr`` (see
    :func:`groupopt.schedules.cyclic` for the formula); with
    ``cycle_momentum`` the momentum / beta1 cycles inversely between
    ``max_momentum`` and ``base_momentum``. Construction sets each group's
    ``lr`` to ``base_lr``, its momentum (or ``betas[0]``) to ``max_momentum``
    (so ``SGD(momentum=0)`` gets momentum), and adds the keys
    ``max_momentum`` and ``base_momentum``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_lr,
        max_lr,
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: str = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: str = "cycle",
        cycle_momentum: bool = True,
        base_momentum: float = 0.8,
        max_momentum: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(optimizer)
        # validate everything first (torch's order, so the first error is torch's)
        base_lrs = _format_param("base_lr", optimizer, base_lr)
        max_lrs = _format_param("max_lr", optimizer, max_lr)
        total_size, step_ratio = cyclic_geometry(step_size_up, step_size_down)
        if mode not in ["triangular", "triangular2", "exp_range"] and scale_fn is None:
            raise ValueError("mode is invalid and scale_fn is None")
        if cycle_momentum:
            use_beta1, base_momentums, max_momentums = _momentum_values(optimizer, base_momentum, max_momentum)
        # commit (a failing initial step puts the groups back as they were)
        with _atomic(self, optimizer):
            self.optimizer = optimizer
            if last_epoch == -1:
                for lr, group in zip(base_lrs, optimizer.param_groups, strict=True):
                    _update_param_group_val(group, "lr", lr)
            self.max_lrs = max_lrs
            self.total_size = total_size
            self.step_ratio = step_ratio
            self.mode = mode
            self.gamma = gamma
            self._scale_fn_custom = scale_fn
            self.scale_mode = scale_mode
            self._init_scale_fn()
            self.cycle_momentum = cycle_momentum
            if cycle_momentum:
                self.use_beta1 = use_beta1
                self.base_momentums = base_momentums
                self.max_momentums = max_momentums
                if last_epoch == -1:
                    for m_momentum, b_momentum, group in zip(max_momentums, base_momentums, optimizer.param_groups, strict=True):
                        _write_momentum(group, m_momentum, use_beta1)
                        group["max_momentum"] = m_momentum
                        group["base_momentum"] = b_momentum
            super().__init__(optimizer, last_epoch)
            self.base_lrs = base_lrs

    def _init_scale_fn(self) -> None:
        if self._scale_fn_custom is not None:
            return
        self._scale_fn_ref, self.scale_mode = cyclic_scale_fn(self.mode, self.gamma)

    def scale_fn(self, x) -> float:
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        return self._scale_fn_ref(x)

    def get_lr(self) -> list[float]:
        """The lrs at ``last_epoch``; with ``cycle_momentum``, also writes each group's momentum / beta1."""
        _warn_get_lr_called_within_step(self)
        t = self.last_epoch
        cycle, s = cyclic_position(t, self.total_size, self.step_ratio)
        lrs = [
            cyclic_value(base, peak, s, cyclic_scale(t, cycle, self.scale_fn, self.scale_mode))
            for base, peak in zip(self.base_lrs, self.max_lrs, strict=True)
        ]
        if self.cycle_momentum:
            momentums = [
                cyclic_momentum_value(b, m, s, cyclic_scale(t, cycle, self.scale_fn, self.scale_mode))
                for b, m in zip(self.base_momentums, self.max_momentums, strict=True)
            ]
            for group, momentum in zip(self.optimizer.param_groups, momentums, strict=True):
                _write_momentum(group, momentum, self.use_beta1)
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """torch's format: no ``_scale_fn_ref``; ``_scale_fn_custom`` is None or a callable object's ``__dict__``."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_scale_fn_ref", "_scale_fn_custom")}
        fn = self._scale_fn_custom
        state["_scale_fn_custom"] = None
        if fn is not None and not isinstance(fn, types.FunctionType):
            state["_scale_fn_custom"] = fn.__dict__.copy()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        fn = state_dict.pop("_scale_fn_custom", None)
        self.__dict__.update(state_dict)
        if fn is not None:
            self._scale_fn_custom.__dict__.update(fn)
        self._init_scale_fn()


class OneCycleLR(LRScheduler):
    """torch.optim.lr_scheduler.OneCycleLR (torch 2.13 signature, state and side effects).

    Construction (``last_epoch=-1``) writes ``initial_lr = max_lr /
    div_factor``, ``max_lr`` and ``min_lr = initial_lr / final_div_factor`` into
    each group and, with ``cycle_momentum``, ``max_momentum``,
    ``base_momentum`` and momentum / beta1 = ``max_momentum``. The values are
    read back from the groups at every step (torch's behaviour: editing
    ``group["max_lr"]`` changes the schedule). ``step()`` may be called
    ``total_steps`` times; the next call raises ``ValueError`` after
    ``last_epoch`` and ``_step_count`` were incremented, with the lrs and
    momenta unchanged, as in torch (other failing steps change nothing; see
    the base class).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr,
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum=0.85,
        max_momentum=0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(optimizer)
        total = one_cycle_total_steps(total_steps, epochs, steps_per_epoch)
        phases = one_cycle_phases(total, pct_start, three_phase)
        one_cycle_check(pct_start, anneal_strategy)
        max_lrs = _format_param("max_lr", optimizer, max_lr)
        if cycle_momentum:
            use_beta1, base_momentums, max_momentums = _momentum_values(optimizer, base_momentum, max_momentum)
        # commit (a failing initial step puts the groups back as they were)
        with _atomic(self, optimizer):
            self.optimizer = optimizer
            self.total_steps = total
            self._schedule_phases = phases
            self._anneal_func_type = anneal_strategy
            if last_epoch == -1:
                for idx, group in enumerate(optimizer.param_groups):
                    group["initial_lr"] = max_lrs[idx] / div_factor
                    group["max_lr"] = max_lrs[idx]
                    group["min_lr"] = group["initial_lr"] / final_div_factor
            self.cycle_momentum = cycle_momentum
            if cycle_momentum:
                self.use_beta1 = use_beta1
                if last_epoch == -1:
                    for m_momentum, b_momentum, group in zip(max_momentums, base_momentums, optimizer.param_groups, strict=True):
                        _write_momentum(group, m_momentum, use_beta1)
                        group["max_momentum"] = m_momentum
                        group["base_momentum"] = b_momentum
            super().__init__(optimizer, last_epoch)

    def step(self, epoch: int | None = None) -> None:
        # A failing step() leaves everything as it was (the base class), except
        # torch's documented end of the cycle: the call after the T allowed ones
        # raises with last_epoch (and _step_count) already advanced, lrs unchanged.
        nxt = self.last_epoch + 1 if epoch is None else epoch
        try:
            super().step(epoch)
        except ValueError:
            if nxt > self.total_steps:
                self._step_count += 1
                self.last_epoch = nxt
            raise

    def get_lr(self) -> list[float]:
        """The lrs at ``last_epoch``; with ``cycle_momentum``, also writes each group's momentum / beta1."""
        _warn_get_lr_called_within_step(self)
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(f"Tried to step {step_num} times. The specified number of total steps is {self.total_steps}")
        phases, anneal = self._schedule_phases, self._anneal_func_type
        groups = self.optimizer.param_groups
        # every value first (a group added later lacks the keys: KeyError before anything is written)
        lrs = [one_cycle_value(step_num, phases, group, "lr", anneal) for group in groups]
        if self.cycle_momentum:
            momentums = [one_cycle_value(step_num, phases, group, "momentum", anneal) for group in groups]
            for group, momentum in zip(groups, momentums):
                _write_momentum(group, momentum, self.use_beta1)
        return lrs

