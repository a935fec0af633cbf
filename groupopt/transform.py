"""The grouped transformation: one Optax ``GradientTransformation`` over many groups.

Each group has an update rule (:mod:`groupopt.optimizers`) and its own
hyperparameters; a leaf belongs to at most one group (see
:mod:`groupopt.groups`), and leaves in no group (or in a ``frozen`` group) are
left untouched and get no state.

Every leaf is traced once, with its own group's coefficients: no per-group
masked copies of the whole tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import hyperparams as hpmod
from .engine import GroupedState, GroupState, check_per_slice, init_group_state, step_groups
from .grad_checks import check_grad_paths, check_grads, check_trainable, is_sparse
from . import hyperparam_access, multihost
from .groups import ALL, GroupPlan, as_param_tree, partition, path_str
from .optimizers.base import Rule
from .optimizers.optax_rule import optax_rule
from .overrides import Override, resolve as resolve_overrides
from .sharding import leaf_shardings, replicated

__all__ = [
    "Group",
    "group",
    "GroupConfig",
    "GroupState",
    "GroupedState",
    "GroupedTransformation",
    "grouped",
    "apply_groups",
    "check_per_slice",
]


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass
class Group:
    """A group specification: what it selects, its rule and hyperparameters.

    Build it with :func:`group`.
    """

    select: Any = ALL
    rule: Rule | type | None = None
    frozen: bool = False
    name: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    hparams: dict = dataclasses.field(default_factory=dict)


def group(select=ALL, *, rule: Rule | type | None = None, frozen: bool = False, name: str | None = None, **kwargs) -> Group:
    """One parameter group.

    Args:
      select: which leaves (see :mod:`groupopt.groups`): a glob, a regex, a
        predicate, an NNX Module/Variable, :data:`~groupopt.ALL`,
        :func:`~groupopt.rest`, or a list of these.
      rule: this group's update rule (an instance or class), if it differs from
        the optimizer's.
      frozen: leave these leaves untouched (no state), like params given to no
        torch optimizer.
      name: a display name for reports and errors.
      **kwargs: hyperparameters (``lr=...``; numbers or schedules) and
        structural options (``nesterov=True``) for this group.
    """
    return Group(select=select, rule=rule, frozen=frozen, name=name, hparams=kwargs)


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """The resolved static configuration of one group."""

    name: str
    rule: Rule | None  # None: frozen
    spec: dict  # hyperparameter name -> number | schedule | tuple of those

    @property
    def frozen(self) -> bool:
        return self.rule is None


def _split_kwargs(rule_cls, kwargs: dict, where: str, strict: bool = True):
    fields = {f.name for f in dataclasses.fields(rule_cls)}
    options = {k: v for k, v in kwargs.items() if k in fields}
    hps = {k: v for k, v in kwargs.items() if k in rule_cls.hyperparams}
    unknown = [k for k in kwargs if k not in fields and k not in rule_cls.hyperparams]
    if unknown and strict:
        # options a rule derives itself (SGD's use_momentum, metadata "derived") are not the user's to set
        shown = sorted(f.name for f in dataclasses.fields(rule_cls) if not f.metadata.get("derived"))
        raise TypeError(
            f"{where}: {rule_cls.name} has no option or hyperparameter {unknown[0]!r} "
            f"(hyperparameters: {list(rule_cls.hyperparams)}; options: {shown})"
        )
    return options, hps


def _resolve_rule(rule) -> Rule:
    if isinstance(rule, type):
        return rule()
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, optax.GradientTransformation):  # hyperparameters fixed: see groupopt.optax_rule
        return optax_rule(rule)
    raise TypeError(f"rule must be a groupopt Rule instance or class, or an optax.GradientTransformation "
                    f"(an Optax factory such as optax.lion: groupopt.optax_rule(optax.lion, learning_rate=...)), "
                    f"got {type(rule).__name__}: {rule!r}")


def _normalize_value(v, tuple_valued: bool):
    """Lists become tuples for tuple-valued hyperparameters (betas) and 1-D per-slice arrays otherwise."""
    if tuple_valued:
        return tuple(_normalize_value(x, False) for x in v)
    if isinstance(v, (list, tuple, np.ndarray)) or (isinstance(v, jax.Array) and v.ndim > 0):
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"a per-slice hyperparameter must be 1-D (one value per slice of axis 0), got shape {arr.shape}")
        return arr
    return v


def make_config(name: str, rule: Rule | None, defaults: dict, overrides: dict, where: str) -> GroupConfig:
    """Merge a rule's torch defaults, optimizer-wide defaults and a group's overrides."""
    if rule is None:
        return GroupConfig(name, None, {})
    rcls = type(rule)
    d_opts, d_hps = _split_kwargs(rcls, {k: v for k, v in defaults.items() if k not in rcls.bound_keys}, where, strict=False)
    g_opts, g_hps = _split_kwargs(rcls, overrides, where, strict=True)
    options = {**rule.options(), **d_opts, **g_opts}
    rule = dataclasses.replace(rule, **options)
    spec = {**rcls.hyperparams, **d_hps, **g_hps}
    for k, v in spec.items():
        default = rcls.hyperparams[k]
        if isinstance(default, tuple) and (not isinstance(v, (tuple, list)) or len(v) != len(default)):
            raise ValueError(f"{where}: {k} must be a sequence of {len(default)} values, got {v!r}")
    spec = {k: _normalize_value(v, isinstance(rcls.hyperparams[k], tuple)) for k, v in spec.items()}
    return GroupConfig(name, rule.specialize(spec), spec)


# --------------------------------------------------------------------------- state


def _place(x, sharding):
    return x if sharding is None else jax.device_put(x, sharding)


def apply_groups(configs, plan: GroupPlan, state: GroupedState, grad_leaves, param_leaves, shardings=None):
    """The whole grouped step on flat leaf lists: returns ``(new_param_leaves, new_state)``.

    Hyperparameters come from the state (schedules evaluated at ``state.count``); the update is
    the engine's (:func:`groupopt.engine.step_groups`). Leaves of frozen groups and of no group
    are returned as they are. ``shardings``: per leaf (plan order) state sharding or None.
    """
    hps = tuple(stored if c.frozen else hpmod.current(c.spec, stored, state.count)
                for c, stored in zip(configs, state.hyperparams))
    out, groups = step_groups([c.rule for c in configs], hps, state.groups, plan.members, grad_leaves,
                              param_leaves, shardings, [c.name for c in configs])
    return out, GroupedState(state.count + 1, hps, groups, state.info)


def init_state(configs, plan: GroupPlan, param_leaves, shardings=None, info=None) -> GroupedState:
    rep = replicated(param_leaves)
    hps, groups = [], []
    for g, config in enumerate(configs):
        hp = jax.tree.map(lambda x: _place(x, rep), hpmod.initial_state(config.spec))
        hps.append(hp)
        sh = None if shardings is None else [shardings[i] for i in plan.members[g]]
        groups.append(init_group_state(config.rule, hp, [param_leaves[i] for i in plan.members[g]], sh))
    return GroupedState(_place(jnp.zeros((), jnp.int32), rep), tuple(hps), tuple(groups), info)


# --------------------------------------------------------------------------- transformation


def _updated(configs, plan: GroupPlan) -> list[int]:
    """Indices of the leaves that a rule updates (not frozen, in a group)."""
    return [i for g, c in enumerate(configs) if not c.frozen for i in plan.members[g]]


def _check_trainable(configs, plan: GroupPlan, leaves, where: str) -> None:
    """Leaves of groups that a rule updates must be real floating point (frozen / no group: anything)."""
    idx = _updated(configs, plan)
    check_trainable([plan.paths[i] for i in idx], [leaves[i] for i in idx], where)


def _check_grads(configs, plan: GroupPlan, grad_paths, grad_leaves, param_leaves, where: str) -> None:
    """At trace time (paths, shapes and dtypes are static): no run-time cost. The gradients of
    frozen leaves and of leaves in no group are not used, so not checked beyond their paths."""
    check_grad_paths(grad_paths, plan.paths, where)
    idx = _updated(configs, plan)
    rules = [c.rule for g, c in enumerate(configs) if not c.frozen for _ in plan.members[g]]  # aligned with idx
    check_grads([plan.paths[i] for i in idx], [grad_leaves[i] for i in idx], [param_leaves[i] for i in idx], where,
                rules=rules)


def _flat(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sparse)  # a BCOO gradient is one leaf
    return [path_str(kp) for kp, _ in flat], [x for _, x in flat], treedef


class GroupedTransformation(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformation`` over parameter groups.

    Besides ``init``/``update`` it offers:

    * ``apply(params, grads, state) -> (new_params, new_state)``: the exact
      torch step, computing the new parameters directly (``update`` returns
      ``new_params - params`` for Optax compatibility, which can differ from
      it by an ulp).
    * ``set_hyperparams(state, group, **values)``: new state with some of a
      group's hyperparameters replaced (no recompile); ``state`` may hold this
      transformation's state at any depth, and an ``nnx.Optimizer``'s
      ``opt_state`` is edited in place (see :func:`groupopt.set_hyperparams`).
    * ``hyperparams(state)``: the current values, per group, as Python floats
      (on the host; inside ``jit`` use :func:`groupopt.get_hyperparams`).
    * ``configs`` and ``plan``: the resolved groups.
    * ``resolution``: how ``overrides`` split the groups
      (:class:`groupopt.overrides.Resolution`), or ``None``.
    """

    configs: tuple
    plan: GroupPlan | None
    resolution: Any = None


