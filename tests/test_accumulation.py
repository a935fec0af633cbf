"""Gradient accumulation: the same numbers as one big batch, and as torch's accumulation loop.

* :func:`groupopt.accumulate` over a grouped transformation (a schedule in one
  group): k micro-batches summed (loss / k, as torch users scale a mean loss)
  or averaged equal one batch of the same data (float64, <= 1e-10), with the
  schedule count advancing once per k calls;
* torch's loop (backward k times, ``step``, ``scheduler.step``, ``zero_grad``)
  against the compat loop (``accumulate_grad`` k times, ``step``,
  ``scheduler.step``, ``zero_grad``) and against the jitted core, step by step,
  with OneCycleLR cycling lr and momentum;
* composition with :func:`groupopt.reduce_on_plateau` against torch.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import groupopt
import groupopt.compat as optim
from groupopt import schedules as S

TL = torch.optim.lr_scheduler
RNG = np.random.default_rng(0)
W0, B0 = RNG.normal(size=(3, 2)), RNG.normal(size=(2,))
DATA_X, DATA_Y = RNG.normal(size=(48, 3)), RNG.normal(size=(48, 2))


def loss_mean(p, x, y):
    r = x @ p["w"] + p["b"] - y
    return jnp.mean(r * r)


def torch_loss_mean(w, b, x, y):
    r = torch.from_numpy(x) @ w + b - torch.from_numpy(y)
    return torch.mean(r * r)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def params0():
    return {"w": jnp.asarray(W0), "b": jnp.asarray(B0)}


def grouped_sgd(params, lr_w=0.1):
    return groupopt.sgd(
        lr_w, momentum=0.9, params=params, groups=[{"params": "w"}, {"params": "b", "lr": S.exponential(0.05, 0.8)}]
    )


@pytest.mark.parametrize("mode", ["sum_scaled_loss", "average", "average_update"])
def test_accumulation_equals_one_big_batch(mode):
    k, windows, mb = 4, 3, 2
    p_big = p_acc = params0()
    tx = grouped_sgd(p_big)
    acc = groupopt.accumulate(tx, k, average=mode != "sum_scaled_loss")
    s_big, s_acc = tx.init(p_big), acc.init(p_acc)
    big_step = jax.jit(lambda p, s, x, y: tx.apply(p, jax.grad(loss_mean)(p, x, y), s))
    if mode == "sum_scaled_loss":  # torch users: loss / k per micro-batch, gradients summed
        micro_grad = lambda p, x, y: jax.grad(lambda q: loss_mean(q, x, y) / k)(p)  # noqa: E731
    else:
        micro_grad = jax.grad(loss_mean)
    if mode == "average_update":
        def micro(p, s, x, y):
            updates, s = acc.update(micro_grad(p, x, y), s, p)
            return optax.apply_updates(p, updates), s, updates
    else:
        def micro(p, s, x, y):
            new_p, s = acc.apply(p, micro_grad(p, x, y), s)
            return new_p, s, None
    micro = jax.jit(micro)
    tol = 1e-10
    for w in range(windows):
        x, y = DATA_X[w * k * mb:(w + 1) * k * mb], DATA_Y[w * k * mb:(w + 1) * k * mb]
        p_big, s_big = big_step(p_big, s_big, x, y)
        for i in range(k):
            before = p_acc
            p_acc, s_acc, updates = micro(p_acc, s_acc, x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb])
            done = i == k - 1
            assert bool(acc.has_updated(s_acc)) == done
            if not done:  # accumulating calls change nothing
                assert all(np.array_equal(before[n], p_acc[n]) for n in before)
                if updates is not None:
                    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
        assert int(s_acc.inner.count) == w + 1 == int(s_big.count)  # the schedule advanced once per window
        for n in p_big:
            assert rel_err(p_acc[n], p_big[n]) <= tol, (n, rel_err(p_acc[n], p_big[n]))
    assert acc.hyperparams(s_acc) == tx.hyperparams(s_big)


def _torch_pair(momentum=0.9):
    w = torch.nn.Parameter(torch.tensor(W0))
    b = torch.nn.Parameter(torch.tensor(B0))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": 0.05}], lr=0.1, momentum=momentum)
    return w, b, opt


def test_torch_loop_equals_compat_and_core_with_scheduler():
    k, windows, mb = 3, 8, 2
    sched_kw = dict(max_lr=[0.2, 0.1], total_steps=windows, pct_start=0.3)
    # torch: backward k times, step, scheduler.step, zero_grad
    w, b, topt = _torch_pair()
    tsched = TL.OneCycleLR(topt, **sched_kw)
    # compat: accumulate_grad k times, step, scheduler.step, zero_grad
    copt = optim.SGD([{"params": "w"}, {"params": "b", "lr": 0.05}], lr=0.1, momentum=0.9, model=params0())
    csched = optim.lr_scheduler.OneCycleLR(copt, **sched_kw)
    # core: accumulate(grouped sgd with the pure schedules), jitted micro-step
    groups = [
        {"params": n, "lr": S.one_cycle(lr, total_steps=windows, pct_start=0.3), "momentum": S.one_cycle_momentum(total_steps=windows, pct_start=0.3)}
        for n, lr in (("w", 0.2), ("b", 0.1))
    ]
    p = params0()
    tx = groupopt.accumulate(groupopt.sgd(0.1, momentum=0.9, params=p, groups=groups), k)
    state = tx.init(p)
    traces = []

    @jax.jit
    def micro(p, s, x, y):
        traces.append(1)
        return tx.apply(p, jax.grad(lambda q: loss_mean(q, x, y) / k)(p), s)

    compat_grad = jax.jit(lambda q, x, y: jax.grad(lambda r: loss_mean(r, x, y) / k)(q))
    worst_c = worst_core = 0.0
    for win in range(windows):
        for i in range(k):
            sl = slice((win * k + i) * mb, (win * k + i + 1) * mb)
            x, y = DATA_X[sl], DATA_Y[sl]
            (torch_loss_mean(w, b, x, y) / k).backward()
            copt.accumulate_grad(compat_grad(copt.params, x, y))
            p, state = micro(p, state, x, y)
        topt.step()
        tsched.step()
        topt.zero_grad()
        copt.step()
        csched.step()
        copt.zero_grad()
        assert [g["lr"] for g in copt.param_groups] == [g["lr"] for g in topt.param_groups]
        assert [g["momentum"] for g in copt.param_groups] == [g["momentum"] for g in topt.param_groups]
        for n, t in (("w", w), ("b", b)):
            ref = t.detach().numpy()
            worst_c = max(worst_c, rel_err(copt.params[n], ref))
            worst_core = max(worst_core, rel_err(p[n], ref))
    assert worst_c <= 1e-10 and worst_core <= 1e-10, (worst_c, worst_core)
    assert len(traces) == 1 and copt.num_compiles == 1
    # a step with nothing accumulated does nothing (torch: every grad is None)
    before = {n: np.asarray(v) for n, v in copt.params.items()}
    copt.step()
    assert all(np.array_equal(before[n], copt.params[n]) for n in before)


def test_accumulate_with_reduce_on_plateau_matches_torch():
    """accumulate(reduce_on_plateau(tx), k): the rule sees the metric once per optimizer step (the k-th call's)."""
    k, windows, mb = 2, 12, 2
    metric = [5.0, 4.0, 4.0, 4.1, 3.9, 3.95, 3.96, 3.97, 3.98, 3.0, 3.1, 3.2]
    w, b, topt = _torch_pair()
    tsched = TL.ReduceLROnPlateau(topt, factor=0.5, patience=1, cooldown=1, min_lr=[0.02, 0.0])
    p = params0()
    tx = groupopt.accumulate(
        groupopt.reduce_on_plateau(groupopt.sgd(0.1, momentum=0.9, params=p, groups=[{"params": "w"}, {"params": "b", "lr": 0.05}]),
                                   factor=0.5, patience=1, cooldown=1, min_lr=[0.02, 0.0]),
        k,
    )
    state = tx.init(p)
    micro = jax.jit(lambda p, s, x, y, v: tx.apply(p, jax.grad(lambda q: loss_mean(q, x, y) / k)(p), s, value=v))
    worst = 0.0
    for win in range(windows):
        for i in range(k):
            sl = slice((win * k + i) * mb, (win * k + i + 1) * mb)
            x, y = DATA_X[sl], DATA_Y[sl]
            (torch_loss_mean(w, b, x, y) / k).backward()
            v = metric[win] if i == k - 1 else 1e9  # only the k-th call's value counts
            p, state = micro(p, state, x, y, v)
        topt.step()
        tsched.step(metric[win])
        topt.zero_grad()
        assert tx.inner.lrs(state.inner) == [g["lr"] for g in topt.param_groups]
        for n, t in (("w", w), ("b", b)):
            worst = max(worst, rel_err(p[n], t.detach().numpy()))
    assert worst <= 1e-10
    assert topt.param_groups[0]["lr"] < 0.1  # the script reduced


def test_plain_optax_and_multisteps():
    """Any Optax transformation: average=True agrees with optax.MultiSteps (its running mean)."""
    p = params0()
    ours = groupopt.accumulate(optax.adam(1e-2), 3, average=True)
    ref = optax.MultiSteps(optax.adam(1e-2), 3, accumulator_dtype=jnp.float64)
    so, sr = ours.init(p), ref.init(p)
    assert not hasattr(ours, "apply")
    pr = p
    step_o = jax.jit(lambda p, s, x, y: ours.update(jax.grad(loss_mean)(p, x, y), s, p))
    step_r = jax.jit(lambda p, s, x, y: ref.update(jax.grad(loss_mean)(p, x, y), s, p))
    for i in range(9):
        x, y = DATA_X[2 * i:2 * i + 2], DATA_Y[2 * i:2 * i + 2]
        uo, so = step_o(p, so, x, y)
        ur, sr = step_r(pr, sr, x, y)
        p, pr = optax.apply_updates(p, uo), optax.apply_updates(pr, ur)
    for n in p:
        assert rel_err(p[n], pr[n]) <= 1e-12


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_bad_every_k(k):
    with pytest.raises(ValueError, match="every_k"):
        groupopt.accumulate(optax.sgd(0.1), k)
