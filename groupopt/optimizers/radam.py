"""RAdam, as torch.optim.RAdam."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from ..transform import grouped
from .base import Rule, lerp, stored

__all__ = ["RAdamRule", "radam"]


@dataclasses.dataclass(frozen=True)
class RAdamRule(Rule):
    r"""torch.optim.RAdam's update, per parameter:

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow -\nabla \text{ if maximize else } \nabla \\
        p &\leftarrow p (1 - \eta\lambda) \text{ if decoupled, else } g \leftarrow g + \lambda p \\
        m &\leftarrow \mathrm{lerp}(m, g, 1 - \beta_1), \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
        \hat m = m / (1 - \beta_1^t) \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \quad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        p &\leftarrow p - \eta \hat m \cdot \frac{\sqrt{1 - \beta_2^t}}{\sqrt v + \epsilon} \cdot
            \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
            \quad \text{if } \rho_t > 5, \text{ else } p \leftarrow p - \eta \hat m

    ``eps`` is added to the *un-corrected* :math:`\sqrt v` (unlike Adam). The
    float32 operation order is torch's: ``((m / bc1) * lr) * (1 / (sqrt(v) + eps)
    * sqrt(bc2)) * r``.
    """

    maximize: bool = False
    decoupled_weight_decay: bool = False

    name: ClassVar[str] = "RAdam"
    hyperparams: ClassVar[dict] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

    def slot_names(self):
        return ("exp_avg", "exp_avg_sq")

    def prepare(self, hp, step, scalars):
        lr, (b1, b2), wd = hp["lr"], hp["betas"], hp["weight_decay"]
        bc1 = 1 - b1**step
        bc2 = 1 - b2**step
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * step * (b2**step) / bc2
        rectify = rho_t > 5.0
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = jnp.where(rectify, ratio, 1.0) ** 0.5  # ratio may be negative when not rectifying
        coef = {
            "lr": lr,
            "bc1": bc1,
            "bc2_sqrt": bc2**0.5,
            "rect": rect,
            "rectify": rectify,
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
            p = stored(p * c["decay"], grad)
        else:
            g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        m = lerp(slots["exp_avg"], g, c["one_minus_b1"])
        v = stored(slots["exp_avg_sq"] * c["b2"], grad) + c["one_minus_b2"] * g * g
        step = (m / c["bc1"]) * c["lr"]
        adaptive = (1 / (jnp.sqrt(v) + c["eps"])) * c["bc2_sqrt"]  # torch: scalar / tensor == reciprocal * scalar
        step = jnp.where(c["rectify"], step * adaptive * c["rect"], step)
        return p - step, {"exp_avg": m, "exp_avg_sq": v}


def radam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, *, maximize=False, params=None, groups=None):
    r"""torch.optim.RAdam as an Optax transformation (see :class:`RAdamRule` for the update).

    Without ``params``/``groups`` it updates every leaf as one group; with them,
    each group may override any argument (numbers or schedules).
    """
    return grouped(
        params, groups, rule=RAdamRule(decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
    )
