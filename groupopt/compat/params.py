"""How a compat optimizer holds its parameters and finds their gradients.

Two kinds of parameters, as in torch where parameters are tensors:

* **Flax NNX Variables** (``nnx.Param``): a group's ``"params"`` may be a
  module, a Variable, or a list/iterator of them (``model.block2``,
  ``model.fc.kernel``, ``[model.a, model.b]``). The optimizer updates them in
  place, as torch updates tensors.

  *How gradients are matched*: ``step(grads)`` takes the gradients of the whole
  model (or of any module containing the group members), as ``nnx.grad``
  returns them. When a Variable joins an optimizer it gets a stable integer in
  its metadata (``groupopt_uid``, with the id of the object it was given to);
  ``nnx.grad`` copies Variable metadata into the gradient State, so each
  gradient is matched to its Variable by that integer -- by identity, not by
  path, so ``block1/l0/kernel`` and ``block2/l0/kernel`` never mix, whatever
  module the grads were taken of. A copy made by ``nnx.clone`` carries the same
  integer: it gets its own when it joins an optimizer, and two gradients with
  one parameter's integer in one step are refused. Gradients of Variables that
  are in no group are ignored (those parameters stay untouched). Tagging
  changes the Variables' metadata once, so a function jitted over the model
  *before* the optimizer was built retraces once.

  *Names* (for ``state_dict``'s ``param_names`` and by-name loads) are paths
  from the root model: ``model=``, or the module passed as ``params``. They are
  never learnt from gradients (whose paths are relative to whatever module was
  differentiated).

* **A plain pytree** (a linen ``params`` dict): the optimizer owns the tree
  (``optimizer.params``), which it replaces at each step. Groups select leaves
  of it by path (glob, regex, predicate) or by passing sub-trees of it
  (matched by array identity at construction). ``step(grads)`` takes a
  gradient tree with the same paths.

``model=`` (an NNX module or a pytree) gives the root against which path
selectors are resolved in either mode.
"""

from __future__ import annotations

import itertools
import re
import sys

import jax

from ..grad_checks import unknown_paths_error
from ..groups import AllSelector as _All, OfTypeSelector as _OfType, as_param_tree, flatten_with_paths, is_module as _is_module, is_variable as _is_variable, matcher as _matcher

UID_KEY = "groupopt_uid"
OWNER_KEY = "groupopt_owner"
_uids = itertools.count(1)


def variable_uid(var) -> int:
    """The Variable's groupopt id, assigned once (stored in its metadata).

    ``nnx.clone`` (and any copy of a module) copies metadata, so a copy of a Variable arrives
    with its original's id. The metadata also records which object the id was given to, so a
    copy is recognised and given an id of its own: no two Variables given to optimizers share one.
    """
    meta = var.get_metadata()
    uid = meta.get(UID_KEY)
    if uid is not None and meta.get(OWNER_KEY) == id(var):
        return uid
    uid = next(_uids)
    var.set_metadata(**{UID_KEY: uid, OWNER_KEY: id(var)})
    return uid


def _is_selector(x) -> bool:
    return isinstance(x, (str, re.Pattern, _All, _OfType)) or (callable(x) and not _is_module(x) and not _is_variable(x))


class TreeParam:
    """One leaf of a tree-mode optimizer's parameter tree (what ``param_groups[i]["params"]`` holds)."""

    __slots__ = ("owner", "index")

    def __init__(self, owner: "TreeBinding", index: int):
        self.owner, self.index = owner, index

    @property
    def path(self) -> str:
        return self.owner.paths[self.index]

    @property
    def value(self):
        return self.owner.leaves[self.index]

    @property
    def shape(self):
        return self.value.shape

    @property
    def dtype(self):
        return self.value.dtype

    def __repr__(self):
        return f"TreeParam({self.path!r}, shape={tuple(self.shape)}, dtype={self.dtype})"


def _refs_held(holder_of) -> int:
    """``sys.getrefcount`` of a parameter's array in ``values[k]`` when only the binding holds it
    (measured once, so it follows the holder's internals): more means someone else holds it too."""
    import jax.numpy as jnp

    arr = jnp.zeros(())
    holder = holder_of(arr)  # noqa: F841 - keeps the holder's reference alive while counting
    values = [arr]
    del arr
    return sys.getrefcount(values[0])


