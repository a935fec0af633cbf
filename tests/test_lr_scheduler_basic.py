"""Compat lr schedulers vs torch 2.13, built side by side in the same run.

Each scheduler is constructed by the same factory from ``torch.optim.lr_scheduler``
and from ``groupopt.compat.lr_scheduler`` (same signatures), over optimizers
with three groups of different lrs; every group's lr after construction and
after each of 300 steps must equal torch's (rel <= 1e-12; in practice the
host float64 arithmetic is torch's, so the numbers are identical), and so must
``last_epoch``, ``get_last_lr()`` and the final ``state_dict()``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import jax.numpy as jnp
import pytest
import torch

import groupopt.compat as optim

N = 300
LRS = [0.1, 0.05, 0.3]
REL = 1e-12

TL = torch.optim.lr_scheduler
GL = optim.lr_scheduler


# ------------------------------------------------------------------ harness


def make_optimizers(lrs=LRS):
    topt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs], lr=lrs[0])
    model = {f"p{i}": jnp.zeros(1) for i in range(len(lrs))}
    gopt = optim.SGD([{"params": f"p{i}", "lr": lr} for i, lr in enumerate(lrs)], lr=lrs[0], model=model)
    return topt, gopt


def lrs_of(opt):
    return [g["lr"] for g in opt.param_groups]


def rel_err(a, b) -> float:
    """Largest relative difference between two nested lists of lrs (0 only matches 0)."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            if x == y:
                continue
            worst = max(worst, abs(x - y) / abs(y) if y != 0 else math.inf)
    return worst


