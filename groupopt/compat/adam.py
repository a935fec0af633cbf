"""``groupopt.compat.Adam`` and ``AdamW``: torch.optim.Adam/AdamW over :class:`groupopt.AdamRule`."""

from __future__ import annotations

from ..optimizers.adam import AdamRule
from .optimizer import Optimizer
from .validation import check_lr, check_nonneg, check_betas, check_fused

__all__ = ["Adam", "AdamW"]


def _validate_adam(lr, betas, eps, weight_decay, foreach, fused, differentiable):
    check_lr(lr)
    check_nonneg("epsilon", eps)
    check_betas(betas)
    check_nonneg("weight_decay", weight_decay)
    if not (isinstance(betas[0], float) and isinstance(betas[1], float)):
        raise ValueError("betas must be either both floats or both Tensors")
    check_fused(fused, foreach, differentiable)


class Adam(Optimizer):
    r"""torch.optim.Adam (``decoupled_weight_decay=True`` gives AdamW).

    The update is :class:`groupopt.AdamRule` (see there for the math); the
    signature, defaults, group keys and validation are torch 2.13's.
    ``foreach``, ``capturable``, ``differentiable`` and ``fused`` are accepted
    and kept in the groups but change nothing.
    """

    _rule_cls = AdamRule

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=False,
        model=None,
    ):
        _validate_adam(lr, betas, eps, weight_decay, foreach, fused, differentiable)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, model=model)


class AdamW(Adam):
    r"""torch.optim.AdamW: Adam with decoupled weight decay ``p *= 1 - lr * weight_decay`` (default 1e-2)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
        model=None,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            model=model,
        )

    def load_state_dict(self, state_dict, strict: bool = True):
        report = super().load_state_dict(state_dict, strict)
        for group in self.param_groups:  # torch's AdamW.__setstate__ forces the flag
            group["decoupled_weight_decay"] = True
        return report
