"""Schedulers interacting with the optimizer and with each other, vs torch 2.13 in the same run.

Groups added before / after a scheduler exists (torch's behaviour per
scheduler kind, same exception type and message), user edits of
``group["lr"]`` under chainable and absolute schedulers, two schedulers on one
optimizer, and ``state_dict`` round trips in the middle of a run.
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import pytest
import torch

import groupopt.compat as optim

TL = torch.optim.lr_scheduler
GL = optim.lr_scheduler
LRS = [0.1, 0.05]
EXTRA = 0.2  # lr of the group added later


def make_optimizers(lrs=LRS, momentum=0.0):
    """A torch and a compat SGD with one group per lr (plus a spare parameter ``x`` for a later group)."""
    topt = torch.optim.SGD(
        [{"params": [torch.zeros(2, dtype=torch.float64, requires_grad=True)], "lr": lr} for lr in lrs], lr=lrs[0], momentum=momentum
    )
    model = {f"p{i}": jnp.zeros(2) for i in range(len(lrs))}
    model["x"] = jnp.zeros(2)
    gopt = optim.SGD([{"params": f"p{i}", "lr": lr} for i, lr in enumerate(lrs)], lr=lrs[0], momentum=momentum, model=model)
    return topt, gopt


def add_group(opt):
    if isinstance(opt, torch.optim.Optimizer):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float64, requires_grad=True)], "lr": EXTRA})
    else:
        opt.add_param_group({"params": "x", "lr": EXTRA})


def lrs_of(opt):
    return [g["lr"] for g in opt.param_groups]


def assert_lrs_equal(a, b, rel=1e-12):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            assert x == y or abs(x - y) <= rel * abs(y), (ra, rb)


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def outcome(fn):
    try:
        quiet(fn)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return None


# ------------------------------------------------------------------ a scheduler created after add_param_group

KINDS = {
    "Lambda": lambda L, o: L.LambdaLR(o, lambda e: 0.95**e),
    "Multiplicative": lambda L, o: L.MultiplicativeLR(o, lambda e: 0.97),
    "Step": lambda L, o: L.StepLR(o, 3, 0.5),
    "MultiStep": lambda L, o: L.MultiStepLR(o, [2, 7], 0.5),
    "Exponential": lambda L, o: L.ExponentialLR(o, 0.9),
    "Constant": lambda L, o: L.ConstantLR(o, 0.5, 4),
    "Linear": lambda L, o: L.LinearLR(o, 0.25, 1.0, 6),
    "Polynomial": lambda L, o: L.PolynomialLR(o, 8, 2.0),
    "Cosine": lambda L, o: L.CosineAnnealingLR(o, 5, 0.001),
    "WarmRestarts": lambda L, o: L.CosineAnnealingWarmRestarts(o, 3, 2),
    "Sequential": lambda L, o: L.SequentialLR(o, [L.LinearLR(o, 0.5, 1.0, 3), L.ExponentialLR(o, 0.9)], [3]),
    "Chained": lambda L, o: L.ChainedScheduler([L.ConstantLR(o, 0.5, 2), L.ExponentialLR(o, 0.9)]),
    "HFCosine": lambda L, o: (
        L.LambdaLR(o, lambda s: s / 3 if s < 3 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * (s - 3) / 17))))
        if L is TL
        else L.get_cosine_schedule_with_warmup(o, 3, 20)
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_scheduler_created_after_add_param_group(kind):
    traces = []
    for L, opt in zip((TL, GL), make_optimizers()):
        add_group(opt)
        s = quiet(lambda: KINDS[kind](L, opt))
        trace = [lrs_of(opt)]
        for _ in range(20):
            opt.step()
            quiet(s.step)
            trace.append(lrs_of(opt))
        traces.append((trace, [g["initial_lr"] for g in opt.param_groups], s.base_lrs if hasattr(s, "base_lrs") else None))
    assert_lrs_equal(traces[1][0], traces[0][0])
    assert traces[1][1:] == traces[0][1:]


# ------------------------------------------------------------------ a group added after the scheduler exists


@pytest.mark.parametrize("kind", list(KINDS))
def test_group_added_after_scheduler(kind):
    """torch's behaviour per kind (TORCH_SEMANTICS 5.1): chainable ones go on from the new group's lr;
    LambdaLR / CosineAnnealingWarmRestarts raise zip's ValueError; CosineAnnealingLR fails at its
    special-branch epoch. Same exception type and message here; afterwards groupopt has changed
    nothing (torch has advanced last_epoch and may have written the first groups' lrs)."""
    results = []
    for L, opt in zip((TL, GL), make_optimizers()):
        s = quiet(lambda: KINDS[kind](L, opt))
        trace, error = [], None
        for k in range(20):
            if k == 3:
                add_group(opt)
            opt.step()
            before = (lrs_of(opt), getattr(s, "last_epoch", None), s.state_dict())
            error = outcome(s.step)
            if error:
                break
            trace.append(lrs_of(opt))
        results.append((trace, error, before, opt, s))
    (t_trace, t_err, *_), (g_trace, g_err, g_before, gopt, gs) = results
    assert_lrs_equal(g_trace, t_trace)
    assert g_err == t_err
    if g_err is not None:  # nothing half-applied
        assert (lrs_of(gopt), getattr(gs, "last_epoch", None)) == g_before[:2]
        assert gs.state_dict() == g_before[2]
    expect_error = kind in {"Lambda", "WarmRestarts", "Cosine", "HFCosine", "Multiplicative"}
    assert (t_err is not None) == expect_error, t_err


def test_group_added_after_scheduler_closed_form_epoch():
    """step(epoch) uses base_lrs (one per original group): zip's ValueError in both."""
    errs = []
    for L, opt in zip((TL, GL), make_optimizers()):
        s = L.ExponentialLR(opt, 0.9)
        add_group(opt)
        errs.append(outcome(lambda: s.step(4)))
    assert errs[0] is not None and errs[1] == errs[0]


# ------------------------------------------------------------------ user edits of group["lr"]

EDITS = {
    "Cosine": lambda L, o: L.CosineAnnealingLR(o, 10),
    "CosineEtaMin": lambda L, o: L.CosineAnnealingLR(o, 6, 0.01),
    "Step": lambda L, o: L.StepLR(o, 4, 0.1),
    "Exponential": lambda L, o: L.ExponentialLR(o, 0.95),
    "Linear": lambda L, o: L.LinearLR(o, 0.2, 1.0, 10),
    "Polynomial": lambda L, o: L.PolynomialLR(o, 12, 1.5),
    "Multiplicative": lambda L, o: L.MultiplicativeLR(o, lambda e: 0.9),
    "Constant": lambda L, o: L.ConstantLR(o, 0.25, 6),
    "Lambda": lambda L, o: L.LambdaLR(o, lambda e: 0.9**e),  # absolute: the edit is discarded
    "WarmRestarts": lambda L, o: L.CosineAnnealingWarmRestarts(o, 4, 2),  # absolute
    "Sequential": lambda L, o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 3), L.CosineAnnealingLR(o, 8)], [5]),
}


