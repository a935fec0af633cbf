"""CyclicLR and OneCycleLR against torch 2.13, computed in the same run.

* compat schedulers (host, float64): every group's lr and momentum / beta1 at
  every step equal torch's (rel <= 1e-12; in practice bit-equal);
* pure schedules (``groupopt.schedules.cyclic`` / ``one_cycle`` and their
  momentum counterparts), jitted, in float64 and float32 state precision;
* parameters after optimizer steps with cycling momentum / beta1 (compat SGD
  and Adam, and the core transformation given the pure schedules);
* construction side effects, T allowed calls of OneCycleLR, state_dict, errors.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
import groupopt.compat as optim
from groupopt import schedules as S

TL = torch.optim.lr_scheduler
REL64 = 1e-12
REL32 = 1e-5  # float32: t / total_size loses ~log2(t) bits (torch in float32 would too)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step.*")
        yield


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


INIT = {"a": np.array([0.5, -1.0]), "b": np.array([1.5, 0.25, -0.75])}


def make_pair(kind="sgd", momentum=0.9, dtype=np.float64):
    """The same two-group optimizer in groupopt (tree mode) and torch."""
    model = {k: jnp.asarray(v, dtype) for k, v in INIT.items()}
    tparams = [torch.nn.Parameter(torch.tensor(INIT[k], dtype=torch.float64 if dtype == np.float64 else torch.float32)) for k in ("a", "b")]
    if kind == "sgd":
        ours = optim.SGD([{"params": "a"}, {"params": "b", "lr": 0.05}], lr=0.1, momentum=momentum, model=model)
        theirs = torch.optim.SGD([{"params": [tparams[0]]}, {"params": [tparams[1]], "lr": 0.05}], lr=0.1, momentum=momentum)
    else:
        ours = optim.Adam([{"params": "a"}, {"params": "b", "lr": 0.05}], lr=0.1, betas=(0.9, 0.99), model=model)
        theirs = torch.optim.Adam([{"params": [tparams[0]]}, {"params": [tparams[1]], "lr": 0.05}], lr=0.1, betas=(0.9, 0.99))
    return ours, theirs, tparams


def hp_trace(opt) -> list:
    """Per group (lr, momentum or beta1) now."""
    out = []
    for g in opt.param_groups:
        m = g["betas"][0] if "betas" in g else g["momentum"]
        out.append((g["lr"], m))
    return out


def run_traces(cls_ours, cls_torch, kind, n, **kw):
    """Hyperparameters at counts 0..n-1 (construction, then n-1 step() calls)."""
    ours, theirs, _ = make_pair(kind)
    s_ours, s_torch = cls_ours(ours, **kw), cls_torch(theirs, **kw)
    a, b = [], []
    for i in range(n):
        if i:
            s_ours.step()
            s_torch.step()
        a.append(hp_trace(ours))
        b.append(hp_trace(theirs))
        assert s_ours.get_last_lr() == s_torch.get_last_lr()
    return np.array(a, np.float64), np.array(b, np.float64), (ours, theirs, s_ours, s_torch)


_TORCH_TRACES: dict = {}


def torch_trace(cls_torch, kind, n, name, kw):
    """torch's hyperparameters at counts 0..n-1 (cached: the pure-schedule tests reuse them)."""
    key = (cls_torch.__name__, kind, n, name)
    if key not in _TORCH_TRACES:
        _, theirs, _ = make_pair(kind)
        sched = cls_torch(theirs, **kw)
        out = []
        for i in range(n):
            if i:
                sched.step()
            out.append(hp_trace(theirs))
        _TORCH_TRACES[key] = np.array(out, np.float64)
    return _TORCH_TRACES[key]


def scale_inv(x):  # jit-able custom scale_fn
    return 1.0 / (1.0 + 0.25 * x)


