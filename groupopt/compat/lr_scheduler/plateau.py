"""torch's ``ReduceLROnPlateau``: the host driver of :mod:`groupopt.plateau`'s rule.

The decision rule (better / bad epochs / cooldown / patience) and the per-group
reduction are :func:`groupopt.plateau.plateau_decide` and
:func:`groupopt.plateau.plateau_reduce_lr`, evaluated here on Python floats;
the same functions run inside ``jit`` in :func:`groupopt.reduce_on_plateau`.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np

from ... import multihost
from ...plateau import PlateauState, mode_worse, plateau_check, plateau_decide, plateau_is_better, plateau_reduce_lr
from ..optimizer import Optimizer
from .base import EPOCH_DEPRECATION_WARNING, LRScheduler, _param_groups_val_list, _update_param_group_val

__all__ = ["ReduceLROnPlateau"]


def _to_float(lr) -> float:
    """torch's ``float(group["lr"])``, which also takes a one-element tensor of any shape."""
    if isinstance(lr, (np.ndarray, jax.Array)) and np.size(lr) == 1:
        return float(np.asarray(lr).reshape(()))
    return float(lr)


class ReduceLROnPlateau(LRScheduler):
    """torch.optim.lr_scheduler.ReduceLROnPlateau (torch 2.13).

    An ``LRScheduler`` that skips the base constructor: no ``initial_lr``, no
    ``base_lrs``, no initial step; ``last_epoch`` starts at 0 and
    ``get_last_lr()`` works. ``step(metrics)`` observes the metric (a number or
    a 0-d array) and, after more than ``patience`` epochs without improvement,
    multiplies each group's lr by ``factor`` (bounded below by ``min_lr``;
    skipped when the change is at most ``eps``).

    One divergence, on an error path only: when a reduction is due, groups
    were added since construction and ``min_lr`` was given as a list, torch
    raises its ``RuntimeError`` after having updated ``last_epoch``, ``best``
    and the counters; here nothing changes before the error.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr=0,
        eps: float = 1e-8,
    ) -> None:
        if factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(optimizer.param_groups):
                raise ValueError(f"expected {len(optimizer.param_groups)} min_lrs, got {len(min_lr)}")
            default_min_lr, min_lrs = None, list(min_lr)
        else:
            default_min_lr, min_lrs = min_lr, [min_lr] * len(optimizer.param_groups)
        plateau_check(mode, factor, threshold_mode)
        self.factor = factor
        self.optimizer = optimizer
        self.default_min_lr = default_min_lr
        self.min_lrs = min_lrs
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = _param_groups_val_list(optimizer, "lr")
        self._init_is_better(mode=mode, threshold=threshold, threshold_mode=threshold_mode)
        self._reset()

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _init_is_better(self, mode, threshold, threshold_mode) -> None:
        plateau_check(mode, 0.0, threshold_mode)
        self.mode_worse = mode_worse(mode)
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _is_better(self, a, best) -> bool:
        return plateau_is_better(a, best, self.mode, self.threshold, self.threshold_mode)

    def step(self, metrics, epoch=None) -> None:  # type: ignore[override]
        """Observe ``metrics`` (``float(metrics)``); reduce the lrs on a plateau."""
        current = float(metrics)
        if multihost.active():  # the same metric on every process, or the lrs drift apart
            multihost.agree("ReduceLROnPlateau.step", {"metric": current, "last_epoch": self.last_epoch})
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        state = PlateauState(self.best, self.num_bad_epochs, self.cooldown_counter, self.last_epoch)
        new, reduce = plateau_decide(
            state,
            current,
            mode=self.mode,
            patience=self.patience,
            threshold=self.threshold,
            threshold_mode=self.threshold_mode,
            cooldown=self.cooldown,
            epoch=epoch,
        )
        groups = self.optimizer.param_groups
        min_lrs = self.min_lrs
        if reduce and len(groups) != len(min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    "The number of param groups in the `optimizer` "
                    f"({len(groups)}) differs "
                    f"from when `ReduceLROnPlateau` was initialized "
                    f"({len(min_lrs)}), usually due to a new "
                    "param group being added to the optimizer. Please "
                    "modify the `min_lrs` field to match the length "
                    "of the `optimizer` param groups."
                )
            min_lrs = [self.default_min_lr] * len(groups)
        # commit
        self.last_epoch = new.last_epoch
        self.best, self.num_bad_epochs, self.cooldown_counter = new.best, new.num_bad_epochs, new.cooldown_counter
        if reduce:
            self.min_lrs = min_lrs
            for i, group in enumerate(groups):
                old_lr = _to_float(group["lr"])
                new_lr = plateau_reduce_lr(old_lr, self.factor, min_lrs[i], self.eps)
                if new_lr != old_lr:
                    # torch: fill_ an lr tensor in place; an array lr keeps its type, shape and dtype
                    _update_param_group_val(group, "lr", new_lr)
        self._last_lr = _param_groups_val_list(self.optimizer, "lr")

    def get_lr(self) -> list[float]:
        raise NotImplementedError("ReduceLROnPlateau has no get_lr(): step(metrics) decides; use get_last_lr()")

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        self._init_is_better(mode=self.mode, threshold=self.threshold, threshold_mode=self.threshold_mode)