def run(opt, sched, epochs=None, n=N):
    """lrs after construction and after each step, with last_epoch and get_last_lr()."""
    lrs, last, info = [lrs_of(opt)], [list(sched.get_last_lr())], [getattr(sched, "last_epoch", None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the epoch deprecation warning
        for k in range(n):
            opt.step()  # no gradients: marks the optimizer as stepped, changes nothing
            e = None if epochs is None else epochs[k]
            if e is None:
                sched.step()
            else:
                sched.step(e)
            lrs.append(lrs_of(opt))
            last.append(list(sched.get_last_lr()))
            info.append(getattr(sched, "last_epoch", None))
    return lrs, last, info


def plain(x):
    """A state_dict value in comparable form (Counters and tuples as-is, nested dicts recursively)."""
    if isinstance(x, dict) and not isinstance(x, Counter):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def compare(factory, epochs=None, lrs=LRS, n=N) -> float:
    topt, gopt = make_optimizers(lrs)
    built = []
    for L, opt in ((TL, topt), (GL, gopt)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built.append(factory(L, opt))
        built.append([str(w.message) for w in caught])
    ts, t_warn, gs, g_warn = built
    assert g_warn == t_warn  # e.g. the order warning when a nested composite is built
    assert lrs_of(gopt) == lrs_of(topt)  # the construction step
    t_lrs, t_last, t_ep = run(topt, ts, epochs, n)
    g_lrs, g_last, g_ep = run(gopt, gs, epochs, n)
    err = max(rel_err(g_lrs, t_lrs), rel_err(g_last, t_last))
    assert err <= REL, err
    assert g_ep == t_ep
    tsd, gsd = ts.state_dict(), gs.state_dict()
    assert list(gsd) == list(tsd)  # same keys, same order
    assert plain(gsd) == plain(tsd)
    assert [g.get("initial_lr") for g in gopt.param_groups] == [g.get("initial_lr") for g in topt.param_groups]
    return err


class Scale:
    """A callable object: its __dict__ goes into state_dict (torch's rule)."""

    def __init__(self, k):
        self.k = k

    def __call__(self, e):
        return self.k ** (e % 11)


# ------------------------------------------------------------------ configurations

# (name, factory(L, opt)) with L = torch.optim.lr_scheduler or groupopt.compat.lr_scheduler
CONFIGS = {
    "LambdaLR": [
        lambda L, o: L.LambdaLR(o, lambda e: 0.97**e),
        lambda L, o: L.LambdaLR(o, [lambda e: 0.97**e, lambda e: 1.0 / (1 + e), lambda e: e // 30 + 0.5]),
        lambda L, o: L.LambdaLR(o, [Scale(0.9), Scale(0.8), lambda e: math.cos(e / 10) ** 2]),
    ],
    "MultiplicativeLR": [
        lambda L, o: L.MultiplicativeLR(o, lambda e: 0.99),
        lambda L, o: L.MultiplicativeLR(o, [lambda e: 0.99, lambda e: 1.0 - 0.002 * (e % 7), lambda e: 1.001 if e < 50 else 0.98]),
        lambda L, o: L.MultiplicativeLR(o, Scale(0.999)),
    ],
    "StepLR": [
        lambda L, o: L.StepLR(o, 3, 0.1),
        lambda L, o: L.StepLR(o, step_size=7, gamma=0.5),
        lambda L, o: L.StepLR(o, 1, gamma=0.99),
    ],
    "MultiStepLR": [
        lambda L, o: L.MultiStepLR(o, [2, 5, 5], 0.1),
        lambda L, o: L.MultiStepLR(o, [100, 30, 30, 200], gamma=0.5),  # unsorted: not validated by torch
        lambda L, o: L.MultiStepLR(o, [0, 10, 299], gamma=0.5),  # milestone 0 decays at construction
    ],
    "ExponentialLR": [
        lambda L, o: L.ExponentialLR(o, 0.9),
        lambda L, o: L.ExponentialLR(o, gamma=0.99),
        lambda L, o: L.ExponentialLR(o, gamma=1.001),
    ],
    "ConstantLR": [
        lambda L, o: L.ConstantLR(o, factor=0.5, total_iters=3),
        lambda L, o: L.ConstantLR(o),
        lambda L, o: L.ConstantLR(o, factor=0.1, total_iters=250),
        lambda L, o: L.ConstantLR(o, factor=0.25, total_iters=0),  # torch never undoes the factor
    ],
    "LinearLR": [
        lambda L, o: L.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=4),
        lambda L, o: L.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=4),
        lambda L, o: L.LinearLR(o, start_factor=0.5, end_factor=0.8, total_iters=100),
        lambda L, o: L.LinearLR(o),
        lambda L, o: L.LinearLR(o, 0.1, 1.0, 0),
        lambda L, o: L.LinearLR(o, 0.3, 0.0, 7),
    ],
    "PolynomialLR": [
        lambda L, o: L.PolynomialLR(o, total_iters=5, power=2),
        lambda L, o: L.PolynomialLR(o, total_iters=100, power=0.9),
        lambda L, o: L.PolynomialLR(o, total_iters=300),
        lambda L, o: L.PolynomialLR(o, 50, 0.5),
    ],
    "CosineAnnealingLR": [
        lambda L, o: L.CosineAnnealingLR(o, T_max=4, eta_min=0.01),
        lambda L, o: L.CosineAnnealingLR(o, 50),
        lambda L, o: L.CosineAnnealingLR(o, T_max=7, eta_min=1e-3),
        lambda L, o: L.CosineAnnealingLR(o, T_max=1),
    ],
    "CosineAnnealingWarmRestarts": [
        lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, 10, 1, 1e-3),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=1, T_mult=3),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=0.01),
    ],
    "SequentialLR": [
        lambda L, o: L.SequentialLR(o, [L.LinearLR(o, 0.1, 1, 3), L.ExponentialLR(o, 0.9)], milestones=[3]),
        lambda L, o: L.SequentialLR(o, [L.ConstantLR(o, 0.1, 10), L.CosineAnnealingLR(o, 4)], [2]),
        lambda L, o: L.SequentialLR(o, [L.LinearLR(o, 0.1, 1, 3), L.LambdaLR(o, lambda e: 0.5**e)], [2]),
        lambda L, o: L.SequentialLR(
            o, [L.LinearLR(o, 0.2, 1, 20), L.CosineAnnealingWarmRestarts(o, 10, 2, 1e-3), L.StepLR(o, 7, 0.7)], [20, 170]
        ),
        lambda L, o: L.SequentialLR(  # nested: a SequentialLR as the first child
            o,
            [L.SequentialLR(o, [L.LinearLR(o, 0.5, 1, 5), L.ExponentialLR(o, 0.98)], [5]), L.PolynomialLR(o, 100, 2.0)],
            [60],
        ),
        lambda L, o: L.SequentialLR(  # nested: a ChainedScheduler as the first child
            o,
            [L.ChainedScheduler([L.ConstantLR(o, 0.5, 8), L.ExponentialLR(o, 0.97)]), L.MultiStepLR(o, [10, 20], 0.5)],
            [40],
        ),
        lambda L, o: L.SequentialLR(  # a chainable child without closed form restarts from the current lr
            o, [L.StepLR(o, 5, 0.5), L.MultiplicativeLR(o, lambda e: 0.99), L.CosineAnnealingLR(o, 30, 1e-3)], [12, 100]
        ),
    ],
    "ChainedScheduler": [
        lambda L, o: L.ChainedScheduler([L.ConstantLR(o, 0.1, 2), L.ExponentialLR(o, 0.9)]),
        lambda L, o: L.ChainedScheduler([L.LinearLR(o, 0.1, 1, 10), L.CosineAnnealingLR(o, 40), L.MultiStepLR(o, [50, 150])], o),
        lambda L, o: L.ChainedScheduler([L.ExponentialLR(o, 0.99), L.CosineAnnealingWarmRestarts(o, 7, 2)]),  # absolute last
        lambda L, o: L.ChainedScheduler([L.PolynomialLR(o, 250, 1.5), L.StepLR(o, 30, 0.5), L.MultiplicativeLR(o, lambda e: 1.001)]),
    ],
    "warmup": [
        lambda L, o: _hf(L, o, "linear", 10, 200),
        lambda L, o: _hf(L, o, "cosine", 25, 300),
        lambda L, o: _hf(L, o, "cosine", 0, 100, num_cycles=2.0),
        lambda L, o: _hf(L, o, "constant", 37),
        lambda L, o: _hf(L, o, "linear", 0, 350),
    ],
}