CYCLIC_CONFIGS = {
    "triangular": dict(base_lr=[0.01, 0.02], max_lr=0.1, step_size_up=7),
    "triangular2_down": dict(base_lr=0.001, max_lr=[0.1, 0.05], step_size_up=5, step_size_down=11, mode="triangular2",
                             base_momentum=[0.8, 0.85], max_momentum=0.95),
    "exp_range": dict(base_lr=0.01, max_lr=0.1, step_size_up=10, step_size_down=4, mode="exp_range", gamma=0.99),
    "custom_cycle": dict(base_lr=0.01, max_lr=0.2, step_size_up=6, scale_fn=scale_inv, scale_mode="cycle", mode="bogus"),
    "custom_iterations": dict(base_lr=0.01, max_lr=0.2, step_size_up=3, step_size_down=9, scale_fn=scale_inv, scale_mode="iterations"),
}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(CYCLIC_CONFIGS))
def test_cyclic_trace_matches_torch(name, kind):
    a, b, (ours, theirs, so, st) = run_traces(optim.lr_scheduler.CyclicLR, TL.CyclicLR, kind, 300, **CYCLIC_CONFIGS[name])
    assert rel_err(a, b) <= REL64
    assert rel_err(b, torch_trace(TL.CyclicLR, kind, 300, name, CYCLIC_CONFIGS[name])) == 0.0
    assert so.last_epoch == st.last_epoch == 299
    for g, h in zip(ours.param_groups, theirs.param_groups):
        for key in ("initial_lr", "max_momentum", "base_momentum"):
            assert g[key] == h[key]
        if kind == "adam":
            assert type(g["betas"]) is tuple and g["betas"][1] == h["betas"][1] == 0.99


ONE_CYCLE_CONFIGS = {
    "cos": dict(max_lr=[0.1, 0.05], total_steps=100),
    "linear_three_phase": dict(max_lr=0.3, total_steps=97, pct_start=0.25, anneal_strategy="linear", three_phase=True,
                               base_momentum=[0.8, 0.85], max_momentum=[0.95, 0.9]),
    "epochs_div": dict(max_lr=[0.1, 0.2], epochs=6, steps_per_epoch=50, div_factor=10.0, final_div_factor=100.0),
    "cos_three_phase": dict(max_lr=0.1, total_steps=300, pct_start=0.4, three_phase=True),
}


def _total(kw):
    return kw.get("total_steps") or kw["epochs"] * kw["steps_per_epoch"]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(ONE_CYCLE_CONFIGS))
def test_one_cycle_trace_matches_torch(name, kind):
    kw = ONE_CYCLE_CONFIGS[name]
    T = _total(kw)
    # construction + T allowed step() calls: counts 0..T
    a, b, (ours, theirs, so, st) = run_traces(optim.lr_scheduler.OneCycleLR, TL.OneCycleLR, kind, T + 1, **kw)
    assert rel_err(a, b) <= REL64
    assert rel_err(b, torch_trace(TL.OneCycleLR, kind, T + 1, name, kw)) == 0.0
    for g, h in zip(ours.param_groups, theirs.param_groups):
        for key in ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"):
            assert g[key] == h[key]
    # call T+1 raises, after last_epoch was incremented; the lrs are unchanged
    assert so.last_epoch == st.last_epoch == T  # T step() calls were allowed
    lrs = [g["lr"] for g in ours.param_groups]
    errs = []
    for s in (so, st):
        with pytest.raises(ValueError) as e:
            s.step()
        errs.append(str(e.value))
    assert errs[0] == errs[1] == f"Tried to step {T + 1} times. The specified number of total steps is {T}"
    assert so.last_epoch == st.last_epoch == T + 1
    assert so._step_count == st._step_count
    assert [g["lr"] for g in ours.param_groups] == lrs == [g["lr"] for g in theirs.param_groups]


def test_no_cycle_momentum_leaves_momentum():
    for kind in ("sgd", "adam"):
        for cls_o, cls_t, kw in (
            (optim.lr_scheduler.CyclicLR, TL.CyclicLR, dict(base_lr=0.01, max_lr=0.1, step_size_up=4, cycle_momentum=False)),
            (optim.lr_scheduler.OneCycleLR, TL.OneCycleLR, dict(max_lr=0.1, total_steps=20, cycle_momentum=False)),
        ):
            a, b, (ours, theirs, _, _) = run_traces(cls_o, cls_t, kind, 20, **kw)
            assert rel_err(a, b) <= REL64
            assert set(ours.param_groups[0]) == set(theirs.param_groups[0])
            assert "max_momentum" not in ours.param_groups[0]


