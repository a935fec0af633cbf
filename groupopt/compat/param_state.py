"""Per-parameter records and ``optimizer.state``: state keyed by the parameter, as in torch.

torch keeps ``optimizer.state`` as a ``defaultdict`` keyed by the tensor: the
state follows the tensor wherever it moves in ``param_groups``, a tensor
removed from every group keeps its state (re-adding it resumes from it), and
users may store their own entries (``state[p]["my_key"] = v``), which
``state_dict()`` exports and ``load_state_dict`` loads back.

Here the arrays of the members of each group live in the core's per-group
state (:class:`groupopt.engine.GroupState`: what the jitted step reads and
writes). :class:`ParamRecords` is the one owner of everything else that
belongs to a parameter, keyed by the parameter object's identity:

* ``extra``: the user's own entries (any key torch's optimizer does not use);
* ``detached``: the core state of a parameter that was removed from every
  group, kept so that re-adding it resumes from it (torch's behaviour);
* ``eager``: torch holds state for it before its first step (Adagrad's
  constructor parameters).

:class:`StateMapping` is ``optimizer.state``; :class:`ParamStateView` is
``optimizer.state[p]``: reading an optimizer key (``exp_avg``, ``step``, ...)
gives the current array; writing one replaces it (shape checked); any other
key is the user's and is kept in the record.
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Any

import jax
import numpy as np

__all__ = ["Record", "ParamRecords", "StateMapping", "ParamStateView", "StateSnapshot", "copy_user_value", "to_numpy"]


class Record:
    """What the optimizer keeps about one parameter besides its live group state."""

    __slots__ = ("param", "extra", "detached", "eager")

    def __init__(self, param):
        self.param = param  # a strong reference: identity keys stay valid while the record exists
        self.extra: dict = {}
        self.detached = None  # (step, scalars, slots) while the parameter is in no group
        self.eager = False

    def empty(self) -> bool:
        return not self.extra and self.detached is None and not self.eager


class ParamRecords:
    """Records keyed by parameter identity (``id``), holding the parameter itself."""

    def __init__(self):
        self._by_id: dict[int, Record] = {}

    def get(self, param) -> Record | None:
        rec = self._by_id.get(id(param))
        return rec if rec is not None and rec.param is param else None

    def ensure(self, param) -> Record:
        rec = self.get(param)
        if rec is None:
            rec = self._by_id[id(param)] = Record(param)
        return rec

    def extra(self, param) -> dict:
        rec = self.get(param)
        return {} if rec is None else rec.extra

    def prune(self) -> None:
        for k in [k for k, r in self._by_id.items() if r.empty()]:
            del self._by_id[k]

    def records(self):
        return list(self._by_id.values())

    def snapshot(self):
        """A copy to restore after a failed multi-step change."""
        out = ParamRecords()
        for k, r in self._by_id.items():
            c = Record(r.param)
            c.extra, c.detached, c.eager = dict(r.extra), r.detached, r.eager
            out._by_id[k] = c
        return out


def to_numpy(x):
    """numpy copy of an array-like (jax, numpy or a torch tensor: torch is never imported here)."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor: copy, never alias its live memory
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def copy_user_value(v):
    """A snapshot of a user entry for ``state_dict()`` (arrays become numpy copies, the rest deep copies)."""
    if hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, np.generic):
        return to_numpy(v)
    return copy.deepcopy(v)


class ParamStateView(MutableMapping):
    """``optimizer.state[p]``: torch's per-parameter state dict for one parameter."""

    def __init__(self, opt, param):
        self._opt, self._param = opt, param

    def _managed(self) -> dict:
        return self._opt._torch_entry(self._param)

    def __getitem__(self, key):
        managed = self._managed()
        if key in managed:
            # a copy: the live array is donated to the next step, this one stays valid
            v = managed[key]
            return jax.device_put(v, v.sharding, may_alias=False) if isinstance(v, jax.Array) else v
        return self._opt._records.extra(self._param)[key]

    def __setitem__(self, key, value):
        if key in self._opt._managed_keys(self._param):
            self._opt._set_torch_entry(self._param, key, value)
        else:
            self._opt._records.ensure(self._param).extra[key] = value

    def __delitem__(self, key):
        if key in self._opt._managed_keys(self._param):
            raise KeyError(
                f"{key!r} is managed by the optimizer; `del optimizer.state[p]` resets the parameter's whole state"
            )
        rec = self._opt._records.get(self._param)
        if rec is None or key not in rec.extra:
            raise KeyError(key)
        del rec.extra[key]
        self._opt._records.prune()

    def __iter__(self):
        managed = self._managed()
        yield from managed
        yield from (k for k in self._opt._records.extra(self._param) if k not in managed)

    def __len__(self):
        return len(set(self._managed()) | set(self._opt._records.extra(self._param)))

    def __repr__(self):
        return repr(dict(self.items()))

    def __eq__(self, other):
        return isinstance(other, (dict, MutableMapping)) and dict(self.items()) == dict(other.items())


class StateMapping(MutableMapping):
    """``optimizer.state``: ``{parameter: per-parameter state}``, like torch's ``defaultdict(dict)``.

    ``state[p]`` for a parameter without state is an empty view (writing a user
    key into it creates the entry, as in torch); iteration yields the parameters
    that have state, in group order.
    """

    def __init__(self, opt):
        self._opt = opt

    def __getitem__(self, param) -> ParamStateView:
        return ParamStateView(self._opt, param)

    def __setitem__(self, param, value: Any):
        if not isinstance(value, (dict, MutableMapping)):
            raise TypeError(f"optimizer.state[p] must be a dict, got {type(value).__name__}")
        view = ParamStateView(self._opt, param)
        value = dict(value.items())
        managed = self._opt._managed_keys(param)
        for k, v in value.items():
            if k in managed:
                view[k] = v
        rec = self._opt._records.ensure(param)
        rec.extra = {k: v for k, v in value.items() if k not in managed}
        self._opt._records.prune()

    def __delitem__(self, param):
        self._opt._reset_param_state(param)

    def _params(self):
        return [p for p in self._opt._state_params() if len(ParamStateView(self._opt, p))]

    def __iter__(self):
        return iter(self._params())

    def __len__(self):
        return len(self._params())

    def __contains__(self, param):
        return any(p is param for p in self._params())

    def keys(self):
        return self._params()

    def values(self):
        return [ParamStateView(self._opt, p) for p in self._params()]

    def items(self):
        return [(p, ParamStateView(self._opt, p)) for p in self._params()]

    def __repr__(self):
        return f"OptimizerState({len(self)} parameters with state)"


class StateSnapshot(dict):
    """A read-only ``optimizer.state`` of fixed entries ``[(param, state dict)]``, keyed by identity
    (LBFGS keeps all its state under the first parameter, as torch does)."""

    def __init__(self, entries: list):
        super().__init__()
        self._entries = entries

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