from hf_reference import _hf_constant, _hf_cosine, _hf_linear  # noqa: E402


def _hf(L, o, kind, W, N=None, num_cycles=0.5):
    from functools import partial

    if L is TL:
        fn = {
            "linear": partial(_hf_linear, W=W, N=N),
            "cosine": partial(_hf_cosine, W=W, N=N, num_cycles=num_cycles),
            "constant": partial(_hf_constant, W=W),
        }[kind]
        return TL.LambdaLR(o, fn)
    if kind == "linear":
        return GL.get_linear_schedule_with_warmup(o, W, N)
    if kind == "cosine":
        return GL.get_cosine_schedule_with_warmup(o, W, N, num_cycles=num_cycles)
    return GL.get_constant_schedule_with_warmup(o, num_warmup_steps=W)


CASES = [(name, i, f) for name, fs in CONFIGS.items() for i, f in enumerate(fs)]


@pytest.mark.parametrize("name,i,factory", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_matches_torch(name, i, factory):
    compare(factory)


# step(epoch): torch's closed form (_get_closed_form_lr) where the scheduler has one, mixed with step()
def _epochs(k):
    return None if k % 3 else (k * 11 + 5) % 47


EPOCHS = [_epochs(k) for k in range(N)]

CLOSED_FORM = {
    name: CONFIGS[name]
    for name in ["StepLR", "MultiStepLR", "ExponentialLR", "ConstantLR", "LinearLR", "PolynomialLR", "CosineAnnealingLR"]
}
CLOSED_FORM["LinearLR"] = [f for i, f in enumerate(CLOSED_FORM["LinearLR"]) if i != 4]  # total_iters=0: tested below
CLOSED_FORM["LambdaLR"] = CONFIGS["LambdaLR"]  # no closed form: step(epoch) uses get_lr at that epoch
CLOSED_FORM["MultiplicativeLR"] = CONFIGS["MultiplicativeLR"]
EPOCH_CASES = [(name, i, f) for name, fs in CLOSED_FORM.items() for i, f in enumerate(fs)]


@pytest.mark.parametrize("name,i,factory", EPOCH_CASES, ids=[f"{n}-{i}" for n, i, _ in EPOCH_CASES])
def test_step_epoch_matches_torch(name, i, factory):
    compare(factory, EPOCHS)


def _frac_epochs(k):
    if k % 4 == 0:
        return None
    if k % 4 == 1:
        return k * 0.37
    if k % 4 == 2:
        return float(k % 23) + 0.5
    return k * 3  # large integer epochs: torch's int(log(...)) path with T_mult > 1


@pytest.mark.parametrize("i", range(len(CONFIGS["CosineAnnealingWarmRestarts"])))
def test_warm_restarts_fractional_epochs(i):
    compare(CONFIGS["CosineAnnealingWarmRestarts"][i], [_frac_epochs(k) for k in range(N)])


def test_cosine_closed_form_branch_of_a_fresh_scheduler():
    """torch's CosineAnnealingLR branch for _step_count == 1 and last_epoch > 0 (reached by _update_lr())."""
    topt, gopt = make_optimizers()
    ts, gs = TL.CosineAnnealingLR(topt, 6, 0.01), GL.CosineAnnealingLR(gopt, 6, 0.01)
    for group in (*topt.param_groups, *gopt.param_groups):
        group["lr"] *= 0.5  # the branch ignores the current lr
    ts._update_lr()
    gs._update_lr()
    assert lrs_of(gopt) == lrs_of(topt)
    assert gs._step_count == ts._step_count == 1


def test_warm_restarts_documented_points():
    """T_0=3: step(1.5) -> lr 0.05, last_epoch 1; T_0=2, T_mult=2: step(7) -> T_cur 1, T_i 8 (in both)."""
    for args, epoch in [((3,), 1.5), ((2, 2), 7)]:
        topt, gopt = make_optimizers()
        ts, gs = TL.CosineAnnealingWarmRestarts(topt, *args), GL.CosineAnnealingWarmRestarts(gopt, *args)
        ts.step(epoch)
        gs.step(epoch)
        assert (gs.T_cur, gs.T_i, gs.last_epoch) == (ts.T_cur, ts.T_i, ts.last_epoch)
        assert lrs_of(gopt) == lrs_of(topt)


# ------------------------------------------------------------------ resume (last_epoch=k) and warnings


@pytest.mark.parametrize(
    "factory",
    [
        lambda L, o: L.StepLR(o, 2, last_epoch=3),
        lambda L, o: L.LinearLR(o, 0.5, 1.0, 10, last_epoch=4),
        lambda L, o: L.CosineAnnealingLR(o, 10, 0.01, last_epoch=6),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, 4, 2, last_epoch=5),
        lambda L, o: L.PolynomialLR(o, 10, 2.0, last_epoch=2),
        lambda L, o: L.LambdaLR(o, lambda e: 0.9**e, last_epoch=7),
        lambda L, o: L.ConstantLR(o, 0.5, 4, last_epoch=3),
    ],
)
def test_resume_with_last_epoch(factory):
    def resumed(L, o):
        for g in o.param_groups:
            g["initial_lr"] = g["lr"] * 2
        return factory(L, o)

    compare(resumed, n=60)


