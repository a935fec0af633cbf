"""``groupopt.compat.LBFGS``: torch.optim.LBFGS over :mod:`groupopt.optimizers.lbfgs`.

Bookkeeping only: torch's signature, defaults, checks and messages, the
``param_groups`` / ``state_dict`` format. The algorithm is the core's
(:func:`groupopt.optimizers.lbfgs.minimize_flat`), run on the group's
parameters flattened in group order, as torch flattens them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..grad_checks import is_sparse as _is_sparse
from ..groups import is_leaf as _is_leaf, is_variable as _is_variable
from ..optimizers.base import Rule
from ..optimizers.lbfgs import LBFGSSolver, minimize_flat, state_from_torch, state_to_torch
from .optimizer import Optimizer
from .param_state import StateSnapshot

__all__ = ["LBFGS"]


@dataclasses.dataclass(frozen=True)
class _NoElementwiseRule(Rule):
    """Placeholder so the base class can keep ``param_groups``; LBFGS has no elementwise rule."""

    name: ClassVar[str] = "LBFGS"
    hyperparams: ClassVar[dict] = {}

    def apply(self, grad, param, slots, coef):  # pragma: no cover - never called
        raise NotImplementedError("LBFGS is not an elementwise rule; see groupopt.optimizers.lbfgs")


@jax.jit
def _flatten(values):
    """torch's flattening: the parameters raveled and concatenated in group order."""
    dtype = jnp.result_type(*values)
    return jnp.concatenate([jnp.ravel(v).astype(dtype) for v in values])


@functools.partial(jax.jit, static_argnums=1)
def _unflatten(flat, specs):
    out, offset = [], 0
    for shape, dtype in specs:
        n = math.prod(shape)
        out.append(flat[offset : offset + n].reshape(shape).astype(dtype))
        offset += n
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gather(grads, idx, dtype):
    """The members' gradients (positions ``idx`` among the leaves of ``grads``), flattened; a sparse
    (BCOO) gradient is made dense first, as torch's LBFGS does (``grad.to_dense()``)."""
    leaves = jax.tree.leaves(grads, is_leaf=_is_leaf)
    leaves = [x.get_value() if _is_variable(x) else x for x in leaves]
    leaves = [x.todense() if _is_sparse(x) else x for x in leaves]
    return jnp.concatenate([jnp.ravel(leaves[i]).astype(dtype) for i in idx])


