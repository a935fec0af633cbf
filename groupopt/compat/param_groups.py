"""``param_groups(model, groups, overrides)``: torch-style ``param_groups`` from groups and overrides.

The list of dicts a torch user writes by hand for crossed partitions (per-layer
lr x no weight decay for biases and norms), built with the core's resolution
(:mod:`groupopt.overrides`): each group is split into the sub-groups the
overrides induce, a later override wins over an earlier one and over the
group's values, frozen groups (and leaves in no group) are left out -- torch's
"not given to the optimizer". Any compat optimizer (or a torch optimizer,
for torch tensors' analogues) takes the result::

    groups = [groupopt.group(f"blocks/{i}", lr=lrs[i]) for i in range(n)]
    no_decay = groupopt.override(lambda path, leaf: leaf.ndim <= 1, weight_decay=0.0)
    opt = optim.AdamW(optim.param_groups(model, groups, [no_decay]), lr=1e-3, weight_decay=0.05)
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from ..groups import ALL, as_param_tree, flatten_with_paths, is_variable
from ..overrides import Override, resolve
from ..transform import Group, group

__all__ = ["param_groups"]


def _spec(i, spec) -> Group:
    if isinstance(spec, Group):
        if spec.rule is not None:
            raise TypeError(f"group {i}: a compat optimizer has one rule; rule= is for groupopt.grouped")
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        if "params" not in spec:
            raise KeyError("params")
        return group(spec.pop("params"), frozen=spec.pop("frozen", False), name=spec.pop("name", None), **spec)
    raise TypeError(f"group {i} must be a groupopt.group(...) or a dict, got {type(spec).__name__}")


def _accepted(optimizer, extra_keys) -> set | None:
    """The group keys ``optimizer``'s constructor takes (torch's group keys), with ``extra_keys``."""
    if optimizer is None:
        return None
    sig = inspect.signature(optimizer)
    keys = {n for n, p in sig.parameters.items()
            if n not in ("self", "params", "model") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return keys | set(extra_keys)


def param_groups(model, groups: Sequence[Group | dict] | None = None, overrides: Sequence[Override] = (), *,
                 optimizer=None, extra_keys: Sequence[str] = (), param_names: bool = True) -> list[dict]:
    """torch-style ``param_groups`` (a list of dicts) for ``model``, with ``overrides`` resolved.

    Args:
      model: an NNX module (``"params"`` hold its ``nnx.Param`` Variables, as
        torch's hold tensors) or a pytree of arrays (``"params"`` hold its
        arrays: build the optimizer with ``model=`` that tree).
      groups: :func:`groupopt.group` specs or torch-style dicts with a
        ``"params"`` selector (see :mod:`groupopt.groups`); their keyword
        values become the dicts' keys. ``None``: one group with every leaf.
        ``frozen=True`` groups are left out.
      overrides: :func:`groupopt.override` specs (later wins).
      optimizer: a compat (or torch) optimizer class: every key must be one of
        its constructor's keywords or in ``extra_keys``, else ``TypeError``.
        Without it any key passes, as in torch (timm's ``lr_scale``).
      extra_keys: keys allowed besides the optimizer's (e.g. ``"lr_scale"``).
      param_names: add torch's ``"param_names"`` (the ``/``-joined paths).

    Returns:
      One dict per sub-group, in the order of :class:`groupopt.overrides.Resolution`:
      ``{"params": [...], "param_names": [...], **values}`` where ``values``
      are the group's own keys with the overrides' applied; keys set by
      nobody are left for the optimizer's defaults, as in torch.
    """
    specs = [Group(select=ALL)] if groups is None else [_spec(i, s) for i, s in enumerate(groups)]
    if not specs:
        raise ValueError("optimizer got an empty parameter list")
    names = [s.name if s.name is not None else str(i) for i, s in enumerate(specs)]
    accepted = _accepted(optimizer, extra_keys)
    if accepted is not None:
        for i, s in enumerate(specs):
            bad = [k for k in s.hparams if k not in accepted]
            if bad and not s.frozen:
                raise TypeError(f"group {i} ({names[i]}): {optimizer.__name__} has no group key {bad[0]!r} "
                                f"(it takes {sorted(accepted)}; allow more with extra_keys=)")
    tree = as_param_tree(model)
    res = resolve(model, [s.select for s in specs], names, [s.frozen for s in specs], [s.hparams for s in specs],
                  overrides, None if accepted is None else [accepted] * len(specs))
    paths, leaves, _ = flatten_with_paths(tree)
    first: dict[int, str] = {}
    for p, leaf in zip(paths, leaves):
        if not is_variable(leaf) and first.setdefault(id(leaf), p) != p:
            raise ValueError(
                f"the arrays at {first[id(leaf)]!r} and {p!r} are one object: a compat optimizer finds a pytree's "
                "arrays by identity, so give each leaf its own array (or select leaves by path in the groups)"
            )
    out = []
    for g, sg in enumerate(res.subgroups):
        if sg.frozen:
            continue
        members = res.plan.members[g]
        d: dict[str, Any] = {"params": [leaves[i] for i in members]}
        if param_names:
            d["param_names"] = [paths[i] for i in members]
        d.update(sg.values)
        out.append(d)
    if not out:
        raise ValueError("every group is frozen: no parameter to optimize")
    return out
