"""The scheduler base class and torch's chainable / closed-form schedulers.

A scheduler is a host-side driver: at each ``step()`` it evaluates one of the
formulas in :mod:`groupopt.schedules` (closed form, or torch's recursive form
that multiplies the group's current lr) and writes ``group["lr"]``. The
optimizer passes the lr to its jitted step as data, so no scheduler step ever
recompiles.

Here: ``LRScheduler`` and ``LambdaLR``, ``MultiplicativeLR``, ``StepLR``,
``MultiStepLR``, ``ConstantLR``, ``LinearLR``, ``ExponentialLR``,
``PolynomialLR``, ``CosineAnnealingLR``, ``CosineAnnealingWarmRestarts``
(torch 2.13's signatures, validation, ``state_dict`` keys and arithmetic).

One deliberate difference from torch: a ``step()`` that raises (a group was
added after the scheduler was built, a lambda raised, ...) leaves the
scheduler and the optimizer's groups exactly as they were; torch has by then
advanced ``last_epoch`` and may have written the first groups' lrs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
import weakref
from collections import Counter
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ... import schedules
from ..optimizer import Optimizer

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
]

EPOCH_DEPRECATION_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being "
    "deprecated where possible. Please use `scheduler.step()` to step the "
    "scheduler. During the deprecation, if epoch is different from None, the "
    "closed form is used instead of the new chainable form, where available. "
    "Please open an issue if you are unable to replicate your use case: "
    "https://github.com/pytorch/pytorch/issues/new/choose."
)


# ------------------------------------------------------------------ helpers

OVERRIDDEN_STEP_WARNING = (
    "Seems like `optimizer.step()` has been overridden after learning rate scheduler "
    "initialization. Please, make sure to call `optimizer.step()` before "
    "`lr_scheduler.step()`. See more details at "
    "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"
)


def _copy_val(value):
    """torch's ``.clone()`` of a tensor hyperparameter: a NumPy array is copied (JAX arrays are immutable)."""
    return value.copy() if isinstance(value, np.ndarray) else value


def _param_groups_val_list(optimizer: Optimizer, key: str) -> list:
    """``group[key]`` of every group, arrays copied (torch's ``_param_groups_val_list``: no aliasing)."""
    return [_copy_val(group[key]) for group in optimizer.param_groups]


def _update_param_group_val(group: dict, key: str, value) -> None:
    """torch's ``_update_param_group_val``: a tensor ``group[key]`` keeps its type, shape and dtype.

    torch fills a tensor lr in place (``fill_``), so the new value is rounded
    to its dtype. JAX arrays are immutable, so an array ``group[key]`` (JAX or
    NumPy, one element) is replaced by an array of the same kind, shape and
    dtype holding ``value`` (torch's aliasing of one lr tensor shared by
    several groups is not reproduced). Anything else, and per-slice vectors
    (several elements: ours, torch has none), is assigned as before.
    """
    old = group[key]
    if isinstance(old, (np.ndarray, jax.Array)) and np.size(old) == 1 and np.size(value) == 1:
        if isinstance(old, np.ndarray):
            group[key] = np.full_like(old, np.asarray(value).reshape(()))
        else:
            group[key] = jnp.full_like(old, jnp.reshape(jnp.asarray(value), ()))
    else:
        group[key] = value


