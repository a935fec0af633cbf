"""``groupopt.compat.RMSprop``: torch.optim.RMSprop over :class:`groupopt.RMSpropRule`."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..optimizers.rmsprop import RMSpropRule
from .optimizer import Optimizer
from .validation import check_lr, check_nonneg

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    r"""torch.optim.RMSprop.

    The update is :class:`groupopt.RMSpropRule` (see there for the math); the
    signature, defaults, group keys, validation and state layout are torch
    2.13's. ``capturable``, ``foreach`` and ``differentiable`` are accepted and
    kept in the groups but change nothing: there is one jitted path.

    A group gets a ``momentum_buffer`` when its momentum is > 0 when its state
    is created, as in torch; setting the momentum to 0 later takes the plain
    path and keeps the buffer (torch too). Raising a momentum from 0 once the
    group has state is an error (torch fails with ``KeyError: 'momentum_buffer'``).
    """

    _rule_cls = RMSpropRule

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        *,
        model=None,
    ):
        check_lr(lr)
        check_nonneg("epsilon", eps)
        check_nonneg("momentum", momentum)
        check_nonneg("weight_decay", weight_decay)
        check_nonneg("alpha", alpha)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, model=model)


    def _structure(self):
        # torch decides on the momentum buffer when a parameter's state is created:
        # once a group has state, its buffer (or its absence) stays.
        rules = super()._structure()
        for i, (old, new) in enumerate(zip(self._rules, rules)):
            if old.use_momentum == new.use_momentum or not np.any(np.asarray(self._groups_state[i].step)):
                continue
            if old.use_momentum:
                rules[i] = dataclasses.replace(new, use_momentum=True)
            else:
                raise ValueError(
                    f"param group {i}: momentum was 0 when its state was created, so it has no momentum "
                    f"buffer; it cannot be raised to {self.param_groups[i]['momentum']} now "
                    "(torch fails with KeyError: 'momentum_buffer')"
                )
        return rules