# --------------------------------------------------------------------------- pure schedules


def _pure_cyclic(kw, g):
    pick = lambda v: v[g] if isinstance(v, list) else v  # noqa: E731
    common = {k: kw[k] for k in ("step_size_up", "step_size_down", "mode", "gamma", "scale_fn", "scale_mode") if k in kw}
    if common.get("mode") == "bogus":
        common.pop("mode")
    lr = S.cyclic(pick(kw["base_lr"]), pick(kw["max_lr"]), **common)
    mom = S.cyclic_momentum(pick(kw.get("base_momentum", 0.8)), pick(kw.get("max_momentum", 0.9)), **common)
    return lr, mom


def _pure_one_cycle(kw, g):
    pick = lambda v: v[g] if isinstance(v, list) else v  # noqa: E731
    steps = {k: kw[k] for k in ("total_steps", "epochs", "steps_per_epoch", "pct_start", "anneal_strategy", "three_phase") if k in kw}
    lr = S.one_cycle(pick(kw["max_lr"]), div_factor=kw.get("div_factor", 25.0), final_div_factor=kw.get("final_div_factor", 1e4), **steps)
    mom = S.one_cycle_momentum(base_momentum=pick(kw.get("base_momentum", 0.85)), max_momentum=pick(kw.get("max_momentum", 0.95)), **steps)
    return lr, mom


def _eval_jitted(fns, n, x64: bool):
    with jax.enable_x64(x64):
        counts = jnp.arange(n, dtype=jnp.int32)
        f = jax.jit(lambda c: jnp.stack([jnp.stack([fn(c) for fn in pair]) for pair in fns]))
        vals = jax.vmap(f)(counts)  # (n, groups, 2)
        assert vals.dtype == (jnp.float64 if x64 else jnp.float32)
        return np.asarray(vals, np.float64)


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("family", ["cyclic", "one_cycle"])
def test_pure_schedules_match_torch(family, x64):
    configs = CYCLIC_CONFIGS if family == "cyclic" else ONE_CYCLE_CONFIGS
    cls_t = TL.CyclicLR if family == "cyclic" else TL.OneCycleLR
    build = _pure_cyclic if family == "cyclic" else _pure_one_cycle
    ns = {name: 300 if family == "cyclic" else _total(kw) + 1 for name, kw in configs.items()}
    # every config's schedules in one jitted function (one compilation)
    fns = [pair for kw in configs.values() for pair in (build(kw, 0), build(kw, 1))]
    vals = _eval_jitted(fns, max(ns.values()), x64)  # (n, configs * groups, 2)
    worst = 0.0
    for c, (name, kw) in enumerate(configs.items()):
        n = ns[name]
        b = torch_trace(cls_t, "sgd", n, name, kw)
        for g in range(2):
            for j in range(2):  # lr, momentum: each relative to its own scale
                worst = max(worst, rel_err(vals[:n, 2 * c + g, j], b[:, g, j]))
        # host evaluation of the same pure schedules (Python ints): torch's numbers exactly
        lr0, mom0 = build(kw, 0)
        host = np.array([[lr0(t), mom0(t)] for t in range(n)])
        assert rel_err(host, b[:, 0, :]) == 0.0
    assert worst <= (REL64 if x64 else REL32), worst


def test_one_cycle_pure_past_the_end_holds():
    f = jax.jit(S.one_cycle(0.1, total_steps=10))
    assert float(f(jnp.int32(10))) == float(f(jnp.int32(25)))


# --------------------------------------------------------------------------- parameters


