"""ASGD (averaged SGD), as torch.optim.ASGD."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from ..transform import grouped
from .base import Rule, hparam_dtype, stored, torch_scalar

__all__ = ["ASGDRule", "asgd"]


@dataclasses.dataclass(frozen=True)
class ASGDRule(Rule):
    r"""torch.optim.ASGD's update (``lambd`` :math:`\lambda`, ``alpha`` :math:`\alpha`,
    ``t0`` :math:`t_0`, ``weight_decay`` :math:`w`), per parameter:

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow -\nabla \text{ if maximize else } \nabla, \quad
        g \leftarrow g + w p \\
        p &\leftarrow p (1 - \lambda \eta_{t-1}), \quad p \leftarrow p - \eta_{t-1} g \\
        a &\leftarrow a + \mu_{t-1} (p - a) \text{ if } \mu_{t-1} \ne 1 \text{ else } p \\
        \eta_t &= \frac{\text{lr}}{(1 + \lambda\,\text{lr}\,t)^\alpha}, \quad
        \mu_t = \frac{1}{\max(1, t - t_0)}

    :math:`a` is ``ax`` (the averaged parameters). The scalars ``eta``
    (initially the lr of the first step) and ``mu`` (initially 1) are computed
    in the hyperparameter dtype and stored in it, as torch stores them in its
    default dtype (float64 under x64, like torch with a float64 default dtype).
    torch keeps them per parameter; groupopt keeps one of each per group (one
    per member when the members' step counts differ, see
    :class:`groupopt.GroupState`).
    """

    maximize: bool = False

    name: ClassVar[str] = "ASGD"
    hyperparams: ClassVar[dict] = {"lr": 1e-2, "lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0}

    def slot_names(self):
        return ("ax",)

    def init_scalars(self, hparams):
        # eta is (re)filled from the lr of the first step in ``prepare``, as torch creates it lazily.
        # shaped like their updates below (per-slice hyperparameters give one per slice)
        eta_shape = jnp.broadcast_shapes(*(jnp.shape(hparams[k]) for k in ("lr", "lambd", "alpha")))
        dt = hparam_dtype()
        eta = jnp.broadcast_to(jnp.asarray(hparams["lr"]).astype(dt), eta_shape)
        return {"eta": eta, "mu": jnp.ones(jnp.shape(hparams["t0"]), dt)}

    def torch_scalars(self, step, scalars):
        if int(step) == 0:
            return None
        return {
            "step": torch_scalar(step),
            "eta": torch_scalar(scalars["eta"]),
            "mu": torch_scalar(scalars["mu"]),
        }

    def from_torch_scalars(self, entry):
        out = {}
        for k in ("eta", "mu"):
            a = np.asarray(entry[k])
            if a.size != 1:
                raise ValueError(f"ASGD state {k!r} must be a scalar, got shape {a.shape}")
            # a copy: the entry may share memory with a live torch tensor that torch keeps updating in place
            out[k] = jnp.array(np.array(a, np.float64).reshape(()), hparam_dtype())
        return int(float(entry["step"])), out

    def torch_state_keys(self):
        return ("step", "eta", "mu") + self.slot_names()

    def prepare(self, hp, step, scalars):
        lr, lambd, alpha, t0 = hp["lr"], hp["lambd"], hp["alpha"], hp["t0"]
        dt, sdt = step.dtype, scalars["eta"].dtype  # sdt: the stored dtype (torch's default dtype)
        eta = jnp.where(step == 1, lr.astype(sdt), scalars["eta"]).astype(dt)  # eta.item()
        mu = scalars["mu"].astype(dt)  # mu.item()
        coef = {
            "wd": hp["weight_decay"],
            "has_wd": hp["weight_decay"] != 0,
            "decay": 1 - lambd * eta,
            "neg_eta": -eta,
            "mu": mu,
            "average": mu != 1,
        }
        new = {
            "eta": (lr / ((1 + lambd * lr * step) ** alpha)).astype(sdt),
            "mu": (1 / jnp.maximum(1, step - t0)).astype(scalars["mu"].dtype),
        }
        return coef, new

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        p = stored(p * c["decay"], grad)
        p = p + c["neg_eta"] * g  # torch: add_(g, alpha=-eta), an FMA
        ax = slots["ax"]
        ax = jnp.where(c["average"], ax + stored((p - ax) * c["mu"], grad), p)
        return p, {"ax": ax}


def asgd(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, *, maximize=False, params=None, groups=None):
    r"""torch.optim.ASGD as an Optax transformation (see :class:`ASGDRule` for the update).

    Without ``params``/``groups`` it updates every leaf as one group; with them,
    each group may override any argument (numbers or schedules).
    """
    return grouped(
        params, groups, rule=ASGDRule(maximize=maximize),
        lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
    )
