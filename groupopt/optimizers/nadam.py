"""NAdam, as torch.optim.NAdam."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from ..transform import grouped
from .base import Rule, hparam_dtype, lerp, stored, torch_scalar

__all__ = ["NAdamRule", "nadam"]


@dataclasses.dataclass(frozen=True)
class NAdamRule(Rule):
    r"""torch.optim.NAdam's update (``momentum_decay`` :math:`\psi`), per parameter:

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow -\nabla \text{ if maximize else } \nabla \\
        p &\leftarrow p (1 - \eta\lambda) \text{ if decoupled, else } g \leftarrow g + \lambda p \\
        \mu_t &= \beta_1 (1 - \tfrac12 \cdot 0.96^{t\psi}), \quad
        \mu_{t+1} = \beta_1 (1 - \tfrac12 \cdot 0.96^{(t+1)\psi}), \quad
        \Pi \leftarrow \Pi \mu_t \\
        m &\leftarrow \mathrm{lerp}(m, g, 1 - \beta_1), \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
        d = \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        p &\leftarrow p - \frac{\eta (1 - \mu_t)}{1 - \Pi} \frac{g}{d}
             - \frac{\eta \mu_{t+1}}{1 - \Pi \mu_{t+1}} \frac{m}{d}

    The momentum product :math:`\Pi` (``mu_product``, initially 1) is a scalar
    in the hyperparameter dtype, as torch stores it in its default dtype: float64
    under x64 (torch with a float64 default dtype), else float32, where
    ``Pi * mu_t`` is computed in float32 (``mu_t`` rounded to float32) and the
    coefficients then use that value in the hyperparameter dtype, like torch's
    ``mu_product.item()``.
    torch keeps one ``mu_product`` per parameter; groupopt keeps one per group
    (one per member when the members' step counts differ, see
    :class:`groupopt.GroupState`).
    """

    decoupled_weight_decay: bool = False
    maximize: bool = False

    name: ClassVar[str] = "NAdam"
    hyperparams: ClassVar[dict] = {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum_decay": 4e-3,
    }

    def slot_names(self):
        return ("exp_avg", "exp_avg_sq")

    def init_scalars(self, hparams):
        # shaped like mu_t: per-slice (1-D) betas / momentum_decay give one product per slice
        shape = jnp.broadcast_shapes(jnp.shape(hparams["betas"][0]), jnp.shape(hparams["momentum_decay"]))
        return {"mu_product": jnp.ones(shape, hparam_dtype())}

    def torch_scalars(self, step, scalars):
        if int(step) == 0:
            return None
        return {"step": torch_scalar(step), "mu_product": torch_scalar(scalars["mu_product"])}

    def from_torch_scalars(self, entry):
        mp = np.asarray(entry["mu_product"])
        if mp.size != 1:
            raise ValueError(f"NAdam state 'mu_product' must be a scalar, got shape {mp.shape}")
        # a copy: the entry may share memory with a live torch tensor that torch keeps updating in place
        return int(float(entry["step"])), {"mu_product": jnp.array(np.array(mp, np.float64).reshape(()), hparam_dtype())}

    def torch_state_keys(self):
        return ("step", "mu_product") + self.slot_names()

    def prepare(self, hp, step, scalars):
        lr, (b1, b2), wd, psi = hp["lr"], hp["betas"], hp["weight_decay"], hp["momentum_decay"]
        bc2 = 1 - b2**step
        mu = b1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        # torch: mu_product (0-d tensor of the default dtype) *= mu (a Python float, rounded to that dtype)
        mu_product = scalars["mu_product"] * mu.astype(scalars["mu_product"].dtype)
        mp = mu_product.astype(step.dtype)  # mu_product.item()
        mu_product_next = mp * mu_next
        coef = {
            "bc2": bc2,
            "eps": hp["eps"],
            "one_minus_b1": 1 - b1,
            "b2": b2,
            "one_minus_b2": 1 - b2,
            "c_grad": -lr * (1.0 - mu) / (1.0 - mp),
            "c_avg": (-lr * mu_next) / (1.0 - mu_product_next),
        }
        if self.decoupled_weight_decay:
            coef["decay"] = 1 - lr * wd
        else:
            coef["wd"] = wd
            coef["has_wd"] = wd != 0
        return coef, {"mu_product": mu_product}

    def apply(self, grad, p, slots, c):
        g = -grad if self.maximize else grad
        if self.decoupled_weight_decay:
            p = stored(p * c["decay"], grad)
        else:
            g = jnp.where(c["has_wd"], g + c["wd"] * p, g)
        m = lerp(slots["exp_avg"], g, c["one_minus_b1"])
        v = stored(slots["exp_avg_sq"] * c["b2"], grad) + c["one_minus_b2"] * g * g
        denom = jnp.sqrt(v / c["bc2"]) + c["eps"]
        p = p + c["c_grad"] * g / denom
        p = p + c["c_avg"] * m / denom
        return p, {"exp_avg": m, "exp_avg_sq": v}


def nadam(
    lr=2e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    momentum_decay=4e-3,
    decoupled_weight_decay=False,
    *,
    maximize=False,
    params=None,
    groups=None,
):
    r"""torch.optim.NAdam as an Optax transformation (see :class:`NAdamRule` for the update).

    Without ``params``/``groups`` it updates every leaf as one group; with them,
    each group may override any argument (numbers or schedules).
    """
    return grouped(
        params, groups, rule=NAdamRule(decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
    )
