"""The compat optimizers' ``state_dict`` / ``load_state_dict`` and whole-optimizer export / import.

torch's format: ``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``, plus
``"param_names"`` where names are known. Loads are checked completely before anything changes:
by name when both sides name their parameters, else by position as in torch.

:meth:`StateDictMixin.export_state` / :meth:`StateDictMixin.prepare_import` carry the whole
optimizer (core arrays as they lie, sharded; groups; per-parameter records; a subclass's own
state) for :mod:`groupopt.checkpoint`.

Extension points for subclasses (documented, instead of overriding internals):

* ``_on_load(had_entry)``: after a load; ``had_entry[id(member)]`` says whether the saved dict
  held optimizer state for that member (Adagrad's eager state).
* ``_export_extra()`` / ``_import_extra(extra)``: state outside the groups' arrays, as plain
  Python values (LBFGS's history); ``_import_extra`` validates and returns the function that
  applies it.
* (in :class:`~groupopt.compat.Optimizer`) ``_param_state(gi, k)``: extra torch entries;
  ``_rule_with_state(rule, member_states)``: structure that a parameter's state brings.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import jax
import numpy as np

from ..engine import GroupState
from ..optimizers.base import Rule, slot_zeros
from ..sharding import fit
from . import hooks
from .. import multihost
from .param_state import copy_user_value, to_numpy as _to_numpy
from .validation import check_saved_groups

__all__ = ["LoadReport", "StateDictMixin"]


class LoadReport(NamedTuple):
    """What a name-matched ``load_state_dict(strict=False)`` could not match (like ``nn.Module``'s)."""

    missing_keys: list
    unexpected_keys: list
    mismatched_keys: list


class StateDictMixin:
    """torch's state_dict / load_state_dict over the compat optimizer's groups and records."""

    # ------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict:
        """torch's format: ``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``,
        plus ``"param_names": {index: name}`` for every parameter whose name is known.

        The arrays are numpy copies (a snapshot; torch returns live tensors). The user's own
        per-parameter entries (``state[p]["my_key"]``) are included, as in torch. torch's own
        ``load_state_dict`` ignores the extra ``param_names`` key.
        """
        self._sync_layout()
        state, groups, names, index = {}, [], {}, 0
        member_names = self._member_names()
        for gi, group in enumerate(self.param_groups):
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            ids = []
            for k, m in enumerate(group["params"]):
                # arrays as numpy copies; Python numbers (SparseAdam's int step) as they are, like torch
                s = {n: copy_user_value(v) for n, v in self._param_state(gi, k).items()}
                s.update({n: copy_user_value(v) for n, v in self._records.extra(m).items() if n not in s})
                if s:
                    state[index] = s
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
        shapes = rule.slot_shapes(tuple(value.shape))  # state may be shaped unlike the parameter (Adafactor)
        missing = sorted(set(rule.torch_keys_for(tuple(value.shape))) - set(entry))
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
        sharding = getattr(value, "sharding", None)
        for n in rule.slot_names():
            if n not in shapes:  # absent for this parameter: the engine's placeholder
                slots[n] = slot_zeros(value, None)
                continue
            arr = entry[n]
            if tuple(arr.shape) != tuple(shapes[n]):
                what = "the parameter has shape" if tuple(shapes[n]) == tuple(value.shape) else \
                    f"a parameter of shape {tuple(value.shape)} needs"
                raise ValueError(
                    f"{where}: state {n!r} of parameter {idx} has shape {tuple(arr.shape)}, "
                    f"but {what} {tuple(shapes[n])}"
                )
            if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.complexfloating):
                raise ValueError(f"{where}: state {n!r} of parameter {idx} has dtype {arr.dtype}, expected floating")
            slots[n] = jax.device_put(arr.astype(value.dtype), fit(sharding, arr.shape))
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
        if multihost.active():  # the same dict on every process (values arrive as replicated arrays)
            multihost.agree(f"{type(self).__name__}.load_state_dict", {
                "param_groups": state_dict["param_groups"],
                "state": {str(k): {n: (list(np.shape(v)), str(getattr(v, "dtype", type(v).__name__))) if np.ndim(v) else v
                                   for n, v in entry.items()} for k, entry in state_dict["state"].items()}})
        self._sync_layout()
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
        new_groups, new_rules, new_states, loaded = [], [], [], {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            where = f"param group {gi}"
            merged = self._merged_group(group, saved, where)
            rule = self._rule_for(merged, where)
            values = self._binding.get(group["params"])
            members = []
            for k, idx in enumerate(saved["params"]):
                entry, extra = self._split_entry(rule, saved_state.get(idx, saved_state.get(str(idx))), values[k].shape)
                members.append(None if not entry else self._entry_state(rule, entry, values[k], idx, where))
                loaded[id(group["params"][k])] = (entry, extra)
            new_states.append(self._group_from_members(rule, merged, values, members, where))
            new_groups.append(merged)
            new_rules.append(rule)
        self._commit_groups(new_groups, new_rules, new_states, loaded)
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
        mismatched, plan, loaded = [], [], {}
        for gi, group in enumerate(self.param_groups):
            saved = saved_groups[gi] if same_groups else {k: v for k, v in group.items()}
            merged = self._merged_group(group, saved, f"param group {gi}")
            rule = self._rule_for(merged, f"param group {gi}")
            values = self._binding.get(group["params"])
            members = []
            for k, name in enumerate(ours[gi]):
                idx = index_of.get(name)
                entry, extra = self._split_entry(rule, None if idx is None else saved_state.get(idx, saved_state.get(str(idx))),
                                                 values[k].shape)
                loaded[id(group["params"][k])] = (entry, extra)
                if entry:
                    want = rule.slot_shapes(tuple(values[k].shape))
                    shapes = {n: tuple(np.shape(_to_numpy(entry[n]))) for n in rule.slot_names() if n in entry}
                    if any(n not in want or s != tuple(want[n]) for n, s in shapes.items()):
                        mismatched.append(f"{name}: saved {sorted(set(shapes.values()))[0]}, now {tuple(values[k].shape)}")
                        entry = None
                        loaded[id(group["params"][k])] = ({}, extra)
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
            states = [None if not entry else self._entry_state(rule, entry, values[k], idx, where)
                      for k, (entry, idx) in enumerate(members)]
            new_states.append(self._group_from_members(rule, merged, values, states, where))
            new_groups.append(merged)
            new_rules.append(rule)
        self._commit_groups(new_groups, new_rules, new_states, loaded)
        return LoadReport(missing, unexpected, mismatched)

    def _split_entry(self, rule: Rule, entry, shape):
        """A saved per-parameter entry of a parameter of ``shape`` -> (the optimizer's entries, the user's own)."""
        if not entry:
            return {}, {}
        keys = set(rule.torch_keys_for(tuple(shape)))
        managed = {k: v for k, v in entry.items() if k in keys}
        extra = {k: copy_user_value(v) for k, v in entry.items() if k not in keys}
        return managed, extra

    def _commit_groups(self, new_groups, new_rules, new_states, loaded: dict):
        for group, merged in zip(self.param_groups, new_groups):
            if group is not merged:
                group.clear()
                group.update(merged)
        self._rules = list(new_rules)
        self._groups_state = list(new_states)
        for m in (m for g in self.param_groups for m in g["params"]):
            entry, extra = loaded.get(id(m), ({}, {}))
            if extra or self._records.get(m) is not None:
                self._records.ensure(m).extra = dict(extra)
        self._records.prune()
        self._on_load({k: bool(e) for k, (e, _) in loaded.items()})

    def _on_load(self, had_entry: dict) -> None:
        """Extension point, after a load: ``had_entry[id(member)]`` says whether the saved dict held
        optimizer state for that member (Adagrad: torch's state is then exactly the saved entries)."""

    # ------------------------------------------------------------------ whole-optimizer export / import

    def export_state(self, include_params: bool = False) -> tuple[dict, dict]:
        """Everything this optimizer holds, for checkpoints: ``(arrays, meta)``.

        ``arrays`` is a pytree of arrays as they lie (sharded): per group the step count, rule
        scalars and per-parameter slots, the update counter, the parameters when
        ``include_params``. ``meta`` holds plain Python values: the class, group sizes, every
        ``param_groups`` entry but the parameters, and per parameter (flat group order) the user's
        own entries and flags (:meth:`_export_records`). Subclasses add theirs through
        :meth:`_export_extra` (LBFGS: its history).
        """
        self._sync_layout()
        groups = [{"step": gs.step, "scalars": dict(gs.scalars), "slots": {n: list(v) for n, v in gs.slots.items()}}
                  for gs in self._groups_state]
        arrays = {"count": self._count, "groups": groups}
        if include_params:
            arrays["params"] = [self._binding.get(g["params"]) for g in self.param_groups]
        meta = {
            "optimizer": type(self).__name__,
            "sizes": [len(g["params"]) for g in self.param_groups],
            "param_groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.param_groups],
            "records": self._export_records(),
            "extra": self._export_extra(),
        }
        return arrays, meta

    def _export_records(self) -> list:
        out = []
        for m in (m for g in self.param_groups for m in g["params"]):
            rec = self._records.get(m)
            out.append(None if rec is None else {"extra": {k: copy_user_value(v) for k, v in rec.extra.items()},
                                                 "eager": rec.eager})
        return out

    def _export_extra(self):
        """Extension point: subclass state outside the groups' arrays, as plain Python values."""
        return None

    def _import_extra(self, extra) -> Callable[[], None]:
        """Extension point: validate :meth:`_export_extra`'s value; return the function that applies it."""
        return lambda: None

    def prepare_import(self, arrays: dict, meta: dict, include_params: bool = False, *, owned: bool = False
                       ) -> Callable[[], None]:
        """Check ``(arrays, meta)`` from :meth:`export_state` against this optimizer and return the
        function that applies it. Nothing changes until that function is called, so a caller
        restoring several objects (optimizer, scheduler, model) can check them all first.

        The arrays are copied when applied (the next step donates the optimizer's buffers, and the
        caller's may be in use elsewhere), unless ``owned=True``: the caller hands them over and
        holds them nowhere else (e.g. arrays just read from a checkpoint), and they are used as they
        are -- on a mesh a replicated array's copy costs one per device.

        Raises ``ValueError`` when the checkpoint is of another optimizer class, other group
        sizes, or arrays of other shapes.
        """
        self._sync_layout()
        if meta["optimizer"] != type(self).__name__:
            raise ValueError(f"holds a {meta['optimizer']} optimizer, not a {type(self).__name__}")
        sizes = [len(g["params"]) for g in self.param_groups]
        if list(meta["sizes"]) != sizes:
            raise ValueError(f"has groups of sizes {list(meta['sizes'])}; this optimizer's are {sizes}")
        like, _ = self.export_state(include_params)
        ls, ss = jax.tree.structure(like), jax.tree.structure(arrays)
        if ls != ss:
            raise ValueError(f"holds state of another structure ({ss}) than this optimizer's ({ls})")
        for a, b in zip(jax.tree.leaves(like), jax.tree.leaves(arrays)):
            if tuple(np.shape(a)) != tuple(np.shape(b)):
                raise ValueError(f"holds an array of shape {tuple(np.shape(b))} where this optimizer has {tuple(np.shape(a))}")
        groups = [dict(g) for g in meta["param_groups"]]
        rules = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, groups)):
            merged = dict(saved, params=group["params"])
            rules.append(self._rule_for(merged, f"param group {gi}"))
            self._host_hparams(merged, f"param group {gi}")
        records = meta.get("records") or [None] * sum(sizes)
        if len(records) != sum(sizes):
            raise ValueError(f"has {len(records)} parameter records for {sum(sizes)} parameters")
        apply_extra = self._import_extra(meta.get("extra"))

        def commit():
            # own buffers: the step donates them, and the caller's arrays may be in use elsewhere
            own = arrays if owned else jax.tree.map(
                lambda x: jax.device_put(x, x.sharding, may_alias=False) if isinstance(x, jax.Array) else x, arrays)
            self._count = own["count"]
            self._groups_state = [
                GroupState(g["step"], dict(g["scalars"]), {n: tuple(v) for n, v in g["slots"].items()})
                for g in own["groups"]
            ]
            for group, saved in zip(self.param_groups, groups):
                params = group["params"]
                group.clear()
                group.update(saved)
                group["params"] = params
            self._rules = rules
            members = [m for g in self.param_groups for m in g["params"]]
            for m, r in zip(members, records):
                rec = self._records.get(m)
                if r is None:
                    if rec is not None:
                        rec.extra, rec.eager = {}, False
                    continue
                rec = self._records.ensure(m)
                rec.extra, rec.eager = dict(r.get("extra", {})), bool(r.get("eager", False))
            self._records.prune()
            if include_params:
                for group, values in zip(self.param_groups, own["params"]):
                    self._binding.set(group["params"], list(values))
            apply_extra()

        return commit


hooks.wrap_class(StateDictMixin)
