"""RMSprop, as torch.optim.RMSprop."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from .base import Rule, lerp

__all__ = ["RMSpropRule", "rmsprop"]


@dataclasses.dataclass(frozen=True)
class RMSpropRule(Rule):
    r"""torch.optim.RMSprop's update, per parameter:

    .. math::
        g &\leftarrow -\nabla \text{ if maximize else } \nabla, \quad
            g \leftarrow g + \lambda p \ (\text{if } \lambda \ne 0) \\
        v &\leftarrow \alpha v + (1 - \alpha) g^2 \\
        \bar g &\leftarrow \mathrm{lerp}(\bar g, g, 1 - \alpha), \quad
            a = \sqrt{v - \bar g^2} + \epsilon \quad \text{if centered, else} \quad
            a = \sqrt{v} + \epsilon \\
        b &\leftarrow \mu b + g / a, \quad p \leftarrow p - \eta b \quad \text{if } \mu > 0, \text{ else} \quad
            p \leftarrow p - \eta g / a

    (``lr`` :math:`\eta`, ``alpha`` :math:`\alpha`, ``eps`` :math:`\epsilon`,
    ``momentum`` :math:`\mu`, ``weight_decay`` :math:`\lambda`). ``eps`` is
    added outside the square root; there is no bias correction. torch's state
    keys: ``step`` (counted, unused by the math), ``square_avg`` :math:`v`,
    ``momentum_buffer`` :math:`b` (only when the initial momentum is > 0) and
    ``grad_avg`` :math:`\bar g` (only when centered).

    Structure: ``use_momentum`` is derived from the momentum a group starts
    with (:meth:`specialize`), as torch creates the buffer only then. With a
    buffer, a momentum later set to <= 0 takes torch's plain path and leaves the
    buffer untouched (as torch does).
    """

    centered: bool = False
    maximize: bool = False
    use_momentum: bool = dataclasses.field(default=False, metadata={"derived": True})  # from momentum > 0 (specialize)

    name: ClassVar[str] = "RMSprop"
    hyperparams: ClassVar[dict] = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0}

    def specialize(self, hparams):
        m = hparams.get("momentum", 0.0)
        if callable(m):  # a schedule: keep the buffer
            return dataclasses.replace(self, use_momentum=True)
        return dataclasses.replace(self, use_momentum=float(m) > 0.0)

    def slot_names(self):
        return ("square_avg",) + (("momentum_buffer",) if self.use_momentum else ()) + (("grad_avg",) if self.centered else ())

    def prepare(self, hp, step, scalars):
        coef = {
            "neg_lr": -hp["lr"],
            "alpha": hp["alpha"],
            "one_minus_alpha": 1 - hp["alpha"],
            "eps": hp["eps"],
            "wd": hp["weight_decay"],
            "has_wd": hp["weight_decay"] != 0,
        }
        if self.use_momentum:
            coef["momentum"] = hp["momentum"]
            coef["use_buf"] = hp["momentum"] > 0
        return coef, scalars

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        sq = slots["square_avg"] * c["alpha"] + c["one_minus_alpha"] * g * g
        new = {"square_avg": sq}
        if self.centered:
            ga = lerp(slots["grad_avg"], g, c["one_minus_alpha"])
            new["grad_avg"] = ga
            avg = jnp.sqrt(sq + -1 * ga * ga)
        else:
            avg = jnp.sqrt(sq)
        avg = avg + c["eps"]
        plain = p + c["neg_lr"] * g / avg
        if not self.use_momentum:
            return plain, new
        buf = slots["momentum_buffer"] * c["momentum"] + g / avg
        new["momentum_buffer"] = jnp.where(c["use_buf"], buf, slots["momentum_buffer"])
        return jnp.where(c["use_buf"], p + c["neg_lr"] * buf, plain), new


def rmsprop(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *, maximize=False, params=None, groups=None):
    r"""torch.optim.RMSprop as an Optax transformation (see :class:`RMSpropRule` for the update).

    Without ``params``/``groups`` it updates every leaf as one group; with them,
    each group may override any argument (numbers, schedules, or ``centered``/``maximize``).
    A group has a momentum buffer when its initial ``momentum`` is > 0 (or a schedule).
    """
    from ..transform import grouped

    return grouped(
        params, groups, rule=RMSpropRule(centered=centered, maximize=maximize),
        lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
    )