def _poly_grad(p):
    # the same elementwise polynomial in numpy/jax and torch: exact in both
    return 0.5 * p * p * p - 0.3 * p + 0.1


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("sched", ["cyclic", "one_cycle"])
def test_parameters_with_cycling_momentum_match_torch(kind, sched):
    steps = 40
    if sched == "cyclic":
        kw = dict(base_lr=[0.01, 0.02], max_lr=0.1, step_size_up=5, step_size_down=8, mode="triangular2")
        cls_o, cls_t = optim.lr_scheduler.CyclicLR, TL.CyclicLR
    else:
        kw = dict(max_lr=[0.1, 0.05], total_steps=steps, pct_start=0.25)
        cls_o, cls_t = optim.lr_scheduler.OneCycleLR, TL.OneCycleLR
    ours, theirs, tparams = make_pair(kind, momentum=0.0 if kind == "sgd" else 0.9)  # SGD(momentum=0): the scheduler sets it
    so, st = cls_o(ours, **kw), cls_t(theirs, **kw)
    if kind == "sgd":
        assert ours.param_groups[0]["momentum"] == theirs.param_groups[0]["momentum"] == kw.get("max_momentum", 0.9 if sched == "cyclic" else 0.95)
    worst = 0.0
    for _ in range(steps):
        grads = {k: _poly_grad(v) for k, v in ours.params.items()}
        ours.step(grads)
        with torch.no_grad():
            for p in tparams:
                p.grad = _poly_grad(p.detach().clone())
        theirs.step()
        so.step()
        st.step()
        for k, p in zip(("a", "b"), tparams):
            worst = max(worst, rel_err(ours.params[k], p.detach().numpy()))
    assert worst <= REL64, worst
    assert ours.num_compiles == 1  # hyperparameters are data: cycling never recompiles


@pytest.mark.parametrize("sched", ["cyclic", "one_cycle"])
def test_core_transformation_with_pure_schedules_matches_torch(sched):
    """A core user: lr=cyclic(...)/one_cycle(...), momentum or betas=(..._momentum(...), b2), jitted."""
    steps = 30
    params = {k: jnp.asarray(v) for k, v in INIT.items()}
    worst = 0.0
    for kind in ("sgd", "adam"):
        if sched == "cyclic":
            kw = dict(base_lr=[0.01, 0.02], max_lr=0.1, step_size_up=4, step_size_down=7, mode="exp_range", gamma=0.95)
            pure = _pure_cyclic
            cls_t = TL.CyclicLR
        else:
            kw = dict(max_lr=[0.1, 0.05], total_steps=steps, three_phase=True, anneal_strategy="linear")
            pure = _pure_one_cycle
            cls_t = TL.OneCycleLR
        groups = []
        for g, name in enumerate(("a", "b")):
            lr, mom = pure(kw, g)
            groups.append({"params": name, "lr": lr, **({"momentum": mom} if kind == "sgd" else {"betas": (mom, 0.99)})})
        tx = groupopt.sgd(0.1, momentum=0.9, params=params, groups=groups) if kind == "sgd" else groupopt.adam(0.1, betas=(0.9, 0.99), params=params, groups=groups)
        _, theirs, tparams = make_pair(kind)
        st = cls_t(theirs, **kw)
        state = tx.init(params)
        step = jax.jit(lambda p, s: tx.apply(p, jax.tree.map(_poly_grad, p), s))
        p = params
        for _ in range(steps):
            p, state = step(p, state)
            with torch.no_grad():
                for tp in tparams:
                    tp.grad = _poly_grad(tp.detach().clone())
            theirs.step()
            st.step()
            for k, tp in zip(("a", "b"), tparams):
                worst = max(worst, rel_err(p[k], tp.detach().numpy()))
    assert worst <= REL64, worst


# --------------------------------------------------------------------------- state_dict


class ScaleObj:
    def __init__(self):
        self.k = 0.5

    def __call__(self, x):
        return self.k ** (x - 1)


def _sd_equal(a: dict, b: dict):
    assert list(a) == list(b)  # torch's keys, in torch's order
    for k in b:
        assert a[k] == b[k], k