class LBFGS(Optimizer):
    r"""torch.optim.LBFGS (see :mod:`groupopt.optimizers.lbfgs` for the algorithm).

    One parameter group only. ``step(closure)`` is required: the closure reads
    the *current* parameters (the model's Variables, which the optimizer sets
    to each trial point before calling it, or ``optimizer.params`` in pytree
    mode) and returns ``(loss, grads)`` with the gradients of the whole model,
    as for the other compat optimizers. It may be called many times; the
    first loss is returned.

    Differences from torch: an invalid ``line_search_fn`` raises torch's
    ``RuntimeError`` at the start of ``step``, before any evaluation and with
    the state untouched (torch raises it after its first evaluation, having
    already counted it); if the closure raises, parameters and state are left
    as they were before the step. Complex parameters are not supported.
    """

    _rule_cls = _NoElementwiseRule

    def __init__(
        self,
        params,
        lr=1,
        max_iter=20,
        max_eval=None,
        tolerance_grad=1e-7,
        tolerance_change=1e-9,
        history_size=100,
        line_search_fn=None,
        *,
        model=None,
    ):
        if hasattr(lr, "shape") and np.size(lr) != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults, model=model)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._solver(self.param_groups[0], check_line_search=False)  # types, history_size: early errors
        self._lbfgs_state: dict | None = None  # the core's state (torch: state[first param])
        self._grad_idx_cache: dict = {}

    # ------------------------------------------------------------------ step

    @staticmethod
    def _solver(group: dict, *, check_line_search: bool = True) -> LBFGSSolver:
        ls = group["line_search_fn"] if check_line_search else None
        return LBFGSSolver(
            group["lr"], group["max_iter"], group["max_eval"], group["tolerance_grad"],
            group["tolerance_change"], group["history_size"], ls,
        )

    def _flat_grad(self, grads, members, dtype):
        """The members' gradients, raveled and concatenated in group order (torch's flat grad)."""
        key = (jax.tree.structure(grads), len(members))
        idx = self._grad_idx_cache.get(key)
        if idx is None:
            idx = self._grad_idx_cache[key] = tuple(self._binding.grad_indices(grads, members))
        return _gather(grads, idx, np.dtype(dtype))

    def step(self, closure):
        """One torch ``LBFGS.step``: returns the closure's first loss.

        Args:
          closure: a callable returning ``(loss, grads)`` at the current parameters.
        """
        self._opt_called = True  # read by the schedulers' order warning
        if len(self.param_groups) != 1:
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        if not callable(closure):
            raise TypeError(
                f"{type(closure).__name__!r} object is not callable: LBFGS.step(closure) needs a closure "
                "returning (loss, grads)"
            )
        group = self.param_groups[0]
        solver = self._solver(group)  # validates, incl. torch's "only 'strong_wolfe' is supported"
        members = group["params"]
        values = self._binding.get(members)
        flat = _flatten(list(values))
        specs = tuple((tuple(v.shape), np.dtype(v.dtype)) for v in values)

        def unravel(x):
            return _unflatten(x, specs)

        def evaluate(x):
            self._binding.set(members, unravel(x))
            out = closure()
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("step(closure): the closure must return (loss, grads)")
            loss, grads = out
            return loss, self._flat_grad(grads, members, flat.dtype)

        state = self._lbfgs_state if self._lbfgs_state is not None else {"func_evals": 0, "n_iter": 0}
        try:
            loss, x, new_state = minimize_flat(solver, flat, state, evaluate)
        except BaseException:
            self._binding.set(members, values)  # nothing half-applied
            raise
        self._binding.set(members, unravel(x))
        self._lbfgs_state = new_state
        return loss

    # ------------------------------------------------------------------ checkpoints (export_state / prepare_import)

    def _export_extra(self):
        return None if self._lbfgs_state is None else state_to_torch(self._lbfgs_state)

    def _import_extra(self, extra):
        if extra is None:
            return lambda: setattr(self, "_lbfgs_state", None)
        group = self.param_groups[0]
        values = self._binding.get(group["params"])
        n = sum(math.prod(v.shape) for v in values)
        solver = self._solver(group, check_line_search=False)
        new_state = state_from_torch(extra, n, jnp.result_type(*values), solver.history_size, "LBFGS checkpoint")
        return lambda: setattr(self, "_lbfgs_state", new_state)

    # ------------------------------------------------------------------ state

    @property
    def state(self):
        """torch's ``optimizer.state``: all LBFGS state lives under the first parameter."""
        if self._lbfgs_state is None:
            return StateSnapshot([])
        return StateSnapshot([(self.param_groups[0]["params"][0], state_to_torch(self._lbfgs_state))])

    def state_dict(self) -> dict:
        """torch's layout: ``{"state": {0: {...}}, "param_groups": [...]}`` (numpy copies, lists for the history)."""
        groups, index = [], 0
        for group in self.param_groups:
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(packed)
        state = {} if self._lbfgs_state is None else {0: state_to_torch(self._lbfgs_state)}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch-format LBFGS state (ours or real torch's, tensors allowed); all checked before any change."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        merged_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            merged = {k: v for k, v in saved.items() if k != "params"}
            if "param_names" not in merged and "param_names" in group:
                merged["param_names"] = group["param_names"]
            for k, v in self.defaults.items():
                merged.setdefault(k, v)
            merged["params"] = group["params"]
            merged_groups.append(merged)
        group0 = merged_groups[0]
        try:
            solver = self._solver(group0, check_line_search=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"param group 0: {e}") from None
        saved_state = state_dict["state"]
        first = saved_groups[0]["params"][0]
        entry = saved_state.get(first, saved_state.get(str(first)))
        new_state = None
        if entry:
            values = self._binding.get(group0["params"])
            n = sum(math.prod(v.shape) for v in values)
            dtype = jnp.result_type(*values)
            where = f"param group 0: saved state of parameter {first}"
            new_state = state_from_torch(entry, n, dtype, solver.history_size, where)
            if new_state.get("n_iter", 0) > 0 and new_state.get("d") is None:
                raise ValueError(f"{where}: n_iter > 0 but no direction 'd'")
        # commit
        for group, merged in zip(self.param_groups, merged_groups):
            group.clear()
            group.update(merged)
        self._lbfgs_state = new_state
