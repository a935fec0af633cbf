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
import math
import os
from typing import Any

import jax
import numpy as np

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


def _abstract(tree):
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


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
    """Save a core optimizer state (any pytree of arrays, e.g. a GroupedState) with Orbax, sharded."""
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.fspath(os.path.abspath(directory)), _drop_empty(state))


def restore_state(directory: str | os.PathLike, like):
    """Restore into the structure, dtypes and shardings of ``like`` (e.g. ``tx.init(params)`` on the new mesh)."""
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        return _refill(ckptr.restore(os.fspath(os.path.abspath(directory)), _abstract(_drop_empty(like))), like)


# ------------------------------------------------------------------ compat optimizers


class Checkpointer:
    """Save/restore a compat optimizer (+ scheduler, + optionally its parameters) at numbered steps.

    >>> ckpt = Checkpointer("/tmp/run/ckpt", max_to_keep=3)
    >>> ckpt.save(step, optimizer, scheduler, include_params=True)   # async; .wait() to block
    >>> ckpt.restore(optimizer, scheduler, include_params=True)      # latest step
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = True):
        ocp = _ocp()
        self.directory = os.fspath(os.path.abspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save),
        )

    # -- API --------------------------------------------------------------
    def save(self, step: int, optimizer, scheduler=None, *, include_params: bool = False) -> None:
        """Start saving (asynchronously unless ``async_save=False``); arrays are snapshotted before returning."""
        ocp = _ocp()
        arrays, meta = optimizer.export_state(include_params)
        meta = dict(meta, param_groups=_encode(meta["param_groups"]), records=_encode(meta["records"]),
                    extra=_encode(meta["extra"]))
        meta["scheduler"] = None if scheduler is None else {"class": type(scheduler).__name__,
                                                            "state": _encode(scheduler.state_dict())}
        self._manager.save(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardSave(_drop_empty(arrays)), meta=ocp.args.JsonSave(meta)),
        )

    def wait(self) -> None:
        """Block until pending saves are committed."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, optimizer, scheduler=None, *, step: int | None = None, include_params: bool = False) -> int:
        """Load checkpoint ``step`` (default: latest) into ``optimizer`` (and ``scheduler``); returns the step.

        All or nothing: everything is read and checked (the optimizer's arrays and groups, then the
        scheduler, by loading its state and putting the old one back on failure) before the
        optimizer changes.
        """
        ocp = _ocp()
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        where = f"checkpoint {self.directory} step {step}"
        if meta["optimizer"] != type(optimizer).__name__:
            raise ValueError(f"{where} holds a {meta['optimizer']} optimizer, not a {type(optimizer).__name__}")
        if (meta["scheduler"] is None) != (scheduler is None) or (
            scheduler is not None and meta["scheduler"]["class"] != type(scheduler).__name__
        ):
            saved = None if meta["scheduler"] is None else meta["scheduler"]["class"]
            raise ValueError(f"{where} holds scheduler {saved}, but {type(scheduler).__name__ if scheduler else None} was given")
        opt_meta = dict(meta, param_groups=_decode(meta["param_groups"]), records=_decode(meta.get("records")),
                        extra=_decode(meta.get("extra")))
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        if list(opt_meta["sizes"]) != sizes:
            raise ValueError(f"{where} has groups of sizes {list(opt_meta['sizes'])}; this optimizer's are {sizes}")
        like, _ = optimizer.export_state(include_params)
        arrays = self._manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(_abstract(_drop_empty(like)))))["arrays"]
        arrays = _refill(arrays, like)
        try:
            commit = optimizer.prepare_import(arrays, opt_meta, include_params)
        except ValueError as e:
            raise ValueError(f"{where} {e}") from None
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
        commit()
        return step

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
