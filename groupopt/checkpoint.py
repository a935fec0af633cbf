"""Orbax checkpoints of a whole optimizer: sharded, async, atomic, restorable onto another mesh.

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``. A
checkpoint of step ``n`` holds

* ``arrays``: every optimizer state array (per group: step count, rule
  scalars, per-parameter slots), the update counter and, with
  ``include_params=True``, the parameters -- saved sharded, as they lie;
* ``meta`` (JSON): the optimizer class, the group structure (sizes, names),
  every ``param_groups`` entry but the parameters (hyperparameters, options,
  ``initial_lr``, ...), and the scheduler's ``state_dict()``.

Restoring needs an optimizer built the same way (same groups, same sizes):
arrays are read straight into the shardings of *its* current state and
parameters, so a checkpoint written on 8 devices restores onto 4. Orbax writes
into a temporary directory and renames it when complete, so an interrupted
save leaves the previous checkpoint readable and is never listed.

For the functional core, :func:`save_state` / :func:`restore_state` do the same
for a :class:`~groupopt.GroupedState` (restored into the shardings of a state
from ``tx.init(params)``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import multihost
from .sharding import replicated

__all__ = ["Checkpointer", "save_state", "restore_state"]


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# ------------------------------------------------------------------ JSON with types


def _encode(x):
    if isinstance(x, collections.Counter):
        return {"__counter__": [[k, v] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v) for v in x]}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: _encode(v) for k, v in x.items()}
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in x.items()]}
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _encode(x.item())
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store {type(x).__name__} in a checkpoint's metadata: {x!r}")


def _decode(x):
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if isinstance(x, dict):
        if "__counter__" in x:
            return collections.Counter({_decode(k): v for k, v in x["__counter__"]})
        if "__tuple__" in x:
            return tuple(_decode(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {_decode(k): _decode(v) for k, v in x["__dict__"]}
        if "__float__" in x:
            return float(x["__float__"])
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        return {k: _decode(v) for k, v in x.items()}
    return x


def _free_sharding(leaves) -> jax.sharding.Sharding:
    """Where a restored leaf with no placement of its own goes: replicated on the mesh of the other
    arrays (with several processes, a global array the next jitted step accepts, not one pinned to
    a process-local device), or this process's first device when there is no mesh."""
    return replicated(leaves) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _target(x, free) -> jax.ShapeDtypeStruct:
    """The restore target of one leaf: its shape, dtype and sharding. A leaf with no placement of its
    own -- a number, a NumPy array, or a JAX array jit may still move (uncommitted, e.g.
    ``nnx.Optimizer``'s step counter or a plateau state before the first step) -- is read into ``free``."""
    if isinstance(x, jax.Array) and x.committed:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    a = x if isinstance(x, jax.Array) else np.asarray(x)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=free)


def _abstract(tree):
    free = _free_sharding(jax.tree.leaves(tree))
    return jax.tree.map(lambda x: _target(x, free), tree)


def _drop_empty(tree):
    """``tree`` with its zero-size arrays as ``None``: Orbax cannot save them (an absent slot's
    placeholder, see :meth:`groupopt.Rule.slot_shapes`; a zero-size parameter). They hold no
    data: :func:`_refill` takes them from the restoring side's own state."""
    return jax.tree.map(lambda x: None if np.size(x) == 0 else x, tree)


def _refill(restored, like):
    """``restored`` (from a tree passed through :func:`_drop_empty`) with ``like``'s zero-size arrays put back."""
    leaves, treedef = jax.tree.flatten(like)
    got = treedef.flatten_up_to(restored)
    return jax.tree.unflatten(treedef, [x if r is None else r for x, r in zip(leaves, got)])


# ------------------------------------------------------------------ core state


def save_state(directory: str | os.PathLike, state) -> None:
    """Save a core optimizer state (any pytree of arrays, e.g. a GroupedState) with Orbax, sharded.

    One state, one directory (an existing one is refused). For numbered steps, options
    (``max_to_keep``, intervals, best-of) and the model alongside, use :class:`Checkpointer`
    (``ckpt.save(step, state=..., model=...)``).
    """
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.fspath(os.path.abspath(directory)), _drop_empty(state))