@pytest.mark.parametrize("kind", list(EDITS))
@pytest.mark.parametrize("closed_form", [False, True], ids=["step()", "step(epoch)"])
def test_user_edits_lr_mid_run(kind, closed_form):
    if closed_form and kind in ("Sequential",):
        closed_form = False  # SequentialLR.step takes no epoch
    traces = []
    for L, opt in zip((TL, GL), make_optimizers()):
        s = quiet(lambda: EDITS[kind](L, opt))
        trace = []
        for k in range(1, 30):
            if k in (3, 11):
                opt.param_groups[0]["lr"] *= 0.5  # the user halves the lr
            if k == 17:
                opt.param_groups[1]["lr"] = 1.0
            opt.step()
            if closed_form and k % 2:
                quiet(lambda: s.step(k))
            else:
                s.step()
            trace.append(lrs_of(opt) + list(s.get_last_lr()))
        traces.append(trace)
    assert_lrs_equal(traces[1], traces[0])


# ------------------------------------------------------------------ two schedulers on one optimizer

PAIRS = [
    (lambda L, o: L.LinearLR(o, 0.5, 1.0, 4), lambda L, o: L.ExponentialLR(o, 0.9)),
    (lambda L, o: L.ExponentialLR(o, 0.9), lambda L, o: L.StepLR(o, 2, 0.1)),
    (lambda L, o: L.LambdaLR(o, lambda e: 0.5), lambda L, o: L.LambdaLR(o, lambda e: 0.5)),  # absolute overwrites
    (lambda L, o: L.CosineAnnealingLR(o, 7, 0.001), lambda L, o: L.MultiStepLR(o, [5, 9], 0.5)),
    (lambda L, o: L.ConstantLR(o, 0.5, 5), lambda L, o: L.CosineAnnealingWarmRestarts(o, 3, 2)),
    (lambda L, o: L.PolynomialLR(o, 20, 2.0), lambda L, o: L.MultiplicativeLR(o, lambda e: 1.05)),
]


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_two_schedulers_on_one_optimizer(i):
    first, second = PAIRS[i]
    traces = []
    for L, opt in zip((TL, GL), make_optimizers()):
        a = first(L, opt)
        b = second(L, opt)
        trace = [lrs_of(opt)]
        for _ in range(40):
            opt.step()
            a.step()
            b.step()
            trace.append(lrs_of(opt) + list(a.get_last_lr()) + list(b.get_last_lr()))
        traces.append((trace, a.base_lrs, b.base_lrs))
    assert_lrs_equal(traces[1][0], traces[0][0])
    assert traces[1][1:] == traces[0][1:]


