"""``groupopt.compat.Adam`` and ``AdamW``: torch.optim.Adam/AdamW over :class:`groupopt.AdamRule`."""

from __future__ import annotations

import numpy as np

from ..optimizers.adam import AdamRule
from .optimizer import Optimizer
from .validation import check_adam_betas, check_betas, check_fused, check_lr, check_nonneg, is_tensor

__all__ = ["Adam", "AdamW"]

_TENSOR_LR_FOREACH = "lr as a Tensor is not supported for capturable=False and foreach=True"


def _validate_adam(lr, betas, eps, weight_decay, foreach, capturable):
    """torch's constructor checks, in its order; returns ``betas`` as torch stores them (tensors squeezed)."""
    if is_tensor(lr) and foreach and not capturable:
        raise ValueError(_TENSOR_LR_FOREACH)
    check_lr(lr)
    check_nonneg("epsilon", eps)
    check_betas(betas)
    check_nonneg("weight_decay", weight_decay)
    return check_adam_betas(betas, foreach, capturable)


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
        betas = _validate_adam(lr, betas, eps, weight_decay, foreach, capturable)
        defaults = {
            "lr": lr,
            "betas": betas,
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
        check_fused(fused, foreach, differentiable)  # after the groups, as torch

    def _structure(self):
        # torch's step with foreach=True and capturable=False refuses a group's tensor lr (RuntimeError,
        # Adam._init_group) and tensor betas (ValueError, _multi_tensor_adam). A tensor is a size-1 array
        # here (per-slice vectors are ours). Checked for every group before anything changes (torch
        # has updated the earlier groups when a later group's betas fail).
        def tensor(x):
            return is_tensor(x) and np.size(x) == 1

        for group in self.param_groups:
            if not group.get("foreach") or group.get("capturable"):
                continue
            if tensor(group["lr"]):
                raise RuntimeError(_TENSOR_LR_FOREACH)
            for name, beta in zip(("beta1", "beta2"), group.get("betas", ())):
                if tensor(beta):
                    raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
        return super()._structure()


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
