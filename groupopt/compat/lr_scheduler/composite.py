"""torch's composite schedulers: ``SequentialLR`` and ``ChainedScheduler``.

They hold no formula of their own: they step their children (whose formulas
are in :mod:`groupopt.schedules`). The pure equivalents are
:func:`groupopt.schedules.join` (SequentialLR) and
:func:`groupopt.schedules.multiply` (ChainedScheduler of chainable schedulers).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Sequence

from ..optimizer import Optimizer
from .base import LRScheduler, _atomic, _param_groups_val_list, _update_param_group_val

__all__ = ["SequentialLR", "ChainedScheduler"]


def _is_plateau(scheduler) -> bool:
    return any(cls.__name__ == "ReduceLROnPlateau" for cls in type(scheduler).__mro__)


def _check_children(kind: str, optimizer, schedulers) -> None:
    for scheduler_idx, scheduler in enumerate(schedulers):
        if not hasattr(scheduler, "optimizer"):
            raise TypeError(f"{kind} at index {scheduler_idx} should have `optimizer` as its attribute.")
        if _is_plateau(scheduler):
            raise ValueError(
                f"{kind} does not support `ReduceLROnPlateau` scheduler as it requires additional kwargs to be "
                f"specified when calling `step`, but got one at index {scheduler_idx} in the given schedulers sequence."
            )
        if optimizer != scheduler.optimizer:
            raise ValueError(
                f"{kind} expects all schedulers to belong to the same optimizer, but got scheduler "
                f"{scheduler.__class__.__name__} at index {scheduler_idx} has {scheduler.optimizer}, "
                f"which is different from {optimizer.__class__.__name__}."
            )


def _children_state(self) -> dict[str, Any]:
    state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "_schedulers")}
    state["_schedulers"] = [s.state_dict() for s in self._schedulers]
    return state


def _load_children_state(self, state_dict: dict[str, Any]) -> None:
    state_dict = dict(state_dict)
    children = state_dict.pop("_schedulers")
    if len(children) != len(self._schedulers):  # checked before anything changes
        raise ValueError(
            f"{type(self).__name__}.load_state_dict: the state holds {len(children)} child schedulers, "
            f"this scheduler has {len(self._schedulers)}"
        )
    self.__dict__.update(state_dict)
    for idx, s in enumerate(children):
        self._schedulers[idx].load_state_dict(s)


class SequentialLR(LRScheduler):
    """Run ``schedulers[i]`` from ``milestones[i-1]`` on; at its milestone a scheduler restarts at epoch 0.

    torch 2.13's construction: every group's lr is reset to ``initial_lr``,
    every child's ``last_epoch`` goes back by one (recursively, into nested
    Sequential/Chained schedulers), and the first child re-runs its initial
    step. At a milestone the child is restarted with ``_update_lr(0)`` (its
    closed form at 0 where it has one, else ``get_lr()``).
    """

    def __init__(self, optimizer: Optimizer, schedulers: list[LRScheduler], milestones: list[int], last_epoch: int = -1) -> None:
        kind = self.__class__.__name__
        if len(schedulers) < 1:
            raise ValueError(f"{kind} expects at least one scheduler, but got no scheduler.")
        _check_children(kind, optimizer, schedulers)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more than the number of "
                f"milestone points, but got number of schedulers {len(schedulers)} and the number of milestones "
                f"to be equal to {len(milestones)}"
            )
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        with _atomic(self, optimizer):
            for group in self.optimizer.param_groups:
                _update_param_group_val(group, "lr", group["initial_lr"])
            self.recursive_undo()
            idx = bisect_right(self._milestones, 0)
            self._schedulers[idx]._initial_step()
            self._last_lr = schedulers[idx].get_last_lr()

    def recursive_undo(self, sched=None) -> None:
        """Move every (nested) child's ``last_epoch`` back by one, undoing the initial steps of their constructions."""
        scheds = self if sched is None else sched
        if hasattr(scheds, "_schedulers"):
            for s in scheds._schedulers:
                self.recursive_undo(s)
        elif hasattr(scheds, "last_epoch"):
            scheds.last_epoch -= 1

    def step(self) -> None:  # type: ignore[override]
        with _atomic(self):
            self.last_epoch += 1
            idx = bisect_right(self._milestones, self.last_epoch)
            scheduler = self._schedulers[idx]
            if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
                scheduler._update_lr(0)
            else:
                scheduler.step()
            self._last_lr = scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        """Own attributes (but the optimizer) and ``_schedulers``: the children's state dicts."""
        return _children_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _load_children_state(self, state_dict)


class ChainedScheduler(LRScheduler):
    """Step every child at each ``step()``, in order: chainable children compose multiplicatively.

    No ``last_epoch`` and no initial step of its own (torch 2.13).
    """

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: Optimizer | None = None) -> None:
        kind = self.__class__.__name__
        if len(schedulers) < 1:
            raise ValueError(f"{kind} expects at least one scheduler to be chained, but got no scheduler.")
        optimizer = optimizer or schedulers[0].optimizer
        _check_children(kind, optimizer, schedulers)
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = _param_groups_val_list(self._schedulers[-1].optimizer, "lr")

    def step(self) -> None:  # type: ignore[override]
        with _atomic(self):
            for scheduler in self._schedulers:
                scheduler.step()
            self._last_lr = _param_groups_val_list(self._schedulers[-1].optimizer, "lr")

    def state_dict(self) -> dict[str, Any]:
        """Own attributes (but the optimizer) and ``_schedulers``: the children's state dicts."""
        return _children_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _load_children_state(self, state_dict)
