"""ReduceLROnPlateau against torch 2.13, in the same run: compat (host) and in-graph (jitted).

Scripted metric sequences (plateaus, improvements, noise, NaN) through torch's
scheduler, the compat one and :func:`groupopt.reduce_on_plateau` inside
``jax.jit``: every group's lr and the rule's state after every step are
torch's; the jitted train step compiles once.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import groupopt
import groupopt.compat as optim
from groupopt.plateau import plateau_decide, plateau_init

TL = torch.optim.lr_scheduler
INIT = {"a": np.array([0.5, -1.0]), "b": np.array([1.5, 0.25, -0.75])}


def metrics(seed: int, n: int = 120, mode: str = "min") -> list[float]:
    """Plateaus, improvements and noise (and one NaN), as Python floats."""
    rng = np.random.default_rng(seed)
    level, out = 10.0, []
    for i in range(n):
        phase = (i // 15) % 3
        if phase == 0:
            level *= 0.9  # improving
        elif phase == 2:
            level *= 1.002  # slowly worse
        noise = rng.normal() * 0.01 * level if rng.random() < 0.5 else 0.0
        v = level + noise
        out.append(float(-v if mode == "max" else v))
    out[40] = float("nan")
    out[41] = out[39]  # an exact repeat: not better
    return out


CONFIGS = {
    "min_rel": dict(mode="min", factor=0.5, patience=2, threshold=1e-3),
    "min_abs_cooldown_minlr": dict(mode="min", factor=0.3, patience=1, threshold=0.05, threshold_mode="abs", cooldown=3, min_lr=[0.02, 1e-3]),
    "max_rel_cooldown": dict(mode="max", factor=0.7, patience=0, threshold=1e-2, cooldown=2, min_lr=0.01),
    "max_abs_eps": dict(mode="max", factor=0.9, patience=3, threshold=0.01, threshold_mode="abs", eps=2e-3),
}


def make_pair(momentum=0.9):
    model = {k: jnp.asarray(v) for k, v in INIT.items()}
    tparams = [torch.nn.Parameter(torch.tensor(INIT[k], dtype=torch.float64)) for k in ("a", "b")]
    ours = optim.SGD([{"params": "a"}, {"params": "b", "lr": 0.05}], lr=0.1, momentum=momentum, model=model)
    theirs = torch.optim.SGD([{"params": [tparams[0]]}, {"params": [tparams[1]], "lr": 0.05}], lr=0.1, momentum=momentum)
    return ours, theirs, tparams


STATE_KEYS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compat_matches_torch(name):
    kw = CONFIGS[name]
    ours, theirs, _ = make_pair()
    so, st = optim.lr_scheduler.ReduceLROnPlateau(ours, **kw), TL.ReduceLROnPlateau(theirs, **kw)
    assert so.get_last_lr() == st.get_last_lr()
    reductions = 0
    for m in metrics(list(CONFIGS).index(name), mode=kw["mode"]):
        before = [g["lr"] for g in theirs.param_groups]
        so.step(m)
        st.step(m)
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
        assert so.get_last_lr() == st.get_last_lr()
        for k in STATE_KEYS:
            assert _same(getattr(so, k), getattr(st, k)), k
        reductions += before != [g["lr"] for g in theirs.param_groups]
    assert reductions >= 3  # the script exercises the rule
    sd_o, sd_t = so.state_dict(), st.state_dict()
    assert list(sd_o) == list(sd_t)
    assert all(_same(sd_o[k], sd_t[k]) for k in sd_t)
    assert "initial_lr" not in ours.param_groups[0] and not hasattr(so, "base_lrs")


def test_compat_state_dict_roundtrip_and_epoch_argument():
    kw = CONFIGS["min_abs_cooldown_minlr"]
    seq = metrics(3)
    ours, theirs, _ = make_pair()
    so, st = optim.lr_scheduler.ReduceLROnPlateau(ours, **kw), TL.ReduceLROnPlateau(theirs, **kw)
    for m in seq[:30]:
        so.step(m)
        st.step(m)
    # torch's state_dict into a fresh compat scheduler, torch's lrs into the optimizer (resume)
    ours2, _, _ = make_pair()
    s2 = optim.lr_scheduler.ReduceLROnPlateau(ours2, mode="max")  # mode comes back from the state
    s2.load_state_dict(st.state_dict())
    for g, h in zip(ours2.param_groups, theirs.param_groups):
        g["lr"] = h["lr"]
    assert s2.mode == "min" and s2.mode_worse == float("inf")
    for i, m in enumerate(seq[30:60]):
        epoch = 100 + i if i == 5 else None  # the deprecated epoch argument
        caught = []
        for s in (s2, st):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                s.step(m, epoch)
            caught.append([str(x.message) for x in w])
        assert caught[0] == caught[1] and len(caught[0]) == (epoch is not None)
        assert [g["lr"] for g in ours2.param_groups] == [g["lr"] for g in theirs.param_groups]
        assert s2.last_epoch == st.last_epoch


def test_compat_metric_types():
    ours, theirs, _ = make_pair()
    so, st = optim.lr_scheduler.ReduceLROnPlateau(ours, patience=0), TL.ReduceLROnPlateau(theirs, patience=0)
    for m_ours, m_torch in ((jnp.asarray(1.0), torch.tensor(1.0)), (np.float32(2.0), np.float32(2.0)), (3, 3)):
        so.step(m_ours)
        st.step(m_torch)
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
        assert so.best == st.best and type(so.best) is type(st.best)


def _raises_same(fo, ft, exc):
    with pytest.raises(exc) as eo:
        fo()
    with pytest.raises(exc) as et:
        ft()
    assert str(eo.value) == str(et.value)


@pytest.mark.parametrize(
    "kw", [dict(factor=1.0), dict(mode="avg"), dict(threshold_mode="pct"), dict(min_lr=[0.1]), dict(min_lr=[0.1, 0.2, 0.3])]
)
def test_errors_match_torch(kw):
    ours, theirs, _ = make_pair()
    _raises_same(lambda: optim.lr_scheduler.ReduceLROnPlateau(ours, **kw), lambda: TL.ReduceLROnPlateau(theirs, **kw), ValueError)
    # the in-graph transformation checks the same way
    tx = groupopt.sgd(0.1, params={k: jnp.asarray(v) for k, v in INIT.items()}, groups=[{"params": "a"}, {"params": "b"}])
    with pytest.raises(ValueError) as e:
        groupopt.reduce_on_plateau(tx, **kw)
    ours2, theirs2, _ = make_pair()
    with pytest.raises(ValueError) as et:
        TL.ReduceLROnPlateau(theirs2, **kw)
    assert str(e.value) == str(et.value)


def test_not_an_optimizer():
    _raises_same(lambda: optim.lr_scheduler.ReduceLROnPlateau(object()), lambda: TL.ReduceLROnPlateau(object()), TypeError)


def test_groups_added_later():
    """Scalar min_lr: re-broadcast at the next reduction; list: torch's RuntimeError (here, with nothing changed)."""
    model = {"a": jnp.zeros(2), "b": jnp.zeros(3), "c": jnp.zeros(1)}
    tp = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (2, 3, 1)]
    for min_lr in (0.01, [0.01, 0.02]):
        ours = optim.SGD([{"params": "a"}, {"params": "b", "lr": 0.05}], lr=0.1, model=model)
        theirs = torch.optim.SGD([{"params": [tp[0]]}, {"params": [tp[1]], "lr": 0.05}], lr=0.1)
        so = optim.lr_scheduler.ReduceLROnPlateau(ours, patience=0, min_lr=min_lr)
        st = TL.ReduceLROnPlateau(theirs, patience=0, min_lr=min_lr)
        for s in (so, st):
            s.step(1.0)
        ours.add_param_group({"params": "c", "lr": 0.3})
        theirs.add_param_group({"params": [tp[2]], "lr": 0.3})
        for s in (so, st):
            s.step(0.5)  # better: no reduction, no check
        if isinstance(min_lr, list):
            state = {k: getattr(so, k) for k in STATE_KEYS}
            _raises_same(lambda: so.step(2.0), lambda: st.step(2.0), RuntimeError)
            assert {k: getattr(so, k) for k in STATE_KEYS} == state  # nothing half-applied (torch advanced its counters)
            assert [g["lr"] for g in ours.param_groups] == [0.1, 0.05, 0.3]
        else:
            for m in (2.0, 3.0, 4.0):
                so.step(m)
                st.step(m)
                assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
            assert so.min_lrs == st.min_lrs == [0.01] * 3


