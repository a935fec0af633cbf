"""The step engine: per-group state and the update of a group's members, shared by both APIs.

The Optax face (:func:`groupopt.grouped`) and the torch face (:mod:`groupopt.compat`) both
step through :func:`step_groups`: given each group's rule (``None``: frozen), its current
hyperparameter arrays and its :class:`GroupState`, it updates the member leaves. Where the
hyperparameters come from is the caller's business: the core evaluates its schedules from the
state, compat reads ``param_groups`` on the host. Nothing here knows about selectors, paths,
schedules or torch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .optimizers.base import Rule, hparam_dtype
from .sharding import constrain, fit, replicated

__all__ = ["GroupState", "GroupedState", "check_per_slice", "init_group_state", "update_group", "step_groups"]


def check_per_slice(spec: dict, leaves, paths, where: str) -> None:
    """A 1-D hyperparameter of length L needs every member leaf to have a leading axis of size L."""
    def lengths(v):
        if isinstance(v, tuple):
            return [n for x in v for n in lengths(x)]
        return [len(v)] if isinstance(v, np.ndarray) else []

    for k, v in spec.items():
        for n in lengths(v):
            for leaf, path in zip(leaves, paths):
                shape = getattr(leaf, "shape", ())
                if len(shape) == 0 or shape[0] != n:
                    raise ValueError(
                        f"{where}: {k} has {n} per-slice values, but member {path!r} has shape {tuple(shape)} "
                        f"(its leading axis must have size {n})"
                    )


class GroupState(NamedTuple):
    """State of one group: its step count, rule scalars, and per-leaf slots.

    ``step`` is a scalar when every member has taken the same number of steps
    (the usual case: bias corrections are then computed once for the group),
    or a vector with one count per member when members joined at different
    times (a torch checkpoint with per-parameter counts, regrouping); rule
    scalars then hold one value per member too.

    ``slots[name]`` is a tuple with one array per member leaf, in the group's
    member order (torch's parameter order).
    """

    step: jax.Array
    scalars: dict
    slots: dict


class GroupedState(NamedTuple):
    """State of a grouped transformation.

    Attributes:
      count: number of updates applied (the argument of schedules).
      hyperparams: per group, ``{name: array}`` of current hyperparameters.
      groups: per group, a :class:`GroupState` (empty for frozen groups).
      info: static description of the groups (their names, ...:
        :class:`groupopt.hyperparam_access.GroupInfo`), or ``None``. It is pytree
        metadata, not a leaf: no arrays, never traced; it lets
        :func:`groupopt.get_hyperparams` find a group by name in any state.
    """

    count: jax.Array
    hyperparams: tuple
    groups: tuple
    info: object = None


# the three array fields are children (key paths as for a plain NamedTuple); ``info`` is static
jax.tree_util.register_pytree_with_keys(
    GroupedState,
    lambda s: (((jax.tree_util.GetAttrKey("count"), s.count), (jax.tree_util.GetAttrKey("hyperparams"), s.hyperparams),
                (jax.tree_util.GetAttrKey("groups"), s.groups)), s.info),
    lambda info, children: GroupedState(*children, info),
    flatten_func=lambda s: ((s.count, s.hyperparams, s.groups), s.info),
)


def _place(x, sharding):
    return x if sharding is None else jax.device_put(x, sharding)


def init_group_state(rule: Rule | None, hparams: dict, leaves: Sequence, shardings: Sequence | None = None) -> GroupState:
    """Initial state of one group (``rule`` None: frozen, no state): per-leaf slots placed like their
    parameter (or by ``shardings``), scalars replicated on the parameters' mesh."""
    rep = replicated(leaves)
    step = _place(jnp.zeros((), jnp.int32), rep)
    if rule is None:
        return GroupState(step, {}, {})
    if rule.whole_group:  # e.g. an Optax transformation over the group's tree: its own state
        return rule.init_members(hparams, leaves, shardings)
    per_leaf = [rule.init_slots(leaf, hparams) for leaf in leaves]
    if shardings is not None:
        per_leaf = [{n: _place(v, fit(sh, v.shape)) for n, v in s.items()} for s, (sh, _) in zip(per_leaf, shardings)]
    slots = {name: tuple(s[name] for s in per_leaf) for name in rule.slot_names()}
    scalars = jax.tree.map(lambda x: _place(x, rep), rule.init_scalars(hparams))
    return GroupState(step, scalars, slots)


def _leaf_coefs(coef: dict, dtype, ndim: int) -> dict:
    """Coefficients cast to a leaf's dtype (``dtype`` None: kept as they are, for a rule with
    ``cast_coefs = False``); per-slice (1-D) ones shaped to broadcast along axis 0."""
    out = {}
    for k, v in coef.items():
        if dtype is not None and jnp.issubdtype(v.dtype, jnp.floating):
            v = v.astype(dtype)
        if v.ndim == 1:
            v = v.reshape(v.shape + (1,) * (ndim - 1))
        out[k] = v
    return out


def _pack(coef: dict) -> dict:
    """The group's coefficients, computed once for the group, each kind (dtype and shape) stacked into
    one array that every member's kernel reads its coefficients from.

    Each kernel then takes one operand for its coefficients instead of one per coefficient (AdamW's
    third kernel: 4 operands instead of 8). On a step over thousands of small leaves, cost per kernel is
    most of the step: unpacked, adamw_2001 ran 1.026x as long (benchmarks/README.md). The barrier keeps
    XLA from folding the slices back into the separate scalars, and from fusing (and so repeating) the
    scalar work into every element of every leaf's update loop.
    """
    floating = {}  # per shape, the dtype its flags (bool coefficients) travel in: 0.0 or 1.0, read back as ``!= 0``
    for v in coef.values():
        if jnp.issubdtype(v.dtype, jnp.floating):
            floating.setdefault(v.shape, v.dtype)
    by_kind: dict = {}
    for k, v in coef.items():
        dtype = floating.get(v.shape, v.dtype) if v.dtype == jnp.bool_ else v.dtype
        by_kind.setdefault((dtype, v.shape), []).append(k)
    out = {}
    for (dtype, _), keys in by_kind.items():
        packed = jax.lax.optimization_barrier(jnp.stack([coef[k].astype(dtype) for k in keys]))
        for i, k in enumerate(keys):
            out[k] = packed[i] != 0 if coef[k].dtype == jnp.bool_ and dtype != jnp.bool_ else packed[i]
    return out


_APPLY_CACHE: dict = {}


def _leaf_apply(rule: Rule):
    """``rule.apply`` under its own ``jax.jit``, one per rule: leaves of the same shape and dtype
    share one trace (jit's cache), so a step over thousands of leaves traces each kind of leaf
    once instead of once per leaf. XLA inlines the calls, so the compiled step is unchanged."""
    try:
        fn = _APPLY_CACHE.get(rule)
    except TypeError:  # an unhashable rule: traced per leaf, as before
        return rule.apply
    if fn is None:
        fn = _APPLY_CACHE[rule] = jax.jit(rule.apply)
    return fn


def update_group(rule: Rule, hparams: dict, gstate: GroupState, grads: Sequence, params: Sequence,
                 shardings: Sequence | None = None, name: str = ""):
    """Apply one group's rule to its member leaves: returns ``(new_params, new_group_state)``.

    The scalar work (bias corrections, ...) is done once for the group; each
    leaf then runs one elementwise computation. A ``None`` gradient skips its
    member (torch's ``p.grad is None``). ``shardings`` (per member, or
    None) pins the new per-leaf state to a placement (e.g. ZeRO-1).
    """
    present = [g is not None for g in grads]
    if all(present):
        step = gstate.step + 1
    else:
        # Members without a gradient (torch's p.grad is None) are skipped: no update, no state
        # change, no step. Their counts fall behind, so the group keeps one count per member.
        n = len(grads)
        widen = lambda v: jnp.broadcast_to(v, (n,)) if jnp.ndim(v) == 0 else v  # noqa: E731
        gstate = GroupState(widen(gstate.step), {k: widen(v) for k, v in gstate.scalars.items()}, gstate.slots)
        mask = jnp.asarray(present)
        step = gstate.step + mask.astype(gstate.step.dtype)
    # Per-member steps (a vector): members joined the group at different times (a loaded torch
    # checkpoint, regrouping, skipped members). The scalar work then runs on vectors and each leaf
    # takes its entry.
    per_member = step.ndim == 1
    if per_member and any(jnp.ndim(v) for v in jax.tree.leaves(hparams)):
        raise ValueError(f"group {name}: per-slice hyperparameters need one step count for the whole group")
    coef, scalars = rule.prepare(hparams, step.astype(hparam_dtype()), gstate.scalars)
    coef = {k: jnp.asarray(v) for k, v in coef.items()}
    coef = _pack(coef)
    by_dtype: dict = {}
    # Under an outer trace, each kind of leaf is traced once; called eagerly, the rule runs op by op
    # (as it always did: a separately compiled leaf update could round differently from jit's).
    apply = _leaf_apply(rule) if any(isinstance(p, jax.core.Tracer) for p in params) else rule.apply
    cast_to = (lambda p: p.dtype) if rule.cast_coefs else (lambda p: None)  # noqa: E731
    names = rule.slot_names()
    new_params, new_slots = [], {n: [] for n in names}
    for i, (g, p) in enumerate(zip(grads, params)):
        if g is None:
            new_params.append(p)
            for n in names:
                new_slots[n].append(gstate.slots[n][i])
            continue
        if per_member:
            c = _leaf_coefs({k: v[i] if v.ndim == 1 else v for k, v in coef.items()}, cast_to(p), p.ndim)
        else:
            c = by_dtype.get((p.dtype, p.ndim))
            if c is None:
                c = by_dtype[(p.dtype, p.ndim)] = _leaf_coefs(coef, cast_to(p), p.ndim)
        leaf_slots = {n: gstate.slots[n][i] for n in names}
        new_p, s = apply(g, p, leaf_slots, c)
        new_params.append(new_p.astype(p.dtype))
        sh, psh = (None, None) if shardings is None else shardings[i]
        if psh is not None:
            new_params[-1] = constrain(new_params[-1], psh)
        for n in names:
            v = s[n].astype(leaf_slots[n].dtype)
            new_slots[n].append(v if sh is None else constrain(v, sh))
    if not all(present):
        scalars = {k: jnp.where(mask, v, gstate.scalars[k]) for k, v in scalars.items()}
    return new_params, GroupState(step, scalars, {n: tuple(v) for n, v in new_slots.items()})


def step_groups(rules: Sequence[Rule | None], hparams: Sequence[dict], groups: Sequence[GroupState],
                members: Sequence[Sequence[int]], grad_leaves: Sequence, param_leaves: Sequence,
                shardings: Sequence | None = None, names: Sequence[str] | None = None):
    """One step of every group over flat leaf lists: returns ``(new_param_leaves, new_groups)``.

    ``members[g]``: the indices (into the leaf lists) of group ``g``'s members, in its order.
    ``hparams[g]``: group ``g``'s current hyperparameter arrays. A ``None`` rule (frozen group)
    and leaves in no group are returned as they are; a ``None`` gradient skips its member.
    ``shardings``: per leaf, ``(state sharding, param sharding)`` or None.
    """
    out = list(param_leaves)
    new_groups = []
    for g, rule in enumerate(rules):
        if rule is None:
            new_groups.append(groups[g])
            continue
        idx = members[g]
        sh = None if shardings is None else [shardings[i] for i in idx]
        update = rule.update_members if rule.whole_group else functools.partial(update_group, rule)
        new_p, gs = update(hparams[g], groups[g], [grad_leaves[i] for i in idx],
                           [param_leaves[i] for i in idx], sh, str(g) if names is None else names[g])
        for i, p in zip(idx, new_p):
            out[i] = p
        new_groups.append(gs)
    return out, tuple(new_groups)
