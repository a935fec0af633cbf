"""``groupopt.compat.Adamax``: torch.optim.Adamax over :class:`groupopt.AdamaxRule`."""

from __future__ import annotations

from ..optimizers.adamax import AdamaxRule
from .optimizer import Optimizer, check_tensor_lr

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
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
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
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, model=model)