def _accepted(rule) -> set | None:
    """The keys a group's rule accepts (hyperparameters and options); None for a frozen group."""
    if rule is None:
        return None
    fields = {f.name for f in dataclasses.fields(rule)} if dataclasses.is_dataclass(rule) else set()
    return set(getattr(type(rule), "hyperparams", {})) | fields


def grouped(params=None, groups: Sequence[Group | dict] | None = None, *, rule: Rule | type, state_sharding=None,
            require_all: bool = False, overrides: Sequence[Override] | None = None, **defaults) -> GroupedTransformation:
    """Build one transformation that updates each group with its own rule and hyperparameters.

    Args:
      params: the parameter tree (a pytree of arrays, ``nnx.state(model)``,
        or an NNX module, whose ``nnx.Param`` state is used). Groups are
        matched against it once, here. May be ``None`` when ``groups`` is
        ``None``: then one group holds every leaf of whatever tree ``init``
        receives.
      groups: a list of :func:`group` specs (or torch-style dicts with a
        ``"params"`` selector). ``None``: one group with everything.
      rule: the default update rule (e.g. ``groupopt.AdamWRule()``).
      require_all: every leaf must be in a group; one error lists every leaf
        that is not (by default such leaves are frozen, as in torch).
      state_sharding: optional ``(path, param) -> Sharding | None`` placing each
        per-leaf state array (e.g. :func:`groupopt.sharding.zero1`); by default
        state is sharded exactly like its parameter. Needs ``params``.
      overrides: :func:`groupopt.override` specs: values for selections that
        cut across groups (``weight_decay=0.0`` for every bias). Each group
        is split into the sub-groups they induce (``"layer3+no_decay"``); a
        later override wins over an earlier one and over group values. See
        :mod:`groupopt.overrides`; ``tx.resolution`` holds the result.
      **defaults: hyperparameters (numbers or schedules) and options shared
        by all groups; each group's own values win.
    """
    base_rule = _resolve_rule(rule)
    if groups is None:
        specs = [Group(select=ALL)]
    else:
        specs = []
        for i, spec in enumerate(groups):
            if isinstance(spec, dict):
                spec = dict(spec)
                if "params" not in spec:
                    raise KeyError("params")
                sel = spec.pop("params")
                spec = group(sel, rule=spec.pop("rule", None), frozen=spec.pop("frozen", False), name=spec.pop("name", None), **spec)
            elif not isinstance(spec, Group):
                raise TypeError(f"group {i} must be a groupopt.group(...) or a dict, got {type(spec).__name__}")
            specs.append(spec)
        if not specs:
            raise ValueError("optimizer got an empty parameter list")
    names = [s.name if s.name is not None else (str(i) if groups is not None else "all") for i, s in enumerate(specs)]
    configs, rules = [], []
    for i, s in enumerate(specs):
        where = f"group {i}" if specs[i].name is None else f"group {i} ({names[i]})"
        r = None if s.frozen else (_resolve_rule(s.rule) if s.rule is not None else base_rule)
        rules.append(r)
        configs.append(make_config(names[i], r, defaults, s.hparams, where))
    # defaults that no group's rule knows are a typo
    known = set()
    for c in configs:
        if c.rule is not None:
            known |= set(type(c.rule).hyperparams) | {f.name for f in dataclasses.fields(c.rule)}
    unknown = [k for k in defaults if k not in known and k not in {f.name for f in dataclasses.fields(base_rule)} and k not in type(base_rule).hyperparams]
    if unknown:
        raise TypeError(f"unknown hyperparameter or option {unknown[0]!r} for {type(base_rule).name}")
    configs = tuple(configs)
    resolution = None
    if overrides:
        if params is None:
            raise ValueError("overrides need the parameter tree to match against: pass params")
        resolution = resolve_overrides(params, [s.select for s in specs], names, [c.frozen for c in configs],
                                       [s.hparams for s in specs], overrides, [_accepted(c.rule) for c in configs], require_all)
        configs = tuple(make_config(sg.name, rules[sg.base], defaults, sg.values, f"group {sg.base} ({sg.name})")
                        for sg in resolution.subgroups)

    if params is None:
        if groups is not None:
            raise ValueError("groups need the parameter tree to match against: pass params")
        plan = None
    else:
        plan = resolution.plan if resolution is not None else partition(
            params, [s.select for s in specs], names, require_all=require_all)  # a module: of_type selectors
        _, leaves, _ = _flat(as_param_tree(params))
        _check_trainable(configs, plan, leaves, "grouped(params)")
        for g, c in enumerate(configs):
            check_per_slice(c.spec, [leaves[i] for i in plan.members[g]], [plan.paths[i] for i in plan.members[g]], f"group {g} ({c.name})")

    def plan_for(paths):
        if plan is None:
            return GroupPlan.from_labels(paths, [0] * len(paths), names)
        plan.check_paths(paths, "parameter")
        return plan

    shardings = None
    if state_sharding is not None:
        if params is None:
            raise ValueError("state_sharding needs params (the placed parameter tree) at construction")
        _, sleaves, _ = _flat(as_param_tree(params))
        shardings = leaf_shardings(state_sharding, plan.paths, sleaves)

    info = hyperparam_access.GroupInfo.from_configs(configs, resolution)  # names: static metadata of the state

    agreed: set = set()  # structures already compared across processes (multi-process runs)

    def agree(where, p: GroupPlan, pleaves, gleaves=()):
        """With several processes: the groups (rules, hyperparameters), members, shapes and dtypes that the
        state is built for (``init``) or the step compiles for (``update``/``apply``) must be the same on
        every process; compared once per structure, at the first call or trace, before any device work."""
        if not multihost.active():
            return
        config = {"groups": configs, "paths": p.paths, "members": p.members,
                  "params": [(list(np.shape(x)), str(x.dtype)) for x in pleaves],
                  "grads": [(list(np.shape(x)), str(x.dtype)) for x in gleaves]}
        key = (where, multihost.fingerprint(config))
        if key not in agreed:
            multihost.agree(f"grouped transformation: {where}", config)
            agreed.add(key)

    def init_fn(params):
        paths, leaves, _ = _flat(as_param_tree(params))
        p = plan_for(paths)
        _check_trainable(configs, p, leaves, "init(params)")
        agree("init", p, leaves)
        return init_state(configs, p, leaves, shardings, info)

    def apply_fn(params, grads, state):
        ppaths, pleaves, ptreedef = _flat(as_param_tree(params))
        gpaths, gleaves, _ = _flat(grads)
        p = plan_for(ppaths)
        _check_grads(configs, p, gpaths, gleaves, pleaves, "apply(params, grads, state)")
        agree("apply", p, pleaves, gleaves)
        new_leaves, new_state = apply_groups(configs, p, state, gleaves, pleaves, shardings)
        return jax.tree_util.tree_unflatten(ptreedef, new_leaves), new_state

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("groupopt transformations need params: call update(grads, state, params)")
        gpaths, gleaves, gtreedef = _flat(updates)
        ppaths, pleaves, _ = _flat(as_param_tree(params))
        p = plan_for(ppaths)
        _check_grads(configs, p, gpaths, gleaves, pleaves, "update(grads, state, params)")
        agree("update", p, pleaves, gleaves)
        new_leaves, new_state = apply_groups(configs, p, state, gleaves, pleaves, shardings)
        deltas = [n - o for n, o in zip(new_leaves, pleaves)]
        return jax.tree_util.tree_unflatten(gtreedef, deltas), new_state

    def set_hyperparams(state, group=0, **values):
        # by name or index, through any wrapper; Variables (nnx.Optimizer's opt_state) are edited in place
        return hyperparam_access.set_hyperparams(state, group, tx=tx, **values)

    def read_hyperparams(state: GroupedState) -> list[dict]:
        def to_py(v):
            if isinstance(v, tuple):
                return tuple(to_py(x) for x in v)
            a = np.asarray(v)
            if a.ndim:
                return a.copy()
            return float(str(a)) if a.dtype == np.float32 else float(a)  # float32: its shortest repr

        found = hyperparam_access.grouped_state(state, tx=tx)  # any nesting; Variables read out
        return [{k: to_py(hp[k]) for k in c.spec} for c, hp in zip(configs, found.hyperparams)]

    tx = GroupedTransformation(init_fn, update_fn)
    tx.configs = configs
    tx.plan = plan
    tx.resolution = resolution
    tx.apply = apply_fn
    tx.set_hyperparams = set_hyperparams
    tx.hyperparams = read_hyperparams
    return tx
