"""Adam and AdamW, as torch.optim.Adam / torch.optim.AdamW."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from .base import Rule, lerp

__all__ = ["AdamRule", "AdamWRule", "adam", "adamw"]


@dataclasses.dataclass(frozen=True)
class AdamRule(Rule):
    r"""torch.optim.Adam's update (AdamW: ``decoupled_weight_decay=True``), per parameter:

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow -\nabla \text{ if maximize else } \nabla \\
        p &\leftarrow p (1 - \eta\lambda) \text{ if decoupled, else } g \leftarrow g + \lambda p \\
        m &\leftarrow \mathrm{lerp}(m, g, 1 - \beta_1), \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat v &= \max(\hat v_{t-1}, v) \text{ if amsgrad else } v
            \quad\text{(max of the raw } v\text{)} \\
        p &\leftarrow p - \frac{\eta}{1 - \beta_1^t} \cdot
            \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}

    ``eps`` is added after the bias correction of ``sqrt(v)``, as in torch.
    """

    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False

    name: ClassVar[str] = "Adam"
    hyperparams: ClassVar[dict] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

    def slot_names(self):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def grad_error(self, grad):
        # torch's AdamW inherits Adam's check, message included
        msg = super().grad_error(grad)
        return msg and "Adam does not support sparse gradients, please consider SparseAdam instead"

    def prepare(self, hp, step, scalars):
        lr, (b1, b2), wd = hp["lr"], hp["betas"], hp["weight_decay"]
        bc1 = 1 - b1**step
        bc2 = 1 - b2**step
        coef = {
            "neg_step_size": -(lr / bc1),
            "bc2_sqrt": bc2**0.5,
            "eps": hp["eps"],
            "one_minus_b1": 1 - b1,
            "b2": b2,
            "one_minus_b2": 1 - b2,
        }
        if self.decoupled_weight_decay:
            coef["decay"] = 1 - lr * wd
        else:
            coef["wd"] = wd
            coef["has_wd"] = wd != 0
        return coef, scalars

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        if self.decoupled_weight_decay:
            p = p * c["decay"]
        else:
            g = jnp.where(c["has_wd"], g + c["wd"] * p, g)  # torch: `if weight_decay != 0` (0 * inf is NaN)
        m = lerp(slots["exp_avg"], g, c["one_minus_b1"])
        v = slots["exp_avg_sq"] * c["b2"] + c["one_minus_b2"] * g * g
        new = {"exp_avg": m, "exp_avg_sq": v}
        if self.amsgrad:
            v = jnp.maximum(slots["max_exp_avg_sq"], v)
            new["max_exp_avg_sq"] = v
        denom = jnp.sqrt(v) / c["bc2_sqrt"] + c["eps"]
        return p + c["neg_step_size"] * m / denom, new


@dataclasses.dataclass(frozen=True)
class AdamWRule(AdamRule):
    """torch.optim.AdamW: :class:`AdamRule` with decoupled weight decay and ``weight_decay=1e-2``."""

    decoupled_weight_decay: bool = True

    name: ClassVar[str] = "AdamW"
    hyperparams: ClassVar[dict] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


def adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *, maximize=False, params=None, groups=None):
    r"""torch.optim.Adam (coupled L2 weight decay) as an Optax transformation (see :class:`AdamRule`)."""
    from ..transform import grouped

    return grouped(
        params, groups, rule=AdamRule(amsgrad=amsgrad, maximize=maximize),
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
    )


def adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *, maximize=False, params=None, groups=None):
    r"""torch.optim.AdamW (decoupled weight decay ``p *= 1 - lr*wd``) as an Optax transformation (see :class:`AdamRule`)."""
    from ..transform import grouped

    return grouped(
        params, groups, rule=AdamWRule(amsgrad=amsgrad, maximize=maximize),
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
    )
