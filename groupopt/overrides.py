"""Overrides: hyperparameters for a selection that cuts across groups.

The most common grouping has two crossed partitions: per-layer learning rates
(layer-wise decay) and "no weight decay for biases and norms". Groups give the
first; an :func:`override` gives the second without writing the cross product
by hand::

    tx = groupopt.grouped(
        params,
        [groupopt.group(f"blocks/{i}", lr=lrs[i], name=f"layer{i}") for i in range(n)],
        overrides=[groupopt.override(lambda path, leaf: leaf.ndim <= 1, weight_decay=0.0, name="no_decay")],
        rule=groupopt.AdamWRule(), weight_decay=0.05,
    )

Resolution, once, at construction (:func:`resolve`):

* Each group is split into the *sub-groups* its leaves' overrides induce: the
  leaves that no override selects keep the group's name (``"layer3"``), the
  others form ``"layer3+no_decay"`` (the names of the overrides that apply,
  in override order, joined by ``+``). Sub-groups come group by group, in
  the groups' order; within a group, in the order of their first leaf (tree
  flatten order). Sub-groups are ordinary groups: the compiled step is the one
  the hand-written cross product gives (no run-time cost).
* Precedence, per hyperparameter: the rule's torch defaults, then the
  optimizer-wide defaults, then the group's own values, then the overrides
  in list order -- a later override wins over an earlier one, and any
  override wins over the group. An override's value replaces the group's value
  entirely: a schedule is replaced by a number, or by the override's schedule.
* Frozen groups stay frozen, and leaves in no group stay in no group: an
  override never makes a leaf trainable.
* An override whose selector matches no leaf, or only leaves that no rule
  updates (frozen or in no group), is a ``ValueError``, like a group that
  selects nothing. ``rest()`` cannot be an override's selector.
* Every key of an override must be a hyperparameter or option of the rule of
  every group whose leaves it changes (a ``TypeError`` naming the override,
  the group and what the rule accepts otherwise).

After construction a group's name addresses all its sub-groups (see
:meth:`Resolution.expand`): ``set_hyperparams(state, "layer3", lr=...)`` sets
``lr`` of ``layer3`` and of ``layer3+no_decay``, but leaves alone the keys an
override fixed in a sub-group (overrides keep winning). A sub-group's own name
(``"layer3+no_decay"``) addresses that sub-group only, every key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .groups import GroupPlan, as_param_tree, describe_selector, flatten_with_paths, matcher, partition, is_module

__all__ = ["Override", "override", "SubGroup", "Resolution", "resolve"]


@dataclasses.dataclass(frozen=True)
class Override:
    """Hyperparameter values for the leaves a selector matches, across groups. Build it with :func:`override`."""

    select: Any
    values: dict
    name: str | None = None


def override(select, *, name: str | None = None, **values) -> Override:
    """Set hyperparameters for every leaf ``select`` matches, whatever group it is in.

    Args:
      select: which leaves, with the selectors of :mod:`groupopt.groups` (a
        glob, a regex, a predicate ``(path, leaf) -> bool``, an NNX
        Module/Variable, :data:`~groupopt.ALL`, or a list of these;
        not ``rest()``).
      name: the name that sub-groups carry (``"layer3+<name>"``); by default
        the values, e.g. ``"weight_decay=0"``.
      **values: hyperparameters (numbers, 1-D per-slice vectors or schedules)
        and options of the rule, e.g. ``weight_decay=0.0``.

    Given to :func:`groupopt.grouped` or :func:`groupopt.compat.param_groups`
    as ``overrides=[...]``; a later override wins over an earlier one and over
    the groups' own values.
    """
    if not values:
        raise TypeError("override() needs at least one hyperparameter, e.g. override('**/bias', weight_decay=0.0)")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"override name must be a string, got {type(name).__name__}")
    return Override(select=select, values=dict(values), name=name)


def _short(v) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    if callable(v):
        return getattr(v, "__name__", "schedule")
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def default_name(ov: Override) -> str:
    """The override's name, or its values (``"weight_decay=0"``) when it has none."""
    if ov.name is not None:
        return ov.name
    return ",".join(f"{k}={_short(v)}" for k, v in ov.values.items())


