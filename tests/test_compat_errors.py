"""Bad input to the compat optimizers: torch's exception type and message, and nothing half-applied.

Each case calls torch and groupopt with the same mistake in the same test and
compares the exceptions. After a failed ``add_param_group`` or
``load_state_dict`` the optimizer must be exactly as before: same
``param_groups``, same ``state_dict``, same parameters, and its next step must
equal the step of a twin optimizer that never saw the failed call.
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import groupopt.compat as optim
from torch_port import make_pair, nnx_params, snapshot


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


mse_grad = nnx.grad(mse)  # eager: a few calls per model, and its primitives compile once per session

_rng = np.random.default_rng(0)
X = jax.device_put(_rng.normal(size=(8, 5)))
Y = jax.device_put(_rng.normal(size=(8, 3)))


def caught(fn) -> BaseException:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - we compare whatever torch raises
            return e
    raise AssertionError(f"{fn} raised nothing")


def assert_same_error(ours, theirs):
    """``ours()`` and ``theirs()`` (torch) raise the same exception type with the same message."""
    t = caught(theirs)
    o = caught(ours)
    assert type(o) is type(t), (type(o), o, type(t), t)
    assert str(o) == str(t), (str(o), str(t))
    return o


# --------------------------------------------------------------------------- constructor

M, T = make_pair("net", seed=11)  # constructor cases never step: shared, and checked unchanged


def _ctor_cases():
    m, t = M, T
    tp = lambda: t.parameters()  # noqa: E731
    return {
        "param in two groups": (
            lambda: optim.SGD([{"params": m.block1}, {"params": [m.block2.l1.bias, m.block1.l0.kernel]}], lr=0.1),
            lambda: torch.optim.SGD([{"params": t.block1.parameters()}, {"params": [t.block2.l1.bias, t.block1.l0.weight]}], lr=0.1),
        ),
        "group without params": (
            lambda: optim.SGD([{"params": m.block1}, {"lr": 0.1}], lr=0.1),
            lambda: torch.optim.SGD([{"params": t.block1.parameters()}, {"lr": 0.1}], lr=0.1),
        ),
        "set of params": (
            lambda: optim.SGD([{"params": {m.block1, m.block2}}], lr=0.1),
            lambda: torch.optim.SGD([{"params": set(t.block1.parameters())}], lr=0.1),
        ),
        "SGD negative lr": (lambda: optim.SGD(m, lr=-0.1), lambda: torch.optim.SGD(tp(), lr=-0.1)),
        "Adam negative lr": (lambda: optim.Adam(m, lr=-1e-3), lambda: torch.optim.Adam(tp(), lr=-1e-3)),
        "AdamW negative lr": (lambda: optim.AdamW(m, lr=-1e-3), lambda: torch.optim.AdamW(tp(), lr=-1e-3)),
        "Adam negative eps": (lambda: optim.Adam(m, eps=-1e-8), lambda: torch.optim.Adam(tp(), eps=-1e-8)),
        "AdamW negative eps": (lambda: optim.AdamW(m, eps=-1.0), lambda: torch.optim.AdamW(tp(), eps=-1.0)),
        "SGD negative momentum": (lambda: optim.SGD(m, momentum=-0.5), lambda: torch.optim.SGD(tp(), momentum=-0.5)),
        "SGD negative weight_decay": (lambda: optim.SGD(m, weight_decay=-1), lambda: torch.optim.SGD(tp(), weight_decay=-1)),
        "Adam negative weight_decay": (lambda: optim.Adam(m, weight_decay=-1e-2), lambda: torch.optim.Adam(tp(), weight_decay=-1e-2)),
        "AdamW negative weight_decay": (lambda: optim.AdamW(m, weight_decay=-1e-2), lambda: torch.optim.AdamW(tp(), weight_decay=-1e-2)),
        "nesterov without momentum": (lambda: optim.SGD(m, lr=0.1, nesterov=True), lambda: torch.optim.SGD(tp(), lr=0.1, nesterov=True)),
        "nesterov with dampening": (
            lambda: optim.SGD(m, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            lambda: torch.optim.SGD(tp(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
        ),
        "beta0 = 1": (lambda: optim.Adam(m, betas=(1.0, 0.999)), lambda: torch.optim.Adam(tp(), betas=(1.0, 0.999))),
        "beta0 < 0": (lambda: optim.AdamW(m, betas=(-0.1, 0.999)), lambda: torch.optim.AdamW(tp(), betas=(-0.1, 0.999))),
        "beta1 = 1": (lambda: optim.Adam(m, betas=(0.9, 1.0)), lambda: torch.optim.Adam(tp(), betas=(0.9, 1.0))),
        "beta1 > 1": (lambda: optim.AdamW(m, betas=(0.9, 1.5)), lambda: torch.optim.AdamW(tp(), betas=(0.9, 1.5))),
        "int beta0": (lambda: optim.Adam(m, betas=(0, 0.999)), lambda: torch.optim.Adam(tp(), betas=(0, 0.999))),
        "int beta1": (lambda: optim.AdamW(m, betas=(0.9, 0)), lambda: torch.optim.AdamW(tp(), betas=(0.9, 0))),
        "SGD empty parameter list": (lambda: optim.SGD([], lr=0.1), lambda: torch.optim.SGD([], lr=0.1)),
        "Adam empty parameter list": (lambda: optim.Adam([]), lambda: torch.optim.Adam([])),
        "empty iterator": (lambda: optim.SGD(iter([])), lambda: torch.optim.SGD(iter([]))),
    }


@pytest.mark.parametrize("case", list(_ctor_cases()))
def test_constructor_errors_match_torch(case):
    before = snapshot(M)
    tbefore = {n: p.detach().clone() for n, p in T.named_parameters()}
    ours, theirs = _ctor_cases()[case]
    assert_same_error(ours, theirs)
    assert all(np.array_equal(v, before[p]) for p, v in snapshot(M).items())
    assert all(torch.equal(p, tbefore[n]) for n, p in T.named_parameters())


# --------------------------------------------------------------------------- add_param_group / load_state_dict


def _groups_snapshot(opt):
    """param_groups with parameters by identity and every other value deep-copied."""
    return [({k: copy.deepcopy(v) for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]], list(g)) for g in opt.param_groups]


def _sd_equal(a, b):
    if list(a["state"]) != list(b["state"]):
        return False
    for i in a["state"]:
        if list(a["state"][i]) != list(b["state"][i]):
            return False
        if not all(np.array_equal(np.asarray(a["state"][i][k]), np.asarray(b["state"][i][k])) for k in a["state"][i]):
            return False
    return a["param_groups"] == b["param_groups"]


def _make(kind, model):
    groups = [{"params": model.block1}, {"params": model.block2, "lr": 0.02}]
    if kind == "SGD":
        return optim.SGD(groups, lr=0.05, momentum=0.9)
    return optim.Adam(groups, lr=1e-2, amsgrad=True)


def _tmake(kind, tmodel):
    groups = [{"params": tmodel.block1.parameters()}, {"params": tmodel.block2.parameters(), "lr": 0.02}]
    if kind == "SGD":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return torch.optim.Adam(groups, lr=1e-2, amsgrad=True)


def _failures(kind, m, t, opt, topt):
    """(name, our failing call, torch's failing call): each must leave the optimizer untouched."""
    other = optim.SGD if kind == "SGD" else optim.Adam
    src, _ = make_pair("net", seed=14)  # the mismatching checkpoints come from another model of the same shape
    tother = torch.optim.SGD if kind == "SGD" else torch.optim.Adam
    cases = [
        (
            "add_param_group: param already in a group",
            lambda: opt.add_param_group({"params": [m.fc.kernel, m.block2.l0.kernel], "lr": 0.1}),
            lambda: topt.add_param_group({"params": [t.fc.weight, t.block2.l0.weight], "lr": 0.1}),
        ),
        (
            "add_param_group: whole module already in a group",
            lambda: opt.add_param_group({"params": m.block1}),
            lambda: topt.add_param_group({"params": t.block1.parameters()}),
        ),
        (
            "add_param_group: no 'params'",
            lambda: opt.add_param_group({"lr": 0.1}),
            lambda: topt.add_param_group({"lr": 0.1}),
        ),
        (
            "add_param_group: a set",
            lambda: opt.add_param_group({"params": {m.fc}}),
            lambda: topt.add_param_group({"params": set(t.fc.parameters())}),
        ),
        (
            "add_param_group: not a dict",
            lambda: opt.add_param_group([m.fc]),
            lambda: topt.add_param_group(list(t.fc.parameters())),
        ),
        (
            "load_state_dict: different number of groups",
            lambda: opt.load_state_dict(other([{"params": src.block1}], lr=0.1).state_dict()),
            lambda: topt.load_state_dict(tother([{"params": t.block1.parameters()}], lr=0.1).state_dict()),
        ),
        (
            "load_state_dict: a group of a different size",
            lambda: opt.load_state_dict(other([{"params": [src.block1, src.fc]}, {"params": src.block2}], lr=0.1).state_dict()),
            lambda: topt.load_state_dict(
                tother([{"params": [*t.block1.parameters(), *t.fc.parameters()]}, {"params": t.block2.parameters()}], lr=0.1).state_dict()
            ),
        ),
        (
            "load_state_dict: second group of a different size",
            lambda: opt.load_state_dict(other([{"params": src.block1}, {"params": [src.block2.l0, src.block2.l1.kernel]}], lr=0.1).state_dict()),
            lambda: topt.load_state_dict(
                tother([{"params": t.block1.parameters()}, {"params": [*t.block2.l0.parameters(), t.block2.l1.weight]}], lr=0.1).state_dict()
            ),
        ),
    ]
    return cases


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_failed_calls_change_nothing(kind):
    m, t = make_pair("net", seed=12)
    twin, _ = make_pair("net", seed=12)
    opt, topt, twin_opt = _make(kind, m), _tmake(kind, t), _make(kind, twin)
    # some state first, in all three
    for _ in range(2):
        opt.step(mse_grad(m, X, Y))
        twin_opt.step(mse_grad(twin, X, Y))
        topt.zero_grad()
        F.mse_loss(t(torch.from_numpy(np.array(X))), torch.from_numpy(np.array(Y))).backward()
        topt.step()
    assert opt.state_dict()["state"]

    for name, ours, theirs in _failures(kind, m, t, opt, topt):
        groups, sd, params = _groups_snapshot(opt), opt.state_dict(), snapshot(m)
        tgroups = [dict((k, v) for k, v in g.items() if k != "params") for g in topt.param_groups]
        assert_same_error(ours, theirs)
        # torch is unchanged too (sanity: the comparison is between equal situations)
        assert [dict((k, v) for k, v in g.items() if k != "params") for g in topt.param_groups] == tgroups, name
        # ours: exactly as before
        assert _groups_snapshot(opt) == groups, name
        assert _sd_equal(opt.state_dict(), sd), name
        now = snapshot(m)
        assert all(np.array_equal(now[p], v) for p, v in params.items()), name
        # and the next step equals the twin's, which never saw the failed call
        opt.step(mse_grad(m, X, Y))
        twin_opt.step(mse_grad(twin, X, Y))
        for (p, a), (_, b) in zip(nnx_params(m), nnx_params(twin)):
            assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), (name, p)
        assert _sd_equal(opt.state_dict(), twin_opt.state_dict()), name
    assert opt.num_compiles == 1  # failed calls cost no recompilation


