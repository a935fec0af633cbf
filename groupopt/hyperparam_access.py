"""Group hyperparameters by group name, in any optimizer state.

A grouped transformation (:func:`groupopt.grouped` and the optimizers built on
it) keeps each group's numeric hyperparameters in its state as arrays, in a
:class:`~groupopt.GroupedState`. That state may sit anywhere inside a larger
one: under ``optax.chain`` (a tuple), ``optax.MultiSteps``
(``.inner_opt_state``), :func:`groupopt.accumulate`,
:func:`groupopt.reduce_on_plateau`, a ``flax.training.train_state.TrainState``,
or an ``nnx.Optimizer`` whose ``opt_state`` holds ``nnx.Variable`` objects.
The functions here find it by tree traversal and address groups by the names
given to :func:`groupopt.group` (``name=``; an unnamed group is named by its
position, ``"0"``, ``"1"``, ...), or by index::

    groupopt.get_hyperparams(state)                  # {"encoder": {"lr": Array(...), ...}, "head": {...}}
    groupopt.get_hyperparams(opt, "head")["lr"]       # opt: an nnx.Optimizer
    state = groupopt.set_hyperparams(state, "head", lr=5e-3)   # pure state: a new state
    groupopt.set_hyperparams(opt, "head", lr=5e-3)             # nnx.Optimizer: edited in place
    groupopt.hyperparams_for_logging(state)           # {"encoder/lr": ..., "head/betas/0": ...}

Everything works outside and inside ``jit`` (values are arrays -- tracers
under ``jit`` -- never Python floats, so there is no host sync), and an edit
keeps each array's dtype, shape and placement, so a jitted step never
recompiles for it. Editing an ``nnx.Optimizer`` writes into its ``Variable``
objects (their types and identities are kept), which is what ``nnx.jit``
expects between calls.

Frozen groups have no hyperparameters: asking for one by name (get or set) is
a ``ValueError`` naming it; ``get_hyperparams(state)`` and
:func:`hyperparams_for_logging` leave frozen groups out. A hyperparameter that
follows a schedule can be read (the value the last update used; the value at
count 0 before any update) but not set. When a state holds several grouped
transformations, a group name found in exactly one of them selects it;
otherwise pass ``tx=`` (the grouped transformation, or a groupopt wrapper of
it) to say which.

Group names are static metadata of the state (:class:`GroupInfo`, carried in
``GroupedState.info``), so reading them costs nothing under ``jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import hyperparams as hpmod, multihost
from .engine import GroupedState
from .groups import path_str

__all__ = ["GroupInfo", "get_hyperparams", "set_hyperparams", "hyperparams_for_logging", "grouped_state"]


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """Static description of a grouped state's groups (pytree metadata of :class:`~groupopt.GroupedState`).

    Attributes:
      names: each group's name, in state order.
      frozen: whether each group is frozen (no hyperparameters, no state).
      scheduled: per group, the hyperparameters that follow a schedule (read-only).
      bases: with ``overrides``, the name of the group each sub-group comes
        from (``set_hyperparams(state, "<group as given>", ...)`` reaches all
        its sub-groups); ``None`` without overrides.
      resolution: the :class:`groupopt.overrides.Resolution` (not compared,
        not pickled: a state read back from a pickle needs ``tx=`` to address a
        split group by its base name).
    """

    names: tuple
    frozen: tuple
    scheduled: tuple
    bases: tuple | None = None
    resolution: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def from_configs(cls, configs, resolution=None) -> "GroupInfo":
        """The info of a grouped transformation's resolved groups (``tx.configs``, ``tx.resolution``)."""
        bases = None
        if resolution is not None:
            bases = tuple(resolution.base_names[sg.base] for sg in resolution.subgroups)
        return cls(
            names=tuple(c.name for c in configs),
            frozen=tuple(c.frozen for c in configs),
            scheduled=tuple(frozenset(k for k, v in c.spec.items() if hpmod.has_schedule(v)) for c in configs),
            bases=bases,
            resolution=resolution,
        )

    def __reduce__(self):
        return (GroupInfo, (self.names, self.frozen, self.scheduled, self.bases))


# ------------------------------------------------------------------ finding the grouped state(s)


def _nnx():
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return None
    return nnx


def _is_variable(x) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Variable)


def _is_nnx_optimizer(x) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Optimizer)


def _is_grouped(x) -> bool:
    return isinstance(x, GroupedState)


