"""The update-rule protocol: one torch optimizer's arithmetic for one group.

A rule is a small frozen dataclass whose fields are the *structural* options
(``nesterov``, ``amsgrad``, ``maximize``, ...: changing one changes the traced
program). Its numeric hyperparameters (``lr``, ``weight_decay``, ``betas``, ...)
are not fields: they arrive at every update as arrays, so editing them never
recompiles. A rule is applied in two stages:

1. :meth:`Rule.prepare` runs once per group per step on scalars: it advances the
   group's scalar state and computes everything that does not depend on the
   element (bias corrections, ``lr / bc1``, ...) in the hyperparameter dtype
   (float64 when ``jax_enable_x64`` is on, as torch computes these in Python
   floats).
2. :meth:`Rule.apply` runs once per leaf: one elementwise computation that
   returns the new parameter and its new per-leaf state together. The
   coefficients it receives are already cast to the leaf's dtype (torch casts
   Python scalars to the tensor's dtype the same way).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Rule", "hparam_dtype", "lerp", "sign", "stored", "torch_scalar", "torch_scalar_dtype"]


def hparam_dtype():
    """float64 when x64 is enabled (torch computes scalars in Python floats), else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def torch_scalar_dtype():
    """The dtype torch gives its scalar state (``step``, NAdam's ``mu_product``, ASGD's ``eta``/``mu``):
    torch's ``_get_scalar_dtype()``, float64 when torch is loaded with a float64 default dtype,
    else float32 (torch's default). Used for torch-format exports only.

    Internally these scalars live in the hyperparameter dtype (:func:`hparam_dtype`): float64
    under x64, JAX's analogue of ``torch.set_default_dtype(torch.float64)``.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_default_dtype() == torch.float64:
        return np.float64
    return np.float32


def torch_scalar(x):
    """``x`` as a 0-d (or per-slice 1-d) array of :func:`torch_scalar_dtype` (numpy when float64
    is not available to JAX)."""
    dt = torch_scalar_dtype()
    if dt == np.float64 and not jax.config.jax_enable_x64:
        return np.asarray(x, np.float64)
    return jnp.asarray(x, dt)


def lerp(start, end, weight):
    """``torch.lerp`` with a scalar weight, using torch's two-branch formula."""
    return jnp.where(jnp.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


def sign(x):
    """``torch.sign``: like ``jnp.sign`` except that ``sign(NaN)`` is 0 (torch's CPU kernel), not NaN."""
    return jnp.where(jnp.isnan(x), jnp.zeros_like(x), jnp.sign(x))


def stored(x, guard):
    """``x`` as torch stores it after an in-place op: rounded to its dtype before the next add.

    XLA (via LLVM) contracts ``a * b + c * d`` into ``fma(a, b, round(c * d))``, while torch
    rounds ``a * b`` into the tensor first and fuses the *other* product (``add_(x, alpha=...)``
    is an FMA). Passing the product through a select (a no-op here: where ``guard`` is NaN the
    result is NaN either way) stops that contraction, so the float32 result is torch's to the ulp.
    """
    return jnp.where(jnp.isnan(guard), guard, x)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of update rules.

    Class attributes each rule defines:
      name: torch's optimizer class name.
      hyperparams: ordered ``{name: torch default}`` of the numeric
        hyperparameters (tuple-valued ones such as ``betas`` are tuples).
    """

    name: ClassVar[str] = "Rule"
    hyperparams: ClassVar[dict[str, Any]] = {}

    # -- structure -------------------------------------------------------
    def specialize(self, hparams: dict) -> "Rule":
        """Fix structure that torch derives from initial values (SGD: momentum == 0 means no buffer)."""
        return self

    def slot_names(self) -> tuple[str, ...]:
        """Names of the per-leaf state arrays (torch's per-parameter state keys)."""
        return ()

    def init_slots(self, param, hparams: dict) -> dict[str, jax.Array]:
        """Per-leaf state for ``param``, shaped, typed and placed like it."""
        return {name: jnp.zeros_like(param) for name in self.slot_names()}

    def init_scalars(self, hparams: dict) -> dict[str, jax.Array]:
        """Per-group scalar state besides the step count (e.g. NAdam's ``mu_product``)."""
        return {}

    def counts_steps(self) -> bool:
        """Whether torch keeps a ``step`` entry in this optimizer's per-parameter state."""
        return True

    # -- torch's per-parameter scalar state ----------------------------------
    def torch_scalars(self, step, scalars: dict) -> dict | None:
        """torch's per-parameter scalar entries (``step``, ...), or None where torch has no state yet."""
        if int(step) == 0:
            return None
        return {"step": torch_scalar(step)} if self.counts_steps() else {}

    def from_torch_scalars(self, entry: dict) -> tuple[int, dict]:
        """Inverse of :meth:`torch_scalars`: ``(step, scalars)`` from one saved per-parameter entry."""
        return int(float(entry["step"])) if self.counts_steps() else 0, {}

    def torch_state_keys(self) -> tuple[str, ...]:
        """Keys a saved per-parameter entry must have."""
        return (("step",) if self.counts_steps() else ()) + self.slot_names()

    # -- arithmetic ------------------------------------------------------
    def prepare(self, hparams: dict, step, scalars: dict):
        """Once per group and step: return ``(coefficients, new_scalars)``.

        ``step`` is the group's step count *after* the increment (1 on the
        first update), a hyperparameter-dtype scalar.
        """
        return dict(hparams), scalars

    def apply(self, grad, param, slots: dict, coef: dict):
        """Once per leaf: return ``(new_param, new_slots)``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The structural options as a dict (torch's boolean group keys)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
