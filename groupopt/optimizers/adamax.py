"""Adamax, as torch.optim.Adamax."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from .base import Rule, lerp

__all__ = ["AdamaxRule", "adamax"]


@dataclasses.dataclass(frozen=True)
class AdamaxRule(Rule):
    r"""torch.optim.Adamax's update, per parameter:

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow -\nabla \text{ if maximize else } \nabla, \quad
            g \leftarrow g + \lambda p \ (\text{if } \lambda \ne 0) \\
        m &\leftarrow \mathrm{lerp}(m, g, 1 - \beta_1) \\
        u &\leftarrow \max(\beta_2 u, |g| + \epsilon) \\
        p &\leftarrow p - \frac{\eta}{1 - \beta_1^t} \cdot \frac{m}{u}

    (``lr`` :math:`\eta`, ``betas`` :math:`(\beta_1, \beta_2)`, ``eps``
    :math:`\epsilon` added to :math:`|g|` inside the max, ``weight_decay``
    :math:`\lambda`). torch's state keys: ``step``, ``exp_avg`` :math:`m`,
    ``exp_inf`` :math:`u`.
    """

    maximize: bool = False

    name: ClassVar[str] = "Adamax"
    hyperparams: ClassVar[dict] = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

    def slot_names(self):
        return ("exp_avg", "exp_inf")

    def prepare(self, hp, step, scalars):
        b1, b2 = hp["betas"]
        clr = hp["lr"] / (1 - b1**step)
        coef = {
            "neg_clr": -clr,
            "one_minus_b1": 1 - b1,
            "b2": b2,
            "eps": hp["eps"],
            "wd": hp["weight_decay"],
            "has_wd": hp["weight_decay"] != 0,
        }
        return coef, scalars

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        m = lerp(slots["exp_avg"], g, c["one_minus_b1"])
        u = jnp.maximum(slots["exp_inf"] * c["b2"], jnp.abs(g) + c["eps"])
        return p + c["neg_clr"] * m / u, {"exp_avg": m, "exp_inf": u}


def adamax(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, maximize=False, params=None, groups=None):
    r"""torch.optim.Adamax as an Optax transformation (see :class:`AdamaxRule`)."""
    from ..transform import grouped

    return grouped(params, groups, rule=AdamaxRule(maximize=maximize), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
