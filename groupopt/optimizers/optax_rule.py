"""Any Optax transformation as a group's rule, its numeric hyperparameters in groupopt's state.

``groupopt.optax_rule(optax.lion, learning_rate=1e-3, b1=0.9)`` is a :class:`~groupopt.Rule`
that runs ``optax.lion`` on one group, next to torch-exact groups::

    tx = groupopt.grouped(params, [
        groupopt.group("head/*", rule=groupopt.optax_rule(optax.lion, learning_rate=1e-4)),
        groupopt.group(groupopt.rest(), lr=1e-3),          # AdamW, torch's numbers
    ], rule=groupopt.AdamWRule())
    state = tx.set_hyperparams(state, 0, learning_rate=3e-5)   # no recompile

Update, per step, for the group's members :math:`p = (p_1, \\dots, p_n)` (member order)
and their gradients :math:`g`:

.. math::
    T &= \\text{factory}(\\text{static arguments}, \\text{hyperparameters from the state}) \\\\
    u, s &\\leftarrow T.\\text{update}(g, s, p) \\\\
    p &\\leftarrow \\text{optax.apply\\_updates}(p, u) = (p + u) \\text{ cast to } p\\text{'s dtype}

The transformation sees the **whole group as one tree**: a tuple of its member arrays in
member order. Group-level transforms in a chain (``optax.clip_by_global_norm``) therefore act
on the group, and a mask or ``muon_weight_dimension_numbers`` given as a callable receives that
tuple. Its state (any pytree: ``ScaleByLionState``, a chain's tuple, ...) is the group's
``GroupState.slots["optax_state"]``: it survives ``init``/``update``/``apply``, Orbax
checkpoints (:mod:`groupopt.checkpoint`) and sharding (state arrays shaped like a member are
placed like it, or by ``state_sharding``; the others are replicated on the parameters' mesh).

Which arguments are hyperparameters (in groupopt's state, editable with
``tx.set_hyperparams`` and schedulable, never recompiling) and which are static (fixed in the
traced program, changed per group like a torch rule's options, one recompile):

* a float (Python, NumPy or a 0-d array) is a hyperparameter, and so is an int given for an
  argument whose default is a float (or which has no default);
* a callable is a schedule (a hyperparameter evaluated from the update count) for an argument
  whose default is a number, which has no default, or whose name ends in ``rate``; any other
  callable (a mask) is static;
* ints for int-defaulted arguments (``ns_steps``, ``min_dim_size_to_factor``), bools, ``None``,
  strings, tuples (``ns_coeffs``), dtypes and arrays are static;
* ``static=("name", ...)`` forces arguments to be static.

Arguments not given take the factory's defaults, classified the same way (so
``set_hyperparams(state, g, b2=0.98)`` works on ``optax.lion`` without naming ``b2``). The
values given to :func:`optax_rule` win over ``grouped(...)``'s optimizer-wide defaults; a
group's own keyword arguments win over both.

Hyperparameters reach the factory as *weakly typed* arrays of the hyperparameter dtype,
exactly as JAX treats the Python floats of a plain ``optax.lion(1e-3)``: with float32
parameters the results are plain Optax's to the bit (under ``jax_enable_x64``; without it the
scalar arithmetic done on hyperparameters alone runs in float32 instead of Python's double).

A ready-made transformation (``rule=optax.lion(1e-3)``, any ``GradientTransformation``) is
accepted too, with its hyperparameters fixed (nothing to set, nothing in groupopt's state).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import sys
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..sharding import constrain, replicated
from .base import Rule

try:  # weak typing (what JAX gives a Python float); no public API does it for a traced array
    from jax._src.lax.lax import _convert_element_type as _jax_convert_element_type
except ImportError:  # pragma: no cover - a JAX without it: optax.inject_hyperparams' casting instead
    _jax_convert_element_type = None

__all__ = ["OptaxRule", "optax_rule", "STATE_KEY"]

#: The key of a group's Optax state in ``GroupState.slots``.
STATE_KEY = "optax_state"

_EMPTY = inspect.Parameter.empty


def _is_float(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (float, np.floating)):
        return True
    return isinstance(v, (np.ndarray, jax.Array)) and v.ndim == 0 and jnp.issubdtype(v.dtype, jnp.floating)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_hyperparameter(name: str, value, default, static: frozenset) -> bool:
    if name in static or isinstance(value, (bool, np.bool_)):
        return False
    numeric_default = default is _EMPTY or (isinstance(default, numbers.Real) and not isinstance(default, bool))
    if callable(value) and not isinstance(value, (np.ndarray, jax.Array)):
        return numeric_default or name.endswith("rate")
    if _is_float(value):
        return True
    if _is_int(value):
        return default is _EMPTY or isinstance(default, (float, np.floating))
    return False


def _display_name(factory) -> str:
    """``optax.lion`` for optax._src.alias.lion, ``optax.contrib.muon`` for optax.contrib._muon.muon."""
    module = getattr(factory, "__module__", "") or ""
    qual = getattr(factory, "__qualname__", getattr(factory, "__name__", type(factory).__name__))
    if module.split(".")[0] == "optax":
        public = [m for m in module.split(".") if not m.startswith("_")]
        for k in range(1, len(public) + 1):  # the shortest public module that exports it
            mod = sys.modules.get(".".join(public[:k]))
            if mod is not None and getattr(mod, qual, None) is factory:
                return ".".join(public[:k] + [qual])
    return getattr(factory, "__name__", qual)


def _weak(x, fallback_dtype):
    """``x`` as JAX treats a Python number (weakly typed), else cast to ``fallback_dtype``."""
    if _jax_convert_element_type is not None:
        return _jax_convert_element_type(x, x.dtype, weak_type=True)
    return x.astype(fallback_dtype)  # pragma: no cover


def _member_map(fn, tree, n: int):
    """``fn(i, x)`` on the arrays of member tuples (a tuple of ``n`` arrays: state shaped like the
    group's tree, e.g. Adam's ``mu``), ``fn(None, x)`` on every other array of ``tree``."""

    def is_member_tuple(x):
        return type(x) is tuple and len(x) == n and n > 0 and all(
            hasattr(e, "shape") or e is None or isinstance(e, optax.MaskedNode) for e in x)

    def one(x):
        if is_member_tuple(x):
            return tuple(fn(i, e) if hasattr(e, "shape") else e for i, e in enumerate(x))
        return fn(None, x)

    return jax.tree.map(one, tree, is_leaf=is_member_tuple)


@dataclasses.dataclass(frozen=True)
class OptaxRule(Rule):
    """Base of the rules :func:`optax_rule` makes (one subclass per call; see the module docstring).

    Class attributes of a made rule: ``factory`` (the Optax function), ``name`` (its display
    name, e.g. ``optax.lion``), ``hyperparams`` (``{argument: value}`` of the numeric
    hyperparameters, in the factory's order), ``bound_keys`` (the arguments given to
    :func:`optax_rule`). Its dataclass fields are the static arguments.
    """

    factory: ClassVar[Callable[..., Any]] = None
    whole_group: ClassVar[bool] = True

    def specialize(self, hparams: dict) -> "OptaxRule":
        for k, v in hparams.items():
            if isinstance(v, np.ndarray):
                raise ValueError(f"{self.name}: {k} has per-slice values; an Optax rule takes one number "
                                 f"(or a schedule) per hyperparameter")
        return self

    def transformation(self, hparams: dict, dtype=None) -> optax.GradientTransformation:
        """The Optax transformation with these hyperparameter values (arrays: weakly typed)."""
        values = {k: _weak(v, dtype) if isinstance(v, jax.Array) else v for k, v in hparams.items()}
        return type(self).factory(**self.options(), **values)

    def init_members(self, hparams: dict, leaves, shardings=None):
        """The group's state: the transformation's ``init`` on the tuple of member arrays, its
        member-shaped arrays placed like their member (or by ``shardings``), the rest replicated."""
        from ..engine import GroupState

        members = tuple(leaves)
        inner = self.transformation(hparams, optax.tree.dtype(members, "highest") if members else None).init(members)
        rep = replicated(members)
        if rep is not None or shardings is not None:
            def place(i, x):
                if i is not None and x.shape == members[i].shape:
                    s = shardings[i][0] if shardings is not None and shardings[i][0] is not None else getattr(members[i], "sharding", None)
                    return x if s is None else jax.device_put(x, s)
                return x if rep is None else jax.device_put(x, rep)

            inner = _member_map(place, inner, len(members))
        step = jnp.zeros((), jnp.int32)
        return GroupState(step if rep is None else jax.device_put(step, rep), {}, {STATE_KEY: inner})

    def update_members(self, hparams: dict, gstate, grads, params, shardings=None, name: str = ""):
        """One step of the whole group: ``(new_params, new_group_state)``."""
        from ..engine import GroupState

        where = f"group {name} ({self.name})"
        missing = [i for i, g in enumerate(grads) if g is None]
        if missing:
            raise ValueError(f"{where}: member {missing[0]} has no gradient; an Optax transformation "
                             f"updates its whole group at once, so every member needs one")
        members = tuple(params)
        try:
            tx = self.transformation(hparams, optax.tree.dtype(members, "highest"))
            updates, inner = tx.update(tuple(grads), gstate.slots[STATE_KEY], members)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError) as e:
            raise TypeError(
                f"{where}: the transformation needs the value of one of its hyperparameters "
                f"{sorted(hparams)} in Python (it cannot be state); name it in "
                f"groupopt.optax_rule(..., static=(...)) to fix it in the program"
            ) from e
        new = list(optax.apply_updates(members, updates))
        if shardings is not None:
            for i, (_, psh) in enumerate(shardings):
                if psh is not None:
                    new[i] = constrain(new[i], psh)

            def pin(i, x):
                if i is None or x.shape != members[i].shape:
                    return x
                s = shardings[i][0] if shardings[i][0] is not None else shardings[i][1]
                return x if s is None else constrain(x, s)

            inner = _member_map(pin, inner, len(members))
        return new, GroupState(gstate.step + 1, gstate.scalars, {STATE_KEY: inner})

    # torch state_dict interop does not apply: an Optax rule runs in the functional core only.
    def counts_steps(self) -> bool:
        return False


def optax_rule(transformation, /, *, static=(), name: str | None = None, **kwargs) -> OptaxRule:
    """An Optax transformation as a group's rule, its numeric hyperparameters in groupopt's state.

    Args:
      transformation: an Optax factory (``optax.lion``, ``optax.adafactor``,
        ``optax.contrib.muon``, or your own ``def f(learning_rate, ...): return optax.chain(...)``),
        called with ``kwargs`` (plus its defaults) at every step, hyperparameters taken from
        the state; or a ready-made ``optax.GradientTransformation`` (its hyperparameters fixed).
      static: argument names to keep out of the state (fixed in the traced program), for
        arguments that the factory uses in Python (``if weight_decay: ...``) or a callable
        that is not a schedule.
      name: display name for reports (default: ``optax.lion`` etc.).
      **kwargs: the factory's arguments: numbers and schedules become hyperparameters,
        everything else is static (see :mod:`groupopt.optimizers.optax_rule`).

    Returns:
      a rule for :func:`groupopt.group` / :func:`groupopt.grouped` (``rule=``).

    Raises:
      TypeError: ``transformation`` is neither a factory nor a ``GradientTransformation``, an
        argument is unknown or missing, or the factory does not return a ``GradientTransformation``.
    """
    if isinstance(transformation, optax.GradientTransformation):
        if kwargs or static:
            raise TypeError("optax_rule: a ready-made GradientTransformation takes no arguments; "
                            "pass its factory to make its hyperparameters state (optax_rule(optax.lion, learning_rate=...))")
        tx = transformation
        label = name or f"optax:{tx.init.__qualname__.split('.')[0]}"
        return _make_rule(lambda: tx, label, {}, frozenset(), {})
    if isinstance(transformation, type) or not callable(transformation):
        raise TypeError(
            f"optax_rule: expected an Optax factory (e.g. optax.lion) or an optax.GradientTransformation, "
            f"got {type(transformation).__name__}: {transformation!r}")
    label = name or _display_name(transformation)
    static = frozenset([static] if isinstance(static, str) else static)
    try:
        sig = inspect.signature(transformation)
    except (TypeError, ValueError) as e:
        raise TypeError(f"optax_rule({label}): cannot read its signature ({e})") from None
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for k in list(kwargs) + sorted(static):
        if k not in named and not var_kw:
            raise TypeError(f"optax_rule({label}): {label} has no argument {k!r}; its arguments: {named}")
    for n, p in params.items():
        if p.kind is p.POSITIONAL_ONLY and p.default is _EMPTY:
            raise TypeError(f"optax_rule({label}): its argument {n!r} is positional-only; wrap it in a function")
    missing = [n for n in named if params[n].default is _EMPTY and n not in kwargs]
    if missing:
        raise TypeError(f"optax_rule({label}): missing required argument {missing[0]!r} "
                        f"(e.g. optax_rule({label}, {missing[0]}=...))")
    hyper, fixed = {}, {}
    for n in named + [k for k in kwargs if k not in named]:
        default = params[n].default if n in params else _EMPTY
        value = kwargs[n] if n in kwargs else default
        if _is_hyperparameter(n, value, default, static):
            hyper[n] = float(value) if _is_float(value) or _is_int(value) else value
        else:
            fixed[n] = value
    clash = [n for n in fixed if hasattr(OptaxRule, n)]
    if clash:
        raise TypeError(f"optax_rule({label}): its static argument {clash[0]!r} clashes with a Rule attribute; "
                        f"wrap the factory in a function with another argument name")
    rule = _make_rule(transformation, label, hyper, frozenset(kwargs), fixed)
    built = rule.transformation(hyper)
    if not isinstance(built, optax.GradientTransformation):
        raise TypeError(f"optax_rule({label}): it returned {type(built).__name__}, not an optax.GradientTransformation")
    return rule


def _make_rule(factory, label: str, hyper: dict, bound: frozenset, fixed: dict) -> OptaxRule:
    def field(v):
        if getattr(type(v), "__hash__", None) is None:  # a dict mask, an array: dataclasses wants a factory
            return dataclasses.field(default_factory=lambda v=v: v)
        return dataclasses.field(default=v)

    cls = dataclasses.make_dataclass(
        f"OptaxRule[{label}]",
        [(n, Any, field(v)) for n, v in fixed.items()],
        bases=(OptaxRule,),
        frozen=True,
        namespace={"factory": staticmethod(factory), "name": label, "hyperparams": dict(hyper),
                   "bound_keys": bound, "__module__": __name__},
    )
    return cls()
