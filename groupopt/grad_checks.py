"""Gradients checked at the door: path, shape and dtype, before anything changes.

A gradient that does not fit its parameter is never broadcast or cast: a (3, 4) gradient
for a (4,) bias, or a scalar one, would silently change the shape of the parameter and of
its state. Shapes, dtypes and tree paths are static under ``jax.jit``, so every check here
runs while a step is traced: no run-time cost, no host sync. Each function raises (or
returns) **one** ``ValueError`` that lists every problem, naming the parameter path and
what was expected.

Used by the core (:func:`groupopt.grouped`: ``apply``, ``update``, ``init``) and by
:mod:`groupopt.compat`.
"""

from __future__ import annotations

import difflib
import sys
from typing import Iterable, Sequence

import jax
import numpy as np

__all__ = ["check_grads", "check_grad_paths", "check_trainable", "is_sparse", "unknown_paths_error"]

_MAX_LISTED = 10  # unknown paths listed by name (each costs a closest-match search)


def _aval(x):
    """``(shape, dtype, weak_type)`` of an array, tracer or Python number (static under jit)."""
    a = jax.api_util.shaped_abstractify(x)
    return tuple(a.shape), np.dtype(a.dtype), bool(getattr(a, "weak_type", False))


def is_sparse(x) -> bool:
    """Whether ``x`` is a sparse array (``jax.experimental.sparse``: a BCOO, BCSR, ...).

    A sparse gradient (e.g. the BCOO that :func:`groupopt.sparse_rows` builds for an embedding
    table) is one leaf of a gradient tree, though it is a pytree of its own (indices and values).
    Checked without importing the sparse module: if it is not imported, nothing is sparse.
    """
    mod = sys.modules.get("jax.experimental.sparse")
    return mod is not None and isinstance(x, mod.JAXSparse)


def _one_error(where: str, what: str, problems: list[str]) -> ValueError:
    if len(problems) == 1:
        return ValueError(f"{where}: {problems[0]}")
    return ValueError(f"{where}: {len(problems)} {what}: " + "; ".join(problems))


def check_grads(names: Sequence[str], grads: Sequence, params: Sequence, where: str = "step",
                rules: Sequence | None = None) -> None:
    """Each gradient must have exactly its parameter's shape and floating dtype.

    Args:
      names: the parameters' paths, for the message.
      grads: one gradient per parameter; ``None`` means no gradient (skipped, like torch's
        ``p.grad is None``).
      params: the parameters (arrays or tracers).
      where: the call the error is about (prefixes the message).
      rules: per gradient, the update rule that will use it (or None): each rule says which
        gradients it refuses (:meth:`groupopt.Rule.grad_error`: a sparse gradient for a dense
        optimizer, a dense one for SparseAdam). Without rules, sparse gradients are refused.

    Raises one ``RuntimeError`` (torch's type for these) listing every gradient a rule refuses,
    with torch's message; otherwise one ``ValueError`` listing every mismatch: a different shape (no broadcasting),
    a non-floating dtype (int, bool, complex: torch refuses those gradients too), or a
    floating dtype other than the parameter's (torch refuses assigning a ``.grad`` of
    another dtype). A weakly typed Python float is accepted for a floating parameter.
    """
    refused, problems = [], []
    for i, (name, g, p) in enumerate(zip(names, grads, params)):
        if g is None:
            continue
        if rules is not None and rules[i] is not None:
            msg = rules[i].grad_error(g)
        else:
            msg = f"a sparse gradient ({type(g).__name__}) needs an optimizer that takes sparse gradients" if is_sparse(g) else None
        if msg:
            refused.append(f"gradient for {name!r}: {msg}")
            continue
        gshape, gdt, gweak = (tuple(g.shape), np.dtype(g.dtype), False) if is_sparse(g) else _aval(g)
        pshape, pdt, _ = _aval(p)
        if gshape != pshape:
            problems.append(f"gradient for {name!r} has shape {gshape}, parameter has shape {pshape}")
        if not np.issubdtype(gdt, np.floating):
            problems.append(f"gradient for {name!r} has dtype {gdt}, parameter has {pdt} (gradients must be real floating point)")
        elif gdt != pdt and not (gweak and np.issubdtype(pdt, np.floating)):
            problems.append(f"gradient for {name!r} has dtype {gdt}, parameter has {pdt}")
    if refused:
        err = _one_error(where, "gradients are refused", refused)
        raise RuntimeError(*err.args)
    if problems:
        raise _one_error(where, "gradients do not match their parameters", problems)


def unknown_paths_error(unknown: Iterable[str], known: Iterable[str], where: str = "step(grads)") -> ValueError:
    """One error listing gradient paths that are no parameter's, each with the closest known path.

    Returns the error (the caller raises it). The first 10 paths are listed by name.
    """
    known, unknown = list(known), list(unknown)
    parts = []
    for p in unknown[:_MAX_LISTED]:
        close = difflib.get_close_matches(p, known, n=1, cutoff=0.0)
        parts.append(f"{p!r}" + (f" (closest parameter: {close[0]!r})" if close else ""))
    more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
    return ValueError(f"{where}: gradients for paths that are not parameters of the model: {'; '.join(parts)}{more}")


def check_grad_paths(paths: Sequence[str], known: Sequence[str], where: str = "step(grads)") -> None:
    """The gradient tree's leaf paths must be exactly the parameters' (same paths, same order).

    Unknown paths are reported with the closest parameter path (:func:`unknown_paths_error`);
    otherwise missing paths are listed.
    """
    if tuple(paths) == tuple(known):
        return
    known_set = set(known)
    unknown = [p for p in paths if p not in known_set]
    if unknown:
        raise unknown_paths_error(unknown, known, where)
    have = set(paths)
    missing = [p for p in known if p not in have]
    if missing:
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise ValueError(f"{where}: the gradient tree has no gradient for {missing[:_MAX_LISTED]}{more}")
    raise ValueError(f"{where}: the gradient tree has the parameters' paths in a different order")


def check_trainable(names: Sequence[str], params: Sequence, where: str = "grouped(params)",
                    hint: str = "put them in a frozen group (groupopt.group(..., frozen=True)) or in no group") -> None:
    """Parameters updated by a rule must be real floating point (torch: only floating tensors
    can require gradients). One error names every int/bool/complex leaf, with ``hint``."""
    bad = []
    for name, p in zip(names, params):
        _, dt, _ = _aval(p)
        if is_sparse(p):  # torch: "SparseAdam requires dense parameter tensors"
            bad.append(f"{name!r} (a sparse {type(p).__name__}: parameters must be dense arrays)")
        elif not np.issubdtype(dt, np.floating):
            bad.append(f"{name!r} ({dt})")
    if bad:
        raise ValueError(
            f"{where}: only real floating point leaves can be optimized, got {', '.join(bad)}; {hint}"
        )
