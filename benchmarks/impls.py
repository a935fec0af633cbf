"""The implementations of an optimizer-only workload (fixed gradients, one optimizer step per timed step).

* ``torch_fused`` / ``torch_foreach``: ``torch.optim.AdamW`` / ``SGD`` with
  ``fused=True`` / ``foreach=True``, one torch param group per workload group
  (the mixed workload: one AdamW and one SGD optimizer, frozen params given to
  neither; stacked params: one group per layer slice, the slices as separate
  tensors). ``p.grad`` is set once and reused.
* ``optax``: the idiomatic Optax way: ``optax.multi_transform({label:
  optax.inject_hyperparams(optax.adamw)(...)}, label_tree)`` (SGD:
  ``add_decayed_weights`` + ``sgd``; frozen: ``set_to_zero``); stacked params:
  ``scale_by_adam`` + ``add_decayed_weights`` + a multiply by the broadcast
  per-layer ``-lr`` vector. ``update`` + ``apply_updates`` in one ``jax.jit``
  donating params and state.
* ``groupopt``: the core, ``groupopt.grouped(params, [groupopt.group(...)])``,
  step = ``jax.jit(tx.apply, donate_argnums=(0, 2))``; stacked params: one
  group with a per-slice lr vector.
* ``groupopt_scalar_lr``: the stacked workload with a single scalar lr (what the
  per-slice vector costs).
* ``groupopt_compat``: ``groupopt.compat.AdamW`` / ``SGD`` in tree mode
  (``model=params_dict``), ``opt.step(grads)`` (it donates the params); its
  ``compile_s`` is the first step minus a typical step.

The jax implementations are compiled ahead of time with
``jax.jit(...).lower(...).compile()`` (timed: ``compile_s``, of which
``compile_lower_s`` is tracing + lowering) and the compiled
executable is what is timed. Each returns a :class:`Measured`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from .timing import Timing, as_numpy, compile_jit, device_kind, memory_stats, time_steps, tree_nbytes
from .workloads import Workload, nest

__all__ = ["Measured", "Config", "IMPLS", "NOT_COMPARABLE", "run_impl", "update_norm"]


@dataclasses.dataclass
class Config:
    warmup: int
    steps: int


@dataclasses.dataclass
class Measured:
    """One implementation's measurements on one workload."""

    timing: Timing
    compile_s: float | None
    state_bytes: int
    n_leaves: int
    n_groups: int
    device: str
    update_norm: float | None = None  # ||params_final - params_0|| (float64): the same for every impl
    memory: dict | None = None
    note: str = ""
    lower_s: float | None = None  # the tracing + lowering part of compile_s (jax.jit(...).lower)


