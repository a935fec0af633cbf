"""A printable table of how parameters are assigned to groups.

``groupopt.report(tx, params)`` for a grouped transformation, or
``optimizer.report()`` for a compat optimizer: one row per group with its
rule, hyperparameters, member count, element count, bytes and shardings, then
the member paths (``verbose=True``) and the leaves in no group. With
overrides (:mod:`groupopt.overrides`), a value an override set is marked
``key=value <override name>`` and the overrides are listed after the table.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .groups import as_param_tree, flatten_with_paths

__all__ = ["report", "format_table"]


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if callable(v):
        return getattr(v, "__name__", "schedule")
    if isinstance(v, np.ndarray):
        return f"[{v.size} per-slice: {v.min():.3g}..{v.max():.3g}]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _value(leaf):
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf


def _sharding(x) -> str:
    s = getattr(x, "sharding", None)
    if s is None:
        return "-"
    spec = getattr(s, "spec", None)
    return str(spec) if spec is not None else type(s).__name__


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    out = [line, "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(out)


def describe_groups(entries, frozen_paths=(), verbose=False, notes: str = "") -> str:
    """entries: per group ``(name, rule_name, hparams, [(path, array), ...])``, optionally with a fifth
    item ``{key: override name}`` (a value set by an override shows as ``key=value <override>``);
    ``notes`` is printed after the table."""
    rows, details = [], []
    for name, rule_name, hparams, members, *origin in entries:
        origin = origin[0] if origin else {}
        arrays = [_value(a) for _, a in members]
        n = sum(int(math.prod(a.shape)) for a in arrays)
        nbytes = sum(int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays)
        shardings = sorted({_sharding(a) for a in arrays})
        rows.append({
            "group": name,
            "rule": rule_name,
            "hyperparameters": ", ".join(f"{k}={_fmt(v)}" + (f" <{origin[k]}>" if k in origin else "")
                                         for k, v in hparams.items()),
            "tensors": len(arrays),
            "params": n,
            "bytes": nbytes,
            "sharding": "; ".join(shardings) if len(shardings) <= 2 else f"{len(shardings)} kinds",
        })
        if verbose:
            details.append(f"group {name}:")
            details += [f"  {p}  {tuple(_value(a).shape)}  {_value(a).dtype}  {_sharding(_value(a))}" for p, a in members]
    text = format_table(rows, ["group", "rule", "hyperparameters", "tensors", "params", "bytes", "sharding"])
    if notes:
        text += "\n" + notes
    if frozen_paths:
        text += f"\nin no group (untouched, no state): {len(frozen_paths)} leaves"
        if verbose:
            text += "\n" + "\n".join(f"  {p}" for p in frozen_paths)
    if details:
        text += "\n" + "\n".join(details)
    return text


def report(tx, params, verbose: bool = False) -> str:
    """The group table of a :class:`~groupopt.GroupedTransformation` built for ``params``."""
    paths, leaves, _ = flatten_with_paths(as_param_tree(params))
    plan = tx.plan
    if plan is None:
        members = [list(range(len(leaves)))]
        frozen = []
    else:
        members = [list(m) for m in plan.members]
        frozen = [paths[i] for i in plan.frozen()]
    entries = []
    for g, config in enumerate(tx.configs):
        rule_name = "frozen" if config.frozen else type(config.rule).name + _options(config.rule)
        origin = tx.resolution.subgroups[g].origin if getattr(tx, "resolution", None) is not None else {}
        entries.append((config.name, rule_name, config.spec, [(paths[i], leaves[i]) for i in members[g]], origin))
    notes = tx.resolution.describe() if getattr(tx, "resolution", None) is not None else ""
    return describe_groups(entries, frozen, verbose, notes)


def _options(rule) -> str:
    on = [k for k, v in rule.options().items() if v is True and k != "use_momentum"]
    return f"({', '.join(on)})" if on else ""
