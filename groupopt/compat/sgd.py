"""``groupopt.compat.SGD``: torch.optim.SGD over :class:`groupopt.SGDRule`."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..optimizers.sgd import SGDRule
from .optimizer import Optimizer
from .validation import check_fused, guarded, is_tensor

__all__ = ["SGD"]


class SGD(Optimizer):
    r"""torch.optim.SGD: stochastic gradient descent with momentum.

    The update is :class:`groupopt.SGDRule` (see there for the math); the
    signature, defaults, group keys and validation are torch 2.13's.
    ``foreach``, ``differentiable`` and ``fused`` are accepted and kept in the
    groups (torch's keys) but change nothing: there is one jitted path.
    """

    _rule_cls = SGDRule

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        *,
        maximize=False,
        foreach=None,
        differentiable=False,
        fused=None,
        model=None,
    ):
        if is_tensor(lr) and np.size(lr) != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if guarded(momentum) < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if guarded(weight_decay) < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or guarded(dampening) != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults, model=model)
        check_fused(fused, foreach, differentiable)  # after the groups, as torch

    def _structure(self):
        # torch keeps a momentum buffer once it exists: a momentum edited to 0 bypasses it (the
        # rule does that in-graph), and a later nonzero momentum resumes from it. So a group whose
        # buffer exists keeps its buffer-carrying structure.
        rules = super()._structure()
        for i, (old, new) in enumerate(zip(self._rules, rules)):
            if old.use_momentum and not new.use_momentum:
                has_buffer = self._groups_state[i].scalars.get("has_buffer")
                if has_buffer is not None and bool(np.any(np.asarray(has_buffer))):
                    rules[i] = dataclasses.replace(new, use_momentum=True)
        return rules

    def _rule_with_state(self, rule, member_states):
        # a parameter that brings a momentum buffer keeps it, whatever the group's momentum is now
        if not rule.use_momentum and any(
            s is not None and bool(np.any(np.asarray(s[1].get("has_buffer", False)))) for s in member_states
        ):
            return dataclasses.replace(rule, use_momentum=True)
        return rule
