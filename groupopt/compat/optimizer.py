"""``groupopt.compat.Optimizer``: torch.optim.Optimizer's face over the grouped core.

This class is bookkeeping only: ``param_groups`` dicts, ``defaults``, the
``state`` view, validation and the ``state_dict`` format. The arithmetic is the
core's (:func:`groupopt.transform.apply_groups` with the rule of the subclass).

Each ``step`` reads every group's hyperparameters from ``param_groups`` on the
host and passes them to one jitted call, as arrays: editing
``param_groups[i]["lr"]`` (by hand or by a scheduler) never recompiles.
Structure -- which parameters exist, how they are grouped, boolean options
such as ``nesterov`` -- is part of the compiled program: ``add_param_group`` or
flipping an option recompiles once. ``num_compiles`` counts the compilations.

Gradients: ``step(grads)`` takes the gradients of the whole model (see
:mod:`groupopt.compat.params` for how they are matched to group members), or
``step(closure)`` with a closure returning ``(loss, grads)``; ``step()`` with
no argument uses the gradients summed by :meth:`Optimizer.accumulate_grad`
since the last :meth:`Optimizer.zero_grad` (torch's ``backward()`` adds into
``.grad`` the same way).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
import numbers
import warnings
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..groups import GroupPlan, _is_module, _is_variable, ALL
from ..optimizers.base import Rule, hparam_dtype
from ..sharding import replicated
from ..transform import GroupConfig, GroupedState, GroupState, check_per_slice, apply_groups, init_group_state
from . import hooks
from .validation import check_saved_groups
from .params import NNXBinding, TreeBinding, TreeParam, is_nnx_state, is_tree, make_binding

__all__ = ["Optimizer", "required", "LoadReport"]


_SCALAR_DONATION_WARNING = r"Some donated buffers were not usable: (?:(?:bool|[a-z]+\d+)\[\](?:, )?)+\.?\s"


class _RequiredParameter:
    """Singleton class representing a required parameter for an Optimizer."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _RequiredParameter()


def _typename(x) -> str:
    if isinstance(x, (bool, int, float, str)):
        return type(x).__name__
    return f"{type(x).__module__}.{type(x).__name__}" if type(x).__module__ != "builtins" else type(x).__name__