def _patch_track_step_called(scheduler: "LRScheduler", opt: Optimizer) -> None:
    """torch's ``patch_track_step_called``: ``opt.step`` becomes a marked wrapper that sets ``opt._opt_called``.

    The mark is how ``step()`` tells that ``optimizer.step`` was replaced after
    the scheduler was built (torch's warning). As in torch, the wrapper is an
    attribute of the instance, calls the class's ``step`` (with its hooks), and
    holds the optimizer by a weak reference.
    """
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        return  # already patched
    opt_ref = weakref.ref(scheduler.optimizer)
    func = opt.step.__func__

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        o = opt_ref()
        o._opt_called = True
        return func.__get__(o, o.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    opt.step = wrapper


def _warn_get_lr_called_within_step(scheduler: "LRScheduler") -> None:
    if not scheduler._get_lr_called_within_step:
        warnings.warn(
            "To get the last learning rate computed by the scheduler, please use `get_last_lr()`.",
            UserWarning,
            stacklevel=2,
        )


def _walk(scheduler):
    yield scheduler
    children = scheduler.__dict__.get("_schedulers")
    if isinstance(children, (list, tuple)):
        for child in children:
            if hasattr(child, "__dict__"):
                yield from _walk(child)


@contextlib.contextmanager
def _atomic(scheduler, optimizer=None):
    """On an exception, put back the scheduler (and nested ones) and the optimizer's groups as they were."""
    optimizer = optimizer if optimizer is not None else scheduler.__dict__.get("optimizer")
    saved = [(s, dict(s.__dict__)) for s in _walk(scheduler)]
    groups = list(optimizer.param_groups) if optimizer is not None else []
    saved_groups = [dict(g) for g in groups]
    try:
        yield
    except BaseException:
        for s, d in saved:
            s.__dict__.clear()
            s.__dict__.update(d)
        for g, d in zip(groups, saved_groups):
            g.clear()
            g.update(d)
        raise


def _check_lambdas(optimizer: Optimizer, lr_lambda) -> list:
    if not isinstance(lr_lambda, list) and not isinstance(lr_lambda, tuple):
        return [lr_lambda] * len(optimizer.param_groups)
    if len(lr_lambda) != len(optimizer.param_groups):
        raise ValueError(f"Expected {len(optimizer.param_groups)} lr_lambdas, but got {len(lr_lambda)}")
    return list(lr_lambda)


# ------------------------------------------------------------------ base


class LRScheduler:
    """Base class (torch's ``LRScheduler``): ``initial_lr``, ``base_lrs``, ``last_epoch``, ``step()``.

    Subclasses implement ``get_lr()`` (torch's chainable form, from the
    groups' current lrs) and, where torch has one, ``_get_closed_form_lr()``
    (used by the deprecated ``step(epoch)``), both through
    :mod:`groupopt.schedules`.
    """

    _get_lr_called_within_step: bool = False
    _is_initial: bool = False

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        with _atomic(self, optimizer):
            if last_epoch == -1:
                for group in optimizer.param_groups:
                    group.setdefault("initial_lr", _copy_val(group["lr"]))
            else:
                for i, group in enumerate(optimizer.param_groups):
                    if "initial_lr" not in group:
                        raise KeyError(
                            f"param 'initial_lr' is not specified in param_groups[{i}] when resuming scheduler with last_epoch >= 0.\n"
                            "This typically happens when:\n"
                            "1. You're trying to resume training from a checkpoint but haven't properly loaded the optimizer state\n"
                            "2. You're using last_epoch >= 0 for a fresh training run (not recommended)"
                        )
            self.base_lrs = _param_groups_val_list(optimizer, "initial_lr")
            self.last_epoch = last_epoch
            _patch_track_step_called(self, optimizer)
            self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        """The lrs written by the last ``step()`` (the same list object each call, as in torch)."""
        return self._last_lr

    def step(self, epoch: int | None = None) -> None:
        with _atomic(self):
            if self._step_count == 1 and not hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
                warnings.warn(OVERRIDDEN_STEP_WARNING, UserWarning, stacklevel=2)
            elif self._step_count == 1 and not getattr(self.optimizer, "_opt_called", False):
                warnings.warn(
                    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. "
                    "In PyTorch 1.1.0 and later, you should call them in the opposite order: "
                    "`optimizer.step()` before `lr_scheduler.step()`.  Failure to do this "
                    "will result in PyTorch skipping the first value of the learning rate schedule. "
                    "See more details at "
                    "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate",
                    UserWarning,
                    stacklevel=2,
                )
            self._step_count += 1
            if epoch is not None:
                warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
            self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        self._get_lr_called_within_step = True
        try:
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                values = self._get_closed_form_lr() if hasattr(self, "_get_closed_form_lr") else self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        self._write_lrs(values)

    def _write_lrs(self, values) -> None:
        # torch writes inside zip(strict=True); check the lengths (same error) before writing anything
        pairs = list(zip(self.optimizer.param_groups, values, strict=True))
        for group, lr in pairs:
            _update_param_group_val(group, "lr", lr)
        self._last_lr = _param_groups_val_list(self.optimizer, "lr")

    def _current_lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _scaled_lrs(self, ratio) -> list[float]:
        """The groups' current lrs times ``ratio`` (a ratio of int 1 keeps them unchanged, as torch does)."""
        if ratio == 1 and type(ratio) is int:
            return self._current_lrs()
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer (torch's format)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)


# ------------------------------------------------------------------ lambda-based


class _LambdaStateMixin:
    """torch's ``state_dict`` for lambda schedulers: plain functions saved as None, callable objects by ``__dict__``."""

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        state["lr_lambdas"] = [None if isinstance(fn, types.FunctionType) else fn.__dict__.copy() for fn in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        lr_lambdas = state_dict.pop("lr_lambdas")
        self.__dict__.update(state_dict)
        for idx, saved in enumerate(lr_lambdas):
            if saved is not None:
                self.lr_lambdas[idx].__dict__.update(saved)


class LambdaLR(_LambdaStateMixin, LRScheduler):
    """lr = initial_lr * lr_lambda(epoch); one lambda, or one per group."""

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float] | list, last_epoch: int = -1) -> None:
        self.optimizer = optimizer
        self.lr_lambdas = _check_lambdas(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        return [schedules.lambda_(base, fn)(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]


class MultiplicativeLR(_LambdaStateMixin, LRScheduler):
    """Multiply the current lr by ``lr_lambda(epoch)`` at each step (chainable)."""

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float] | list, last_epoch: int = -1) -> None:
        self.optimizer = optimizer
        self.lr_lambdas = _check_lambdas(optimizer, lr_lambda)
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"lr_lambda should be a function, but got {type(fn).__name__}")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        if self._is_initial:
            return self._current_lrs()
        return [
            group["lr"] * schedules.multiplicative_ratio(self.last_epoch, fn)
            for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups, strict=True)
        ]