# ------------------------------------------------------------------ state_dict round trip mid-run


class Warm:
    """A callable object lambda: its __dict__ is saved in the scheduler's state_dict."""

    def __init__(self, w):
        self.w = w

    def __call__(self, e):
        return min(1.0, (e + 1) / self.w)


ROUND_TRIP = {
    "Cosine": lambda L, o: L.CosineAnnealingLR(o, 13, 1e-4),
    "Linear": lambda L, o: L.LinearLR(o, 0.1, 0.9, 50),
    "WarmRestarts": lambda L, o: L.CosineAnnealingWarmRestarts(o, 5, 2, 1e-3),
    "Polynomial": lambda L, o: L.PolynomialLR(o, 60, 0.7),
    "Lambda": lambda L, o: L.LambdaLR(o, [Warm(10), lambda e: 0.99**e]),
    "Multiplicative": lambda L, o: L.MultiplicativeLR(o, Warm(7)),
    "MultiStep": lambda L, o: L.MultiStepLR(o, [10, 30, 30, 55], 0.5),
    "Sequential": lambda L, o: L.SequentialLR(
        o,
        [L.ChainedScheduler([L.ConstantLR(o, 0.5, 12), L.ExponentialLR(o, 0.99)]), L.CosineAnnealingLR(o, 20), L.StepLR(o, 5)],
        [25, 45],
    ),
    "Chained": lambda L, o: L.ChainedScheduler([L.LinearLR(o, 0.3, 1.0, 15), L.CosineAnnealingWarmRestarts(o, 6, 2)]),
    "HFLinear": lambda L, o: (
        L.LambdaLR(o, lambda s: s / 8 if s < 8 else max(0.0, (70 - s) / 62)) if L is TL else L.get_linear_schedule_with_warmup(o, 8, 70)
    ),
}
SAVE_AT, TOTAL = 37, 80
WITH_GRADS = {"Sequential", "Lambda", "WarmRestarts"}  # also compare the parameters (SGD with momentum)


