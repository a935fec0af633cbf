"""``groupopt.compat.Adafactor``: torch.optim.Adafactor over :class:`groupopt.AdafactorRule`."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..optimizers.adafactor import AdafactorRule
from .optimizer import Optimizer
from .validation import is_tensor

__all__ = ["Adafactor"]


class Adafactor(Optimizer):
    r"""torch.optim.Adafactor (torch 2.13).

    The update is :class:`groupopt.AdafactorRule` (see there for the math); the signature,
    defaults (``weight_decay=0.0``: torch's docstring says 1e-2, its code 0.0), group keys
    (``eps`` kept as the tuple, ``None`` included), validation and state layout (``step``,
    then ``row_var`` ``(..., m, 1)`` and ``col_var`` ``(..., 1, n)`` for a parameter of two or
    more dimensions, ``variance`` for a 0-d or 1-d one) are torch's. ``foreach`` is accepted and
    kept in the groups but changes nothing (torch's two paths agree).

    ``eps=(None, eps2)``: as in torch, ``eps1`` is the machine epsilon of the group's first
    parameter's dtype, used for every member (torch takes the first member *with a gradient*;
    here the first member, whatever the gradients of the step).
    """

    _rule_cls = AdafactorRule

    def __init__(
        self,
        params,
        lr=1e-2,
        beta2_decay=-0.8,
        eps=(None, 1e-3),
        d=1.0,
        weight_decay=0.0,
        *,
        foreach=None,
        maximize=False,
        model=None,
    ):
        if is_tensor(lr) and np.size(lr) != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        super().__init__(params, defaults, model=model)

    def _rule_for(self, group: dict, where: str):
        # torch resolves eps1=None once per group, from the first parameter's dtype
        rule = super()._rule_for(group, where)
        members = list(group["params"])
        if not members:
            return rule
        dtype = np.dtype(self._binding.get(members[:1])[0].dtype).name
        return dataclasses.replace(rule, eps1_dtype=dtype)