def _caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [str(x.message) for x in w]


def test_warnings_match_torch():
    topt, gopt = make_optimizers()
    ts, gs = TL.StepLR(topt, 2), GL.StepLR(gopt, 2)
    # scheduler stepped before the optimizer
    assert _caught(gs.step) == _caught(ts.step)
    # get_lr() outside step
    assert _caught(gs.get_lr) == _caught(ts.get_lr)
    # step(epoch) deprecation
    assert _caught(lambda: gs.step(4)) == _caught(lambda: ts.step(4))
    assert lrs_of(gopt) == lrs_of(topt)
    # CosineAnnealingWarmRestarts overrides step: no order or deprecation warning
    topt, gopt = make_optimizers()
    ts, gs = TL.CosineAnnealingWarmRestarts(topt, 3), GL.CosineAnnealingWarmRestarts(gopt, 3)
    assert _caught(lambda: gs.step(1.5)) == _caught(lambda: ts.step(1.5)) == []


# ------------------------------------------------------------------ bad input


def outcome(fn, reprs=()):
    """("ok", None) or (exception type name, message) with optimizer reprs replaced by a placeholder."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        for r in reprs:
            msg = msg.replace(r, "<OPT>")
        return type(e).__name__, msg
    return "ok", None


BAD = [
    lambda L, o, o2: L.ConstantLR(o, factor=1.5),
    lambda L, o, o2: L.ConstantLR(o, factor=-0.1),
    lambda L, o, o2: L.LinearLR(o, start_factor=0),
    lambda L, o, o2: L.LinearLR(o, start_factor=1.5),
    lambda L, o, o2: L.LinearLR(o, end_factor=-0.1),
    lambda L, o, o2: L.LinearLR(o, end_factor=1.1),
    lambda L, o, o2: L.LambdaLR(o, [lambda e: 1.0]),
    lambda L, o, o2: L.MultiplicativeLR(o, 0.5),
    lambda L, o, o2: L.MultiplicativeLR(o, [lambda e: 1.0, 0.5, lambda e: 1.0]),
    lambda L, o, o2: L.MultiplicativeLR(o, [lambda e: 1.0] * 2),
    lambda L, o, o2: L.CosineAnnealingWarmRestarts(o, T_0=0),
    lambda L, o, o2: L.CosineAnnealingWarmRestarts(o, T_0=1.5),
    lambda L, o, o2: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=0),
    lambda L, o, o2: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=1.5),
    lambda L, o, o2: L.CosineAnnealingWarmRestarts(o, T_0=3, eta_min="0.1"),
    lambda L, o, o2: L.CosineAnnealingWarmRestarts(o, T_0=3).step(-1),
    lambda L, o, o2: L.StepLR([1, 2], 3),
    lambda L, o, o2: L.ExponentialLR(o, 0.9, last_epoch=3),  # no initial_lr in the groups
    lambda L, o, o2: L.SequentialLR(o, [], []),
    lambda L, o, o2: L.SequentialLR(o, [L.ExponentialLR(o, 0.9), L.StepLR(o, 2)], [2, 4]),
    lambda L, o, o2: L.SequentialLR(o, [L.ExponentialLR(o, 0.9), L.StepLR(o2, 2)], [2]),
    lambda L, o, o2: L.SequentialLR(o, [L.ExponentialLR(o, 0.9), object()], [2]),
    lambda L, o, o2: L.SequentialLR(o, [L.ReduceLROnPlateau(o)], []),
    lambda L, o, o2: L.ChainedScheduler([]),
    lambda L, o, o2: L.ChainedScheduler([L.ExponentialLR(o, 0.9), L.StepLR(o2, 2)]),
    lambda L, o, o2: L.ChainedScheduler([L.ExponentialLR(o, 0.9), L.ReduceLROnPlateau(o)]),
    lambda L, o, o2: L.ChainedScheduler([L.ExponentialLR(o, 0.9)], optimizer=o2),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_matches_torch(i):
    topt, gopt = make_optimizers()
    topt2, gopt2 = make_optimizers([0.2])
    t = outcome(lambda: BAD[i](TL, topt, topt2), [repr(topt), repr(topt2)])
    g = outcome(lambda: BAD[i](GL, gopt, gopt2), [repr(gopt), repr(gopt2)])
    assert t[0] != "ok"
    assert g == t


# what torch does not validate fails in the same place with the same error
UNVALIDATED = [
    (lambda L, o: L.StepLR(o, step_size=0), None),  # ZeroDivisionError at the first step
    (lambda L, o: L.ConstantLR(o, factor=0, total_iters=2), None),  # ZeroDivisionError at total_iters
    (lambda L, o: L.PolynomialLR(o, total_iters=0), 3),  # the closed form divides by zero
    (lambda L, o: L.LinearLR(o, 0.5, 1.0, total_iters=0), 2),
    (lambda L, o: L.CosineAnnealingLR(o, T_max=0), None),
    # a nested scheduler restarted at a milestone has no get_lr: NotImplementedError in torch too
    (lambda L, o: L.SequentialLR(o, [L.ExponentialLR(o, 0.9), L.ChainedScheduler([L.StepLR(o, 2)])], [3]), None),
]


@pytest.mark.parametrize("i", range(len(UNVALIDATED)))
def test_unvalidated_input_fails_like_torch(i):
    factory, epoch = UNVALIDATED[i]
    results = []
    for L, opt in zip((TL, GL), make_optimizers()):
        steps = []

        def go():
            s = factory(L, opt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for k in range(6):
                    s.step() if epoch is None else s.step(epoch)
                    steps.append(lrs_of(opt))

        results.append((outcome(go), steps))
    assert results[0][0][0] != "ok"
    assert results[1] == results[0]