def _run_resumed(L, kind, interrupt: bool):
    """Run TOTAL steps; with ``interrupt``, save at SAVE_AT, rebuild optimizer and scheduler, load both, go on."""
    if kind not in WITH_GRADS:
        return _run_resumed_lr_only(L, kind, interrupt)
    opt = make_optimizers(momentum=0.9)[0 if L is TL else 1]
    s = quiet(lambda: ROUND_TRIP[kind](L, opt))
    trace = []
    for k in range(TOTAL):
        if interrupt and k == SAVE_AT:
            osd, ssd = opt.state_dict(), s.state_dict()
            opt = make_optimizers(momentum=0.9)[0 if L is TL else 1]
            if L is GL:  # the parameters live in the (functional) optimizer: carry them over
                opt._binding.set(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], saved_values)
            else:
                with torch.no_grad():
                    for p, v in zip([p for g in opt.param_groups for p in g["params"]], saved_values):
                        p.copy_(v)
            s = quiet(lambda: ROUND_TRIP[kind](L, opt))  # resume order: optimizer, scheduler, then load both
            opt.load_state_dict(osd)
            s.load_state_dict(ssd)
        grads = [torch.full((2,), math.sin(k + i), dtype=torch.float64) for i in range(2)]
        if L is TL:
            for p, g in zip([p for g in opt.param_groups for p in g["params"]], grads):
                p.grad = g.clone()
        opt.step(None if L is TL else {"p0": jnp.asarray(grads[0].numpy()), "p1": jnp.asarray(grads[1].numpy()), "x": jnp.zeros(2)})
        quiet(s.step)
        trace.append(lrs_of(opt) + list(s.get_last_lr()))
        if L is TL:
            saved_values = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        else:
            saved_values = opt._binding.get(opt.param_groups[0]["params"] + opt.param_groups[1]["params"])
    if L is TL:
        params = [p.detach().numpy().copy() for g in opt.param_groups for p in g["params"]]
    else:
        params = [jnp.asarray(v) for v in opt._binding.get(opt.param_groups[0]["params"] + opt.param_groups[1]["params"])]
    return trace, params, s.state_dict()


def _run_resumed_lr_only(L, kind, interrupt: bool):
    opt = make_optimizers()[0 if L is TL else 1]
    s = quiet(lambda: ROUND_TRIP[kind](L, opt))
    trace = []
    for k in range(TOTAL):
        if interrupt and k == SAVE_AT:
            osd, ssd = opt.state_dict(), s.state_dict()
            opt = make_optimizers()[0 if L is TL else 1]
            s = quiet(lambda: ROUND_TRIP[kind](L, opt))
            opt.load_state_dict(osd)
            s.load_state_dict(ssd)
        opt.step()
        quiet(s.step)
        trace.append(lrs_of(opt) + list(s.get_last_lr()))
    return trace, [], s.state_dict()


@pytest.mark.parametrize("kind", list(ROUND_TRIP))
def test_state_dict_round_trip_mid_run(kind):
    t_full, t_params_full, _ = _run_resumed(TL, kind, False)
    t_res, t_params, t_sd = _run_resumed(TL, kind, True)
    g_full, g_params_full, _ = _run_resumed(GL, kind, False)
    g_res, g_params, g_sd = _run_resumed(GL, kind, True)
    assert g_res == g_full  # resuming changes nothing in groupopt
    assert_lrs_equal(g_res, t_res)  # and it matches torch's resumed run
    assert_lrs_equal(t_res, t_full)
    for a, b in zip(g_params, t_params):
        assert float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b)))) <= 1e-12
    assert list(g_sd) == list(t_sd)


def test_scheduler_state_dict_load_never_touches_lr():
    results = []
    for L, opt in zip((TL, GL), make_optimizers()):
        s = L.StepLR(opt, 2)
        for _ in range(5):
            opt.step()
            s.step()
        sd = s.state_dict()
        opt2 = make_optimizers()[0 if L is TL else 1]
        s2 = L.StepLR(opt2, 2)
        s2.load_state_dict(sd)
        results.append((lrs_of(opt2), s2.last_epoch, s2.get_last_lr()))
    assert results[1] == results[0]
