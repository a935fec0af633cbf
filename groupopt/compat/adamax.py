"""``groupopt.compat.Adamax``: torch.optim.Adamax over :class:`groupopt.AdamaxRule`."""

from __future__ import annotations

from ..optimizers.adamax import AdamaxRule
from .optimizer import Optimizer
from .validation import check_lr, check_nonneg, check_betas

__all__ = ["Adamax"]


class Adamax(Optimizer):
    r"""torch.optim.Adamax.

    The update is :class:`groupopt.AdamaxRule` (see there for the math); the
    signature, defaults, group keys, validation and state layout are torch
    2.13's (``betas`` is kept as given, a list stays a list, as in torch).
    ``foreach``, ``differentiable`` and ``capturable`` are accepted and kept
    in the groups but change nothing.
    """

    _rule_cls = AdamaxRule

    def __init__(
        self,
        params,
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        foreach=None,
        *,
        maximize=False,
        differentiable=False,
        capturable=False,
        model=None,
    ):
        check_lr(lr)
        check_nonneg("epsilon", eps)
        check_betas(betas)
        check_nonneg("weight_decay", weight_decay)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, model=model)

