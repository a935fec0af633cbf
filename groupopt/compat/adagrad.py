"""``groupopt.compat.Adagrad``: torch.optim.Adagrad over :class:`groupopt.AdagradRule`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..optimizers.adagrad import AdagradRule
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
        self._eager: list[bool] = []  # per group: torch holds state for it before its first step
        super().__init__(params, defaults, model=model)
        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._eager = [True] * len(self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._eager.append(False)  # torch creates a later group's state lazily

    def _host_hparams(self, group, where):
        # torch fills ``sum`` with defaults["initial_accumulator_value"], whatever the group says
        hp = super()._host_hparams(group, where)
        iav = self._number(self.defaults["initial_accumulator_value"], "initial_accumulator_value")
        hp["initial_accumulator_value"] = np.asarray(iav, hp["lr"].dtype)
        return hp

    def _param_state(self, gi, k):
        entry = super()._param_state(gi, k)
        if not entry and self._eager[gi]:
            entry = {"step": jnp.zeros((), jnp.float32), "sum": self._groups_state[gi].slots["sum"][k]}
        return entry

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        report = super().load_state_dict(state_dict, strict)
        # torch's state is now exactly the saved entries: a group without any starts lazily
        saved = state_dict["state"]
        self._eager = [
            any(idx in saved or str(idx) in saved for idx in g["params"]) for g in state_dict["param_groups"]
        ]
        return report