def restore_state(directory: str | os.PathLike, like):
    """Restore into the structure, dtypes and shardings of ``like`` (e.g. ``tx.init(params)`` on the new mesh)."""
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        return _refill(ckptr.restore(os.fspath(os.path.abspath(directory)), _abstract(_drop_empty(like))), like)


# ------------------------------------------------------------------ flat trees: model, nnx.Optimizer, core state


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_key_array(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class _Flat:
    """A pytree as ``{path: leaf}`` (paths like ``"a/kernel"``, the Orbax item's keys) and its treedef.

    Leaves are arrays (``jax.Array``, ``np.ndarray``, typed PRNG keys) or numbers; ``describe``
    gives what a checkpoint records of each leaf (shape and dtype) to check a restore target
    before anything is read.
    """

    def __init__(self, tree, what: str):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.leaves: dict[str, Any] = {}
        for kp, x in flat:
            path = "/".join(_key_str(k) for k in kp) or "."
            if path in self.leaves:
                raise ValueError(f"{what}: two leaves have the path {path!r}; a checkpoint needs distinct paths")
            if not (isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))):
                raise TypeError(f"{what}: {path} is a {type(x).__name__}, not an array: a checkpoint holds arrays")
            self.leaves[path] = x

    def describe(self) -> dict:
        return {p: [list(np.shape(x)), str(x.dtype) if hasattr(x, "dtype") else str(np.asarray(x).dtype)]
                for p, x in self.leaves.items()}

    def to_save(self) -> dict:
        """The arrays Orbax writes: keys as their data, zero-size arrays left out (they hold no data)."""
        out = {}
        for p, x in self.leaves.items():
            if _is_key_array(x):
                x = jax.random.key_data(x)
            elif not isinstance(x, jax.Array):
                x = jnp.asarray(x)
            if x.size:
                out[p] = x
        return out

    def stored_paths(self) -> set:
        """The paths :meth:`to_save` writes (the non-empty leaves)."""
        return {p for p, x in self.leaves.items() if math.prod(np.shape(x))}

    def targets(self, saved: set) -> dict:
        """Orbax restore targets for the saved paths: this tree's shapes, dtypes and shardings (see :func:`_target`)."""
        free = _free_sharding(list(self.leaves.values()))
        return {p: _target(jax.random.key_data(x) if _is_key_array(x) else x, free)
                for p, x in self.leaves.items() if p in saved}

    def rebuild(self, restored: dict):
        """This tree with the restored values, each leaf of the kind this tree had there."""
        leaves = []
        for p, x in self.leaves.items():
            if p not in restored:  # zero-size: nothing was stored
                leaves.append(x)
                continue
            r = restored[p]
            if _is_key_array(x):
                r = jax.random.wrap_key_data(r, impl=jax.random.key_impl(x))
            elif isinstance(x, np.ndarray):
                r = np.asarray(r).copy()
            elif not isinstance(x, jax.Array):
                r = type(x)(np.asarray(r).item()) if isinstance(x, (bool, int, float, complex)) else np.asarray(r)[()]
            leaves.append(r)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _compat_label(path: str) -> str:
    """A compat optimizer's array path as torch names it: ``param_groups[0]['params'][1] exp_avg``."""
    parts = path.split("/")
    if len(parts) == 5 and parts[0] == "groups" and parts[2] == "slots":
        return f"{path} (param_groups[{parts[1]}]['params'][{parts[4]}]'s {parts[3]!r})"
    if len(parts) == 3 and parts[0] == "params":
        return f"{path} (param_groups[{parts[1]}]['params'][{parts[2]}])"
    return path