# ------------------------------------------------------------------ step-like


class StepLR(LRScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` epochs (recursive form keeps user edits)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        return self._scaled_lrs(schedules.step_ratio(self.last_epoch, self.step_size, self.gamma))

    def _get_closed_form_lr(self) -> list[float]:
        return [base * schedules.step_factor(self.last_epoch, self.step_size, self.gamma) for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply the lr by ``gamma`` at each milestone (a repeated milestone counts twice; not validated, as in torch)."""

    def __init__(self, optimizer: Optimizer, milestones, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self.milestones = Counter(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        if self.last_epoch not in self.milestones:
            return self._current_lrs()
        return self._scaled_lrs(schedules.multistep_ratio(self.last_epoch, list(self.milestones.elements()), self.gamma))

    def _get_closed_form_lr(self) -> list[float]:
        ms = sorted(self.milestones.elements())
        return [base * schedules.multistep_factor(self.last_epoch, ms, self.gamma) for base in self.base_lrs]


class ConstantLR(LRScheduler):
    """Multiply the lr by ``factor`` until ``total_iters``, then undo it (chainable)."""

    def __init__(self, optimizer: Optimizer, factor: float = 1.0 / 3, total_iters: int = 5, last_epoch: int = -1) -> None:
        if factor > 1.0 or factor < 0:
            raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        return self._scaled_lrs(schedules.constant_ratio(self.last_epoch, self.factor, self.total_iters))

    def _get_closed_form_lr(self) -> list[float]:
        return [base * schedules.constant_factor(self.last_epoch, self.factor, self.total_iters) for base in self.base_lrs]


class LinearLR(LRScheduler):
    """Multiply the lr by a factor going linearly from ``start_factor`` to ``end_factor`` over ``total_iters`` (chainable)."""

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError("Starting multiplicative factor expected to be greater than 0 and less or equal to 1.")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        if self.last_epoch != 0 and self._is_initial:
            return self._current_lrs()
        return self._scaled_lrs(schedules.linear_ratio(self.last_epoch, self.start_factor, self.end_factor, self.total_iters))

    def _get_closed_form_lr(self) -> list[float]:
        return [
            base * schedules.linear_factor(self.last_epoch, self.start_factor, self.end_factor, self.total_iters)
            for base in self.base_lrs
        ]


class ExponentialLR(LRScheduler):
    """Multiply the lr by ``gamma`` every epoch."""

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        if self._is_initial:
            return self._current_lrs()
        return self._scaled_lrs(schedules.exponential_ratio(self.last_epoch, self.gamma))

    def _get_closed_form_lr(self) -> list[float]:
        return [base * schedules.exponential_factor(self.last_epoch, self.gamma) for base in self.base_lrs]


class PolynomialLR(LRScheduler):
    """Decay the lr polynomially to 0 over ``total_iters`` (chainable); ``total_iters`` not validated, as in torch."""

    def __init__(self, optimizer: Optimizer, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1) -> None:
        self.total_iters = total_iters
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        if self._is_initial:
            return self._current_lrs()
        return self._scaled_lrs(schedules.polynomial_ratio(self.last_epoch, self.total_iters, self.power))

    def _get_closed_form_lr(self) -> list[float]:
        return [base * schedules.polynomial_factor(self.last_epoch, self.total_iters, self.power) for base in self.base_lrs]


# ------------------------------------------------------------------ cosine


class CosineAnnealingLR(LRScheduler):
    """Cosine from the base lr to ``eta_min`` over ``T_max`` epochs, and back (periodic); chainable."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        if self._is_initial:
            return self._current_lrs()
        if self._step_count == 1 and self.last_epoch > 0:
            # torch's closed-form branch (only reachable through _update_lr on a fresh scheduler)
            return [
                schedules.cosine_value(self.last_epoch, base, self.T_max, self.eta_min)
                for base, _ in zip(self.base_lrs, self.optimizer.param_groups, strict=True)
            ]
        if (self.last_epoch - 1 - self.T_max) % (2 * self.T_max) == 0:
            return [
                schedules.cosine_next(group["lr"], self.last_epoch, base, self.T_max, self.eta_min)
                for base, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)
            ]
        # off the special branch the base lr is not used (torch does not zip base_lrs here)
        return [
            schedules.cosine_next(group["lr"], self.last_epoch, None, self.T_max, self.eta_min)
            for group in self.optimizer.param_groups
        ]

    def _get_closed_form_lr(self) -> list[float]:
        return [schedules.cosine_value(self.last_epoch, base, self.T_max, self.eta_min) for base in self.base_lrs]


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine from the base lr to ``eta_min`` over cycles of ``T_0, T_0*T_mult, ...`` epochs (absolute, from ``base_lrs``).

    Overrides ``step``: no order warning, no deprecation warning, fractional
    epochs accepted by ``step(epoch)``.
    """

    def __init__(self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        if T_0 <= 0 or not isinstance(T_0, int):
            raise ValueError(f"Expected positive integer T_0, but got {T_0}")
        if T_mult < 1 or not isinstance(T_mult, int):
            raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
        if not isinstance(eta_min, (float, int)):
            raise ValueError(f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}")
        self.T_0 = T_0
        self.T_i = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        _warn_get_lr_called_within_step(self)
        return [schedules.cosine_value(self.T_cur, base, self.T_i, self.eta_min) for base in self.base_lrs]

    def step(self, epoch=None) -> None:
        with _atomic(self):
            if epoch is None and self.last_epoch < 0:
                epoch = 0
            if epoch is None:
                epoch = self.last_epoch + 1
                self.T_cur, self.T_i = schedules.warm_restarts_advance(self.T_cur, self.T_i, self.T_mult)
            else:
                if epoch < 0:
                    raise ValueError(f"Expected non-negative epoch, but got {epoch}")
                self.T_cur, self.T_i = schedules.warm_restarts_at(epoch, self.T_0, self.T_mult, self.T_i)
            self.last_epoch = math.floor(epoch)
            self._get_lr_called_within_step = True
            try:
                values = self.get_lr()
            finally:
                self._get_lr_called_within_step = False
            self._write_lrs(values)