def _to_numpy(x):
    """numpy copy of an array-like (jax, numpy or a torch tensor: torch is never imported here)."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor: copy, never alias its live memory
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


class LoadReport(NamedTuple):
    """What a name-matched ``load_state_dict(strict=False)`` could not match (like ``nn.Module``'s)."""

    missing_keys: list
    unexpected_keys: list
    mismatched_keys: list


class _StateView(dict):
    """``optimizer.state``: per-parameter state, keyed by the parameter object (by identity)."""

    def __init__(self, entries: list):
        super().__init__()
        self._entries = entries  # list of (param, state dict)

    def __getitem__(self, param):
        for p, s in self._entries:
            if p is param:
                return s
        return {}

    def __contains__(self, param):
        return any(p is param for p, _ in self._entries)

    def __iter__(self):
        return (p for p, _ in self._entries)

    def __len__(self):
        return len(self._entries)

    def keys(self):
        return [p for p, _ in self._entries]

    def values(self):
        return [s for _, s in self._entries]

    def items(self):
        return list(self._entries)

    def __repr__(self):
        return f"OptimizerState({len(self)} parameters with state)"


class Optimizer:
    """Base class of the compat optimizers (``torch.optim.Optimizer``'s API).

    Subclasses set ``_rule_cls`` (the core update rule) and build ``defaults``
    in torch's key order, validating them with torch's messages.
    """

    _rule_cls: ClassVar[type[Rule]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        hooks.wrap_class(cls)

    def __init__(self, params, defaults: dict, *, model=None):
        if isinstance(params, jax.Array) or _is_variable(params) or isinstance(params, np.ndarray):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, "
                f"but got {_typename(params)}"
            )
        self.defaults = defaults
        self.param_groups: list[dict] = []
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._binding = make_binding(params, model)
        self._groups_state: list[GroupState] = []  # core per-group state, aligned with param_groups
        self._count = jnp.zeros((), jnp.int32)
        self._rules: list[Rule] = []
        self._step_fns: dict = {}
        self._members_cache = None
        self._grad_acc = None
        self._adder = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
        self.num_compiles = 0
        self._state_sharding = None

        if _is_module(params) or is_nnx_state(params):
            groups = [{"params": params}]
        elif is_tree(params):
            groups = [{"params": ALL}]
        else:
            groups = list(params)
            if len(groups) == 0:
                raise ValueError("optimizer got an empty parameter list")
            if not isinstance(groups[0], dict):
                groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    # ------------------------------------------------------------------ groups

    def _resolve_members(self, params, where: str):
        if _is_variable(params) or isinstance(params, TreeParam) or _is_module(params) or is_nnx_state(params):
            items = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. Please use a list instead."
            )
        elif isinstance(self._binding, TreeBinding) and not isinstance(params, (list, tuple)):
            items = [params]  # a selector or a sub-tree
        elif isinstance(params, (str, jax.Array)) or callable(params) and not hasattr(params, "__iter__"):
            items = [params]
        else:
            items = list(params)
        members, names = [], []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names.append(item[0])
                item = item[1]
            resolved = self._binding.resolve(item, where)
            members.extend(resolved)
        if names and len(names) != len(items):
            raise ValueError("all optimizer params should be with/without names. Some param names are missing")
        if names and len(names) != len(members):
            raise ValueError("named parameters must each name a single parameter (a Variable or array), not a module")
        return members, names

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch semantics: defaults fill missing keys; a parameter may be in one group only).

        Costs exactly one recompilation at the next step. On error nothing changes.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        where = f"param group {len(self.param_groups)}"
        members, names = self._resolve_members(params, where)
        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(f"parameter group didn't specify a value of required optimization parameter {name}")
        unique = []
        for m in members:
            if not any(m is u for u in unique):
                unique.append(m)
        if len(unique) != len(members):
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; "
                "in future, this will cause an error; "
                "see github.com/pytorch/pytorch/issues/40967 for more information",
                stacklevel=2,
            )
            members = unique
        has_names = bool(names) or "param_names" in param_group
        for group in self.param_groups:
            if has_names != ("param_names" in group):
                txt = "with names" if has_names else "without names"
                raise ValueError(
                    "all optimizer param groups should be with/without names. "
                    f"cannot add param group {txt} to the optimizer"
                )
        seen = {id(m) for group in self.param_groups for m in group["params"]}
        if any(id(m) in seen for m in members):
            raise ValueError("some parameters appear in more than one parameter group")
        if not members:
            raise ValueError(f"{where} selects no parameter")
        # validated: build the group's state before touching anything
        candidate = dict(param_group)
        candidate["params"] = members
        if names:
            candidate["param_names"] = names
        for name, default in self.defaults.items():
            candidate.setdefault(name, default)
        rule = self._rule_for(candidate, where)
        hp = self._host_hparams(candidate, where)
        values = self._binding.get(members)
        check_per_slice(GroupConfig(where, rule, self._numbers(candidate, where)), values,
                         [self._binding.name(m) or f"parameter {k}" for k, m in enumerate(members)], where)
        for k, v in enumerate(values):
            if getattr(v, "is_deleted", lambda: False)():
                raise ValueError(
                    f"{where}: parameter {k} ({self._binding.name(members[k]) or type(members[k]).__name__}) is a deleted array "
                    "(its buffer was donated to an earlier step): build the optimizer from the current parameters"
                )
        gstate = init_group_state(GroupConfig(where, rule, {}), hp, values, self._shardings_for(members, values))
        # commit (the user's dict becomes the group, as in torch)
        if isinstance(self._binding, NNXBinding):
            self._binding.tag(members)
        param_group.clear()
        param_group.update(candidate)
        self.param_groups.append(param_group)
        rep = replicated(values)
        if rep is not None:  # keep the step counter where the jitted step puts it: no retrace
            self._count = jax.device_put(self._count, rep)
        self._rules.append(rule)
        self._groups_state.append(gstate)

    # ------------------------------------------------------------------ hyperparameters

    def _rule_for(self, group: dict, where: str) -> Rule:
        import dataclasses

        opts = {f.name: bool(group[f.name]) for f in dataclasses.fields(self._rule_cls) if f.name in group}
        return self._rule_cls(**opts).specialize(self._numbers(group, where))

    def _numbers(self, group: dict, where: str) -> dict:
        out = {}
        for k, default in self._rule_cls.hyperparams.items():
            v = group[k]
            if isinstance(default, tuple):
                if not isinstance(v, (tuple, list)) or len(v) != len(default):
                    raise ValueError(f"{where}: {k} must be a sequence of {len(default)} numbers, got {v!r}")
                out[k] = tuple(self._number(x, f"{where}: {k}") for x in v)
            else:
                out[k] = self._number(v, f"{where}: {k}")
        return out

    @staticmethod
    def _number(v, where):
        """A hyperparameter value: a number, or a 1-D per-slice vector (one value per slice of axis 0)."""
        if isinstance(v, (list, np.ndarray, jax.Array)) and np.ndim(v) == 1 and np.size(v) > 1:
            arr = np.asarray(v, dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{where} has non-finite per-slice values: {arr}")
            return arr
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) or (hasattr(v, "shape") and np.size(v) == 1)):
            raise TypeError(f"{where} must be a number or a 1-D per-slice vector, got {v!r}")
        return float(v)

    def _host_hparams(self, group: dict, where: str) -> dict:
        dt = np.dtype(hparam_dtype())
        out = {}
        for k, v in self._numbers(group, where).items():
            out[k] = tuple(np.asarray(x, dt) for x in v) if isinstance(v, tuple) else np.asarray(v, dt)
        return out

    # ------------------------------------------------------------------ step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients summed by :meth:`accumulate_grad` (torch: ``p.grad = None``)."""
        self._grad_acc = None

    def accumulate_grad(self, grads) -> None:
        """Add ``grads`` to the pending gradients, as torch's ``backward()`` adds into ``.grad``."""
        self._grad_acc = grads if self._grad_acc is None else self._adder(self._grad_acc, grads)

    def _structure(self):
        rules = []
        for i, group in enumerate(self.param_groups):
            rules.append(self._rule_for(group, f"param group {i}"))
        return rules

    def _sync_structure(self, rules):
        """Re-initialise state whose structure changed because an option was edited."""
        for i, (old, new) in enumerate(zip(self._rules, rules)):
            if old == new:
                continue
            group = self.param_groups[i]
            fresh = init_group_state(
                GroupConfig(str(i), new, {}), self._host_hparams(group, f"param group {i}"), self._binding.get(group["params"])
            )
            gs = self._groups_state[i]
            slots = {n: gs.slots[n] if n in gs.slots else fresh.slots[n] for n in new.slot_names()}
            scalars = {n: gs.scalars[n] if n in gs.scalars else fresh.scalars[n] for n in fresh.scalars}
            self._groups_state[i] = GroupState(gs.step, scalars, slots)
            self._rules[i] = new

    def _members(self):
        """The flat member list (group order), cached until a group's list changes."""
        key = tuple((id(g["params"]), len(g["params"])) for g in self.param_groups)
        if self._members_cache is None or self._members_cache[0] != key:
            self._members_cache = (key, [m for g in self.param_groups for m in g["params"]])
        return self._members_cache

    def _step_fn(self, rules, members_key, members):
        """The jitted step for this structure. Gradients are matched to members while tracing, from
        the gradient tree's structure, so a new gradient structure simply retraces (jit's own cache)."""
        key = (tuple(rules), members_key, id(self._state_sharding))
        fn = self._step_fns.get(key)
        if fn is not None:
            return fn
        sizes = tuple(len(g["params"]) for g in self.param_groups)
        configs = tuple(GroupConfig(str(i), r, {k: 0.0 for k in r.hyperparams}) for i, r in enumerate(rules))
        labels = [g for g, n in enumerate(sizes) for _ in range(n)]
        plan = GroupPlan.from_labels([str(i) for i in range(len(labels))], labels, [str(i) for i in range(len(sizes))])
        shardings = None
        if self._state_sharding is not None:
            shardings = self._shardings_for(members, self._binding.get(members))
        binding = self._binding

        def step(values, grads, groups_state, count, hparams):
            self.num_compiles += 1  # runs once per trace, i.e. per compilation
            # a member without a gradient (None) is skipped, as torch skips p.grad is None
            idx = binding.grad_indices(grads, members, allow_missing=True)
            leaves = jax.tree.leaves(grads, is_leaf=_is_variable)
            leaves = [x.get_value() if _is_variable(x) else x for x in leaves]
            sel = [None if i is None else leaves[i] for i in idx]
            state = GroupedState(count, hparams, groups_state)
            new_values, new_state = apply_groups(configs, plan, state, sel, values, shardings)
            return new_values, new_state.groups, new_state.count

        fn = self._step_fns[key] = jax.jit(step, donate_argnums=(0, 2))
        return fn

    def step(self, grads=None):
        """One optimizer step.

        Args:
          grads: the model's gradients, or a closure returning ``(loss, grads)``
            (its loss is returned, as in torch), or ``None`` to use the
            gradients gathered by :meth:`accumulate_grad`; with none gathered,
            nothing happens (torch skips parameters whose ``grad`` is None).
        """
        self._opt_called = True  # read by the schedulers' order warning
        loss = None
        if callable(grads) and not isinstance(grads, dict) and not hasattr(grads, "items"):
            out = grads()
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("step(closure): the closure must return (loss, grads)")
            loss, grads = out
        if grads is None:
            grads = self._grad_acc
            if grads is None:
                return loss
        rules = self._structure()
        hparams = tuple(self._host_hparams(g, f"param group {i}") for i, g in enumerate(self.param_groups))
        self._sync_structure(rules)
        members_key, members = self._members()
        fn = self._step_fn(rules, members_key, members)
        values = self._binding.get(members)
        with warnings.catch_warnings():
            # when a group's step count turns per-member (skipped parameters), its old scalar
            # buffers cannot be reused for the new vectors: harmless, not worth a warning
            warnings.filterwarnings("ignore", message=_SCALAR_DONATION_WARNING)
            new_values, groups_state, self._count = fn(values, grads, tuple(self._groups_state), self._count, hparams)
        self._binding.set(members, new_values)
        self._groups_state = list(groups_state)
        return loss

    # ------------------------------------------------------------------ placement

    def _shardings_for(self, members, values):
        if self._state_sharding is None:
            return None
        from ..sharding import leaf_shardings

        names = [self._binding.name(m) or str(k) for k, m in enumerate(members)]
        return leaf_shardings(self._state_sharding, names, values)

    def set_state_sharding(self, fn) -> None:
        """Place per-parameter state by ``fn(path, param) -> Sharding | None`` (e.g.
        :func:`groupopt.sharding.zero1`), now and after every step; ``None`` restores the default
        (state sharded like its parameter). Costs one recompilation."""
        old = self._state_sharding
        self._state_sharding = fn
        try:
            new_states = []
            for group, gs in zip(self.param_groups, self._groups_state):
                values = self._binding.get(group["params"])
                sh = self._shardings_for(group["params"], values)
                sh = [v.sharding for v in values] if sh is None else [t for t, _ in sh]
                slots = {n: tuple(jax.device_put(x, t) if t is not None else x for x, t in zip(arrs, sh)) for n, arrs in gs.slots.items()}
                new_states.append(gs._replace(slots=slots))
        except Exception:
            self._state_sharding = old
            raise
        self._groups_state = new_states
        self._step_fns.clear()

    # ------------------------------------------------------------------ pytree mode

    @property
    def params(self):
        """Tree mode: the current parameter tree (the optimizer replaces it at each step)."""
        if not isinstance(self._binding, TreeBinding):
            raise AttributeError("params: this optimizer updates NNX Variables in place; read them from the model")
        return self._binding.tree

    # ------------------------------------------------------------------ state

    def _member_state(self, gi: int, k: int):
        """``(step, scalars, slots)`` of member ``k`` of group ``gi`` (per-member entries picked out)."""
        gs = self._groups_state[gi]
        pick = (lambda v: v[k]) if gs.step.ndim == 1 else (lambda v: v)
        scalars = {n: (pick(v) if jnp.ndim(v) == 1 else v) for n, v in gs.scalars.items()}
        return pick(gs.step), scalars, {n: gs.slots[n][k] for n in gs.slots}

    def _param_state(self, gi: int, k: int) -> dict:
        """torch's per-parameter state dict for member ``k`` of group ``gi`` ({} when torch has none)."""
        rule = self._rules[gi]
        step, scalars, slots = self._member_state(gi, k)
        entry = rule.torch_scalars(step, scalars)
        if entry is None:
            return {}
        for name in rule.slot_names():
            entry[name] = slots[name]
        return entry

    def _group_from_members(self, rule: Rule, group: dict, values: list, members: list, where: str) -> GroupState:
        """A group's core state from per-member ``(step, scalars, slots)`` (None: fresh, torch's lazy state).

        One step count for the group when all members agree, else one per member.
        """
        fresh = init_group_state(GroupConfig(where, rule, {}), self._host_hparams(group, where), values,
                                 self._shardings_for(group["params"], values))
        if all(m is None for m in members):
            return fresh
        steps, scalars, slots = [], [], {n: [] for n in rule.slot_names()}
        for k, m in enumerate(members):
            if m is None:
                steps.append(0)
                scalars.append(dict(fresh.scalars))
                for n in slots:
                    slots[n].append(fresh.slots[n][k])
                continue
            step, sc, sl = m
            steps.append(int(step))
            scalars.append({**fresh.scalars, **sc})
            for n in slots:
                slots[n].append(sl[n])
        rep = fresh.step.sharding if hasattr(fresh.step, "sharding") else None
        if len(set(steps)) == 1 and all(
            all(np.array_equal(np.asarray(s[n]), np.asarray(scalars[0][n])) for n in s) for s in scalars
        ):
            step = jax.device_put(jnp.asarray(steps[0], jnp.int32), rep)
            sc = scalars[0]
        else:
            step = jax.device_put(jnp.asarray(steps, jnp.int32), rep)
            sc = {n: jnp.stack([jnp.asarray(s[n]) for s in scalars]) for n in fresh.scalars}
        return GroupState(step, sc, {n: tuple(v) for n, v in slots.items()})

    @property
    def state(self):
        """Per-parameter state, like torch's ``optimizer.state[param]`` (read-only arrays)."""
        entries = []
        for gi, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                s = self._param_state(gi, k)
                if s:
                    entries.append((p, s))
        return _StateView(entries)

    def _member_names(self) -> list[list]:
        """Each member's stable name: torch's ``param_names``, else its path (None when not known yet)."""
        out = []
        for group in self.param_groups:
            if "param_names" in group:
                out.append(list(group["param_names"]))
            else:
                out.append([self._binding.name(m) for m in group["params"]])
        return out

    def state_dict(self) -> dict:
        """torch's format: ``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``,
        plus ``"param_names": {index: name}`` for every parameter whose name is known.

        The arrays are numpy copies (a snapshot; torch returns live tensors). torch's own
        ``load_state_dict`` ignores the extra key.
        """
        state, groups, names, index = {}, [], {}, 0
        member_names = self._member_names()
        for gi, group in enumerate(self.param_groups):
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            ids = []
            for k in range(len(group["params"])):
                s = self._param_state(gi, k)
                if s:
                    state[index] = {n: np.array(v, copy=True) for n, v in s.items()}
                if member_names[gi][k] is not None:
                    names[index] = member_names[gi][k]
                ids.append(index)
                index += 1
            packed["params"] = ids
            groups.append(packed)
        out = {"state": state, "param_groups": groups}
        if names:
            out["param_names"] = names
        return out

    def _merged_group(self, group: dict, saved: dict, where: str) -> dict:
        merged = {k: v for k, v in saved.items() if k != "params"}
        if "param_names" not in merged and "param_names" in group:
            merged["param_names"] = group["param_names"]
        for k, v in self.defaults.items():
            merged.setdefault(k, v)  # torch's __setstate__ re-adds missing keys
        merged["params"] = group["params"]
        return merged

    def _entry_state(self, rule: Rule, entry: dict, value, idx, where: str):
        """Validate one saved per-parameter entry and turn it into ``(step, scalars, slots)``."""
        entry = {n: _to_numpy(v) for n, v in entry.items()}
        missing = sorted(set(rule.torch_state_keys()) - set(entry))
        if missing:
            raise ValueError(
                f"{where}: saved state of parameter {idx} lacks {missing} (has {sorted(entry)}); "
                f"is it from a different optimizer than {type(self).__name__}?"
            )
        try:
            step, scalars = rule.from_torch_scalars(entry)
        except (TypeError, ValueError) as e:  # e.g. a 'step' that is not a scalar
            raise ValueError(f"{where}: scalar state of parameter {idx} is invalid ({e})") from None
        slots = {}
        for n in rule.slot_names():
            arr = entry[n]
            if tuple(arr.shape) != tuple(value.shape):
                raise ValueError(
                    f"{where}: state {n!r} of parameter {idx} has shape {tuple(arr.shape)}, "
                    f"but the parameter has shape {tuple(value.shape)}"
                )
            if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.complexfloating):
                raise ValueError(f"{where}: state {n!r} of parameter {idx} has dtype {arr.dtype}, expected floating")
            slots[n] = jax.device_put(arr.astype(value.dtype), getattr(value, "sharding", None))
        return step, scalars, slots

    def _saved_names(self, state_dict: dict) -> dict | None:
        """index -> name from our ``param_names`` key or torch's per-group ``param_names``."""
        if state_dict.get("param_names"):
            return {int(k): v for k, v in state_dict["param_names"].items()}
        names = {}
        for g in state_dict["param_groups"]:
            if "param_names" in g:
                names.update(zip(g["params"], g["param_names"]))
        return names or None

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        """Load torch-format state (ours or real torch.optim's, tensors allowed).

        When the saved dict and this optimizer both name their parameters
        (``param_names``, pytree paths, or NNX paths from ``model=`` or learnt at
        the first step), state is matched **by name**: a model edited between
        save and load keeps the moments of the parameters it still has. Missing,
        unexpected and shape-mismatched names are reported together: raised
        (``strict=True``) or returned as a :class:`LoadReport` (``strict=False``,
        missing parameters start fresh). Without names, matching is torch's:
        by position, group by group.

        Everything is checked before anything changes: on error the optimizer
        is exactly as before.
        """
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
        check_saved_groups(self, state_dict)
        saved_names = self._saved_names(state_dict)
        ours = self._member_names()
        if saved_names and all(n is not None for names in ours for n in names):
            return self._load_by_name(state_dict, saved_names, ours, strict)
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        saved_state = state_dict["state"]
        new_groups, new_rules, new_states = [], [], []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            where = f"param group {gi}"
            merged = self._merged_group(group, saved, where)
            rule = self._rule_for(merged, where)
            values = self._binding.get(group["params"])
            members = []
            for k, idx in enumerate(saved["params"]):
                entry = saved_state.get(idx, saved_state.get(str(idx)))
                members.append(None if not entry else self._entry_state(rule, entry, values[k], idx, where))
            new_states.append(self._group_from_members(rule, merged, values, members, where))
            new_groups.append(merged)
            new_rules.append(rule)
        self._commit_groups(new_groups, new_rules, new_states)
        return LoadReport([], [], [])

    def _load_by_name(self, state_dict, saved_names, ours, strict):
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        saved_state = state_dict["state"]
        index_of = {name: idx for idx, name in saved_names.items()}
        flat_ours = [n for names in ours for n in names]
        missing = [n for n in flat_ours if n not in index_of]
        unexpected = [n for n in index_of if n not in set(flat_ours)]
        same_groups = len(saved_groups) == len(self.param_groups)
        # shape check needs the entries: gather them first
        mismatched, plan = [], []
        for gi, group in enumerate(self.param_groups):
            saved = saved_groups[gi] if same_groups else {k: v for k, v in group.items()}
            merged = self._merged_group(group, saved, f"param group {gi}")
            rule = self._rule_for(merged, f"param group {gi}")
            values = self._binding.get(group["params"])
            members = []
            for k, name in enumerate(ours[gi]):
                idx = index_of.get(name)
                entry = None if idx is None else saved_state.get(idx, saved_state.get(str(idx)))
                if entry:
                    shapes = {n: tuple(np.shape(_to_numpy(entry[n]))) for n in rule.slot_names() if n in entry}
                    if any(s != tuple(values[k].shape) for s in shapes.values()):
                        mismatched.append(f"{name}: saved {sorted(set(shapes.values()))[0]}, now {tuple(values[k].shape)}")
                        entry = None
                members.append((entry, idx))
            plan.append((merged, rule, values, members))
        problems = []
        if missing:
            problems.append(f"Missing key(s) in state_dict: {', '.join(repr(n) for n in missing)}.")
        if unexpected:
            problems.append(f"Unexpected key(s) in state_dict: {', '.join(repr(n) for n in unexpected)}.")
        if mismatched:
            problems.append(f"Shape mismatch: {'; '.join(mismatched)}.")
        if not same_groups:
            problems.append(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}: "
                "hyperparameters kept"
            )
        if strict and problems:
            raise ValueError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(problems))
        new_groups, new_rules, new_states = [], [], []
        for gi, (merged, rule, values, members) in enumerate(plan):
            where = f"param group {gi}"
            states = [None if entry is None else self._entry_state(rule, entry, values[k], idx, where)
                      for k, (entry, idx) in enumerate(members)]
            new_states.append(self._group_from_members(rule, merged, values, states, where))
            new_groups.append(merged)
            new_rules.append(rule)
        self._commit_groups(new_groups, new_rules, new_states)
        return LoadReport(missing, unexpected, mismatched)

    def _commit_groups(self, new_groups, new_rules, new_states):
        for group, merged in zip(self.param_groups, new_groups):
            if group is not merged:
                group.clear()
                group.update(merged)
        self._rules = list(new_rules)
        self._groups_state = list(new_states)

    def move_params(self, params, to) -> None:
        """Move parameters to another group, keeping their moments and step counts.

        ``params``: what a group's ``"params"`` may be (module, Variable, list,
        selector). ``to``: a group index, or a dict of hyperparameters for a new
        group. Parameters not in the optimizer yet join with fresh state (as a
        tensor appended to ``group["params"]`` does in torch). Costs one
        recompilation. torch equivalent::

            for p in params: src["params"].remove(p); dst["params"].append(p)  # torch keeps state[p]
        """
        members, _ = self._resolve_members(params, "move_params")
        if isinstance(to, dict):
            new_group = {k: v for k, v in to.items() if k != "params"}
            for k, v in self.defaults.items():
                new_group.setdefault(k, v)
            dest = len(self.param_groups)
        else:
            if not 0 <= to < len(self.param_groups):
                raise IndexError(f"move_params: group {to} out of range: there are {len(self.param_groups)} groups")
            dest = to
        if any("param_names" in g for g in self.param_groups):
            raise ValueError("move_params: groups with param_names are not supported yet; move by rebuilding the groups")
        where_of = {}
        for gi, group in enumerate(self.param_groups):
            for k, m in enumerate(group["params"]):
                where_of[id(m)] = (gi, k)
        carried = {id(m): (where_of.get(id(m)), None if id(m) not in where_of else self._member_state(*where_of[id(m)])) for m in members}
        groups = [dict(g, params=list(g["params"])) for g in self.param_groups]
        if dest == len(groups):
            groups.append(dict(new_group, params=[]))
        moved = {id(m) for m in members}
        states_by_member = {}
        for gi, g in enumerate(groups):
            for k, m in enumerate(g["params"]):
                if gi < len(self.param_groups):
                    states_by_member[id(m)] = self._member_state(gi, k)
        for g in groups:
            g["params"] = [m for m in g["params"] if id(m) not in moved]
        groups[dest]["params"].extend(members)
        new_rules, new_states = [], []
        for gi, g in enumerate(groups):
            where = f"param group {gi}"
            rule = self._rule_for(g, where)
            values = self._binding.get(g["params"])
            states = [states_by_member.get(id(m)) for m in g["params"]]
            if gi < len(self._rules) and rule != self._rules[gi]:
                rule = self._rules[gi]
            new_states.append(self._group_from_members(rule, g, values, states, where))
            new_rules.append(rule)
        if isinstance(self._binding, NNXBinding):
            self._binding.tag(members)
        # commit: the user's group dicts keep their identity
        for gi, g in enumerate(groups):
            if gi < len(self.param_groups):
                self.param_groups[gi]["params"] = g["params"]
            else:
                self.param_groups.append(g)
        self._rules = new_rules
        self._groups_state = new_states

    # ------------------------------------------------------------------ hooks (torch's)

    def register_step_pre_hook(self, hook) -> "hooks.RemovableHandle":
        """``hook(optimizer, args, kwargs) -> None | (new_args, new_kwargs)``, before each ``step``."""
        return hooks.add_hook(self._optimizer_step_pre_hooks, hook)

    def register_step_post_hook(self, hook) -> "hooks.RemovableHandle":
        """``hook(optimizer, args, kwargs)``, after each ``step``."""
        return hooks.add_hook(self._optimizer_step_post_hooks, hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False) -> "hooks.RemovableHandle":
        """``hook(optimizer)``, before ``state_dict`` builds its dict."""
        return hooks.add_hook(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False) -> "hooks.RemovableHandle":
        """``hook(optimizer, state_dict) -> None | new state_dict``, before ``state_dict`` returns."""
        return hooks.add_hook(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False) -> "hooks.RemovableHandle":
        """``hook(optimizer, state_dict) -> None | new state_dict``, before loading."""
        return hooks.add_hook(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False) -> "hooks.RemovableHandle":
        """``hook(optimizer)``, after loading."""
        return hooks.add_hook(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    # ------------------------------------------------------------------ misc

    def report(self, verbose: bool = False) -> str:
        """A table of the groups: rule, hyperparameters, tensors, element count, bytes, sharding."""
        from ..report import describe_groups

        entries = []
        for i, group in enumerate(self.param_groups):
            members = group["params"]
            names = group.get("param_names") or [self._binding.name(m) or f"param {i}.{k}" for k, m in enumerate(members)]
            hps = {k: group[k] for k in self._rule_cls.hyperparams}
            rule = self._rules[i]
            on = [k for k, v in rule.options().items() if v is True and k != "use_momentum"]
            entries.append((str(i), type(self).__name__ + (f"({', '.join(on)})" if on else ""), hps,
                            list(zip(names, self._binding.get(members)))))
        return describe_groups(entries, verbose=verbose)

    def __repr__(self) -> str:
        format_string = self.__class__.__name__ + " ("
        for i, group in enumerate(self.param_groups):
            format_string += "\n"
            format_string += f"Parameter Group {i}\n"
            for key in sorted(group.keys()):
                if key != "params":
                    format_string += f"    {key}: {group[key]}\n"
        format_string += ")"
        return format_string

    def __getstate__(self):
        raise TypeError(
            f"{type(self).__name__} holds live parameters and compiled steps; pickle optimizer.state_dict() instead"
        )


hooks.wrap_class(Optimizer)
