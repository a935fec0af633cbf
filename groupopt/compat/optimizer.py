"""``groupopt.compat.Optimizer``: torch.optim.Optimizer's face over the grouped core.

This class is bookkeeping only: ``param_groups`` dicts, ``defaults``, the
``state`` view, validation and the ``state_dict`` format. The arithmetic is the
core's (:func:`groupopt.engine.step_groups` with the rule of the subclass).

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

from collections import OrderedDict
import numbers
import sys
import warnings
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..groups import ALL, OfTypeSelector, is_leaf as _is_leaf, is_module as _is_module, is_variable as _is_variable
from ..optimizers.base import Rule, hparam_dtype
from ..sharding import fit, replicated
from ..grad_checks import check_grads, check_trainable, is_sparse as _is_sparse
from ..engine import GroupState, check_per_slice, init_group_state, step_groups
from . import hooks
from .. import multihost
from .state_dict import LoadReport, StateDictMixin
from .param_state import ParamRecords, StateMapping
from .params import NNXBinding, TreeBinding, TreeParam, is_nnx_state, is_tree, make_binding

__all__ = ["Optimizer", "required", "LoadReport"]


def _current_trace():
    """JAX's trace state, as flax compares it before writing into a Variable."""
    from flax.nnx.tracers import current_jax_trace

    return current_jax_trace()


_HOST_TRACE = _current_trace()  # outside any transformation (this module is imported at the top level)

_SCALAR_DONATION_WARNING = r"Some donated buffers were not usable: (?:(?:bool|[a-z]+\d+)\[\](?:, )?)+\.?\s"


def _add_grads(a, b):
    """``a + b`` as torch's ``backward()`` adds into ``.grad``: two sparse gradients (BCOO) are
    concatenated (torch keeps the sum uncoalesced; duplicates are summed at the step); a sparse
    and a dense one add up to a dense one."""
    if not (_is_sparse(a) or _is_sparse(b)):
        return jnp.add(a, b)
    if _is_sparse(a) and _is_sparse(b) and type(a) is type(b) and hasattr(a, "n_batch") and \
            (a.shape, a.n_batch, a.n_dense) == (b.shape, b.n_batch, b.n_dense):
        ax = a.n_batch
        return type(a)((jnp.concatenate([a.data, b.data], ax), jnp.concatenate([a.indices, b.indices], ax)), shape=a.shape)
    dense = lambda x: x.todense() if _is_sparse(x) else x  # noqa: E731
    return dense(a) + dense(b)


def _zero_grad(g):
    """torch's ``grad.zero_()``: zeros, or for a sparse gradient no entries at all (nothing touched)."""
    if not _is_sparse(g):
        return jnp.zeros_like(g)
    n = g.n_batch
    return type(g)((g.data[(slice(None),) * n + (slice(0, 0),)], g.indices[(slice(None),) * n + (slice(0, 0),)]), shape=g.shape)


def _placement(x) -> str:
    """Where an array lies, the same text on every process: its mesh axes and partition spec."""
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
        return f"{dict(s.mesh.shape)} {s.spec}"
    return f"{type(s).__name__} on {len(getattr(s, 'device_set', ()))} device(s)"


