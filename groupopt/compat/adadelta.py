"""``groupopt.compat.Adadelta``: torch.optim.Adadelta over :class:`groupopt.AdadeltaRule`."""

from __future__ import annotations

from ..optimizers.adadelta import AdadeltaRule
from .optimizer import Optimizer
from .validation import check_lr, check_nonneg, guarded

__all__ = ["Adadelta"]


class Adadelta(Optimizer):
    r"""torch.optim.Adadelta.

    The update is :class:`groupopt.AdadeltaRule` (see there for the math); the
    signature, defaults, group keys, validation and state layout are torch
    2.13's. ``capturable``, ``foreach`` and ``differentiable`` are accepted and
    kept in the groups but change nothing.
    """

    _rule_cls = AdadeltaRule

    def __init__(
        self,
        params,
        lr=1.0,
        rho=0.9,
        eps=1e-6,
        weight_decay=0,
        foreach=None,
        *,
        capturable=False,
        maximize=False,
        differentiable=False,
        model=None,
    ):
        check_lr(lr)
        if not 0.0 <= guarded(rho) <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        check_nonneg("epsilon", eps)
        check_nonneg("weight_decay", weight_decay)
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, model=model)