def _unwrap(leaf):
    """A hyperparameter's value: arrays as they are, a Variable's value, tuples (betas) element by element."""
    if isinstance(leaf, tuple):
        return tuple(_unwrap(x) for x in leaf)
    return leaf.get_value() if _is_variable(leaf) else leaf


@dataclasses.dataclass
class _Found:
    index: int  # position among the leaves of the traversal
    path: str  # where it sits in the state ("" for the root)
    state: GroupedState
    info: GroupInfo | None


def _tx_info(tx) -> GroupInfo:
    if isinstance(tx, GroupInfo):
        return tx
    configs = getattr(tx, "configs", None)
    if configs is None:
        raise TypeError(
            f"tx= must be a groupopt grouped transformation (groupopt.grouped(...), groupopt.adamw(...), ...) or a "
            f"groupopt wrapper of one (accumulate, reduce_on_plateau), got {type(tx).__name__}"
        )
    return GroupInfo.from_configs(configs, getattr(tx, "resolution", None))


def _root(obj):
    """``(tree to search, is an nnx.Optimizer)``."""
    if _is_nnx_optimizer(obj):
        return obj.opt_state, True
    return obj, False


def _describe(found: list[_Found]) -> str:
    return "; ".join(f"{f.path or '<root>'}: {list(f.info.names) if f.info else 'unnamed groups'}" for f in found)