@dataclasses.dataclass(frozen=True)
class SubGroup:
    """One group of the resolved optimizer: a group's leaves that the same overrides select.

    Attributes:
      base: index of the group (in the list given) it comes from.
      name: ``"<group name>"`` or ``"<group name>+<override>+..."``.
      overrides: indices of the overrides that apply, in order.
      values: the group's own values with the overrides' applied (later wins).
      origin: ``{key: override name}`` for every key an override set.
      frozen: the group is frozen (never split).
    """

    base: int
    name: str
    overrides: tuple[int, ...]
    values: dict
    origin: dict
    frozen: bool


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The result of :func:`resolve`: the sub-groups and the plan over them.

    Attributes:
      plan: the :class:`~groupopt.GroupPlan` whose groups are the sub-groups.
      subgroups: one :class:`SubGroup` per group of ``plan``.
      base_names: the names of the groups as given.
      overrides: the overrides as given.
      override_names: their display names.
      matched: per override, the number of leaves it changes.
    """

    plan: GroupPlan
    subgroups: tuple[SubGroup, ...]
    base_names: tuple[str, ...]
    overrides: tuple[Override, ...]
    override_names: tuple[str, ...]
    matched: tuple[int, ...]

    def expand(self, group, values: dict) -> list[tuple[int, dict]] | None:
        """What ``set_hyperparams(state, group, **values)`` changes: ``[(sub-group index, values)]``.

        A string naming a group as given (``"layer3"``) reaches each of its
        sub-groups with the keys that no override fixed there; a key fixed in
        every sub-group is a ``ValueError`` (address the sub-group by its own
        name to change it). Anything else (a sub-group's name, an index) gives
        ``None``: the caller looks it up among the sub-groups.
        """
        if not isinstance(group, str) or group not in self.base_names:
            return None
        bases = {b for b, n in enumerate(self.base_names) if n == group}
        targets, reached = [], set()
        for i, sg in enumerate(self.subgroups):
            if sg.base not in bases:
                continue
            vals = {k: v for k, v in values.items() if k not in sg.origin}
            reached |= set(vals)
            if vals:
                targets.append((i, vals))
        fixed = [k for k in values if k not in reached]
        if fixed:
            subs = [sg for sg in self.subgroups if sg.base in bases]
            by = sorted({sg.origin[k] for sg in subs for k in fixed if k in sg.origin})
            raise ValueError(
                f"group {group!r}: {fixed} fixed by override {by} in every sub-group "
                f"({[sg.name for sg in subs]}); set it on a sub-group by its name"
            )
        return targets

    def describe(self) -> str:
        """The overrides in order, with what each selects and changes (a section of :func:`groupopt.report`)."""
        lines = ["overrides (in order; a later one wins over earlier ones and over group values):"]
        for k, (ov, name) in enumerate(zip(self.overrides, self.override_names)):
            subs = [sg.name for sg in self.subgroups if k in sg.overrides]
            vals = ", ".join(f"{key}={_short(v)}" for key, v in ov.values.items())
            lines.append(f"  {k} {name}: {describe_selector(ov.select)} -> {vals}; "
                         f"{self.matched[k]} leaves in {len(subs)} sub-groups: {', '.join(subs)}")
            shadowed = sorted({key for sg in self.subgroups if k in sg.overrides for key in ov.values
                               if sg.origin.get(key) != name})
            if shadowed:
                lines.append(f"    overridden by a later override in some sub-groups: {shadowed}")
        return "\n".join(lines)


def resolve(params, selectors: Sequence[Any], names: Sequence[str], frozen: Sequence[bool], values: Sequence[dict],
            overrides: Sequence[Override], known: Sequence[set | None] | None = None,
            require_all: bool = False) -> Resolution:
    """Split groups by the overrides that select their leaves (see the module docstring for the rules).

    Args:
      params: the parameter tree (arrays, ``nnx.state(model)`` or an NNX module).
      selectors, names, frozen, values: per group: its selector, name, whether
        it is frozen, and its own hyperparameter values.
      overrides: :func:`override` specs, in precedence order (later wins).
      known: per group, the keys its rule accepts (``None``: not checked).
      require_all: every leaf must be in a group (as in :func:`~groupopt.partition`).
    """
    overrides = tuple(overrides)
    for k, ov in enumerate(overrides):
        if not isinstance(ov, Override):
            raise TypeError(f"override {k} must be a groupopt.override(...), got {type(ov).__name__}")
    base = partition(params, selectors, names, require_all=require_all)
    paths, leaves, treedef = flatten_with_paths(as_param_tree(params))
    onames = [default_name(ov) for ov in overrides]
    hits = []  # per override: leaf indices it matches
    for k, ov in enumerate(overrides):
        where = f"override {k} ({onames[k]})"
        try:
            m = matcher(ov.select, paths, leaves, params if is_module(params) else None)
        except TypeError as e:
            raise TypeError(f"{where}: {e}") from None
        if m is None:
            raise TypeError(f"{where}: rest() selects by group membership; an override needs a selector of leaves")
        idx = [i for i in range(len(leaves)) if m(i)]
        if not idx:
            raise ValueError(f"{where} selects no parameter: selector {describe_selector(ov.select)}")
        live = [i for i in idx if base.leaf_group[i] >= 0 and not frozen[base.leaf_group[i]]]
        if not live:
            raise ValueError(
                f"{where} selects only parameters that no rule updates (frozen or in no group): "
                f"{[paths[i] for i in idx][:10]}"
            )
        hits.append(set(live))
        if known is not None:
            for g in sorted({base.leaf_group[i] for i in live}):
                if known[g] is None:
                    continue
                bad = [key for key in ov.values if key not in known[g]]
                if bad:
                    first = paths[min(i for i in live if base.leaf_group[i] == g)]
                    raise TypeError(
                        f"{where}: the rule of group {g} ({base.names[g]}) has no option or hyperparameter "
                        f"{bad[0]!r} (it accepts {sorted(known[g])}); the override selects {first!r} of that group"
                    )
    # sub-groups: per group in order, keyed by the overrides that apply, in order of their first leaf
    subgroups: list[SubGroup] = []
    index: dict[tuple[int, tuple[int, ...]], int] = {}
    leaf_sub = [-1] * len(leaves)
    for g in range(base.num_groups):
        if not base.members[g]:  # an empty rest() group stays, as without overrides
            subgroups.append(SubGroup(g, base.names[g], (), dict(values[g]), {}, bool(frozen[g])))
        for i in base.members[g]:
            sig = () if frozen[g] else tuple(k for k in range(len(overrides)) if i in hits[k])
            key = (g, sig)
            if key not in index:
                vals, origin = dict(values[g]), {}
                for k in sig:
                    vals.update(overrides[k].values)
                    origin.update({name: onames[k] for name in overrides[k].values})
                name = "+".join([base.names[g], *(onames[k] for k in sig)])
                index[key] = len(subgroups)
                subgroups.append(SubGroup(g, name, sig, vals, origin, bool(frozen[g])))
            leaf_sub[i] = index[key]
    seen: dict[str, int] = {}
    for s, sg in enumerate(subgroups):
        if sg.name in seen and (sg.overrides or subgroups[seen[sg.name]].overrides):
            raise ValueError(
                f"two groups are named {sg.name!r} after applying the overrides (sub-groups {seen[sg.name]} and {s}); "
                "give the overrides or the groups distinct names"
            )
        seen.setdefault(sg.name, s)
    plan = GroupPlan.from_labels(paths, leaf_sub, [sg.name for sg in subgroups], treedef)
    return Resolution(plan, tuple(subgroups), tuple(base.names), overrides, tuple(onames), tuple(len(h) for h in hits))
