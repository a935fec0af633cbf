"""``groupopt.compat.RAdam``: torch.optim.RAdam over :class:`groupopt.RAdamRule`."""

from __future__ import annotations

from ..optimizers.radam import RAdamRule
from .nadam import _check_lr, _StrictLoad
from .optimizer import Optimizer

__all__ = ["RAdam"]


class RAdam(_StrictLoad, Optimizer):
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
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
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