def _find(tree, tx) -> tuple[list[_Found], list, Any]:
    """The grouped states in ``tree`` (those of ``tx`` when given), the traversal's leaves and treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_grouped)
    leaves = [x for _, x in flat]
    found = [_Found(i, path_str(kp), x, x.info) for i, (kp, x) in enumerate(flat) if _is_grouped(x)]
    if not found:
        raise ValueError(
            f"no groupopt GroupedState in this {type(tree).__name__}: pass the state of a groupopt grouped "
            "transformation (or of an Optax wrapper around one), a TrainState, or an nnx.Optimizer"
        )
    if tx is None:
        return found, leaves, treedef
    want = _tx_info(tx)
    match = [f for f in found if f.info == want]
    if not match:  # a GroupedState built by hand carries no names: the tx's, if it has as many groups
        match = [dataclasses.replace(f, info=want) for f in found
                 if f.info is None and len(f.state.hyperparams) == len(want.names)]
    if not match:
        raise ValueError(f"the state holds no grouped state of this tx (groups {list(want.names)}); "
                         f"it holds: {_describe(found)}")
    if len(match) > 1:
        raise ValueError(f"the state holds {len(match)} grouped states built like this tx (at "
                         f"{[f.path or '<root>' for f in match]}); they cannot be told apart by tx=")
    if want.resolution is not None and match[0].info.resolution is None:  # e.g. a state read back from a pickle
        match[0] = dataclasses.replace(match[0], info=want)
    return match, leaves, treedef


def _index_in(f: _Found, group) -> int:
    n = len(f.state.hyperparams)
    if isinstance(group, (int, np.integer)) and not isinstance(group, bool):
        if not 0 <= group < n:
            raise IndexError(f"group {group} out of range: there are {n} groups")
        return int(group)
    if f.info is None:
        raise ValueError(
            f"the GroupedState at {f.path or '<root>'} carries no group names (it was not made by "
            "groupopt.grouped's init): address groups by index, or pass tx="
        )
    hits = [g for g, name in enumerate(f.info.names) if name == group]
    if not hits and f.info.bases is not None and group in f.info.bases:
        subs = [f.info.names[g] for g, b in enumerate(f.info.bases) if b == group]
        raise KeyError(f"group {group!r} was split by overrides into sub-groups {subs}: name one of them")
    if not hits:
        raise KeyError(f"no group named {group!r}; groups: {list(f.info.names)}")
    if len(hits) > 1:
        raise ValueError(f"{len(hits)} groups are named {group!r} (indices {hits}): address one by index")
    return hits[0]


def _has(f: _Found, group) -> bool:
    if isinstance(group, (int, np.integer)) and not isinstance(group, bool):
        return True
    if f.info is None:
        return False
    return group in f.info.names or (f.info.bases is not None and group in f.info.bases)


def _select(found: list[_Found], group) -> _Found:
    """The one grouped state that ``group`` (a name, an index or None) refers to."""
    if group is not None and not isinstance(group, (str, int, np.integer)) or isinstance(group, bool):
        raise TypeError(f"group must be a group name (str), an index (int) or None, got {type(group).__name__}: {group!r}")
    if len(found) == 1:
        f = found[0]
        if isinstance(group, str) and not _has(f, group) and f.info is not None:
            raise KeyError(f"no group named {group!r}; groups: {list(f.info.names)}")
        return f
    if group is None or not isinstance(group, str):
        raise ValueError(
            f"this state holds {len(found)} grouped transformations ({_describe(found)}); "
            "pass tx= (the grouped transformation) to say which"
        )
    hits = [f for f in found if _has(f, group)]
    if not hits:
        raise KeyError(f"no group named {group!r}; groups: {_describe(found)}")
    if len(hits) > 1:
        raise ValueError(
            f"group {group!r} is in {len(hits)} grouped transformations of this state (at "
            f"{[f.path or '<root>' for f in hits]}); pass tx= (the grouped transformation) to say which"
        )
    return hits[0]


def _where(f: _Found, g: int) -> str:
    return f"group {g}" + (f" ({f.info.names[g]})" if f.info is not None else "")


def _check_not_frozen(f: _Found, g: int) -> None:
    if f.info is not None and f.info.frozen[g]:
        raise ValueError(f"{_where(f, g)} is frozen: it has no hyperparameters (its leaves are not updated)")


# ------------------------------------------------------------------ public functions


def grouped_state(state, *, tx=None) -> GroupedState:
    """The :class:`~groupopt.GroupedState` inside ``state``, with plain array values.

    Args:
      state: an optimizer state (any nesting of Optax / groupopt wrappers), a
        ``TrainState``, or an ``nnx.Optimizer`` (its ``Variable`` values are
        read out).
      tx: the grouped transformation to look for, when the state holds several.
    """
    tree, _ = _root(state)
    found, _, _ = _find(tree, tx)
    f = _select(found, None)
    return jax.tree.map(_unwrap, f.state, is_leaf=_is_variable)._replace(info=f.info)


def get_hyperparams(state, group=None, *, tx=None) -> dict:
    """Current hyperparameters of one group, or of every group, by group name.

    Args:
      state: an optimizer state holding a grouped transformation's state at
        any depth (``optax.chain``, ``optax.MultiSteps``,
        :func:`groupopt.accumulate`, :func:`groupopt.reduce_on_plateau`, a
        ``TrainState``, ...), or an ``nnx.Optimizer``.
      group: a group name (``group(..., name=...)``; unnamed groups are
        ``"0"``, ``"1"``, ...), an index, or ``None`` for every group.
      tx: the grouped transformation, when the state holds several.

    Returns:
      ``{hyperparameter: array}`` for one group (tuple-valued ones such as
      ``betas`` as tuples of arrays), or ``{group name: {...}}`` for every
      group but the frozen ones. Arrays, not Python floats: inside ``jit``
      they are tracers (no host sync); convert on the host with ``float()``.

    Raises:
      ValueError: the group is frozen (it has no hyperparameters), or the
        state holds several grouped transformations and ``tx=`` is needed.
      KeyError: no group has that name.
    """
    tree, _ = _root(state)
    found, _, _ = _find(tree, tx)
    f = _select(found, group)
    if group is None:
        if f.info is None:
            raise ValueError(f"the GroupedState at {f.path or '<root>'} carries no group names: pass tx= or an index")
        return {name: {k: _unwrap(v) for k, v in hp.items()}
                for name, frozen, hp in zip(f.info.names, f.info.frozen, f.state.hyperparams) if not frozen}
    g = _index_in(f, group)
    _check_not_frozen(f, g)
    return {k: _unwrap(v) for k, v in f.state.hyperparams[g].items()}


def _placed(new, old):
    """``new`` placed as ``old`` is (outside ``jit``): same sharding and commitment, so the same compiled step."""
    if (isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer) and not isinstance(new, jax.core.Tracer)
            and old.committed):
        return jax.device_put(new, old.sharding)
    return new


def _write(old, new):
    """Put ``new`` in place of the hyperparameter leaf ``old``: into a Variable (in place), else a new array."""
    if isinstance(old, tuple):
        return tuple(_write(o, n) for o, n in zip(old, new))
    if _is_variable(old):
        old.set_value(_placed(new, old.get_value()))
        return old
    return _placed(new, old)


def _targets(f: _Found, group, values: dict, tx) -> list[tuple[int, dict]]:
    """``[(group index, values)]`` that ``set_hyperparams(state, group, **values)`` changes."""
    info = f.info
    if isinstance(group, str) and info is not None and info.bases is not None and group in info.bases:
        resolution = info.resolution
        if resolution is None and tx is not None:
            resolution = getattr(tx, "resolution", None)
        subs = [info.names[g] for g, b in enumerate(info.bases) if b == group]
        if resolution is not None:
            return resolution.expand(group, values)
        if subs != [group]:
            raise ValueError(
                f"group {group!r} was split by overrides into sub-groups {subs}, and this state does not carry "
                "the overrides (read back from a pickle?): pass tx= (the grouped transformation), or name a sub-group"
            )
    return [(_index_in(f, group), values)]


def set_hyperparams(state, group, *, tx=None, **values):
    """Set some hyperparameters of one group, by group name; never causes a recompile.

    Args:
      state: as for :func:`get_hyperparams`: an optimizer state with a grouped
        transformation's state at any depth, a ``TrainState``, or an
        ``nnx.Optimizer``.
      group: a group name or index. With ``overrides``, the name of a group as
        given reaches each of its sub-groups, except the keys an override
        fixed there (as ``tx.set_hyperparams``).
      tx: the grouped transformation, when the state holds several.
      **values: new values (numbers, arrays -- tracers inside ``jit`` --, a
        sequence for ``betas``, a 1-D array for a per-slice hyperparameter).
        Each keeps its array's dtype, shape and placement.

    Returns:
      For a pure state: a new state, the same structure with the values
      replaced (``state`` is not modified). For an ``nnx.Optimizer`` (or a
      state whose hyperparameters are ``nnx.Variable`` objects, like
      ``opt.opt_state``): the same object, edited in place -- its Variables
      receive the new values, so ``nnx.jit``-ed steps see them without a
      recompile.

    Raises:
      ValueError: the group is frozen, a value follows a schedule, a value
        has the wrong shape or length, or ``tx=`` is needed to pick one of
        several grouped transformations. Nothing is changed then.
      KeyError: no such group, or the group has no such hyperparameter.
    """
    if group is None:
        raise TypeError("set_hyperparams needs a group (a name or an index)")
    tree, is_opt = _root(state)
    found, leaves, treedef = _find(tree, tx)
    f = _select(found, group)
    hps = list(f.state.hyperparams)
    # everything checked and computed before anything is written
    plan = []
    for g, vals in _targets(f, group, values, tx):
        _check_not_frozen(f, g)
        where = _where(f, g)
        scheduled = f.info.scheduled[g] if f.info is not None else frozenset()
        for k in vals:
            if k in scheduled:
                raise ValueError(f"{where}: {k} follows a schedule; it cannot be set by hand")
        current = {k: _unwrap(v) for k, v in hps[g].items()}
        new = hpmod.replace(current, vals, where)
        plan.append((g, {k: new[k] for k in vals}))
    if multihost.active() and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values)):
        # host values become replicated arrays: every process must set the same ones (in jit they are)
        multihost.agree("set_hyperparams", {"group": group, "values": values})
    in_place = True
    for g, new in plan:
        out = dict(hps[g])
        for k, v in new.items():
            out[k] = _write(hps[g][k], v)
            in_place &= out[k] is hps[g][k]
        hps[g] = out
    if is_opt or in_place:
        return state
    leaves = list(leaves)
    leaves[f.index] = f.state._replace(hyperparams=tuple(hps))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def hyperparams_for_logging(state, *, tx=None, prefix: str = "") -> dict:
    """Every group's hyperparameters as one flat dict for a metrics logger: ``{"<group>/<hparam>": array}``.

    Tuple-valued hyperparameters become one entry per element
    (``"encoder/betas/0"``, ``"encoder/betas/1"``), and so do per-slice
    (1-D) ones (``"blocks/lr/0"``, ...): every value is a scalar array.
    Frozen groups are left out. Works inside ``jit`` on tracers (return the
    dict from the jitted step and log it on the host: no host sync in the
    step).

    Args:
      state: as for :func:`get_hyperparams`.
      tx: the grouped transformation, when the state holds several.
      prefix: put in front of every key (``"hparams/"``).
    """
    out = {}

    def put(key, v):
        if isinstance(v, tuple):
            for i, x in enumerate(v):
                put(f"{key}/{i}", x)
        elif jnp.ndim(v) > 0:
            for i in range(jnp.shape(v)[0]):
                put(f"{key}/{i}", v[i])
        else:
            out[key] = v

    for name, hp in get_hyperparams(state, tx=tx).items():
        for k, v in hp.items():
            put(f"{prefix}{name}/{k}", v)
    return out