class _RequiredParameter:
    """Singleton class representing a required parameter for an Optimizer."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _RequiredParameter()


def _typename(x) -> str:
    if isinstance(x, (bool, int, float, str)):
        return type(x).__name__
    return f"{type(x).__module__}.{type(x).__name__}" if type(x).__module__ != "builtins" else type(x).__name__


class Optimizer(StateDictMixin):
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
        self._records = ParamRecords()  # per-parameter records: user keys, detached state, eager flags
        self._layout: tuple = ()  # per group, the ids of the members the core state is laid out for
        self._layout_members: list[list] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(member) -> (group, position)
        self._grad_acc = None
        self._adder = jax.jit(lambda a, b: jax.tree.map(_add_grads, a, b, is_leaf=_is_sparse))
        self.num_compiles = 0
        self._state_sharding = None
        self._steps_called = 0  # steps that reached the multi-process check (its step count)

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
        elif isinstance(params, (str, jax.Array, OfTypeSelector)) or callable(params) and not hasattr(params, "__iter__"):
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
        self._sync_layout()
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
        if not members and not isinstance(params, (list, tuple)):
            # torch accepts an empty group; a selector that matches nothing is most likely a typo
            warnings.warn(f"{where}: {params!r} selects no parameter; the group is empty", stacklevel=2)
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
        if multihost.active():  # before the group's state is placed (a collective in jax.device_put)
            multihost.agree(f"{type(self).__name__}.add_param_group", {
                "group": {k: v for k, v in candidate.items() if k != "params"}, "hparams": hp,
                "params": [(self._binding.name(m) or k, list(np.shape(v)), str(v.dtype)) for k, (m, v) in enumerate(zip(members, values))]})
        self._check_values(members, values, where)
        check_per_slice(self._numbers(candidate, where), values,
                         [self._binding.name(m) or f"parameter {k}" for k, m in enumerate(members)], where)
        # a parameter removed from its group earlier still has its state (torch's state[p]): it resumes
        carried = [None if (r := self._records.get(m)) is None or r.detached is None else r.detached[1] for m in members]
        if any(c is not None for c in carried):
            gstate = self._group_from_members(self._rule_with_state(rule, carried), candidate, values, carried, where)
        else:
            gstate = init_group_state(rule, hp, values, self._shardings_for(members, values))
        # commit (the user's dict becomes the group, as in torch)
        if isinstance(self._binding, NNXBinding):
            self._binding.tag(members)
        param_group.clear()
        param_group.update(candidate)
        self.param_groups.append(param_group)
        rep = replicated(values)
        if rep is not None:  # keep the step counter where the jitted step puts it: no retrace
            self._count = jax.device_put(self._count, rep)
        self._rules.append(self._rule_with_state(rule, carried))
        self._groups_state.append(gstate)
        for m in members:
            rec = self._records.get(m)
            if rec is not None:  # re-added after removal: torch's state[p] is still there
                rec.detached = None
        self._set_layout()

    def _check_values(self, members, values, where: str) -> None:
        """Parameters must be live floating arrays (torch: only floating tensors can require gradients)."""
        for k, (m, v) in enumerate(zip(members, values)):
            if getattr(v, "is_deleted", lambda: False)():
                raise ValueError(
                    f"{where}: parameter {k} ({self._binding.name(m) or type(m).__name__}) is a deleted array "
                    "(its buffer was donated to an earlier step): build the optimizer from the current parameters"
                )
        check_trainable([self._binding.name(m) or f"parameter {k}" for k, m in enumerate(members)], values, where,
                        hint="leave them out of the optimizer")

    # ------------------------------------------------------------------ layout (state follows each parameter)

    def _layout_key(self) -> tuple:
        return tuple(tuple(map(id, g["params"])) for g in self.param_groups)

    def _set_layout(self) -> None:
        """Record that the core state is now laid out for the current ``param_groups``."""
        self._layout = self._layout_key()
        self._layout_members = [list(g["params"]) for g in self.param_groups]
        self._where = {id(m): (gi, k) for gi, ms in enumerate(self._layout_members) for k, m in enumerate(ms)}

    def _sync_layout(self) -> None:
        """Follow torch-style edits of ``param_groups``: ``del``/``append``/``insert``/reordering of a
        group's ``"params"`` list, moving a parameter between groups, deleting a group.

        As in torch, state follows each parameter: a moved parameter keeps its state, a new one starts
        fresh, and one removed from every group keeps its state aside (re-adding it resumes from it).
        Costs one recompilation. Everything is checked before anything changes.
        """
        key = self._layout_key()
        if key == self._layout:
            return
        seen: dict[int, int] = {}
        for gi, g in enumerate(self.param_groups):
            where = f"param group {gi}"
            for m in g["params"]:
                self._binding.check_member(m, where)
                if id(m) in seen:
                    raise ValueError("some parameters appear in more than one parameter group")
                seen[id(m)] = gi
            self._check_values(list(g["params"]), self._binding.get(list(g["params"])), where)
        old = {}
        for gi, ms in enumerate(self._layout_members):
            for k, m in enumerate(ms):
                old[id(m)] = (self._rules[gi], self._member_state(gi, k))
        new_rules, new_states = [], []
        for gi, g in enumerate(self.param_groups):
            where = f"param group {gi}"
            members = list(g["params"])
            states = []
            for m in members:
                if id(m) in old:
                    states.append(old[id(m)][1])
                else:
                    rec = self._records.get(m)
                    states.append(None if rec is None or rec.detached is None else rec.detached[1])
            rule = self._rule_with_state(self._rule_for(g, where), states)
            values = self._binding.get(members)
            new_states.append(self._group_from_members(rule, g, values, states, where))
            new_rules.append(rule)
        # commit
        if isinstance(self._binding, NNXBinding):
            self._binding.tag([m for g in self.param_groups for m in g["params"]])
        for ms in self._layout_members:
            for m in ms:
                if id(m) not in seen:  # removed from every group: torch keeps state[p] (own buffers: the
                    rule, (step, scalars, slots) = old[id(m)]  # group's are donated at the next step)
                    own = (jnp.array(step), {n: jnp.array(v) for n, v in scalars.items()}, slots)
                    self._records.ensure(m).detached = (rule, own)
        for g in self.param_groups:
            for m in g["params"]:
                rec = self._records.get(m)
                if rec is not None:
                    rec.detached = None
        self._records.prune()
        self._rules, self._groups_state = new_rules, new_states
        self._set_layout()

    def _rule_with_state(self, rule: Rule, member_states: list) -> Rule:
        """Extension point: the rule for a group whose members bring ``member_states`` (SGD keeps a
        momentum buffer that exists)."""
        return rule

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
                # None where torch's default is None: an optional value the rule resolves (Adafactor's eps1)
                out[k] = tuple(None if x is None and dx is None else self._number(x, f"{where}: {k}")
                               for x, dx in zip(v, default))
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
        return float(np.asarray(v).reshape(())) if hasattr(v, "shape") else float(v)

    def _host_hparams(self, group: dict, where: str) -> dict:
        dt = np.dtype(hparam_dtype())
        out = {}
        for k, v in self._numbers(group, where).items():
            out[k] = tuple(np.asarray(np.nan if x is None else x, dt) for x in v) if isinstance(v, tuple) else np.asarray(v, dt)
        return out

    # ------------------------------------------------------------------ step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients summed by :meth:`accumulate_grad` (torch: ``p.grad = None``).

        ``set_to_none=False`` keeps them as zeros (torch zeroes ``.grad`` in place): the next
        ``step()`` is then a real step on zero gradients (weight decay and momentum still act).
        """
        if set_to_none or self._grad_acc is None:
            self._grad_acc = None
        else:
            self._grad_acc = jax.tree.map(_zero_grad, self._grad_acc, is_leaf=_is_sparse)

    def accumulate_grad(self, grads) -> None:
        """Add ``grads`` to the pending gradients, as torch's ``backward()`` adds into ``.grad``."""
        self._grad_acc = grads if self._grad_acc is None else self._adder(self._grad_acc, grads)

    @property
    def accumulated_grads(self):
        """The gradients summed by :meth:`accumulate_grad` since the last :meth:`zero_grad`
        (torch's ``.grad``), or ``None``: what ``step()`` with no argument uses.

        Assigning replaces them -- e.g. with clipped ones (``groupopt.compat.clip_grad_norm_(opt,
        1.0)`` does this); ``None`` forgets them. While some are held, the new tree must have
        the same structure, shapes and dtypes (checked before anything changes).
        """
        return self._grad_acc

    @accumulated_grads.setter
    def accumulated_grads(self, grads) -> None:
        old = self._grad_acc
        if grads is not None and old is not None:
            spec = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)  # noqa: E731
            if jax.tree.structure(grads) != jax.tree.structure(old) or spec(grads) != spec(old):
                raise ValueError(
                    "accumulated_grads: the new gradients must have the structure, shapes and dtypes of the "
                    f"accumulated ones ({jax.tree.structure(old)}); got {jax.tree.structure(grads)}"
                )
        self._grad_acc = grads

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
            fresh = init_group_state(new, self._host_hparams(group, f"param group {i}"), self._binding.get(group["params"]))
            gs = self._groups_state[i]
            slots = {n: gs.slots[n] if n in gs.slots else fresh.slots[n] for n in new.slot_names()}
            scalars = {n: gs.scalars[n] if n in gs.scalars else fresh.scalars[n] for n in fresh.scalars}
            self._groups_state[i] = GroupState(gs.step, scalars, slots)
            self._rules[i] = new

    def _member_labels(self, members) -> list[str]:
        names = self._flat_names()
        return [n if n is not None else f"parameter {k}" for k, n in enumerate(names)]

    def _step_key(self, rules, members_key) -> tuple:
        return (tuple(rules), members_key, id(self._state_sharding))

    def _agree_across_processes(self, rules: list, hparams: tuple) -> None:
        """With several processes (``jax.distributed``): every process must step the same optimizer with the
        same hyperparameters (host values the jitted step takes as replicated). Compared across processes
        (:func:`groupopt.multihost.agree`) when the step compiles -- groups, parameters, shapes, dtypes,
        shardings, options -- and every ``multihost.configure(check_every=n)`` steps -- hyperparameters and
        step count --, before anything changes and before any device work (a process that went its own
        way must not be left waiting in a collective the others never join)."""
        self._steps_called += 1
        compiles = self._step_key(rules, self._layout_key()) not in self._step_fns  # the step _step_fn will look up
        every = multihost.settings().check_every
        if not compiles and not (every and self._steps_called % every == 0):
            return
        config = {"optimizer": type(self).__name__, "steps": self._steps_called, "hparams": list(hparams)}
        if compiles:
            members = [m for g in self.param_groups for m in g["params"]]
            values = self._binding.get(members)
            config["groups"] = [{"rule": r, "size": len(g["params"])} for r, g in zip(rules, self.param_groups)]
            config["params"] = [(self._binding.name(m) or k, list(np.shape(v)), str(v.dtype), _placement(v))
                                for k, (m, v) in enumerate(zip(members, values))]
            fn = self._state_sharding
            config["state_sharding"] = None if fn is None else getattr(fn, "__qualname__", type(fn).__qualname__)
        multihost.agree(f"{type(self).__name__}.step" + (" (compiling)" if compiles else ""), config)

    def _step_fn(self, rules, members_key, members):
        """The jitted step for this structure. Gradients are matched to members while tracing, from
        the gradient tree's structure, so a new gradient structure simply retraces (jit's own cache)."""
        key = self._step_key(rules, members_key)
        fn = self._step_fns.get(key)
        if fn is not None:
            return fn
        starts = np.cumsum([0] + [len(g["params"]) for g in self.param_groups])
        index_lists = [list(range(starts[g], starts[g + 1])) for g in range(len(self.param_groups))]
        shardings = None
        if self._state_sharding is not None:
            shardings = self._shardings_for(members, self._binding.get(members))
        binding = self._binding
        names = self._member_labels(members)

        def step(values, grad_leaves, groups_state, count, hparams, grad_def):
            self.num_compiles += 1  # runs once per trace, i.e. per compilation
            grads = jax.tree.unflatten(grad_def, grad_leaves)
            # a member without a gradient (None) is skipped, as torch skips p.grad is None
            idx = binding.grad_indices(grads, members, allow_missing=True)
            leaves = jax.tree.leaves(grads, is_leaf=_is_leaf)
            leaves = [x.get_value() if _is_variable(x) else x for x in leaves]
            sel = [None if i is None else leaves[i] for i in idx]
            check_grads(names, sel, values, where="step(grads)", rules=[rules[g] for g, ix in enumerate(index_lists) for _ in ix])
            new_values, new_groups = step_groups(rules, hparams, groups_state, index_lists, sel, values, shardings)
            return new_values, new_groups, count + 1

        # the gradients come flat, their structure static: step() flattens them anyway (to check them), and a
        # flat list plus a static structure is cheaper for jit's dispatch than the nested dict (2001 leaves:
        # 1.32 ms a call against 1.44-1.52 ms, flattening included)
        fn = self._step_fns[key] = jax.jit(step, donate_argnums=(0, 2), static_argnums=(5,))
        return fn

    def step(self, grads=None):
        """One optimizer step.

        Args:
          grads: the model's gradients, or a closure returning ``(loss, grads)``
            (its loss is returned, as in torch), or ``None`` to use the
            gradients gathered by :meth:`accumulate_grad`; with none gathered,
            nothing happens (torch skips parameters whose ``grad`` is None).
            Gradients are checked before anything changes: each must have its
            parameter's shape and dtype, and in tree mode every path must be a
            parameter's.
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
        grad_leaves, grad_def = jax.tree.flatten(grads)
        if not grad_leaves:
            return loss  # every gradient is None (a Variable holding None has no leaves): torch's step does nothing
        self._refuse_traced(grad_leaves)
        rules = self._structure()  # host work only, from param_groups
        hparams = tuple(self._host_hparams(g, f"param group {i}") for i, g in enumerate(self.param_groups))
        if multihost.active():
            self._agree_across_processes(rules, hparams)  # before any device work: a divergent process must not wait in one
        self._sync_layout()
        self._sync_structure(rules)
        members = [m for ms in self._layout_members for m in ms]
        fn = self._step_fn(rules, self._layout, members)
        values = self._binding.get(members)
        self._refuse_traced(values, "the parameters are tracers")
        self._unshare(values)
        with warnings.catch_warnings():
            # when a group's step count turns per-member (skipped parameters), its old scalar
            # buffers cannot be reused for the new vectors: harmless, not worth a warning
            warnings.filterwarnings("ignore", message=_SCALAR_DONATION_WARNING)
            new_values, groups_state, self._count = fn(values, grad_leaves, tuple(self._groups_state), self._count, hparams,
                                                       grad_def)
        self._binding.set(members, new_values)
        self._groups_state = list(groups_state)
        return loss

    def _refuse_traced(self, leaves, what: str = "the gradients are tracers") -> None:
        """``step`` is a host-side call that writes into the model: under ``nnx.jit``, ``jax.jit``,
        ``jax.grad`` or ``vmap`` (a tracer among the gradients or the parameters) it would fail deep
        in flax, or keep a tracer. Refused first, with the path that does work under a transformation.
        Called on the gradient leaves, then on the parameter values ``step`` reads anyway."""
        where = None
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            where = what
        elif _current_trace() != _HOST_TRACE:
            where = "the step is being traced"
        if where is not None:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called under a JAX transformation (nnx.jit, jax.jit, "
                f"jax.grad, vmap, ...): {where}. The compat optimizer's step runs on the host (it "
                "jits its own update) and writes into the model, so call it outside the transformation. To "
                "train inside a jitted step, use the functional core: tx = groupopt.grouped(model, groups, "
                "rule=...) with tx.apply / tx.update, or nnx.Optimizer(model, tx, wrt=nnx.Param) inside "
                "nnx.jit (see docs/nnx_optimizer.md). Nothing was changed.")

    def _unshare(self, values: list) -> None:
        """Parameter buffers are donated to the step (no second copy of the model in memory). A buffer
        that something else also holds -- another parameter (two Variables set from one array), an
        ``nnx.clone`` of the model (an EMA / teacher copy shares the arrays), the user's own
        reference -- is copied first, so that holder keeps a valid array and each parameter steps
        on its own."""
        seen: set = set()
        held = self._binding.refs_held
        for k in range(len(values)):
            if id(values[k]) in seen or sys.getrefcount(values[k]) > held:
                values[k] = jnp.copy(values[k])
            seen.add(id(values[k]))

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
        self._sync_layout()
        old = self._state_sharding
        self._state_sharding = fn
        try:
            new_states = []
            for group, gs in zip(self.param_groups, self._groups_state):
                values = self._binding.get(group["params"])
                sh = self._shardings_for(group["params"], values)
                sh = [v.sharding for v in values] if sh is None else [t for t, _ in sh]
                slots = {n: tuple(jax.device_put(x, fit(t, x.shape)) if t is not None else x for x, t in zip(arrs, sh))
                         for n, arrs in gs.slots.items()}
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
        """torch's per-parameter state dict for member ``k`` of group ``gi`` ({} when torch has none).

        Extension point: a subclass may add entries torch has that the core does not count as
        state (Adagrad's eager state before the first step)."""
        return self._entry_from(self._rules[gi], self._member_state(gi, k), self._shape_of(self._layout_members[gi][k]))

    def _shape_of(self, member) -> tuple:
        return tuple(self._binding.get([member])[0].shape)

    @staticmethod
    def _entry_from(rule: Rule, member_state, shape=None) -> dict:
        """torch's entry from ``(step, scalars, slots)``: the slots a parameter of ``shape`` has
        (:meth:`Rule.slot_shapes`; ``None``: every slot)."""
        step, scalars, slots = member_state
        entry = rule.torch_scalars(step, scalars)
        if entry is None:
            return {}
        for name in (rule.slot_names() if shape is None else rule.slot_shapes(shape)):
            entry[name] = slots[name]
        return entry

    def _group_from_members(self, rule: Rule, group: dict, values: list, members: list, where: str) -> GroupState:
        """A group's core state from per-member ``(step, scalars, slots)`` (None: fresh, torch's lazy state).

        One step count for the group when all members agree, else one per member. A slot that a
        member's state lacks (it comes from a group with other options) starts fresh.
        """
        fresh = init_group_state(rule, self._host_hparams(group, where), values,
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
            scalars.append({**fresh.scalars, **{n: v for n, v in sc.items() if n in fresh.scalars}})
            for n in slots:
                slots[n].append(sl[n] if n in sl else fresh.slots[n][k])
        rep = fresh.step.sharding if hasattr(fresh.step, "sharding") else None
        if len(set(steps)) == 1 and all(
            all(np.array_equal(np.asarray(s[n]), np.asarray(scalars[0][n])) for n in s) for s in scalars
        ):
            step = jax.device_put(jnp.asarray(steps[0], jnp.int32), rep)
            sc = {n: jnp.array(v) for n, v in scalars[0].items()}  # own buffers: members' scalars may be shared
        else:
            step = jax.device_put(jnp.asarray(steps, jnp.int32), rep)
            sc = {n: jnp.stack([jnp.asarray(s[n]) for s in scalars]) for n in fresh.scalars}
        return GroupState(step, sc, {n: tuple(v) for n, v in slots.items()})

    # ------------------------------------------------------------------ optimizer.state (torch's mapping)

    @property
    def state(self) -> StateMapping:
        """torch's ``optimizer.state``: ``state[p]`` is the parameter's state dict.

        Optimizer keys (``exp_avg``, ``step``, ...) read the current arrays and can be replaced
        (same shape); any other key is the user's: kept, exported by :meth:`state_dict` and loaded
        back by :meth:`load_state_dict`, as in torch. ``del state[p]`` resets the parameter's state.
        """
        self._sync_layout()
        return StateMapping(self)

    def _state_params(self) -> list:
        """Parameters that may have state: the members (group order), then removed ones with state."""
        out = [m for ms in self._layout_members for m in ms]
        out += [r.param for r in self._records.records() if id(r.param) not in self._where]
        return out

    def _torch_entry(self, param) -> dict:
        self._sync_layout()
        pos = self._where.get(id(param))
        if pos is not None and self._layout_members[pos[0]][pos[1]] is param:
            return self._param_state(*pos)
        rec = self._records.get(param)
        if rec is not None and rec.detached is not None:
            return self._entry_from(*rec.detached, self._shape_of(param))
        return {}

    def _managed_keys(self, param) -> tuple:
        pos = self._where.get(id(param))
        if pos is not None:
            return self._rules[pos[0]].torch_keys_for(self._shape_of(param))
        rec = self._records.get(param)
        return rec.detached[0].torch_keys_for(self._shape_of(param)) if rec is not None and rec.detached is not None else ()

    def _set_torch_entry(self, param, key, value) -> None:
        """``state[p][key] = value`` for an optimizer key: validated like a loaded entry, then applied."""
        self._sync_layout()
        pos = self._where.get(id(param))
        if pos is None:
            raise KeyError(f"{key!r}: this parameter is in no group of the optimizer; its state cannot be edited")
        gi, k = pos
        entry = dict(self._param_state(gi, k))
        if not entry:
            raise KeyError(f"{key!r}: the parameter has no optimizer state yet (it is created at its first step)")
        entry[key] = value
        rule, group = self._rules[gi], self.param_groups[gi]
        values = self._binding.get(group["params"])
        where = f"param group {gi}"
        member = self._entry_state(rule, entry, values[k], k, where)
        states = [self._member_state(gi, j) if j != k else member for j in range(len(values))]
        self._groups_state[gi] = self._group_from_members(rule, group, values, states, where)

    def _reset_param_state(self, param) -> None:
        """``del optimizer.state[p]``: the parameter starts afresh at its next step (torch re-creates it)."""
        self._sync_layout()
        pos = self._where.get(id(param))
        rec = self._records.get(param)
        if pos is None and rec is None:
            raise KeyError(param)
        if pos is not None:
            gi, k = pos
            group = self.param_groups[gi]
            values = self._binding.get(group["params"])
            states = [self._member_state(gi, j) if j != k else None for j in range(len(values))]
            self._groups_state[gi] = self._group_from_members(self._rules[gi], group, values, states, f"param group {gi}")
        if rec is not None:
            rec.extra, rec.detached, rec.eager = {}, None, False
            self._records.prune()

    # ------------------------------------------------------------------ names

    def _member_names(self) -> list[list]:
        """Each member's stable name: torch's ``param_names``, else its path from the model (None when
        unknown: no ``model=`` and parameters given as submodules or Variables). Never from gradients."""
        out = []
        for group in self.param_groups:
            if "param_names" in group and len(group["param_names"]) == len(group["params"]):
                out.append(list(group["param_names"]))
            else:
                out.append([self._binding.name(m) for m in group["params"]])
        return out

    def _flat_names(self) -> list:
        return [n for names in self._member_names() for n in names]

    def move_params(self, params, to) -> None:
        """Move parameters to another group, keeping their moments and step counts.

        ``params``: what a group's ``"params"`` may be (module, Variable, list,
        selector). ``to``: a group index, or a dict of hyperparameters for a new
        group. Parameters not in the optimizer yet join with fresh state (as a
        tensor appended to ``group["params"]`` does in torch). Costs one
        recompilation. torch equivalent::

            for p in params: src["params"].remove(p); dst["params"].append(p)  # torch keeps state[p]
        """
        self._sync_layout()
        members, _ = self._resolve_members(params, "move_params")
        self._check_values(members, self._binding.get(members), "move_params")
        if isinstance(to, dict):
            new_group = {k: v for k, v in to.items() if k != "params"}
            for k, v in self.defaults.items():
                new_group.setdefault(k, v)
        elif not 0 <= to < len(self.param_groups):
            raise IndexError(f"move_params: group {to} out of range: there are {len(self.param_groups)} groups")
        if any("param_names" in g for g in self.param_groups):
            raise ValueError("move_params: groups with param_names are not supported yet; move by rebuilding the groups")
        # torch's list surgery, then the same re-layout as any edit of param_groups (state follows each parameter)
        saved_lists = [g["params"] for g in self.param_groups]
        moved = {id(m) for m in members}
        try:
            for g in self.param_groups:
                g["params"] = [m for m in g["params"] if id(m) not in moved]
            if isinstance(to, dict):
                self.param_groups.append(dict(new_group, params=list(members)))
            else:
                self.param_groups[to]["params"].extend(members)
            self._sync_layout()
        except Exception:
            if len(self.param_groups) > len(saved_lists):
                self.param_groups.pop()
            for g, lst in zip(self.param_groups, saved_lists):
                g["params"] = lst
            raise

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

        self._sync_layout()
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
