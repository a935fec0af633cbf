"""Compile counts, exact: hyperparameters are data, structure is code.

* compat: 200 steps with lr/momentum/weight_decay/betas/eps edited every step
  (by hand, StepLR, ExponentialLR, LambdaLR) compile the step once;
  ``add_param_group`` and a structural key (``nesterov``, ``amsgrad``) cost
  exactly one more each; flipping back and ``load_state_dict`` of the same
  structure cost none. Every run is also checked against torch doing the same
  edits, so the edits are known to reach the update.
* XLA backend compilations are counted independently with a
  ``jax.monitoring`` listener over a window of lr-edit steps: zero.
* core: a ``jax.jit``-ed ``tx.update`` of ``groupopt.adamw`` with
  ``tx.set_hyperparams`` between steps traces once.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import groupopt
import groupopt.compat as optim
from groupopt.groups import path_str
from torch_port import compare_models, errlog, make_pair, param_pairs, torch_view  # noqa: F401

BACKEND_COMPILE = "backend_compile"
assert BACKEND_COMPILE in jax._src.dispatch.BACKEND_COMPILE_EVENT  # the event name this jax version records


@contextlib.contextmanager
def count_backend_compiles():
    """Count XLA backend compilations (jax.monitoring duration events named '...backend_compile...')."""
    events = []

    def listener(event, duration, **kwargs):
        if BACKEND_COMPILE in event:
            events.append(kwargs.get("fun_name", event))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


mse_grad = nnx.grad(mse)  # eager: called twice per model; its primitives compile once per session

_rng = np.random.default_rng(0)
X = jax.device_put(_rng.normal(size=(8, 5)))
Y = jax.device_put(_rng.normal(size=(8, 3)))


def fixed_grads(model, tmodel):
    """The model's gradients at its current weights, as an nnx.State; torch's ``.grad`` set to the same values."""
    grads = mse_grad(model, X, Y)
    flat = {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for path, _, t, tr in param_pairs(model, tmodel):
        g = flat[path]
        t.grad = torch.from_numpy(np.ascontiguousarray(g.T if tr else g).copy())
    return grads


def make(kind, model, tmodel):
    groups = [{"params": model.block1}, {"params": model.block2, "lr": 0.02}]
    tgroups = [{"params": tmodel.block1.parameters()}, {"params": tmodel.block2.parameters(), "lr": 0.02}]
    if kind == "SGD":
        return optim.SGD(groups, lr=0.05, momentum=0.9), torch.optim.SGD(tgroups, lr=0.05, momentum=0.9)
    cls, tcls = getattr(optim, kind), getattr(torch.optim, kind)
    return cls(groups, lr=1e-2), tcls(tgroups, lr=1e-2)


def hand_edit(kind, i, group, g):
    """Edit every numeric hyperparameter of a group at step i (the same for both frameworks)."""
    group["lr"] = (0.05 if kind == "SGD" else 1e-2) * (1 + g) / (1 + i / 100)
    group["weight_decay"] = 1e-3 * ((i + g) % 3)
    if kind == "SGD":
        group["momentum"] = 0.9 - 0.002 * i  # stays > 0: momentum == 0 is structural (no buffer)
        group["dampening"] = 0.05 * (i % 2)
    else:
        group["betas"] = (0.9 - 1e-4 * i, 0.999 - 1e-5 * (i + g))
        group["eps"] = 1e-8 * (1 + (i % 4))


def make_scheduler(lib, driver, opt):
    sched = lib.optim.lr_scheduler if lib is torch else lib.lr_scheduler
    if driver == "StepLR":
        return sched.StepLR(opt, step_size=7, gamma=0.7)
    if driver == "ExponentialLR":
        return sched.ExponentialLR(opt, gamma=0.98)
    if driver == "LambdaLR":
        return sched.LambdaLR(opt, lambda s: s / 20 if s < 20 else max(0.0, (200 - s) / 180))
    return None


def run_edited_steps(kind, driver, model, tmodel, opt, topt, errlog, n=200, window=(100, 200)):
    """n steps, every numeric hyperparameter edited at every step (lr by hand or by a scheduler).

    Returns the XLA backend compilations seen during steps ``window[0]..window[1]-1``.
    """
    sched, tsched = make_scheduler(optim, driver, opt), make_scheduler(torch, driver, topt)
    grads = fixed_grads(model, tmodel)  # fixed gradients: the loop runs only the optimizer step
    events = None
    with contextlib.ExitStack() as stack:
        for i in range(n):
            if i == window[0]:
                events = stack.enter_context(count_backend_compiles())
            for o in (opt, topt):
                for g, group in enumerate(o.param_groups):
                    lr = group["lr"]
                    hand_edit(kind, i, group, g)
                    if driver != "hand":
                        group["lr"] = lr  # the scheduler owns the lr
            opt.step(grads)
            topt.step()
            if sched is not None:
                sched.step()
                tsched.step()
            assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in topt.param_groups]
    compare_models(model, tmodel, errlog, f"{kind} {driver} edits (fixed grads)")
    return events


@pytest.mark.parametrize("kind,driver", [("SGD", "StepLR"), ("AdamW", "LambdaLR")])
def test_scheduled_lr_and_edits_never_recompile(kind, driver, errlog):
    """200 steps, lr from a scheduler and every other hyperparameter edited by hand: one compile."""
    model, tmodel = make_pair("net", seed=21)
    opt, topt = make(kind, model, tmodel)
    events = run_edited_steps(kind, driver, model, tmodel, opt, topt, errlog)
    assert opt.num_compiles == 1
    assert events == [], events  # 100 edited steps after warm-up: no XLA compilation at all


@pytest.mark.parametrize("kind,driver", [("SGD", "hand"), ("Adam", "ExponentialLR")])
def test_edits_then_structure_changes_compile_exactly_once_each(kind, driver, errlog):
    """After 200 edited steps (1 compile): add_param_group +1, a structural key +1, flipping back +0,
    load_state_dict of the same structure +0."""
    model, tmodel = make_pair("net", seed=21)
    opt, topt = make(kind, model, tmodel)
    events = run_edited_steps(kind, driver, model, tmodel, opt, topt, errlog)
    assert opt.num_compiles == 1
    assert events == [], events

    # structure: add_param_group -> exactly one more
    opt.add_param_group({"params": model.fc, "lr": 0.01})
    topt.add_param_group({"params": tmodel.fc.parameters(), "lr": 0.01})
    grads = fixed_grads(model, tmodel)  # fc's gradient now carries its optimizer id
    for _ in range(3):
        opt.step(grads)
        topt.step()
    assert opt.num_compiles == 2
    compare_models(model, tmodel, errlog, f"{kind} {driver} edits (fixed grads)")

    # a structural key -> exactly one more (one XLA compilation); back to the old value -> none (cached)
    key = "nesterov" if kind == "SGD" else "amsgrad"
    for o in (opt, topt):
        if kind == "SGD":
            for group in o.param_groups:
                group["dampening"] = 0.0  # nesterov needs zero dampening
        o.param_groups[1][key] = True
    with count_backend_compiles() as events:
        opt.step(grads)
    assert opt.num_compiles == 3
    assert len(events) == 1, events
    if kind == "SGD":  # torch supports flipping nesterov mid-run (torch's Adam cannot turn amsgrad on mid-run)
        topt.step()
        for _ in range(3):
            opt.step(grads)
            topt.step()
        compare_models(model, tmodel, errlog, f"{kind} {driver} edits (fixed grads)")
    opt.param_groups[1][key] = False
    with count_backend_compiles() as events:
        opt.step(grads)
    assert opt.num_compiles == 3
    assert events == [], events

    # load_state_dict of the same structure -> none
    sd = opt.state_dict()
    opt.step(grads)
    opt.load_state_dict(sd)
    opt.step(grads)
    m2, t2 = make_pair("net", seed=22)
    other, _ = make(kind, m2, t2)
    other.add_param_group({"params": m2.fc, "lr": 0.01})
    opt.load_state_dict(other.state_dict())  # another optimizer's checkpoint of the same shape
    opt.step(grads)
    assert opt.num_compiles == 3


def test_sgd_momentum_edited_to_zero_and_back(errlog):
    """torch keeps the momentum buffer while momentum is 0 (``if momentum != 0`` skips it) and
    resumes from it later; no recompilation. A group that starts at momentum 0 has no buffer until
    its first nonzero-momentum step (one recompilation: the buffer appears)."""
    model, tmodel = make_pair("net", seed=25)
    opt = optim.SGD([{"params": model.block1}, {"params": model.block2, "momentum": 0.0}], lr=0.05, momentum=0.9, dampening=0.1)
    topt = torch.optim.SGD(
        [{"params": tmodel.block1.parameters()}, {"params": tmodel.block2.parameters(), "momentum": 0.0}], lr=0.05, momentum=0.9, dampening=0.1
    )
    grads = fixed_grads(model, tmodel)
    schedule = [(0.9, 0.0), (0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.8, 0.0), (0.8, 0.7), (0.0, 0.7), (0.0, 0.0), (0.9, 0.5), (0.9, 0.5)]
    compiles = []
    for m0, m1 in schedule:
        for o in (opt, topt):
            o.param_groups[0]["momentum"] = m0
            o.param_groups[1]["momentum"] = m1
        opt.step(grads)
        topt.step()
        compiles.append(opt.num_compiles)
        sd, tsd = opt.state_dict(), topt.state_dict()
        assert list(sd["state"]) == list(tsd["state"])  # buffers kept while momentum is 0, as in torch
        for idx in tsd["state"]:
            assert list(sd["state"][idx]) == list(tsd["state"][idx]) == ["momentum_buffer"]
        compare_models(model, tmodel, errlog, "SGD momentum edited to 0 and back")
    assert compiles == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]  # only group 1's first nonzero momentum recompiles


def test_backend_compile_listener_sees_compiles():
    """The listener used above does count compilations (so its zero is meaningful)."""
    with count_backend_compiles() as events:
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(7.0))
    assert len(events) >= 1


# --------------------------------------------------------------------------- core


def test_core_jitted_update_with_set_hyperparams_traces_once(errlog):
    """``jax.jit(tx.update)`` of ``groupopt.adamw`` with ``set_hyperparams`` between steps: one trace.

    Checked against torch.optim.AdamW with the same per-group edits.
    """
    model, tmodel = make_pair("net", seed=24)
    graphdef = nnx.graphdef(model)
    params = jax.tree.map(lambda v: jax.device_put(np.array(v)), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tx = groupopt.adamw(
        lr=1e-2,
        weight_decay=1e-2,
        params=params,
        groups=[groupopt.group("block1"), groupopt.group("block2", lr=5e-3), groupopt.group("fc", weight_decay=0.0)],
    )
    state = tx.init(params)
    tparams = {p: t for p, _, t, _ in param_pairs(model, tmodel)}
    topt = torch.optim.AdamW(
        [
            {"params": tmodel.block1.parameters()},
            {"params": tmodel.block2.parameters(), "lr": 5e-3},
            {"params": tmodel.fc.parameters(), "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=1e-2,
    )
    traces = 0

    def step(params, grads, state):
        nonlocal traces
        traces += 1  # Python side effect: runs once per trace
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jstep = jax.jit(step)

    @jax.jit
    def grad_fn(params):
        return jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(X) - Y) ** 2))(params)

    xla_events = None
    for i in range(200):
        lr0, lr1 = 1e-2 * 0.99**i, 5e-3 * (1 + (i % 5))
        betas = (0.9 - 1e-4 * i, 0.999 - 1e-5 * i)
        state = tx.set_hyperparams(state, 0, lr=lr0)  # a Python float
        state = tx.set_hyperparams(state, 1, lr=jnp.float64(lr1), betas=betas, eps=1e-8 * (1 + i % 3))  # an array, a tuple
        state = tx.set_hyperparams(state, "2", weight_decay=1e-3 * (i % 2))  # by group name
        topt.param_groups[0]["lr"] = lr0
        topt.param_groups[1].update(lr=lr1, betas=betas, eps=1e-8 * (1 + i % 3))
        topt.param_groups[2]["weight_decay"] = 1e-3 * (i % 2)
        if i == 100:
            cm = count_backend_compiles()
            xla_events = cm.__enter__()
        grads = grad_fn(params)
        params, state = jstep(params, grads, state)
        flat = {path_str(kp): np.asarray(g) for kp, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
        for path, _, t, tr in param_pairs(model, tmodel):
            t.grad = torch.from_numpy(np.ascontiguousarray(flat[path].T if tr else flat[path]).copy())
        topt.step()
    cm.__exit__(None, None, None)
    assert traces == 1
    assert jstep._cache_size() == 1
    assert xla_events == [], xla_events
    hp = tx.hyperparams(state)
    assert hp[0]["lr"] == topt.param_groups[0]["lr"] and hp[2]["weight_decay"] == topt.param_groups[2]["weight_decay"]
    flat = {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    tol = 1e-6
    for path, _, t, tr in param_pairs(model, tmodel):
        a, b = flat[path], torch_view(t, tr)
        e = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(float).tiny))
        errlog.record("core adamw jit + set_hyperparams (update + apply_updates)", a.dtype, e)
        assert e <= tol, (path, e)
