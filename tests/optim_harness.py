"""Differential harness: run a torch.optim optimizer and its groupopt port side by side.

Everything here builds the *same* problem in torch and in groupopt in the same
process and compares numbers computed in that run: nothing is hard-coded.
It works for any elementwise optimizer (one that updates each parameter from
its own gradient and state).

The problem
-----------
``shapes`` gives, per parameter group, the shapes of its parameters. Group
``i``'s parameters live in a plain pytree at paths ``g{i}/p{j:02d}``; groupopt
sees them as that tree (compat: tree mode with one ``{"params": "g{i}/*"}``
group per torch group; core: one ``groupopt.group("g{i}/*")`` per group).
Initial parameters and the gradient of every step are drawn from
``numpy.random.default_rng(seed)`` in float64 and cast to ``dtype``; torch and
groupopt get bit-identical inputs.

Main entry points
-----------------
* :func:`run_differential` -- build both optimizers, run ``steps`` steps,
  optionally editing hyperparameters of some groups before some steps
  (``edits``), and return a :class:`DiffResult` with the max relative error of
  the parameters after every step (and, for compat, the final state).
* :func:`roundtrip_torch_to_ours` / :func:`roundtrip_ours_to_torch` -- one side
  runs ``k`` steps, its ``state_dict`` is loaded by the other side, which runs
  ``n`` more; compared with the first side running ``k + n`` uninterrupted.
* :func:`assert_same_error` -- a torch call and a groupopt call must raise the
  same exception type with the same message.
* :func:`assert_load_rejected` -- ``opt.load_state_dict(bad)`` must raise and
  leave ``opt.state_dict()`` exactly as before.
* :func:`rel_err`, :func:`state_dicts_equal`, :func:`compare_state` -- the
  comparisons used (``compare_state(ours_sd, torch_sd)`` also checks that
  both have state for the same indices, with the same dtypes).

Relative error is normwise per tensor: ``max|ours - torch| / max(max|torch|, 1e-30)``,
then the max over tensors. Typical tolerances: float64 ``1e-6`` (observed
~1e-15), float32 ``1e-5`` (observed ~1e-7).

Example (another optimizer plugs in the same way)::

    from optim_harness import run_differential
    res = run_differential(
        torch.optim.RMSprop, groupopt.compat.RMSprop,
        kwargs=dict(lr=1e-2, momentum=0.9),
        groups=[{}, {"lr": 3e-3, "centered": True}],   # per-group overrides
        dtype=np.float32, steps=200, edits={50: {1: {"lr": 1e-3}}},
    )
    assert res.max_err <= 1e-5, res.describe()

    # the optax-style factory (jitted ``tx.apply``) instead of the compat class:
    res = run_differential(torch.optim.RMSprop, core_factory=groupopt.rmsprop, kwargs=..., groups=...)

Keep tests fast: each call builds one optimizer per side (one compilation);
put several option combinations into different groups of one call.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

import groupopt
from groupopt.compat import to_torch

__all__ = [
    "DEFAULT_SHAPES",
    "DiffResult",
    "Problem",
    "make_problem",
    "run_differential",
    "run_torch",
    "make_compat",
    "make_torch",
    "torch_step",
    "roundtrip_torch_to_ours",
    "roundtrip_ours_to_torch",
    "assert_same_error",
    "assert_load_rejected",
    "rel_err",
    "state_dicts_equal",
    "compare_state",
    "torch_dtype",
]

DEFAULT_SHAPES = ((3, 2), (4,))
"""Parameter shapes of each group when ``shapes`` is not given."""


def torch_dtype(dtype):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def rel_err(ours, ref) -> float:
    """Normwise relative error ``max|ours - ref| / max(max|ref|, 1e-30)`` (float64 arithmetic)."""
    a = np.asarray(ours, np.float64)
    b = np.asarray(ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: ours {a.shape} vs torch {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        same = np.array_equal(a, b, equal_nan=True)
        return 0.0 if same else float("inf")
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30))


# --------------------------------------------------------------------------- the problem


@dataclasses.dataclass
class Problem:
    """Initial parameters and per-step gradients, identical for both sides (numpy arrays)."""

    dtype: Any
    shapes: tuple  # per group, a tuple of shapes
    init: list  # per group, a list of arrays
    seed: int

    def paths(self, g: int) -> list[str]:
        return [f"g{g}/p{j:02d}" for j in range(len(self.shapes[g]))]

    def grads(self, step: int, scale: float = 1.0) -> list:
        """Gradients of step ``step`` (0-based), per group, a list of arrays (deterministic)."""
        rng = np.random.default_rng([self.seed, 1000 + step])
        return [[(scale * rng.standard_normal(s)).astype(self.dtype) for s in shapes] for shapes in self.shapes]

    def tree(self, per_group_lists) -> dict:
        return {f"g{g}": {f"p{j:02d}": jnp.asarray(a) for j, a in enumerate(arrs)} for g, arrs in enumerate(per_group_lists)}

    def flat_from_tree(self, tree) -> list:
        return [[np.asarray(tree[f"g{g}"][f"p{j:02d}"]) for j in range(len(s))] for g, s in enumerate(self.shapes)]


def make_problem(n_groups: int, dtype=np.float64, shapes=None, seed: int = 0) -> Problem:
    """``shapes``: per-group tuples of shapes (default :data:`DEFAULT_SHAPES` for every group)."""
    if shapes is None:
        shapes = tuple(DEFAULT_SHAPES for _ in range(n_groups))
    shapes = tuple(tuple(tuple(s) for s in g) for g in shapes)
    if len(shapes) != n_groups:
        raise ValueError(f"shapes has {len(shapes)} groups, expected {n_groups}")
    rng = np.random.default_rng([seed, 0])
    init = [[rng.standard_normal(s).astype(dtype) for s in g] for g in shapes]
    return Problem(np.dtype(dtype), shapes, init, seed)


# --------------------------------------------------------------------------- building both sides


def _torch_groups(prob: Problem, groups: Sequence[Mapping]):
    params = [[torch.tensor(a.copy()).requires_grad_(True) for a in arrs] for arrs in prob.init]
    return params, [{"params": ps, **dict(o)} for ps, o in zip(params, groups)]


def make_torch(torch_cls, prob: Problem, kwargs: Mapping, groups: Sequence[Mapping]):
    """``(optimizer, params)`` with ``params`` per group a list of leaf tensors."""
    params, tgroups = _torch_groups(prob, groups)
    return torch_cls(tgroups, **dict(kwargs)), params


def make_compat(compat_cls, prob: Problem, kwargs: Mapping, groups: Sequence[Mapping]):
    """The compat optimizer in tree mode (``optimizer.params`` is the current tree)."""
    tree = prob.tree(prob.init)
    cgroups = [{"params": f"g{g}/*", **dict(o)} for g, o in enumerate(groups)]
    return compat_cls(cgroups, model=tree, **dict(kwargs))


def torch_step(opt, params, grads) -> None:
    for ps, gs in zip(params, grads):
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g.copy())
    opt.step()


def _apply_torch_edits(opt, edit: Mapping) -> None:
    for g, values in edit.items():
        opt.param_groups[g].update(values)


def run_torch(torch_cls, prob: Problem, kwargs, groups, steps: int, edits=None, grad_scale: float = 1.0, start: int = 0, opt=None, params=None):
    """Run torch for ``steps`` steps (gradients ``start .. start+steps-1``); returns ``(opt, params, history)``.

    ``history[t]``: per group, a list of numpy copies of the parameters after step ``start + t``.
    """
    edits = edits or {}
    if opt is None:
        opt, params = make_torch(torch_cls, prob, kwargs, groups)
    hist = []
    for t in range(start, start + steps):
        if t in edits:
            _apply_torch_edits(opt, edits[t])
        torch_step(opt, params, prob.grads(t, grad_scale))
        hist.append([[p.detach().numpy().copy() for p in ps] for ps in params])
    return opt, params, hist


# --------------------------------------------------------------------------- the differential run


@dataclasses.dataclass
class DiffResult:
    """Outcome of :func:`run_differential`.

    Attributes:
      errors: per step, the max relative error over all parameters after it.
      state_errors: compat mode: per state key, the max relative error of the final state.
      key_orders: compat mode: per parameter index, ``(ours, torch)`` state key tuples (must be equal).
      ours / torch_opt: the two optimizers at the end (compat object, or ``(tx, state, tree)`` for core).
    """

    errors: np.ndarray
    state_errors: dict
    key_orders: dict
    ours: Any
    torch_opt: Any
    torch_params: Any

    @property
    def max_err(self) -> float:
        """Max relative error over all steps (parameters) and, in compat mode, the final state."""
        return float(max([float(np.max(self.errors, initial=0.0))] + list(self.state_errors.values())))

    def key_orders_match(self) -> bool:
        return all(a == b for a, b in self.key_orders.values())

    def describe(self) -> str:
        worst = int(np.argmax(self.errors)) if len(self.errors) else -1
        bad = {k: v for k, v in self.key_orders.items() if v[0] != v[1]}
        return (
            f"max param rel err {np.max(self.errors, initial=0.0):.3e} (worst step {worst}); "
            f"state errors {self.state_errors}; mismatched state key orders {bad}"
        )


def _compare_state(ours_sd, torch_sd):
    """Per state key, the max relative error; per index, both key orders. Raises on index or dtype mismatch."""
    errs, orders = {}, {}
    ts, os_ = torch_sd["state"], ours_sd["state"]
    if sorted(ts) != sorted(os_):
        raise AssertionError(f"state indices differ: ours {sorted(os_)} vs torch {sorted(ts)}")
    for idx in ts:
        orders[idx] = (tuple(os_[idx]), tuple(ts[idx]))
        for k, tv in ts[idx].items():
            if k not in os_[idx]:
                continue
            ov = os_[idx][k]
            if isinstance(tv, torch.Tensor):
                want = str(tv.dtype).replace("torch.", "")
                if np.asarray(ov).dtype.name != want:
                    raise AssertionError(f"state {idx}[{k!r}]: ours has dtype {np.asarray(ov).dtype.name}, torch {want}")
            e = rel_err(ov, tv)
            errs[k] = max(errs.get(k, 0.0), e)
    return errs, orders


def run_differential(
    torch_cls,
    compat_cls=None,
    *,
    core_factory: Callable | None = None,
    kwargs: Mapping | None = None,
    groups: Sequence[Mapping] = ({},),
    dtype=np.float64,
    steps: int = 200,
    edits: Mapping[int, Mapping[int, Mapping[str, Any]]] | None = None,
    shapes=None,
    seed: int = 0,
    grad_scale: float = 1.0,
) -> DiffResult:
    """Run ``torch_cls`` and groupopt on the same problem; compare after every step.

    Args:
      torch_cls: e.g. ``torch.optim.RMSprop``.
      compat_cls: e.g. ``groupopt.compat.RMSprop`` (compat mode), or None with ``core_factory``.
      core_factory: e.g. ``groupopt.rmsprop`` (core mode): called as
        ``core_factory(params=tree, groups=[{"params": "g{i}/*", **groups[i]}], **kwargs)``
        and stepped with ``jax.jit(tx.apply)``; edits go through ``tx.set_hyperparams``
        (numeric hyperparameters only).
      kwargs: constructor keyword arguments shared by both sides.
      groups: per-group overrides (one dict per group; ``{}`` for defaults).
      dtype: ``np.float32`` or ``np.float64`` (parameters, gradients, state).
      steps: number of steps.
      edits: ``{step: {group: {key: value}}}``: before step ``step`` (0-based),
        ``param_groups[group].update(values)`` on both sides (e.g. an lr change).
      shapes: per-group tuples of parameter shapes (default :data:`DEFAULT_SHAPES`).
      seed: seeds the initial parameters and gradients.
      grad_scale: gradients are ``grad_scale * N(0, 1)``.
    """
    if (compat_cls is None) == (core_factory is None):
        raise ValueError("pass exactly one of compat_cls and core_factory")
    kwargs = dict(kwargs or {})
    groups = [dict(g) for g in groups]
    edits = edits or {}
    prob = make_problem(len(groups), dtype, shapes, seed)
    topt, tparams = make_torch(torch_cls, prob, kwargs, groups)
    errors = np.zeros(steps)
    if compat_cls is not None:
        ours = make_compat(compat_cls, prob, kwargs, groups)
        for t in range(steps):
            if t in edits:
                _apply_torch_edits(topt, edits[t])
                for g, values in edits[t].items():
                    ours.param_groups[g].update(values)
            grads = prob.grads(t, grad_scale)
            torch_step(topt, tparams, grads)
            ours.step(prob.tree(grads))
            mine = prob.flat_from_tree(ours.params)
            errors[t] = max(rel_err(a, p) for ma, ps in zip(mine, tparams) for a, p in zip(ma, ps))
        state_errors, orders = _compare_state(ours.state_dict(), topt.state_dict())
        return DiffResult(errors, state_errors, orders, ours, topt, tparams)

    tree = prob.tree(prob.init)
    cgroups = [{"params": f"g{g}/*", **o} for g, o in enumerate(groups)]
    tx = core_factory(params=tree, groups=cgroups, **kwargs)
    state = tx.init(tree)
    apply = jax.jit(tx.apply)
    for t in range(steps):
        if t in edits:
            _apply_torch_edits(topt, edits[t])
            for g, values in edits[t].items():
                state = tx.set_hyperparams(state, g, **values)
        grads = prob.grads(t, grad_scale)
        torch_step(topt, tparams, grads)
        tree, state = apply(tree, prob.tree(grads), state)
        mine = prob.flat_from_tree(tree)
        errors[t] = max(rel_err(a, p) for ma, ps in zip(mine, tparams) for a, p in zip(ma, ps))
    return DiffResult(errors, {}, {}, (tx, state, tree), topt, tparams)


compare_state = _compare_state


# --------------------------------------------------------------------------- round trips


def _max_param_err(mine_tree, prob: Problem, tparams) -> float:
    mine = prob.flat_from_tree(mine_tree)
    return max(rel_err(a, p) for ma, ps in zip(mine, tparams) for a, p in zip(ma, ps))


def roundtrip_torch_to_ours(torch_cls, compat_cls, *, kwargs=None, groups=({},), dtype=np.float64, k=5, n=5, shapes=None, seed=0, edits=None):
    """torch runs ``k`` steps -> ``state_dict()`` (tensors) -> our ``load_state_dict`` -> we run ``n`` more.

    Our parameters start from torch's after ``k`` steps. Returns the max relative
    error against torch running ``k + n`` steps uninterrupted (over the ``n``
    steps, and of the state at the end), and the two optimizers.
    """
    kwargs, groups = dict(kwargs or {}), [dict(g) for g in groups]
    prob = make_problem(len(groups), dtype, shapes, seed)
    topt, tparams, _ = run_torch(torch_cls, prob, kwargs, groups, k, edits)
    sd = topt.state_dict()  # live tensors: our load must not keep aliases torch mutates
    mid = Problem(prob.dtype, prob.shapes, [[p.detach().numpy().copy() for p in ps] for ps in tparams], prob.seed)
    ours = make_compat(compat_cls, mid, kwargs, groups)
    ours.load_state_dict(sd)
    err = 0.0
    for t in range(k, k + n):
        if edits and t in edits:
            for g, values in edits[t].items():
                ours.param_groups[g].update(values)
                topt.param_groups[g].update(values)
        grads = prob.grads(t)
        torch_step(topt, tparams, grads)
        ours.step(prob.tree(grads))
        err = max(err, _max_param_err(ours.params, prob, tparams))
    serr, orders = _compare_state(ours.state_dict(), topt.state_dict())
    if any(a != b for a, b in orders.values()):
        raise AssertionError(f"state key orders differ after loading torch's state: {orders}")
    return max([err] + list(serr.values())), ours, topt


def roundtrip_ours_to_torch(torch_cls, compat_cls, *, kwargs=None, groups=({},), dtype=np.float64, k=5, n=5, shapes=None, seed=0):
    """We run ``k`` steps -> ``to_torch(state_dict())`` -> ``torch_cls.load_state_dict`` -> torch runs ``n`` more.

    torch's parameters start from ours after ``k`` steps. Returns the max
    relative error against us running ``k + n`` steps uninterrupted, and the two optimizers.
    """
    kwargs, groups = dict(kwargs or {}), [dict(g) for g in groups]
    prob = make_problem(len(groups), dtype, shapes, seed)
    ours = make_compat(compat_cls, prob, kwargs, groups)
    for t in range(k):
        ours.step(prob.tree(prob.grads(t)))
    mid = Problem(prob.dtype, prob.shapes, prob.flat_from_tree(ours.params), prob.seed)
    topt, tparams = make_torch(torch_cls, mid, kwargs, groups)
    topt.load_state_dict(to_torch(ours.state_dict()))
    err = 0.0
    for t in range(k, k + n):
        grads = prob.grads(t)
        torch_step(topt, tparams, grads)
        ours.step(prob.tree(grads))
        err = max(err, _max_param_err(ours.params, prob, tparams))
    serr, _ = _compare_state(ours.state_dict(), topt.state_dict())
    return max([err] + list(serr.values())), ours, topt


# --------------------------------------------------------------------------- errors


def assert_same_error(torch_call: Callable[[], Any], our_call: Callable[[], Any]):
    """Both calls must raise; same exception type (by name) and the same message. Returns ours."""
    try:
        torch_call()
    except Exception as e:  # noqa: BLE001
        terr = e
    else:
        raise AssertionError("torch raised nothing")
    try:
        our_call()
    except Exception as e:  # noqa: BLE001
        oerr = e
    else:
        raise AssertionError(f"groupopt raised nothing; torch raised {type(terr).__name__}: {terr}")
    assert type(oerr).__name__ == type(terr).__name__, f"ours {type(oerr).__name__}: {oerr} vs torch {type(terr).__name__}: {terr}"
    assert str(oerr) == str(terr), f"ours {oerr!r} vs torch {terr!r}"
    return oerr


def state_dicts_equal(a: dict, b: dict) -> bool:
    """Exact equality of two state_dicts (arrays bitwise, key orders included)."""

    def eq(x, y):
        if isinstance(x, dict) and isinstance(y, dict):
            return list(x) == list(y) and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        if hasattr(x, "shape") or hasattr(y, "shape"):
            xa, ya = np.asarray(x), np.asarray(y)
            return xa.dtype == ya.dtype and xa.shape == ya.shape and np.array_equal(xa, ya, equal_nan=True)
        return type(x) is type(y) and (x == y or (x != x and y != y))

    return eq(a, b)


def assert_load_rejected(opt, bad_state_dict, match: str | None = None, exc=(ValueError, KeyError, TypeError)):
    """``opt.load_state_dict(bad)`` raises (message matching ``match``) and ``opt`` is unchanged."""
    import re

    before = copy.deepcopy(opt.state_dict())
    groups_before = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(bad_state_dict)
    except exc as e:
        if match is not None and not re.search(match, str(e)):
            raise AssertionError(f"error message {str(e)!r} does not match {match!r}") from e
        err = e
    else:
        raise AssertionError("load_state_dict accepted a bad state_dict")
    assert state_dicts_equal(before, opt.state_dict()), "optimizer state changed by a rejected load_state_dict"
    after = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert state_dicts_equal({"g": groups_before}, {"g": after}), "param_groups changed by a rejected load_state_dict"
    return err
