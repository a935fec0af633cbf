"""Adafactor, as torch.optim.Adafactor (torch 2.13)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from ..transform import grouped
from .base import Rule, hparam_dtype, lerp

__all__ = ["AdafactorRule", "adafactor"]


def _py_max(a, b):
    """Python's ``max(a, b)``: ``a`` unless ``b > a`` (so a NaN ``b`` gives ``a``, unlike ``jnp.maximum``)."""
    return jnp.where(b > a, b, a)


def _py_min(a, b):
    """Python's ``min(a, b)``: ``a`` unless ``b < a``."""
    return jnp.where(b < a, b, a)


def _sq_norm(x, axis=None):
    return jnp.sum(x * x, axis=axis, keepdims=axis is not None)


@dataclasses.dataclass(frozen=True)
class AdafactorRule(Rule):
    r"""torch.optim.Adafactor's update, per parameter (``t`` the step after the increment):

    .. math::
        g &\leftarrow -\nabla \text{ if maximize else } \nabla, \quad
        w = t^{\tau} \;(\tau = \text{beta2\_decay}), \quad
        \rho = \min(\eta, 1/\sqrt t) \\
        \alpha &= \max(\epsilon_2, \mathrm{RMS}(p)) \, \rho
            \quad\text{(RMS over the whole parameter, before the decay)} \\
        p &\leftarrow p (1 - \eta\lambda) \quad\text{if } \lambda \ne 0 \\
        \text{ndim} \ge 2:\; r &\leftarrow \mathrm{lerp}(r, \mathrm{mean}_{-1}(g^2), w), \quad
            c \leftarrow \mathrm{lerp}(c, \mathrm{mean}_{-2}(g^2), w), \quad
            \hat V = \frac{r\,c}{\max(\mathrm{mean}_{-2}(r), \epsilon_1)} \\
        \text{ndim} \le 1:\; v &\leftarrow \mathrm{lerp}(v, g^2, w), \quad \hat V = v \\
        U &= g \cdot \mathrm{rsqrt}(\max(\hat V, \epsilon_1^2)), \quad
        \delta = \max(1, \mathrm{RMS}(U) / d), \quad
        p \leftarrow p - (\alpha / \delta)\, U

    Only the last two dimensions are factored (leading ones are a batch): ``row_var`` has shape
    ``(..., m, 1)``, ``col_var`` ``(..., 1, n)``; a 0-d or 1-d parameter keeps ``variance``
    (its own shape). The state is therefore *not* shaped like the parameter
    (:meth:`slot_shapes`), and the update is not elementwise (norms and means over the whole
    leaf): per-slice (1-D) hyperparameters are refused.

    ``eps = (eps1, eps2)``; ``eps1=None`` (the default) means the machine epsilon of
    ``eps1_dtype`` -- torch resolves it once per group, from the first parameter's dtype, and
    uses it for every member; the compat class sets ``eps1_dtype`` to its group's first
    member's dtype. ``eps1_dtype=None`` (the core's default) uses each leaf's own dtype, which is
    the same unless a group mixes dtypes. ``None`` is held in the state as NaN (so switching
    between ``None`` and a number never recompiles); an explicit NaN is refused.

    The scalar work torch does in Python floats (:math:`w, \rho, \alpha, \delta`) is done in
    the hyperparameter dtype (float64 under x64), from float32 norms for float32 leaves, as
    torch's ``.item()`` does. ``max``/``min`` follow Python's (a NaN norm leaves ``eps2`` /
    ``1``, as in torch).
    """

    maximize: bool = False
    eps1_dtype: str | None = None

    name: ClassVar[str] = "Adafactor"
    cast_coefs: ClassVar[bool] = False  # alpha and the clipping denominator are Python floats in torch
    hyperparams: ClassVar[dict] = {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0}

    def slot_names(self):
        return ("row_var", "col_var", "variance")

    def slot_shapes(self, shape):
        shape = tuple(shape)
        if len(shape) >= 2:
            return {"row_var": shape[:-1] + (1,), "col_var": shape[:-2] + (1, shape[-1])}
        return {"variance": shape}

    def specialize(self, hparams):
        for k, v in hparams.items():
            for x in v if isinstance(v, tuple) else (v,):
                if isinstance(x, np.ndarray) and x.ndim > 0:
                    raise ValueError(
                        f"Adafactor: {k} has per-slice (1-D) values {x}, but Adafactor's update is not elementwise "
                        "(norms and means over the whole parameter): give one number per group"
                    )
        eps1 = hparams.get("eps", (None,))[0]
        if isinstance(eps1, (float, np.floating)) and math.isnan(eps1):
            raise ValueError("Adafactor: eps[0] (epsilon1) is NaN; use None for the parameters' machine epsilon")
        return self

    def prepare(self, hp, step, scalars):
        lr, b2d, (eps1, eps2), d, wd = hp["lr"], hp["beta2_decay"], hp["eps"], hp["d"], hp["weight_decay"]
        coef = {
            "w": step**b2d,  # 1 - beta2_t
            "rho": _py_min(lr, 1 / jnp.sqrt(step)),
            "eps1": eps1,  # NaN: None, resolved per leaf from eps1_dtype
            "eps1_sq": eps1 * eps1,
            "eps2": eps2,
            "d": d,
            "decay": 1 - lr * wd,
            "has_wd": wd != 0,
        }
        return coef, scalars

    def apply(self, grad, p, slots, c):
        hd = hparam_dtype()
        dt = p.dtype
        g = -grad if self.maximize else grad
        w = c["w"].astype(dt)
        numel = int(np.prod(p.shape))
        eps_dtype = p.dtype if self.eps1_dtype is None else np.dtype(self.eps1_dtype)
        auto = jnp.finfo(eps_dtype).eps
        # torch casts the Python-float eps1, eps1**2, decay and lerp weight to the tensor's dtype
        eps1 = jnp.where(jnp.isnan(c["eps1"]), jnp.asarray(auto, hd), c["eps1"]).astype(dt)
        eps1_sq = jnp.where(jnp.isnan(c["eps1_sq"]), jnp.asarray(float(auto) * float(auto), hd), c["eps1_sq"]).astype(dt)
        rms_p = jnp.sqrt(_sq_norm(p)).astype(hd) / (numel**0.5)
        alpha = _py_max(c["eps2"], rms_p) * c["rho"]
        p = jnp.where(c["has_wd"], p * c["decay"].astype(dt), p)
        new = dict(slots)
        if p.ndim >= 2:
            n, m = p.shape[-1], p.shape[-2]
            row_mean = jnp.square(jnp.sqrt(_sq_norm(g, -1))) / n
            col_mean = jnp.square(jnp.sqrt(_sq_norm(g, -2))) / m
            r = lerp(slots["row_var"], row_mean, w)
            col = lerp(slots["col_var"], col_mean, w)
            new["row_var"], new["col_var"] = r, col
            v_hat = (r * col) / jnp.maximum(jnp.mean(r, axis=-2, keepdims=True), eps1)
        else:
            v = lerp(slots["variance"], g * g, w)
            new["variance"] = v
            v_hat = v
        update = (1 / jnp.sqrt(jnp.maximum(v_hat, eps1_sq))) * g
        rms_u = jnp.sqrt(_sq_norm(update)).astype(hd) / ((numel**0.5) * c["d"])
        denom = _py_max(jnp.asarray(1.0, hd), rms_u)
        return p + (-alpha / denom).astype(dt) * update, new


def adafactor(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *, maximize=False, params=None, groups=None):
    r"""torch.optim.Adafactor as an Optax transformation (see :class:`AdafactorRule` for the update).

    ``eps=(None, eps2)`` uses each leaf's machine epsilon for ``eps1`` (torch: the group's first
    parameter's). Without ``params``/``groups`` it updates every leaf as one group; with them,
    each group may override any argument (numbers or schedules; no per-slice vectors).
    """
    return grouped(
        params, groups, rule=AdafactorRule(maximize=maximize),
        lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
    )