def update_norm(final: dict, initial: dict) -> float:
    """``sqrt(sum((final - initial) ** 2))`` over all parameters, in float64 (a cross-implementation check)."""
    total = 0.0
    for path, x0 in initial.items():
        d = as_numpy(final[path]) - x0.astype(np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return float(np.sqrt(total))


def path_selector(paths) -> Callable:
    """A groupopt selector (predicate) matching exactly these paths."""
    paths = frozenset(paths)
    return lambda path, leaf: path in paths


# --------------------------------------------------------------------------- torch


def _torch(w: Workload, cfg: Config, *, fused: bool) -> Measured:
    import torch

    flags = {"fused": True} if fused else {"foreach": True}
    group_of = w.group_of()
    L = None if w.layer_lrs is None else len(w.layer_lrs)
    tensors: dict = {}  # path -> tensor, or list of per-slice tensors for stacked params
    for path, x in w.params.items():
        live = w.groups[group_of[path]].rule != "frozen"
        if L is None:
            t = torch.tensor(x, requires_grad=live)  # a copy: torch updates in place
            if live:
                t.grad = torch.tensor(w.grads[path])
            tensors[path] = t
        else:
            tensors[path] = [torch.tensor(x[i], requires_grad=True) for i in range(L)]
            for i, t in enumerate(tensors[path]):
                t.grad = torch.tensor(w.grads[path][i])
    opts = []
    if L is not None:
        (g,) = w.groups
        groups = [{"params": [tensors[p][i] for p in g.paths], **g.hparams, "lr": float(w.layer_lrs[i])} for i in range(L)]
        opts.append(torch.optim.AdamW(groups, **flags))
    else:
        for rule, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
            groups = [{"params": [tensors[p] for p in g.paths], **g.hparams} for g in w.groups if g.rule == rule]
            if groups:
                opts.append(cls(groups, **flags))

    def step():
        for o in opts:
            o.step()

    with torch.no_grad():
        timing = time_steps(step, warmup=cfg.warmup, steps=cfg.steps, sync=lambda _: None)
    state_bytes = sum(int(v.nbytes) for o in opts for s in o.state.values() for v in s.values() if torch.is_tensor(v))
    final = {p: (torch.stack([t.detach() for t in ts]) if L is not None else ts) for p, ts in tensors.items()}
    n_leaves = sum(len(v) if isinstance(v, list) else 1 for v in tensors.values())
    return Measured(
        timing,
        None,
        state_bytes,
        n_leaves,
        sum(len(o.param_groups) for o in opts),
        "cpu",
        update_norm(final, w.params),
        note=f"torch threads={torch.get_num_threads()}",
    )


def torch_fused(w, cfg):
    return _torch(w, cfg, fused=True)


def torch_foreach(w, cfg):
    return _torch(w, cfg, fused=False)


# --------------------------------------------------------------------------- jax helpers


def _jax_inputs(w: Workload):
    import jax.numpy as jnp

    params = nest({p: jnp.array(x) for p, x in w.params.items()})
    grads = nest({p: jnp.array(x) for p, x in w.grads.items()})
    return params, grads


def _flat_by_path(tree) -> dict:
    import jax

    from groupopt.groups import path_str

    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run_jitted(w: Workload, cfg: Config, step_fn, init_state: Callable, n_groups: int, note: str = "") -> Measured:
    """Compile ``step_fn(params, grads, state) -> (params, state)`` donating params and state, and time it."""
    params, grads = _jax_inputs(w)
    state = init_state(params)
    compiled, ct = compile_jit(step_fn, (params, grads, state), donate_argnums=(0, 2))
    memory = memory_stats(compiled, tree_nbytes(params))
    carry = [params, state]

    def step():
        carry[0], carry[1] = compiled(carry[0], grads, carry[1])
        return carry

    timing = time_steps(step, warmup=cfg.warmup, steps=cfg.steps)
    return Measured(
        timing,
        ct.total_s,
        tree_nbytes(carry[1]),
        w.n_leaves,
        n_groups,
        device_kind(),
        update_norm(_flat_by_path(carry[0]), w.params),
        memory,
        note,
        lower_s=ct.lower_s,
    )


# --------------------------------------------------------------------------- optax


def _optax_sgd(learning_rate, momentum, weight_decay):
    import optax

    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def _optax_group(g):
    import optax

    hp = g.hparams
    if g.rule == "adamw":
        b1, b2 = hp["betas"]
        return optax.inject_hyperparams(optax.adamw)(
            learning_rate=hp["lr"], b1=b1, b2=b2, eps=hp["eps"], weight_decay=hp["weight_decay"]
        )
    if g.rule == "sgd":
        return optax.inject_hyperparams(_optax_sgd)(
            learning_rate=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
        )
    return optax.set_to_zero()


def _scale_by_slice(factors):
    """Multiply each update by ``factors[i]`` along its axis 0 (a per-layer learning rate on stacked params)."""
    import jax
    import jax.numpy as jnp
    import optax

    factors = jnp.asarray(factors)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * factors.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optax_impl(w: Workload, cfg: Config) -> Measured:
    import optax

    if w.layer_lrs is not None:
        (g,) = w.groups
        b1, b2 = g.hparams["betas"]
        tx = optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2, eps=g.hparams["eps"]),
            optax.add_decayed_weights(g.hparams["weight_decay"]),
            _scale_by_slice(-w.layer_lrs),
        )
        n_groups, note = 1, "per-layer lr: scale_by_adam + add_decayed_weights + broadcast -lr vector (a constant)"
    else:
        labels = nest({p: w.groups[i].name for p, i in sorted(w.group_of().items())})
        tx = optax.multi_transform({g.name: _optax_group(g) for g in w.groups}, labels)
        n_groups, note = len(w.groups), "multi_transform of inject_hyperparams(...)"

    def step_fn(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return _run_jitted(w, cfg, step_fn, tx.init, n_groups, note)


def optax_plain(w: Workload, cfg: Config) -> Measured:
    """``optax.adamw`` over the whole tree, no groups: the reference for "grouping is free"."""
    import optax

    g = w.groups[0]
    b1, b2 = g.hparams["betas"]
    tx = optax.adamw(g.hparams["lr"], b1=b1, b2=b2, eps=g.hparams["eps"], weight_decay=g.hparams["weight_decay"])

    def step_fn(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return _run_jitted(w, cfg, step_fn, tx.init, 1, "optax.adamw, one group (not the same update: no per-group lr/wd)")


# --------------------------------------------------------------------------- groupopt


def groupopt_tx(w: Workload, params, *, scalar_lr: bool = False):
    """The workload's groups as one ``groupopt.grouped`` transformation."""
    import groupopt

    rules = {"adamw": groupopt.AdamWRule(), "sgd": groupopt.SGDRule()}
    specs = []
    for g in w.groups:
        hp = dict(g.hparams)
        if w.layer_lrs is not None and not scalar_lr:
            hp["lr"] = np.asarray(w.layer_lrs)  # one lr per slice along axis 0
        if g.rule == "frozen":
            specs.append(groupopt.group(path_selector(g.paths), frozen=True, name=g.name))
        else:
            specs.append(groupopt.group(path_selector(g.paths), rule=rules[g.rule], name=g.name, **hp))
    return groupopt.grouped(params, specs, rule=groupopt.AdamWRule())


def _groupopt(w: Workload, cfg: Config, *, scalar_lr: bool) -> Measured:
    params, _ = _jax_inputs(w)
    tx = groupopt_tx(w, params, scalar_lr=scalar_lr)
    note = ""
    if w.layer_lrs is not None:
        note = "one group, scalar lr" if scalar_lr else f"one group, lr = vector of {len(w.layer_lrs)} (per slice)"
    return _run_jitted(w, cfg, tx.apply, tx.init, len(w.groups), note)


def groupopt_impl(w, cfg):
    return _groupopt(w, cfg, scalar_lr=False)


def groupopt_scalar_lr(w, cfg):
    return _groupopt(w, cfg, scalar_lr=True)


def groupopt_compat(w: Workload, cfg: Config) -> Measured:
    import jax

    import groupopt.compat as optim

    params, grads = _jax_inputs(w)
    opts = []  # (optimizer, its paths)
    for rule, cls in (("adamw", optim.AdamW), ("sgd", optim.SGD)):
        groups = [g for g in w.groups if g.rule == rule]
        if groups:
            spec = [{"params": path_selector(g.paths), **g.hparams} for g in groups]
            opts.append((cls(spec, model=params), [p for g in groups for p in g.paths]))
    del params  # each optimizer owns its tree now (and donates its members at each step)

    def live(opt, paths):
        flat = _flat_by_path(opt.params)
        return [flat[p] for p in paths]

    def step():
        for opt, _ in opts:
            opt.step(grads)
        if len(opts) == 1:
            return opts[0][0].params
        return [live(opt, paths) for opt, paths in opts]  # the other optimizer's leaves were donated

    timing = time_steps(step, warmup=cfg.warmup, steps=cfg.steps)
    final = dict(w.params)  # frozen: untouched
    for opt, paths in opts:
        final.update(zip(paths, live(opt, paths)))
    state_bytes = sum(tree_nbytes(list(s.values())) for opt, _ in opts for s in opt.state.values())
    note = "tree mode; compile_s = first step - median step"
    if len(opts) > 1:
        note += f"; {len(opts)} optimizers (AdamW + SGD), frozen params in neither"
    return Measured(
        timing,
        timing.first_call_overhead_s(),
        state_bytes,
        w.n_leaves,
        sum(len(opt.param_groups) for opt, _ in opts),
        jax.devices()[0].device_kind,
        update_norm(final, w.params),
        None,
        note,
    )


# impls that run a different update on purpose (excluded from the update_norm cross-check)
NOT_COMPARABLE = {"groupopt_scalar_lr", "optax_plain"}

IMPLS: dict[str, Callable[[Workload, Config], Measured]] = {
    "torch_fused": torch_fused,
    "torch_foreach": torch_foreach,
    "optax": optax_impl,
    "optax_plain": optax_plain,
    "groupopt": groupopt_impl,
    "groupopt_scalar_lr": groupopt_scalar_lr,
    "groupopt_compat": groupopt_compat,
}


def run_impl(impl: str, w: Workload, cfg: Config) -> Measured:
    """Measure ``impl`` on the optimizer workload ``w``."""
    return IMPLS[impl](w, cfg)
