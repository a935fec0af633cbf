"""SGD with momentum, dampening, Nesterov and coupled weight decay, as torch.optim.SGD."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from .base import Rule, stored

__all__ = ["SGDRule", "sgd"]


@dataclasses.dataclass(frozen=True)
class SGDRule(Rule):
    r"""torch.optim.SGD's update, per parameter:

    .. math::
        g &\leftarrow -\nabla \text{ if maximize else } \nabla \\
        g &\leftarrow g + \lambda p \\
        b &\leftarrow g \text{ on the first step, else } \mu b + (1 - \tau) g \\
        g &\leftarrow g + \mu b \text{ if nesterov else } b \\
        p &\leftarrow p - \eta g

    (``lr`` :math:`\eta`, ``momentum`` :math:`\mu`, ``dampening`` :math:`\tau`,
    ``weight_decay`` :math:`\lambda`). With ``momentum == 0`` there is no buffer
    and no state, as in torch; the first buffer is the gradient itself, without
    :math:`(1-\tau)`.
    A momentum edited to 0 once the buffer exists skips the buffer and leaves
    it unchanged (torch's ``if momentum != 0``); a later nonzero momentum
    resumes from it.
    """

    nesterov: bool = False
    maximize: bool = False
    use_momentum: bool = dataclasses.field(default=True, metadata={"derived": True})  # from momentum != 0 (specialize)

    name: ClassVar[str] = "SGD"
    hyperparams: ClassVar[dict] = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0}

    def specialize(self, hparams):
        m = hparams.get("momentum", 0.0)
        if callable(m):
            return self
        return dataclasses.replace(self, use_momentum=bool(np.any(np.asarray(m) != 0.0)))

    def slot_names(self):
        return ("momentum_buffer",) if self.use_momentum else ()

    def init_scalars(self, hparams):
        # torch creates the buffer from the first gradient it sees; 0 until then.
        return {"has_buffer": jnp.zeros((), jnp.bool_)} if self.use_momentum else {}

    def counts_steps(self):
        return False

    def torch_scalars(self, step, scalars):
        if not self.use_momentum or not bool(scalars["has_buffer"]):
            return None
        return {}

    def from_torch_scalars(self, entry):
        return 0, ({"has_buffer": jnp.ones((), jnp.bool_)} if self.use_momentum else {})

    def prepare(self, hp, step, scalars):
        coef = {
            "neg_lr": -hp["lr"],
            "wd": hp["weight_decay"],
            "has_wd": hp["weight_decay"] != 0,
            "momentum": hp["momentum"],
        }
        if self.use_momentum:
            # torch: `if momentum != 0` -- a zero momentum (edited mid-run) bypasses the buffer and
            # leaves it as it is; it is created by the first step with a nonzero momentum (buf = g).
            # The new buffer is buf*keep + take*g: (momentum, 1 - dampening) once it exists, (0, 1)
            # before (exact: the buffer is still 0 then, and 0*0 + 1*g == g, infinities included).
            has, on = scalars["has_buffer"], hp["momentum"] != 0
            coef["keep"] = jnp.where(has, hp["momentum"], jnp.zeros_like(hp["momentum"]))
            coef["take"] = jnp.where(has, 1 - hp["dampening"], jnp.ones_like(hp["momentum"]))
            coef["on"] = on
            scalars = {"has_buffer": has | jnp.any(on)}
        return coef, scalars

    def apply(self, grad, p, slots, c):
        # Disabled terms are selected away, never multiplied by 0: 0 * inf is NaN where torch
        # (`if weight_decay != 0`, `if momentum != 0`) keeps +-inf.
        g = -grad if self.maximize else grad
        g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        if self.use_momentum:
            old = slots["momentum_buffer"]
            # torch: buf.mul_(momentum).add_(g, alpha=1 - dampening): the product is rounded first
            buf = jnp.where(c["on"], stored(old * c["keep"], grad) + c["take"] * g, old)
            if self.nesterov:
                g = jnp.where(c["on"], g + c["momentum"] * buf, g)
            else:
                # where(on, buf, g), written as a sum of two selects (exact: x + -0.0 == x) because
                # XLA:CPU then fuses the update into one loop per output, as for the buffer alone.
                g = jnp.where(c["on"], buf, -0.0) + jnp.where(c["on"], -0.0, g)
            slots = {"momentum_buffer": buf}
        return p + c["neg_lr"] * g, slots


def sgd(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *, maximize=False, params=None, groups=None):
    r"""torch.optim.SGD as an Optax transformation (see :class:`SGDRule` for the update).

    Without ``params``/``groups`` it updates every leaf as one group; with them,
    each group may override any argument (numbers or schedules).
    """
    from ..transform import grouped

    return grouped(
        params, groups, rule=SGDRule(nesterov=nesterov, maximize=maximize),
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
    )
