"""Adagrad, as torch.optim.Adagrad."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from .base import Rule

__all__ = ["AdagradRule", "adagrad"]


@dataclasses.dataclass(frozen=True)
class AdagradRule(Rule):
    r"""torch.optim.Adagrad's update (dense gradients), per parameter:

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow -\nabla \text{ if maximize else } \nabla, \quad
            g \leftarrow g + \lambda p \ (\text{if } \lambda \ne 0) \\
        \tilde\eta &= \eta / (1 + (t - 1)\,\delta) \\
        s &\leftarrow s + g^2 \\
        p &\leftarrow p - \tilde\eta \, g / (\sqrt{s} + \epsilon)

    (``lr`` :math:`\eta`, ``lr_decay`` :math:`\delta`, ``eps`` :math:`\epsilon`,
    ``weight_decay`` :math:`\lambda`). The accumulator ``sum`` :math:`s` starts
    at ``initial_accumulator_value`` (used only at initialisation). torch's
    state keys: ``step``, ``sum``.
    """

    maximize: bool = False

    name: ClassVar[str] = "Adagrad"
    hyperparams: ClassVar[dict] = {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "eps": 1e-10,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
    }

    def slot_names(self):
        return ("sum",)

    def init_slots(self, param, hparams):
        iav = jnp.asarray(hparams.get("initial_accumulator_value", 0.0))
        return {"sum": jnp.full_like(param, iav.astype(param.dtype))}

    def prepare(self, hp, step, scalars):
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        coef = {"neg_clr": -clr, "eps": hp["eps"], "wd": hp["weight_decay"], "has_wd": hp["weight_decay"] != 0}
        return coef, scalars

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        s = slots["sum"] + g * g
        std = jnp.sqrt(s) + c["eps"]
        return p + c["neg_clr"] * g / std, {"sum": s}


def adagrad(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, *, maximize=False, params=None, groups=None):
    r"""torch.optim.Adagrad as an Optax transformation (see :class:`AdagradRule`).

    Unlike torch (whose accumulators always start at the constructor's value),
    each group's own ``initial_accumulator_value`` is used for its accumulators.
    """
    from ..transform import grouped

    return grouped(
        params, groups, rule=AdagradRule(maximize=maximize),
        lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value,
    )
