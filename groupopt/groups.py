"""Parameter groups: which leaf of a parameter pytree belongs to which group.

This module is the single place where the group -> leaves mapping is computed.
Everything else (the grouped transformation, the compat layer, state_dict
conversion) consumes a :class:`GroupPlan`.

Selectors (what a group's ``select`` / torch-style ``"params"`` may be):

* ``None`` or :data:`ALL` -- every leaf (``model.parameters()``).
* a Flax NNX ``Module`` or ``Variable`` (or a list of them) -- matched by
  identity, like torch matches tensors. Needs a params tree that holds the
  Variables (a module, or ``nnx.state(model)``).
* a glob string over ``/``-joined paths: ``*`` matches inside one path
  segment, ``**`` any number of segments. A pattern selects a node and every
  leaf below it, so ``"encoder"`` selects the whole encoder subtree and
  ``"encoder/**/kernel"`` selects its kernels.
* a compiled regex (``re.compile``), ``fullmatch``-ed against each leaf path.
* a predicate ``(path: str, leaf) -> bool``.
* :func:`rest` -- every leaf no other group selects.
* :func:`of_type` (or an NNX Module class itself, ``nnx.LayerNorm``) -- every
  ``nnx.Param`` of every submodule of that type, as torch users select with
  ``isinstance(module, nn.LayerNorm)``. Needs the model itself as the tree (or
  ``model=``), since ``nnx.state`` does not record module types.
* a list/tuple of any of these (their union).

:func:`named_parameters` lists ``(path, Variable)`` pairs, torch's
``model.named_parameters()`` with the NNX paths every selector, ``state_dict``
and error message of groupopt uses (``"blocks/0/attn/query/kernel"``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax

from .grad_checks import is_sparse

__all__ = ["ALL", "AllSelector", "GroupPlan", "rest", "path_str", "flatten_with_paths", "partition", "is_module",
           "is_variable", "is_leaf", "matcher", "of_type", "named_parameters", "OfTypeSelector"]


class _All:
    def __repr__(self):
        return "ALL"


ALL = _All()
"""Selector matching every leaf of the tree."""


@dataclasses.dataclass(frozen=True)
class _Rest:
    def __repr__(self):
        return "rest()"


def rest() -> _Rest:
    """Selector matching every leaf that no other group selects."""
    return _Rest()


@dataclasses.dataclass(frozen=True)
class _OfType:
    types: tuple

    def __repr__(self):
        return "of_type(" + ", ".join(t.__name__ for t in self.types) + ")"


def of_type(*types) -> _OfType:
    """Selector: every ``nnx.Param`` of every submodule that is an instance of one of ``types``.

    torch users write ``[p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]``;
    here ``groupopt.group(groupopt.of_type(nnx.LayerNorm, nnx.Embed), weight_decay=0.0)``. A module class
    given directly as a selector (``group(nnx.LayerNorm, ...)``) means the same. Subclasses match
    (``isinstance``); a matched module's Params include those of its submodules.

    Module types are not recorded in ``nnx.state``: the selector needs the model itself as the
    parameter tree (``grouped(model, ...)``, ``partition(model, ...)``, a compat optimizer given the
    module or ``model=``); with a State or arrays it raises ``TypeError``.
    """
    module = _nnx_classes()[1]
    if not types:
        raise TypeError("of_type() needs at least one NNX Module class, e.g. of_type(nnx.LayerNorm)")
    for t in types:
        if not (isinstance(t, type) and issubclass(t, module)):
            raise TypeError(f"of_type() takes NNX Module classes (nnx.LayerNorm, ...), got {t!r}")
    return _OfType(tuple(types))


def named_parameters(model, filter=None) -> list[tuple[str, Any]]:
    """``(path, Variable)`` for every ``nnx.Param`` of ``model`` (or every Variable passing ``filter``,
    an ``nnx`` filter such as ``nnx.BatchStat``), torch's ``model.named_parameters()``.

    Names are NNX paths joined with ``/`` (``"encoder/layers/0/kernel"``), in ``nnx.state``'s
    order: the names that selectors match, that compat optimizers put in ``state_dict``'s
    ``param_names`` and that errors report. A compat optimizer takes the pairs as torch's take
    named parameters (``optim.AdamW(groupopt.named_parameters(model))``). For torch's dotted
    names and layouts see :func:`groupopt.compat.torch_name_table`. Returns a list (torch returns
    an iterator): filter it with comprehensions as in torch.
    """
    from flax import nnx

    if not _is_module(model):
        raise TypeError(f"named_parameters() takes an NNX Module, got {type(model).__name__}")
    paths, leaves, _ = flatten_with_paths(nnx.state(model, nnx.Param if filter is None else filter))
    return list(zip(paths, leaves))


def _type_paths(root, types) -> set:
    """Paths (from ``root``) of the Params of every submodule of ``root`` that is an instance of ``types``."""
    from flax import nnx

    ids = set()
    for _, node in nnx.iter_graph(root):
        if isinstance(node, types):
            ids.update(id(v) for v in jax.tree.leaves(nnx.state(node, nnx.Param), is_leaf=_is_variable))
    paths, leaves, _ = flatten_with_paths(as_param_tree(root))
    return {p for p, v in zip(paths, leaves) if id(v) in ids}


def path_str(keypath) -> str:
    """Render a jax key path as ``"a/b/kernel"`` (``jax.tree_util.keystr(..., simple=True, separator="/")``:
    dict keys, attribute names, sequence and flattened indices, joined by ``/``).

    The trailing ``.value`` attribute that NNX Variables add is dropped, so the
    path of a Variable and of its array are the same.
    """
    keypath = tuple(keypath)
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def _nnx_classes():
    """``(nnx.Variable, nnx.Module)``, imported once (these checks run over every leaf of a tree)."""
    global _NNX
    if _NNX is None:
        try:
            from flax import nnx
        except ImportError:  # pragma: no cover - flax is a dependency
            _NNX = (type(None), type(None))
        else:
            _NNX = (nnx.Variable, nnx.Module)
    return _NNX


_NNX = None


def _is_variable(x) -> bool:
    return x is not None and isinstance(x, _nnx_classes()[0])


def is_leaf(x) -> bool:
    """``is_leaf`` for flattening parameter and gradient trees: NNX Variables and sparse arrays."""
    return _is_variable(x) or is_sparse(x)


def _is_module(x) -> bool:
    return x is not None and isinstance(x, _nnx_classes()[1])


def as_param_tree(params):
    """A Flax NNX module becomes ``nnx.state(module, nnx.Param)``; anything else is kept."""
    if _is_module(params):
        from flax import nnx

        return nnx.state(params, nnx.Param)
    return params


def flatten_with_paths(tree) -> tuple[list[str], list[Any], Any]:
    """Flatten ``tree`` to (paths, leaves, treedef); NNX Variables and sparse arrays (a BCOO
    gradient, :func:`groupopt.grad_checks.is_sparse`) count as leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [leaf for _, leaf in flat]
    return paths, leaves, treedef


