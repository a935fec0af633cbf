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

from ..grad_checks import is_sparse
from ..sharding import explicit, fit

__all__ = ["ABSENT_SHAPE", "Rule", "hparam_dtype", "lerp", "sign", "slot_zeros", "stored", "torch_scalar", "torch_scalar_dtype"]

ABSENT_SHAPE = (0,)
"""Shape of the empty placeholder the engine keeps for a slot that a parameter does not have
(see :meth:`Rule.slot_shapes`): every member of a group holds every slot name."""


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


def slot_zeros(param, shape):
    """Zeros of ``param``'s dtype: shaped and placed like ``param`` when ``shape`` is its shape, else of
    ``shape`` (``None``: the empty placeholder of an absent slot) on ``param``'s sharding fit to it."""
    if shape is not None and tuple(shape) == tuple(param.shape):
        return jnp.zeros_like(param)
    shape = ABSENT_SHAPE if shape is None else tuple(shape)
    out = jnp.zeros(shape, param.dtype)
    sharding = None if isinstance(param, jax.core.Tracer) else getattr(param, "sharding", None)
    if sharding is not None:
        out = jax.device_put(out, fit(sharding, shape))
    return out


def lerp(start, end, weight):
    """``torch.lerp`` with a scalar weight, bit for bit as torch's vectorized CPU kernel computes it: the base
    (``start`` if ``|w| < 0.5``, else ``end``) plus a coefficient (``w``, else ``w - 1``) times ``end - start``.
    The same numbers as torch's two-branch formula (``start + w * (end - start)``, else
    ``end - (end - start) * (1 - w)``) except the sign of a zero result at ``w = 1`` (where torch's vectorized
    kernel and the formula differ too); one select of an input per element instead of both branches."""
    small = jnp.abs(weight) < 0.5
    diff = end - start
    base = jnp.where(small, *_sharded_like(diff, start, end))
    return base + jnp.where(small, weight, weight - 1) * diff


def _sharded_like(ref, *xs):
    """``xs`` on ``ref``'s sharding where the mesh has Explicit axes (a select needs its cases sharded alike: a
    ZeRO-1 slot and its replicated gradient are not); elsewhere ``xs`` as they are."""
    sharding = getattr(jax.typeof(ref), "sharding", None)
    if not explicit(sharding):
        return xs
    return tuple(x if jax.typeof(x).sharding == sharding else jax.sharding.reshard(x, sharding) for x in xs)


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
    #: False: :meth:`apply` receives its coefficients in the hyperparameter dtype and casts them
    #: itself (Muon: a shape-dependent lr ratio applied in double, as torch does in Python).
    cast_coefs: ClassVar[bool] = True
    #: True: the rule updates its group as a whole (an Optax transformation over the group's tree):
    #: the engine calls :meth:`init_members` / :meth:`update_members` instead of the per-leaf
    #: ``init_slots``/``init_scalars``/``prepare``/``apply``.
    whole_group: ClassVar[bool] = False
    #: Hyperparameters and options whose values the rule instance itself carries (the arguments
    #: given to :func:`groupopt.optax_rule`): ``grouped(...)``'s shared defaults do not override them.
    bound_keys: ClassVar[frozenset] = frozenset()

    # -- structure -------------------------------------------------------
    def specialize(self, hparams: dict) -> "Rule":
        """Fix structure that torch derives from initial values (SGD: momentum == 0 means no buffer)."""
        return self

    def slot_names(self) -> tuple[str, ...]:
        """Names of the per-leaf state arrays (torch's per-parameter state keys)."""
        return ()

    def slot_shapes(self, shape: tuple) -> dict[str, tuple]:
        """The per-leaf state a parameter of ``shape`` has: ``{slot name: its shape}``, in torch's key order.

        Default: every slot of :meth:`slot_names`, shaped like the parameter. A rule whose state
        is not shaped like its parameter overrides this (Adafactor: ``row_var`` ``(..., m, 1)`` and
        ``col_var`` ``(..., 1, n)`` for a matrix, ``variance`` for a vector). A slot of
        :meth:`slot_names` missing here is absent for such a parameter: the engine keeps an empty
        placeholder (shape :data:`ABSENT_SHAPE`) in its place, which torch's state never shows.
        Everything else (state_dict checks, ``opt.state[p][key] = v``, placement, checkpoints)
        follows these shapes.
        """
        return {name: tuple(shape) for name in self.slot_names()}

    def torch_keys_for(self, shape: tuple) -> tuple[str, ...]:
        """Keys of torch's per-parameter entry for a parameter of ``shape`` (:meth:`torch_state_keys`
        with only the slots :meth:`slot_shapes` gives it)."""
        slots = self.slot_names()
        return tuple(k for k in self.torch_state_keys() if k not in slots) + tuple(self.slot_shapes(tuple(shape)))

    def init_slots(self, param, hparams: dict) -> dict[str, jax.Array]:
        """Per-leaf state for ``param``: typed like it, shaped by :meth:`slot_shapes` and placed like it
        (a slot of another shape gets the parameter's sharding :func:`~groupopt.sharding.fit` to it)."""
        shapes = self.slot_shapes(tuple(param.shape))
        return {name: slot_zeros(param, shapes.get(name)) for name in self.slot_names()}

    def init_scalars(self, hparams: dict) -> dict[str, jax.Array]:
        """Per-group scalar state besides the step count (e.g. NAdam's ``mu_product``)."""
        return {}

    def grad_error(self, grad) -> str | None:
        """Why this rule refuses ``grad`` (torch's message, raised as a ``RuntimeError`` when the step
        is traced, before anything changes), or None when it takes it.

        Default: dense gradients are taken; a sparse one (a ``jax.experimental.sparse`` BCOO, see
        :func:`groupopt.sparse_rows`) is refused with torch's ``"<Name> does not support sparse
        gradients"``. A rule that takes sparse gradients (:class:`groupopt.SparseAdamRule`) overrides this.
        """
        return f"{self.name} does not support sparse gradients" if is_sparse(grad) else None

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

    # -- whole-group rules (``whole_group = True``) ------------------------------
    def init_members(self, hparams: dict, leaves, shardings=None):
        """A whole-group rule's initial ``GroupState`` for its member ``leaves`` (member order)."""
        raise NotImplementedError

    def update_members(self, hparams: dict, gstate, grads, params, shardings=None, name: str = ""):
        """A whole-group rule's step over all members at once: ``(new_params, new_group_state)``,
        with :func:`groupopt.engine.update_group`'s arguments."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The structural options as a dict (torch's boolean group keys)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