@pytest.mark.parametrize("which", ["cyclic_fn", "cyclic_obj", "one_cycle"])
def test_state_dict_roundtrip_and_torch_interop(which):
    if which == "one_cycle":
        kw = dict(max_lr=[0.1, 0.05], total_steps=60, three_phase=True)
        cls_o, cls_t = optim.lr_scheduler.OneCycleLR, TL.OneCycleLR
    else:
        fn = scale_inv if which == "cyclic_fn" else ScaleObj()
        kw = dict(base_lr=0.01, max_lr=0.1, step_size_up=5, scale_fn=fn)
        cls_o, cls_t = optim.lr_scheduler.CyclicLR, TL.CyclicLR
    ours, theirs, _ = make_pair("adam")
    so, st = cls_o(ours, **kw), cls_t(theirs, **kw)
    for _ in range(17):
        so.step()
        st.step()
    sd_o, sd_t = so.state_dict(), st.state_dict()
    _sd_equal(sd_o, sd_t)
    if which == "cyclic_obj":
        assert sd_o["_scale_fn_custom"] == {"k": 0.5}
    # load ours and torch's into fresh schedulers (built on fresh optimizers, as when resuming)
    for sd in (sd_o, sd_t):
        fresh, _, _ = make_pair("adam")
        if which != "one_cycle":
            kw2 = dict(kw, scale_fn=ScaleObj() if which == "cyclic_obj" else scale_inv)
        else:
            kw2 = kw
        s2 = cls_o(fresh, **kw2)
        s2.load_state_dict(dict(sd))
        for g, h in zip(fresh.param_groups, ours.param_groups):  # resume order: optimizer groups come back too
            g.update({k: v for k, v in h.items() if k != "params"})
        a = []
        for _ in range(20):
            s2.step()
            a.append(hp_trace(fresh))
        # compare against the torch scheduler continuing from step 17
        _, theirs2, _ = make_pair("adam")
        st2 = cls_t(theirs2, **kw)
        st2.load_state_dict(dict(sd_t))
        for g, h in zip(theirs2.param_groups, theirs.param_groups):
            g.update({k: v for k, v in h.items() if k != "params"})
        b = []
        for _ in range(20):
            st2.step()
            b.append(hp_trace(theirs2))
        assert rel_err(np.array(a), np.array(b)) == 0.0


# --------------------------------------------------------------------------- errors


def _both_raise(make_ours, make_torch, exc=ValueError):
    with pytest.raises(exc) as eo:
        make_ours()
    with pytest.raises(exc) as et:
        make_torch()
    assert str(eo.value) == str(et.value)
    return str(eo.value)


ONE_CYCLE_BAD = [
    dict(max_lr=0.1),
    dict(max_lr=0.1, epochs=3),
    dict(max_lr=0.1, total_steps=0),
    dict(max_lr=0.1, total_steps=2.5),
    dict(max_lr=0.1, epochs=0, steps_per_epoch=3),
    dict(max_lr=0.1, epochs=3, steps_per_epoch=-1),
    dict(max_lr=0.1, total_steps=10, pct_start=1),
    dict(max_lr=0.1, total_steps=10, pct_start=1.5),
    dict(max_lr=0.1, total_steps=10, anneal_strategy="exp"),
    dict(max_lr=[0.1, 0.2, 0.3], total_steps=10),
    dict(max_lr=0.1, total_steps=10, base_momentum=[0.8]),
]

CYCLIC_BAD = [
    dict(base_lr=[0.01], max_lr=0.1),
    dict(base_lr=0.01, max_lr=[0.1, 0.1, 0.1]),
    dict(base_lr=0.01, max_lr=0.1, mode="nope"),
    dict(base_lr=0.01, max_lr=0.1, max_momentum=[0.9]),
]


@pytest.mark.parametrize("kw", ONE_CYCLE_BAD)
def test_one_cycle_errors(kw):
    ours, theirs, _ = make_pair("sgd")
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups]
    _both_raise(lambda: optim.lr_scheduler.OneCycleLR(ours, **kw), lambda: TL.OneCycleLR(theirs, **kw))
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups] == before  # nothing half-applied
    if not isinstance(kw["max_lr"], list) and "base_momentum" not in kw:  # the pure schedule validates the same way
        steps = {k: v for k, v in kw.items() if k != "max_lr"}
        with pytest.raises(ValueError):
            S.one_cycle(0.1, **steps)


