"""``groupopt.compat.Adagrad``: torch.optim.Adagrad over :class:`groupopt.AdagradRule`."""

from __future__ import annotations

import numpy as np

from ..optimizers.adagrad import AdagradRule
from ..optimizers.base import torch_scalar
from .optimizer import Optimizer
from .validation import check_lr, check_nonneg

__all__ = ["Adagrad"]


class Adagrad(Optimizer):
    r"""torch.optim.Adagrad (dense gradients).

    The update is :class:`groupopt.AdagradRule` (see there for the math); the
    signature, defaults, group keys, validation and state layout are torch
    2.13's, including two quirks of torch's:

    * state is created **eagerly** for the constructor's groups:
      ``state_dict()`` before any step already holds ``step=0`` and ``sum``
      for them; groups added later by :meth:`add_param_group` get state at
      their first step.
    * ``sum`` starts at the **constructor's** ``initial_accumulator_value``
      (``defaults``); a group's own ``initial_accumulator_value`` is kept in
      the group but ignored.

    ``foreach``, ``differentiable`` and ``fused`` are accepted and kept in the
    groups but change nothing.
    """

    _rule_cls = AdagradRule

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        foreach=None,
        *,
        maximize=False,
        differentiable=False,
        fused=None,
        model=None,
    ):
        check_lr(lr)
        check_nonneg("lr_decay", lr_decay)
        check_nonneg("weight_decay", weight_decay)
        check_nonneg("initial_accumulator_value", initial_accumulator_value)
        check_nonneg("epsilon", eps)
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, model=model)
        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        for group in self.param_groups:  # torch creates the constructor's state eagerly; it follows each parameter
            for p in group["params"]:
                self._records.ensure(p).eager = True

    def _host_hparams(self, group, where):
        # torch fills ``sum`` with defaults["initial_accumulator_value"], whatever the group says
        hp = super()._host_hparams(group, where)
        iav = self._number(self.defaults["initial_accumulator_value"], "initial_accumulator_value")
        hp["initial_accumulator_value"] = np.asarray(iav, hp["lr"].dtype)
        return hp

    def _param_state(self, gi, k):
        entry = super()._param_state(gi, k)
        rec = self._records.get(self.param_groups[gi]["params"][k])
        if not entry and rec is not None and rec.eager:
            entry = {"step": torch_scalar(0.0), "sum": self._groups_state[gi].slots["sum"][k]}
        return entry

    def _on_load(self, had_entry):
        # torch's state is now exactly the saved entries: a parameter without one starts lazily
        for group in self.param_groups:
            for p in group["params"]:
                if had_entry.get(id(p)):
                    self._records.ensure(p).eager = True
                elif self._records.get(p) is not None:
                    self._records.get(p).eager = False
        self._records.prune()