class Binding:
    """Common interface of the two parameter kinds."""

    refs_held = 3

    def resolve(self, value, where: str) -> list:
        raise NotImplementedError

    def get(self, members) -> list:
        raise NotImplementedError

    def set(self, members, values) -> None:
        raise NotImplementedError

    def name(self, member) -> str | None:
        raise NotImplementedError

    def grad_indices(self, grads, members) -> tuple[int, ...]:
        raise NotImplementedError

    def check_member(self, member, where: str) -> None:
        """A ``param_groups[i]["params"]`` entry must be one parameter (torch: a Tensor)."""
        raise NotImplementedError


class NNXBinding(Binding):
    def __init__(self, root=None, match_paths: bool = True):
        from flax import nnx

        self.match_paths = match_paths  # match id-less gradients (a pure dict) by path from the root

        self.refs_held = _refs_held(lambda a: nnx.Param(a))
        self.root = root
        self._root_paths = None
        if root is not None:
            paths, leaves, _ = flatten_with_paths(as_param_tree(root))
            self._root_paths = {id(v): p for p, v in zip(paths, leaves)}
            self._root = (paths, leaves)

    def resolve(self, value, where):
        if _is_variable(value):
            return [value]
        if _is_module(value) or is_nnx_state(value):
            from flax import nnx

            state = value if is_nnx_state(value) else nnx.state(value, nnx.Param)
            return list(jax.tree.leaves(state, is_leaf=_is_variable))
        if _is_selector(value):
            if self.root is None:
                raise TypeError(
                    f"{where}: a path selector {value!r} needs the model: pass model=<root module> to the optimizer"
                )
            paths, leaves = self._root
            m = _matcher(value, paths, leaves, self.root)
            return [leaves[i] for i in range(len(leaves)) if m(i)]
        hint = " (for a pytree of arrays, pass model=<the whole params tree>)" if isinstance(value, (dict, jax.Array)) else ""
        raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(value).__name__}{hint}")

    def get(self, members):
        return [v.get_value() for v in members]

    def set(self, members, values):
        for v, x in zip(members, values):
            v.set_value(x)

    def name(self, member):
        """The member's path from the root model (``model=``, or the module given as ``params``);
        None when there is no root or the member is not in it. Never learnt from gradients."""
        if self._root_paths is not None:
            return self._root_paths.get(id(member))
        return None

    def check_member(self, member, where):
        if not _is_variable(member):
            hint = (" (append the module's Variables, e.g. nnx.state(module, nnx.Param) leaves, not the module)"
                    if _is_module(member) else "")
            raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(member).__name__}{hint}")

    def tag(self, members):
        for v in members:
            variable_uid(v)

    def grad_indices(self, grads, members, allow_missing: bool = False):
        """Per member, the index of its gradient among ``grads``' leaves (None: no gradient, when allowed).

        Matched by identity (the id in each Variable's metadata, which ``nnx.grad`` copies into the
        gradients). Two gradients carrying one parameter's id (gradients of the model and of an
        ``nnx.clone`` of it taken together) are refused, naming both paths.
        """
        paths, leaves, _ = flatten_with_paths(grads)
        pos, dup = {}, {}
        for i, leaf in enumerate(leaves):
            if _is_variable(leaf):
                uid = leaf.get_metadata().get(UID_KEY)
                if uid is not None:
                    if uid in pos:
                        dup.setdefault(uid, [paths[pos[uid]]]).append(paths[i])
                    pos[uid] = i
        mine = {variable_uid(v): k for k, v in enumerate(members)}
        clash = [ps for uid, ps in dup.items() if uid in mine]
        if clash:
            raise ValueError(
                "step(grads): several gradients belong to the same parameter: "
                + "; ".join(" and ".join(repr(p) for p in ps) for ps in clash[:5])
                + ". A copy of the model made with nnx.clone after the optimizer shares its parameters' "
                "identity: take gradients of the trained model only (e.g. nnx.grad(loss)(model), with the copy "
                "closed over or under jax.lax.stop_gradient), or build the copy before the optimizer"
            )
        missing = []
        out = []
        for k, v in enumerate(members):
            i = pos.get(variable_uid(v))
            if i is None:
                missing.append(k)
            out.append(i)
        if missing and not pos and self._root_paths is not None and self.match_paths:
            return self._indices_by_path(grads, members, allow_missing)
        if missing and (not allow_missing or not pos or len(missing) == len(members)):
            if not pos:
                raise ValueError(
                    "step(grads): the gradients carry no groupopt ids; pass the nnx.State that "
                    "nnx.grad returns for the model, or build the optimizer with model=<root module> "
                    "to match a pure dict of gradients by path"
                )
            raise ValueError(
                f"step(grads): no gradient for parameters {missing[:10]} (index in optimizer order); "
                + ("none of the gradients belongs to this optimizer's parameters"
                   if len(missing) == len(members) else
                   "take grads of a module that contains every parameter given to the optimizer")
            )
        return tuple(out)


    def _indices_by_path(self, grads, members, allow_missing=False):
        """Grads without ids (e.g. a pure dict): match by path from the root given as model=."""
        paths, _, _ = flatten_with_paths(grads)
        names = [self._root_paths.get(id(v)) for v in members]
        return _by_path(paths, names, allow_missing, known=self._root[0])