@pytest.mark.parametrize("kw", CYCLIC_BAD)
def test_cyclic_errors(kw):
    ours, theirs, _ = make_pair("sgd")
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups]
    msg = _both_raise(lambda: optim.lr_scheduler.CyclicLR(ours, **kw), lambda: TL.CyclicLR(theirs, **kw))
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups] == before
    if "mode" in kw:  # the pure schedules validate the same way
        for fn in (S.cyclic, S.cyclic_momentum):
            with pytest.raises(ValueError) as e:
                fn(0.01, 0.1, mode=kw["mode"])
            assert str(e.value) == msg


def test_cycle_momentum_needs_momentum_or_betas():
    # no compat optimizer without momentum/betas exists yet: fake one by removing the key from defaults
    ours, _, _ = make_pair("sgd")
    ours.defaults = {k: v for k, v in ours.defaults.items() if k != "momentum"}
    theirs = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    lr_before = [g["lr"] for g in ours.param_groups]
    for cls_o, cls_t, kw in (
        (optim.lr_scheduler.CyclicLR, TL.CyclicLR, dict(base_lr=0.01, max_lr=0.1)),
        (optim.lr_scheduler.OneCycleLR, TL.OneCycleLR, dict(max_lr=0.1, total_steps=10)),
    ):
        msg = _both_raise(lambda: cls_o(ours, **kw), lambda: cls_t(theirs, **kw))
        assert msg == "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
        assert [g["lr"] for g in ours.param_groups] == lr_before and "initial_lr" not in ours.param_groups[0]
    # without cycle_momentum it works
    optim.lr_scheduler.CyclicLR(ours, 0.01, 0.1, cycle_momentum=False)


def test_not_an_optimizer():
    for cls_o, cls_t in ((optim.lr_scheduler.CyclicLR, TL.CyclicLR), (optim.lr_scheduler.OneCycleLR, TL.OneCycleLR)):
        _both_raise(lambda: cls_o(object(), 0.1, 0.2), lambda: cls_t(object(), 0.1, 0.2), TypeError)


def test_group_added_later():
    """Interaction rule: CyclicLR -> zip ValueError; OneCycleLR -> KeyError('initial_lr'); nothing written."""
    model = {"a": jnp.zeros(2), "b": jnp.zeros(3), "c": jnp.zeros(1)}
    tp = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (2, 3, 1)]
    for cls_o, cls_t, kw, exc in (
        (optim.lr_scheduler.CyclicLR, TL.CyclicLR, dict(base_lr=0.01, max_lr=0.1, step_size_up=3), ValueError),
        (optim.lr_scheduler.OneCycleLR, TL.OneCycleLR, dict(max_lr=0.1, total_steps=10), KeyError),
    ):
        ours = optim.SGD([{"params": "a"}, {"params": "b"}], lr=0.1, momentum=0.9, model=model)
        theirs = torch.optim.SGD([{"params": [tp[0]]}, {"params": [tp[1]]}], lr=0.1, momentum=0.9)
        so, st = cls_o(ours, **kw), cls_t(theirs, **kw)
        so.step()
        st.step()
        ours.add_param_group({"params": "c", "momentum": 0.5})
        theirs.add_param_group({"params": [tp[2]], "momentum": 0.5})
        before = [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups]
        _both_raise(so.step, st.step, exc)
        assert [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups] == before


def test_failing_initial_step_changes_nothing():
    """A custom scale_fn that raises in the construction step: torch's error, the groups as they were."""

    def bad_scale(x):
        raise ZeroDivisionError("scale")

    ours, theirs, _ = make_pair("sgd")
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups]
    _both_raise(lambda: optim.lr_scheduler.CyclicLR(ours, 0.01, 0.1, scale_fn=bad_scale),
                lambda: TL.CyclicLR(theirs, 0.01, 0.1, scale_fn=bad_scale), ZeroDivisionError)
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in ours.param_groups] == before
