"""Adadelta, as torch.optim.Adadelta."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from .base import Rule

__all__ = ["AdadeltaRule", "adadelta"]


@dataclasses.dataclass(frozen=True)
class AdadeltaRule(Rule):
    r"""torch.optim.Adadelta's update, per parameter:

    .. math::
        g &\leftarrow -\nabla \text{ if maximize else } \nabla, \quad
            g \leftarrow g + \lambda p \ (\text{if } \lambda \ne 0) \\
        v &\leftarrow \rho v + (1 - \rho) g^2 \\
        \Delta &= \sqrt{u + \epsilon} / \sqrt{v + \epsilon} \cdot g \\
        u &\leftarrow \rho u + (1 - \rho) \Delta^2 \\
        p &\leftarrow p - \eta \Delta

    (``lr`` :math:`\eta`, ``rho`` :math:`\rho`, ``eps`` :math:`\epsilon` inside
    both square roots, ``weight_decay`` :math:`\lambda`). torch's state keys:
    ``step`` (counted, unused by the math), ``square_avg`` :math:`v`,
    ``acc_delta`` :math:`u`.
    """

    maximize: bool = False

    name: ClassVar[str] = "Adadelta"
    hyperparams: ClassVar[dict] = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}

    def slot_names(self):
        return ("square_avg", "acc_delta")

    def prepare(self, hp, step, scalars):
        coef = {
            "neg_lr": -hp["lr"],
            "rho": hp["rho"],
            "one_minus_rho": 1 - hp["rho"],
            "eps": hp["eps"],
            "wd": hp["weight_decay"],
            "has_wd": hp["weight_decay"] != 0,
        }
        return coef, scalars

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        sq = slots["square_avg"] * c["rho"] + c["one_minus_rho"] * g * g
        std = jnp.sqrt(sq + c["eps"])
        delta = jnp.sqrt(slots["acc_delta"] + c["eps"])
        delta = delta / std * g
        acc = slots["acc_delta"] * c["rho"] + c["one_minus_rho"] * delta * delta
        return p + c["neg_lr"] * delta, {"square_avg": sq, "acc_delta": acc}


def adadelta(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False, params=None, groups=None):
    r"""torch.optim.Adadelta as an Optax transformation (see :class:`AdadeltaRule`)."""
    from ..transform import grouped

    return grouped(params, groups, rule=AdadeltaRule(maximize=maximize), lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)