def _glob_to_regex(pattern: str) -> re.Pattern:
    parts = [p for p in pattern.strip("/").split("/")]
    out = []
    for i, seg in enumerate(parts):
        if seg == "**":
            out.append("(?:[^/]+/)*" if i < len(parts) - 1 else "(?:[^/]+(?:/[^/]+)*)?")
            continue
        rx = ""
        for ch in seg:
            if ch == "*":
                rx += "[^/]*"
            elif ch == "?":
                rx += "[^/]"
            else:
                rx += re.escape(ch)
        out.append(rx + ("/" if i < len(parts) - 1 else ""))
    body = "".join(out)
    # A pattern selects a node and everything below it.
    return re.compile(body + "(?:/.*)?")


def _variables_of(obj) -> list:
    """Variables selected by an NNX module/Variable (or a list of them), in graph order."""
    from flax import nnx

    if _is_variable(obj):
        return [obj]
    if _is_module(obj):
        return [v for v in jax.tree.leaves(nnx.state(obj, nnx.Param), is_leaf=_is_variable)]
    raise TypeError(f"not an NNX Module or Variable: {type(obj).__name__}")


def _describe(selector) -> str:
    if isinstance(selector, str):
        return repr(selector)
    if isinstance(selector, re.Pattern):
        return f"re.compile({selector.pattern!r})"
    if _is_module(selector) or _is_variable(selector):
        return type(selector).__name__
    if _is_module_class(selector):
        return f"of_type({selector.__name__})"
    if isinstance(selector, (list, tuple)):
        return "[" + ", ".join(_describe(s) for s in selector) + "]"
    return getattr(selector, "__name__", repr(selector))


def _is_module_class(x) -> bool:
    return isinstance(x, type) and issubclass(x, _nnx_classes()[1])


