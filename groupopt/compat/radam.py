"""``groupopt.compat.RAdam``: torch.optim.RAdam over :class:`groupopt.RAdamRule`."""

from __future__ import annotations

from ..optimizers.radam import RAdamRule
from .optimizer import Optimizer
from .validation import check_lr, check_nonneg, check_betas

__all__ = ["RAdam"]


class RAdam(Optimizer):
    r"""torch.optim.RAdam.

    The update is :class:`groupopt.RAdamRule` (see there for the math); the
    signature, defaults, group keys, validation and state_dict layout
    (``step``, ``exp_avg``, ``exp_avg_sq``) are torch 2.13's.
    ``foreach``, ``capturable`` and ``differentiable`` are accepted and kept in
    the groups but change nothing: there is one jitted path.
    """

    _rule_cls = RAdamRule

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        decoupled_weight_decay=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
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
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, model=model)