def _check_leaves(saved: dict, ours: dict, what: str, where: str, label=lambda p: p) -> None:
    """Same paths and shapes, or an error naming the first difference. Dtypes may differ (the arrays are
    read into the target's dtype, as Orbax does: a float32 run restores into a float64 one), except
    that PRNG keys stay keys of the same implementation."""
    missing = [p for p in ours if p not in saved]
    extra = [p for p in saved if p not in ours]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no entry for {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if extra:
            parts.append(f"entries {extra[:5]}" + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
                         + f" that this {what} lacks")
        raise ValueError(f"{where}: {what}: the checkpoint has " + " and ".join(parts) + "; nothing was restored")
    for p, (shape, dtype) in ours.items():
        s_shape, s_dtype = saved[p]
        if list(s_shape) != list(shape) or (s_dtype != dtype and "key<" in s_dtype + dtype):
            raise ValueError(f"{where}: {what}: {label(p)} is {s_dtype}{tuple(s_shape)} in the checkpoint, "
                             f"{dtype}{tuple(shape)} in this {what}; nothing was restored")


def _nnx():
    from flax import nnx

    return nnx


def _is_nnx_object(x) -> bool:
    nnx = _nnx()
    return isinstance(x, nnx.Pytree)  # nnx.Module, nnx.Optimizer


def _nnx_flat(obj, what: str):
    """``(nnx.state(obj), its values as a _Flat)``: every Variable, trainable or not."""
    nnx = _nnx()
    state = nnx.state(obj)
    return state, _Flat(nnx.to_pure_dict(state), what)


def _nnx_commit(obj, state, pure) -> None:
    nnx = _nnx()
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(obj, state)


def _is_compat(optimizer) -> bool:
    return callable(getattr(optimizer, "export_state", None)) and callable(getattr(optimizer, "prepare_import", None))


def _check_kinds(optimizer, model) -> None:
    if optimizer is not None and not _is_compat(optimizer) and not _is_nnx_object(optimizer):
        raise TypeError(
            "optimizer must be a groupopt.compat optimizer or an nnx.Optimizer, got "
            f"{type(optimizer).__name__}; a core optimizer state (a GroupedState, or an Optax state holding "
            "one) goes in state="
        )
    if model is not None and not _is_nnx_object(model):
        raise TypeError(
            f"model must be an NNX Module (its state is restored in place), got {type(model).__name__}; "
            "a pytree of parameters goes in state= (e.g. state=(params, opt_state))"
        )


def _manager_options(options, async_save, kwargs):
    ocp = _ocp()
    fields = {f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}
    unknown = sorted(k for k in kwargs if k not in fields)
    if unknown:
        raise TypeError(f"Checkpointer: unknown option {unknown[0]!r}; "
                        f"CheckpointManagerOptions fields are {sorted(fields)}")
    if options is None:
        options = ocp.CheckpointManagerOptions()
    elif not isinstance(options, ocp.CheckpointManagerOptions):
        raise TypeError(f"options must be an orbax.checkpoint.CheckpointManagerOptions, got {type(options).__name__}")
    if async_save is not None:
        kwargs = dict(kwargs, enable_async_checkpointing=bool(async_save))
    return dataclasses.replace(options, **kwargs) if kwargs else options


def _read_meta(raw: dict) -> dict:
    """A checkpoint's metadata in the current form (checkpoints of the first format held one compat optimizer)."""
    if raw.get("format") == 2:
        return raw
    compat = {k: raw[k] for k in ("optimizer", "sizes", "param_groups", "records", "extra") if k in raw}
    return {"format": 2, "compat": compat, "scheduler": raw.get("scheduler"), "trees": {}}


# ------------------------------------------------------------------ the checkpointer


_TREE_ITEMS = {"model": "model", "optimizer": "nnx_optimizer", "state": "state"}  # meta name -> Orbax item


class Checkpointer:
    """Numbered checkpoints of a training run: model, optimizer and scheduler, through Orbax's ``CheckpointManager``.

    Each saved step holds what was given, any combination of:

    * ``model=``: an NNX Module -- its whole ``nnx.state`` (every ``Param``, also those in no
      optimizer group, e.g. a frozen embedding; batch statistics; RNG state), restored in place
      with ``nnx.update``;
    * ``optimizer``: a :mod:`groupopt.compat` optimizer (state arrays, every ``param_groups``
      entry, per-parameter records; its parameters too with ``include_params=True``), or an
      ``nnx.Optimizer`` (e.g. ``nnx.Optimizer(model, groupopt.grouped(...), wrt=nnx.Param)``:
      its ``nnx.state``), restored in place;
    * ``scheduler``: anything with ``state_dict()`` / ``load_state_dict()`` (a compat lr scheduler);
    * ``state=``: any pytree of arrays -- the functional core's optimizer state (a
      :class:`~groupopt.GroupedState`, or an Optax state holding one such as ``optax.chain``'s),
      with the parameters if they are a plain pytree: ``state=(params, opt_state)``. It cannot
      be restored in place, so :meth:`restore` returns it.

    Arrays are saved sharded, as they lie, and read straight into the shardings of the objects
    restored into (a checkpoint written on 8 devices restores onto 4). Orbax writes each step
    into a temporary directory and renames it when complete: an interrupted save is never
    listed and the previous steps stay readable. Restoring is all or nothing: everything is
    read and checked before any object changes.

    The manager's options are Orbax's: pass ``options=ocp.CheckpointManagerOptions(...)`` and/or
    its fields as keywords (``max_to_keep``, ``save_interval_steps``, ``keep_period``,
    ``best_fn`` / ``best_mode`` with ``metrics=`` at :meth:`save`, ...); keywords win.
    ``async_save`` sets ``enable_async_checkpointing`` (on by default).

    >>> ckpt = Checkpointer("/tmp/run/ckpt", max_to_keep=3)
    >>> ckpt.save(step, optimizer, scheduler, model=model)          # async; .wait() to block
    >>> step = ckpt.restore(optimizer, scheduler, model=model)      # latest step
    >>> step, opt_state = ckpt.restore(model=model, state=tx.init(nnx.state(model, nnx.Param)))
    """

    def __init__(self, directory: str | os.PathLike, options=None, *, async_save: bool | None = None, **option_kwargs):
        ocp = _ocp()
        self.directory = os.fspath(os.path.abspath(directory))
        self.options = _manager_options(options, async_save, option_kwargs)
        self._manager = ocp.CheckpointManager(self.directory, options=self.options)

    @property
    def manager(self):
        """The underlying ``orbax.checkpoint.CheckpointManager``."""
        return self._manager

    # -- saving -----------------------------------------------------------
    def save(self, step: int, optimizer=None, scheduler=None, *, model=None, state=None, include_params: bool = False,
             metrics: dict | None = None, force: bool = False) -> bool:
        """Save what is given as checkpoint ``step``; returns whether it was saved.

        Returns False, saving nothing, when the options' policy skips this step
        (``save_interval_steps``, ``save_on_steps``, ...) unless ``force``. Steps must increase: a
        step not after the latest saved one is refused (``ValueError``), never silently dropped.
        ``metrics`` (a dict of numbers) is what ``best_fn`` ranks. Saves are asynchronous unless
        ``async_save=False``: arrays are snapshotted before this returns; :meth:`wait` blocks
        until the step is committed.
        """
        ocp = _ocp()
        step = operator.index(step)
        if optimizer is None and scheduler is None and model is None and state is None:
            raise ValueError("Checkpointer.save: nothing to save (give an optimizer, scheduler, model= or state=)")
        _check_kinds(optimizer, model)
        latest = self.latest_step()
        self._agree("save", step, optimizer, scheduler, model, state, include_params=include_params, force=force)
        if latest is not None and step <= latest:
            raise ValueError(
                f"Checkpointer.save: step {step} is not after the latest saved step {latest} in {self.directory} "
                f"(steps {self.all_steps()}); save under a later step, or delete the later ones first "
                "(ckpt.manager.delete(step))"
            )
        if not force and not self._manager.should_save(step):
            return False
        items: dict = {}
        meta: dict = {"format": 2, "compat": None, "trees": {}, "scheduler": None}
        if optimizer is not None and _is_compat(optimizer):
            arrays, cmeta = optimizer.export_state(include_params)
            meta["compat"] = dict(cmeta, param_groups=_encode(cmeta["param_groups"]), records=_encode(cmeta["records"]),
                                  extra=_encode(cmeta["extra"]), include_params=bool(include_params),
                                  leaves=_Flat(arrays, "optimizer").describe())
            items["arrays"] = ocp.args.StandardSave(_drop_empty(arrays))
        nnx_optimizer = optimizer if optimizer is not None and not _is_compat(optimizer) else None
        trees = {"model": model, "optimizer": nnx_optimizer}
        for name, obj in trees.items():
            if obj is not None:
                _, flat = _nnx_flat(obj, name)
                self._add_tree(items, meta, name, type(obj).__name__, flat)
        if state is not None:
            self._add_tree(items, meta, "state", type(state).__name__, _Flat(state, "state"))
        if scheduler is not None:
            meta["scheduler"] = {"class": type(scheduler).__name__, "state": _encode(scheduler.state_dict())}
        items["meta"] = ocp.args.JsonSave(meta)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force))

    def _agree(self, what, step, optimizer, scheduler, model, state, **flags) -> None:
        """With several processes: every one must save (restore) the same step of the same objects into the
        same directory, seeing the same committed steps (:func:`groupopt.multihost.agree`)."""
        if not multihost.active():
            return
        config = {"directory": self.directory, "step": step, "steps": self.all_steps(), "flags": flags,
                  "objects": [None if x is None else type(x).__qualname__ for x in (optimizer, scheduler, model, state)]}
        if optimizer is not None and _is_compat(optimizer):
            config["param_groups"] = [{k: v for k, v in g.items() if k != "params"} | {"params": len(g["params"])}
                                      for g in optimizer.param_groups]
        if scheduler is not None and what == "save":
            config["scheduler"] = scheduler.state_dict()
        multihost.agree(f"Checkpointer.{what}(step {step})", config)

    @staticmethod
    def _add_tree(items, meta, name, cls, flat: _Flat) -> None:
        ocp = _ocp()
        meta["trees"][name] = {"class": cls, "leaves": flat.describe()}
        data = flat.to_save()
        if data:  # Orbax cannot write an empty tree; an all-empty one needs nothing stored
            items[_TREE_ITEMS[name]] = ocp.args.StandardSave(data)

    # -- steps ------------------------------------------------------------
    def wait(self) -> None:
        """Block until pending saves are committed."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """The committed steps, ascending (an interrupted save is not among them)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest saved step, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by ``best_fn`` over the saved ``metrics`` (the latest one without ``best_fn``)."""
        return self._manager.best_step()

    # -- restoring --------------------------------------------------------
    def restore(self, optimizer=None, scheduler=None, *, model=None, state=None, step: int | None = None,
                include_params: bool = False, partial: bool = False):
        """Load checkpoint ``step`` (default: the latest) into the objects given; returns the step.

        With ``state=`` (a pytree like the one saved, e.g. ``tx.init(params)`` on the new mesh:
        its structure, dtypes and shardings are the target) returns ``(step, restored_state)``.

        What is given must be in the checkpoint, and everything the checkpoint holds must be
        given, unless ``partial=True`` (e.g. the model alone, for evaluation).

        All or nothing: the metadata is read and every object's structure, shapes and dtypes
        are checked against it, then all arrays are read, the compat optimizer checks them
        (``prepare_import``) and the scheduler's state is loaded (its old state put back if that
        fails); only then do the model, optimizer and scheduler change. After an error every
        object is exactly as before.
        """
        ocp = _ocp()
        _check_kinds(optimizer, model)
        self.wait()
        self._agree("restore", step, optimizer, scheduler, model, state, include_params=include_params, partial=partial)
        step = self.latest_step() if step is None else operator.index(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (steps {self.all_steps()})")
        where = f"checkpoint {self.directory} step {step}"
        meta = _read_meta(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        compat = optimizer if optimizer is not None and _is_compat(optimizer) else None
        given = {"model": model, "optimizer": optimizer if compat is None else None, "state": state}

        # 1. what is given against what is stored (classes, group sizes)
        saved_opt = (meta["compat"] or {}).get("optimizer") or (meta["trees"].get("optimizer") or {}).get("class")
        if optimizer is not None and saved_opt != type(optimizer).__name__:
            raise ValueError(f"{where} holds a {saved_opt} optimizer, not a {type(optimizer).__name__}"
                             if saved_opt else f"{where} holds no optimizer; {type(optimizer).__name__} was given")
        if optimizer is None and saved_opt and not partial:
            raise ValueError(f"{where} holds a {saved_opt} optimizer; give it (or partial=True to leave it out)")
        saved_sched = None if meta["scheduler"] is None else meta["scheduler"]["class"]
        if (scheduler is not None and saved_sched != type(scheduler).__name__) or (
                scheduler is None and saved_sched is not None and not partial):
            raise ValueError(f"{where} holds scheduler {saved_sched}, but "
                             f"{type(scheduler).__name__ if scheduler is not None else None} was given")
        for name, obj in given.items():
            if name == "optimizer":
                continue
            if obj is not None and name not in meta["trees"]:
                raise ValueError(f"{where} holds no {name}; {name}= was given")
            if obj is None and name in meta["trees"] and not partial:
                raise ValueError(f"{where} holds a {name}; give {name}= (or partial=True to leave it out)")

        # 2. structure, shapes and dtypes of each target against the metadata, before reading arrays
        targets: dict = {}
        flats: dict = {}
        states = {}
        for name, obj in given.items():
            if obj is None:
                continue
            if name == "state":
                flat = _Flat(obj, "state")
            else:
                states[name], flat = _nnx_flat(obj, name)
            saved = meta["trees"][name]["leaves"]
            _check_leaves(saved, flat.describe(), name, where)
            flats[name] = flat
            stored = flat.stored_paths()
            if stored:
                targets[_TREE_ITEMS[name]] = ocp.args.StandardRestore(flat.targets(stored))

        if compat is not None:
            cmeta = meta["compat"]
            sizes = [len(g["params"]) for g in compat.param_groups]
            if list(cmeta["sizes"]) != sizes:
                raise ValueError(f"{where} has groups of sizes {list(cmeta['sizes'])}; this optimizer's are {sizes}")
            if include_params and cmeta.get("include_params") is False:
                raise ValueError(f"{where} holds no parameters of the optimizer (saved without include_params)")
            # parameters saved but not wanted are read too (into the shapes of this optimizer's), then dropped
            read_params = bool(include_params or cmeta.get("include_params"))
            like, _ = compat.export_state(read_params)
            if "leaves" in cmeta:  # checkpoints of the first format: Orbax checks shapes when reading
                _check_leaves(cmeta["leaves"], _Flat(like, "optimizer").describe(), "optimizer", where, _compat_label)
            targets["arrays"] = ocp.args.StandardRestore(_abstract(_drop_empty(like)))

        # 3. read everything
        read = self._manager.restore(step, args=ocp.args.Composite(**targets)) if targets else {}

        # 4. check what was read, build the new values; nothing has changed yet
        commit = None
        if compat is not None:
            arrays = _refill(read["arrays"], like)
            if read_params and not include_params:
                arrays = {k: v for k, v in arrays.items() if k != "params"}
            opt_meta = dict(meta["compat"], param_groups=_decode(meta["compat"]["param_groups"]),
                            records=_decode(meta["compat"].get("records")), extra=_decode(meta["compat"].get("extra")))
            try:
                commit = compat.prepare_import(arrays, opt_meta, include_params, owned=True)  # just read: ours alone
            except ValueError as e:
                raise ValueError(f"{where} {e}; nothing was restored") from None
        new = {name: flat.rebuild(dict(read[_TREE_ITEMS[name]]) if _TREE_ITEMS[name] in read else {})
               for name, flat in flats.items()}

        # 5. the scheduler last (loading is its only check): its old state goes back on failure
        before = None
        if scheduler is not None:
            before = scheduler.state_dict()
            try:
                scheduler.load_state_dict(_decode(meta["scheduler"]["state"]))
            except Exception as e:
                scheduler.load_state_dict(before)
                raise ValueError(
                    f"{where}: its {type(scheduler).__name__} state does not fit the scheduler given ({e!r}); "
                    "nothing was restored"
                ) from e

        # 6. commit
        try:
            for name in ("model", "optimizer"):
                if name in new:
                    _nnx_commit(given[name], states[name], new[name])
            if commit is not None:
                commit()
        except Exception:
            if before is not None:
                scheduler.load_state_dict(before)
            raise
        return (step, new["state"]) if state is not None else step

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