# --------------------------------------------------------------------------- the rule itself


def test_rule_host_and_traced_agree():
    """plateau_decide on Python floats and on arrays inside jit: the same decisions."""
    kw = dict(mode="min", patience=2, threshold=1e-3, threshold_mode="rel", cooldown=1)
    host = plateau_init("min", traced=False)
    dev = plateau_init("min")
    step = jax.jit(lambda s, m: plateau_decide(s, m, **kw))
    for m in metrics(7, 60):
        host, r_host = plateau_decide(host, m, **kw)
        dev, r_dev = step(dev, jnp.asarray(m))
        assert bool(r_dev) == r_host
        assert _same(float(dev.best), host.best) and int(dev.num_bad_epochs) == host.num_bad_epochs
        assert int(dev.cooldown_counter) == host.cooldown_counter and int(dev.last_epoch) == host.last_epoch


# --------------------------------------------------------------------------- in the graph


def _poly_grad(p):
    return 0.5 * p * p * p - 0.3 * p + 0.1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_in_graph_matches_torch(name):
    """A fully jitted train step: update(grads, state, params, value=m) == opt.step(); sched.step(m)."""
    kw = CONFIGS[name]
    params = {k: jnp.asarray(v) for k, v in INIT.items()}
    tx = groupopt.reduce_on_plateau(
        groupopt.sgd(0.1, momentum=0.9, params=params, groups=[{"params": "a"}, {"params": "b", "lr": 0.05}]), **kw
    )
    _, theirs, tparams = make_pair()
    st = TL.ReduceLROnPlateau(theirs, **kw)
    traces = []

    @jax.jit
    def train_step(p, state, p2, state2, value):
        traces.append(1)
        # the Optax way (update + apply_updates) and the exact one (apply), side by side
        updates, state = tx.update(jax.tree.map(_poly_grad, p), state, p, value=value)
        p2, state2 = tx.apply(p2, jax.tree.map(_poly_grad, p2), state2, value=value)
        return optax.apply_updates(p, updates), state, p2, state2

    state = state2 = tx.init(params)
    p = p2 = params
    worst = worst_exact = 0.0
    for m in metrics(list(CONFIGS).index(name) + 1, n=80, mode=kw["mode"]):
        p, state, p2, state2 = train_step(p, state, p2, state2, m)
        with torch.no_grad():
            for tp in tparams:
                tp.grad = _poly_grad(tp.detach().clone())
        theirs.step()
        st.step(m)
        assert tx.lrs(state) == [g["lr"] for g in theirs.param_groups] == tx.lrs(state2)
        ps = state.plateau
        assert _same(float(ps.best), st.best) and int(ps.num_bad_epochs) == st.num_bad_epochs
        assert int(ps.cooldown_counter) == st.cooldown_counter and int(ps.last_epoch) == st.last_epoch
        for k, tp in zip(("a", "b"), tparams):
            ref = tp.detach().numpy()
            worst = max(worst, float(np.max(np.abs(np.asarray(p[k]) - ref)) / np.max(np.abs(ref))))
            worst_exact = max(worst_exact, float(np.max(np.abs(np.asarray(p2[k]) - ref)) / np.max(np.abs(ref))))
    assert len(traces) == 1  # no recompilation across steps (the metric is data)
    assert worst_exact <= 1e-12 and worst <= 1e-10, (worst_exact, worst)