def _matcher(selector, paths, leaves, root=None) -> Callable[[int], bool] | None:
    """Return a function leaf_index -> bool, or None for a rest() selector.

    ``root``: the NNX module the tree was taken from, for :func:`of_type` selectors.
    """
    if _is_module_class(selector):
        selector = _OfType((selector,))
    if isinstance(selector, _OfType):
        if not _is_module(root):
            raise TypeError(
                f"{selector!r} selects by module type, which needs the model: pass the NNX module itself "
                "(not nnx.state(model) or arrays) as the parameter tree, or model=<root module>"
            )
        want = _type_paths(root, selector.types)
        return lambda i: paths[i] in want
    if selector is None or isinstance(selector, _All):
        return lambda i: True
    if isinstance(selector, _Rest):
        return None
    if isinstance(selector, str):
        rx = _glob_to_regex(selector)
        return lambda i: rx.fullmatch(paths[i]) is not None
    if isinstance(selector, re.Pattern):
        return lambda i: selector.fullmatch(paths[i]) is not None
    if _is_module(selector) or _is_variable(selector):
        ids = {id(v) for v in _variables_of(selector)}
        if not any(_is_variable(leaf) for leaf in leaves):
            raise TypeError(
                "an NNX Module/Variable selects by identity, so the params tree must hold the "
                "Variables: pass the model itself or nnx.state(model), not raw arrays"
            )
        return lambda i: id(leaves[i]) in ids
    if isinstance(selector, (list, tuple)):
        subs = [_matcher(s, paths, leaves, root) for s in selector]
        if any(s is None for s in subs):
            raise TypeError("rest() cannot be combined with other selectors in a list")
        return lambda i: any(s(i) for s in subs)
    if callable(selector):
        return lambda i: bool(selector(paths[i], leaves[i]))
    raise TypeError(
        f"cannot select parameters with {type(selector).__name__}: use a glob string, re.compile(...), "
        "a predicate (path, leaf) -> bool, an NNX Module/Variable, ALL or rest()"
    )


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """The static assignment of leaves to groups.

    Attributes:
      paths: rendered path of every leaf, in tree-flatten order.
      leaf_group: group index per leaf, ``-1`` for leaves in no group (frozen).
      members: per group, the leaf indices in tree-flatten order. This order is
        also torch's order for ``state_dict`` indices.
      names: a display name per group.
      treedef: the tree structure the plan was made for (``None`` for a plan made
        without a tree: one group holding whatever tree it is given).
    """

    paths: tuple[str, ...]
    leaf_group: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    treedef: Any = None

    @property
    def num_groups(self) -> int:
        return len(self.members)

    def frozen(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.leaf_group) if g < 0)

    @classmethod
    def from_labels(cls, paths: Sequence[str], leaf_group: Sequence[int], names: Sequence[str], treedef=None):
        members = [[] for _ in names]
        for i, g in enumerate(leaf_group):
            if g >= 0:
                members[g].append(i)
        return cls(tuple(paths), tuple(leaf_group), tuple(tuple(m) for m in members), tuple(names), treedef)

    def check_paths(self, paths: Sequence[str], what: str = "grads") -> None:
        """Raise a clear error if ``paths`` (of a tree given to update) differ from the plan's."""
        if tuple(paths) == self.paths:
            return
        have, want = set(paths), set(self.paths)
        missing = sorted(want - have)
        extra = sorted(have - want)
        msg = f"{what} tree does not match the parameter tree the groups were built for"
        if missing:
            msg += f"; missing: {missing[:10]}"
        if extra:
            msg += f"; unexpected: {extra[:10]}"
        if not missing and not extra:
            msg += "; same paths in a different order"
        raise ValueError(msg)


def partition(params, selectors: Sequence[Any], names: Sequence[str] | None = None, require_all: bool = False) -> GroupPlan:
    """Assign every leaf of ``params`` to at most one of ``selectors``.

    Raises ``ValueError`` listing every leaf matched by more than one group (with
    both groups' names). Leaves matched by no group are frozen (``leaf_group ==
    -1``), unless ``require_all``: then every unmatched leaf is listed in one error.
    """
    root = params if _is_module(params) else None  # of_type selectors need the module types
    params = as_param_tree(params)
    paths, leaves, treedef = flatten_with_paths(params)
    names = [str(i) if names is None or names[i] is None else str(names[i]) for i in range(len(selectors))]
    matchers = [_matcher(s, paths, leaves, root) for s in selectors]
    rest_groups = [g for g, m in enumerate(matchers) if m is None]
    if len(rest_groups) > 1:
        raise ValueError(f"rest() is used by more than one group: {[names[g] for g in rest_groups]}")
    leaf_group = [-1] * len(leaves)
    clashes = []
    for i in range(len(leaves)):
        hits = [g for g, m in enumerate(matchers) if m is not None and m(i)]
        if len(hits) > 1:
            clashes.append(
                f"{paths[i]!r} is in group {hits[0]} ({names[hits[0]]}) and group {hits[1]} ({names[hits[1]]})"
            )
        if hits:
            leaf_group[i] = hits[0]
        elif rest_groups:
            leaf_group[i] = rest_groups[0]
    unmatched = [paths[i] for i, g in enumerate(leaf_group) if g < 0] if require_all else []
    if clashes or unmatched:
        parts = []
        if clashes:
            parts.append("some parameters appear in more than one parameter group: " + "; ".join(clashes))
        if unmatched:
            parts.append(f"{len(unmatched)} parameters are in no group (require_all=True): " + ", ".join(map(repr, unmatched)))
        raise ValueError("\n".join(parts))
    for g, sel in enumerate(selectors):
        if matchers[g] is not None and not any(lg == g for lg in leaf_group):
            raise ValueError(f"group {g} ({names[g]}) selects no parameter: selector {_describe(sel)}")
    return GroupPlan.from_labels(paths, leaf_group, names, treedef)


def describe_selector(selector) -> str:
    return _describe(selector)


# Public names for the other layers (compat): the same functions, without the underscore.
AllSelector = _All
OfTypeSelector = _OfType
is_variable = _is_variable
is_module = _is_module
matcher = _matcher