def test_load_state_dict_with_bad_state_is_all_or_nothing():
    """A checkpoint whose *last* group is broken (a state of the wrong shape) changes nothing.

    torch does not check shapes here (it fails later, in ``step``); groupopt refuses at load,
    before touching the first (valid) group.
    """
    m, _ = make_pair("net", seed=13)
    twin, _ = make_pair("net", seed=13)
    opt, twin_opt = _make("Adam", m), _make("Adam", twin)
    opt.step(mse_grad(m, X, Y))
    twin_opt.step(mse_grad(twin, X, Y))
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = 0.5  # would change group 0 if loading were half-applied
    last = max(bad["state"])
    bad["state"][last]["exp_avg"] = np.zeros((2, 2))
    groups = _groups_snapshot(opt)
    with pytest.raises(ValueError, match="(?i)shape"):
        opt.load_state_dict(bad)
    assert _groups_snapshot(opt) == groups
    assert _sd_equal(opt.state_dict(), sd)
    opt.step(mse_grad(m, X, Y))
    twin_opt.step(mse_grad(twin, X, Y))
    for (p, a), (_, b) in zip(nnx_params(m), nnx_params(twin)):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p


def test_foreign_group_keys_cover_all_15_torch_optimizers():
    """A state_dict from another optimizer is refused by its keys: the list of torch's keys is
    every key torch 2.13's optimizers put in their defaults (computed from torch here)."""
    from groupopt.compat.validation import TORCH_OPTIMIZER_KEYS

    names = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "Rprop", "ASGD",
             "LBFGS", "Adafactor", "Muon", "SparseAdam"]
    keys = set()
    for n in names:
        keys |= set(getattr(torch.optim, n)([torch.nn.Parameter(torch.zeros(2, 2))]).defaults)
    assert TORCH_OPTIMIZER_KEYS == keys
    # a Muon checkpoint loaded into AdamW (same params) is refused, naming Muon's keys
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(4.0).reshape(2, 2))

    m = M()
    muon = optim.Muon(m, lr=0.02)
    muon.step(nnx.grad(lambda m: jnp.sum(jnp.sin(m.w[...])))(m))
    adamw = optim.AdamW(M())
    before = adamw.state_dict()
    with pytest.raises(ValueError, match="ns_coefficients"):
        adamw.load_state_dict(muon.state_dict())
    assert str(adamw.state_dict()) == str(before)
