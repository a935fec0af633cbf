"""``groupopt.compat.ASGD``: torch.optim.ASGD over :class:`groupopt.ASGDRule`."""

from __future__ import annotations

from ..optimizers.asgd import ASGDRule
from .optimizer import Optimizer
from .validation import check_lr, check_nonneg

__all__ = ["ASGD"]


class ASGD(Optimizer):
    r"""torch.optim.ASGD (averaged SGD).

    The update is :class:`groupopt.ASGDRule` (see there for the math); the
    signature (all arguments positional, as torch's), defaults, group keys,
    validation and state_dict layout (``step``, ``eta``, ``mu``, ``ax``) are
    torch 2.13's. ``foreach``, ``capturable`` and ``differentiable`` are
    accepted and kept in the groups but change nothing: there is one jitted
    path (torch's non-capturable one).
    """

    _rule_cls = ASGDRule

    def __init__(
        self,
        params,
        lr=1e-2,
        lambd=1e-4,
        alpha=0.75,
        t0=1e6,
        weight_decay=0,
        foreach=None,
        maximize=False,
        differentiable=False,
        capturable=False,
        *,
        model=None,
    ):
        check_lr(lr)
        check_nonneg("weight_decay", weight_decay)
        defaults = {
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, model=model)