class TreeBinding(Binding):
    def __init__(self, tree):
        tree = as_param_tree(tree)
        self.refs_held = _refs_held(lambda a: [a])
        self.paths, self.leaves, self.treedef = flatten_with_paths(tree)
        self.refs = [TreeParam(self, i) for i in range(len(self.leaves))]
        self._by_id = {}
        for i, leaf in enumerate(self.leaves):
            self._by_id.setdefault(id(leaf), i)

    @property
    def tree(self):
        return jax.tree_util.tree_unflatten(self.treedef, self.leaves)

    def resolve(self, value, where):
        if isinstance(value, TreeParam):
            return [value]
        if _is_selector(value):
            m = _matcher(value, self.paths, self.leaves)
            return [self.refs[i] for i in range(len(self.leaves)) if m(i)]
        # a sub-tree (or list of arrays) of the model's tree: match leaves by identity
        out = []
        for leaf in jax.tree.leaves(value):
            i = self._by_id.get(id(leaf))
            if i is None:
                raise ValueError(
                    f"{where}: a parameter of shape {getattr(leaf, 'shape', '?')} is not a leaf of the model "
                    "tree this optimizer was built with"
                )
            out.append(self.refs[i])
        return out

    def get(self, members):
        return [self.leaves[m.index] for m in members]

    def set(self, members, values):
        for m, x in zip(members, values):
            self.leaves[m.index] = x

    def name(self, member):
        return member.path

    def check_member(self, member, where):
        if not (isinstance(member, TreeParam) and member.owner is self):
            raise TypeError(
                f"{where}: a tree-mode optimizer's params lists hold its TreeParam entries (from "
                f"param_groups[i]['params']), got {type(member).__name__}"
            )

    def grad_indices(self, grads, members, allow_missing: bool = False):
        paths, _, _ = flatten_with_paths(grads)
        return _by_path(paths, [m.path for m in members], allow_missing, known=self.paths)


def _by_path(paths, names, allow_missing, known=None):
    """Index of each name among ``paths`` (None where missing, if allowed).

    Every gradient path must be a known parameter path (``known``: every path of the model,
    in a group or not): a typo or a renamed key would otherwise leave its parameter untrained.
    """
    known = list(names) if known is None else list(known)
    known_set = set(known)
    unknown = [p for p in paths if p not in known_set]
    if unknown:
        raise unknown_paths_error(unknown, known)
    pos = {p: i for i, p in enumerate(paths)}
    missing = [n for n in names if n not in pos]
    if missing and (not allow_missing or len(missing) == len(names)):
        raise ValueError(f"step(grads): grads tree has no gradient for {missing[:10]}")
    return tuple(pos.get(n) for n in names)


def is_nnx_state(x) -> bool:
    """An ``nnx.State`` (e.g. ``nnx.state(model.head, nnx.Param)``: the ``.parameters()`` of a submodule)."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nnx.State)


def is_tree(params) -> bool:
    """A top-level dict that is not a torch group dict is a model's parameter tree."""
    return isinstance(params, dict) and "params" not in params


def make_binding(params, model) -> Binding:
    """Tree mode when the model (or the params argument) is a plain pytree, else NNX mode."""
    if model is not None:
        return NNXBinding(model) if _is_module(model) or is_nnx_state(model) else TreeBinding(model)
    if is_tree(params):
        return TreeBinding(params)
    if _is_module(params) or is_nnx_state(params):
        # the module given is the root of the names; a pure dict of gradients is matched by path only
        # against a model= root (the module passed may be a submodule of what was differentiated)
        return NNXBinding(params, match_paths=False)
    return NNXBinding()