def test_in_graph_plateau_step_alone_and_frozen_group():
    """Observe a metric without an update (epoch-end validation); frozen groups are skipped."""
    params = {k: jnp.asarray(v) for k, v in INIT.items()}
    inner = groupopt.sgd(0.1, params=params, groups=[{"params": "a"}, {"params": "b", "frozen": True}])
    tx = groupopt.reduce_on_plateau(inner, patience=0, factor=0.5, min_lr=[0.02, 0.0])
    _, theirs, _ = make_pair()
    theirs.param_groups.pop()  # torch knows only the trainable group
    st = TL.ReduceLROnPlateau(theirs, patience=0, factor=0.5, min_lr=0.02)
    observe = jax.jit(tx.plateau_step)
    state = tx.init(params)
    for m in (1.0, 2.0, 3.0, 0.5, 0.6, 0.7, 0.8):
        state = observe(state, m)
        st.step(m)
        assert tx.lrs(state) == [theirs.param_groups[0]["lr"], None]


def test_in_graph_refuses_scheduled_lr_and_non_grouped():
    params = {k: jnp.asarray(v) for k, v in INIT.items()}
    with pytest.raises(ValueError, match="schedule"):
        groupopt.reduce_on_plateau(groupopt.sgd(groupopt.schedules.exponential(0.1, 0.9), params=params))
    with pytest.raises(TypeError):
        groupopt.reduce_on_plateau(optax.sgd(0.1))
