"""Rprop, as torch.optim.Rprop."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from ..transform import grouped
from .base import Rule, sign

__all__ = ["RpropRule", "rprop"]


@dataclasses.dataclass(frozen=True)
class RpropRule(Rule):
    r"""torch.optim.Rprop's update (``etas`` :math:`(\eta^-, \eta^+)`, ``step_sizes``
    :math:`(s_{lo}, s_{hi})`), per parameter:

    .. math::
        g &\leftarrow -\nabla \text{ if maximize else } \nabla, \quad
        f = \begin{cases} \eta^+ & g \cdot g_{prev} > 0 \\ \eta^- & g \cdot g_{prev} < 0 \\
            1 & \text{otherwise} \end{cases} \\
        s &\leftarrow \mathrm{clamp}(s f, s_{lo}, s_{hi}), \quad
        g \leftarrow 0 \text{ where } f = \eta^- \\
        p &\leftarrow p - \mathrm{sign}(g)\, s, \quad g_{prev} \leftarrow g

    The per-element step size :math:`s` (``step_size``) starts at the group's
    ``lr`` *at its first step*, as torch fills it when it creates the state;
    later ``lr`` changes are ignored. :math:`f` is computed with torch's
    three in-place assignments (``>0``, then ``<0``, then ``==0``).
    """

    maximize: bool = False

    name: ClassVar[str] = "Rprop"
    hyperparams: ClassVar[dict] = {"lr": 1e-2, "etas": (0.5, 1.2), "step_sizes": (1e-6, 50.0)}

    def slot_names(self):
        return ("prev", "step_size")

    def init_slots(self, param, hparams):
        # torch creates the state at the first step, filled with that step's lr: ``apply`` fills
        # step_size on the first step (so an lr edited before it is honoured); 0 until then.
        return {"prev": jnp.zeros_like(param), "step_size": jnp.zeros_like(param)}

    def prepare(self, hp, step, scalars):
        (eta_minus, eta_plus), (lo, hi) = hp["etas"], hp["step_sizes"]
        coef = {
            "first": step == 1,
            "lr": hp["lr"],
            "eta_minus": eta_minus,
            "eta_plus": eta_plus,
            "lo": lo,
            "hi": hi,
        }
        return coef, scalars

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        f = sign(g * slots["prev"])  # torch.sign: NaN -> 0 (and so a factor of 1)
        f = jnp.where(f > 0, c["eta_plus"], f)
        f = jnp.where(f < 0, c["eta_minus"], f)
        f = jnp.where(f == 0, jnp.ones_like(f), f)
        size = jnp.where(c["first"], jnp.full_like(p, c["lr"]), slots["step_size"])
        size = jnp.minimum(jnp.maximum(size * f, c["lo"]), c["hi"])
        g = jnp.where(f == c["eta_minus"], jnp.zeros_like(g), g)
        return p - sign(g) * size, {"prev": g, "step_size": size}


def rprop(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), *, maximize=False, params=None, groups=None):
    r"""torch.optim.Rprop as an Optax transformation (see :class:`RpropRule` for the update).

    Without ``params``/``groups`` it updates every leaf as one group; with them,
    each group may override any argument (numbers or schedules; ``lr`` only
    matters at the first step).
    """
    return grouped(params, groups, rule=RpropRule(maximize=maximize), lr=lr, etas=etas, step_sizes=step_sizes)
