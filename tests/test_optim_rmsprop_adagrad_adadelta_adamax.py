"""RMSprop, Adagrad, Adadelta and Adamax against torch.optim, differentially (same run, same inputs).

Each optimizer runs two configurations that together switch every boolean
option on and off, use non-default numbers, several groups with different
hyperparameters and mid-run edits (lr, and RMSprop's momentum), in float32
and float64, for 200 steps; the parameters must match torch's after every
step, and the final state (keys, order, dtype, values) torch's. Plus the
optax-style factories under jax.jit, state_dict round trips in both
directions, constructor validation (same exception and message as torch)
and refused loads.
"""

from __future__ import annotations

import copy
import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
import groupopt.compat as C
from groupopt.compat import to_numpy, to_torch
from optim_harness import (
    assert_load_rejected,
    assert_same_error,
    compare_state,
    make_compat,
    make_problem,
    make_torch,
    rel_err,
    roundtrip_ours_to_torch,
    roundtrip_torch_to_ours,
    run_differential,
    state_dicts_equal,
    torch_step,
)

TOL = {"float32": 1e-5, "float64": 1e-6}
DTYPES = {"float32": np.float32, "float64": np.float64}
STEPS = 200


def _shapes(n_groups):
    """Group 0 has two parameters (member order matters), the others one (fewer leaves: faster compiles)."""
    return (((3, 2), (4,)),) + (((2, 3),),) * (n_groups - 1)

# name -> torch class, compat class, core factory, configs [(kwargs, groups, edits)], round-trip config,
#         a torch optimizer whose state_dict must be refused, bad constructor arguments
SPECS = {
    "RMSprop": dict(
        torch=torch.optim.RMSprop,
        compat=C.RMSprop,
        core=groupopt.rmsprop,
        configs=[
            (
                dict(lr=1e-2, alpha=0.9, eps=1e-6),
                [
                    {},
                    {"centered": True, "momentum": 0.9, "lr": 5e-3},
                    {"momentum": 0.5, "maximize": True, "weight_decay": 0.1},
                    {"centered": True, "maximize": True, "weight_decay": 0.05, "alpha": 0.99, "eps": 1e-8},
                ],
                # lr edit; momentum to 0 (torch's plain path, buffer kept) and back
                {100: {1: {"lr": 1e-3}}, 60: {2: {"momentum": 0.0}}, 130: {2: {"momentum": 0.7}}},
            ),
            (
                dict(lr=3e-3, momentum=0.9, centered=True, maximize=True, weight_decay=0.01, alpha=0.95),
                [{}, {"centered": False, "momentum": 0, "maximize": False, "weight_decay": 0}],
                {80: {0: {"lr": 1e-3}}},
            ),
        ],
        roundtrip=(dict(lr=1e-2, momentum=0.9, centered=True), [{}, {"centered": False, "momentum": 0.0, "lr": 3e-3}]),
        foreign=torch.optim.Adadelta,
        bad=[
            dict(lr=-1.0), dict(eps=-1e-3), dict(momentum=-0.5), dict(weight_decay=-0.1), dict(alpha=-0.5), "lr_tensor",
        ],
    ),
    "Adagrad": dict(
        torch=torch.optim.Adagrad,
        compat=C.Adagrad,
        core=groupopt.adagrad,
        configs=[
            (
                dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-6),
                [
                    {},
                    {"maximize": True, "weight_decay": 0.1, "lr": 0.05, "lr_decay": 0.0},
                    {"initial_accumulator_value": 2.0, "eps": 1e-10},  # torch ignores a group's value
                ],
                {100: {1: {"lr": 0.01}}},
            ),
            (
                dict(lr=0.05, maximize=True, weight_decay=0.05),
                [{}, {"maximize": False, "weight_decay": 0, "lr_decay": 0.1}],
                {80: {0: {"lr": 0.2}}},
            ),
        ],
        roundtrip=(dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.5), [{}, {"weight_decay": 0.1, "maximize": True}]),
        foreign=torch.optim.RMSprop,
        bad=[
            dict(lr=-1.0), dict(lr_decay=-0.1), dict(weight_decay=-0.1), dict(initial_accumulator_value=-1.0),
            dict(eps=-1e-3), dict(fused=True, differentiable=True), dict(fused=True, foreach=True), "lr_tensor",
        ],
    ),
    "Adadelta": dict(
        torch=torch.optim.Adadelta,
        compat=C.Adadelta,
        core=groupopt.adadelta,
        configs=[
            (
                dict(lr=0.5, rho=0.8, eps=1e-5),
                [{}, {"maximize": True, "weight_decay": 0.1, "lr": 0.3}, {"rho": 0.95, "eps": 1e-6}],
                {100: {1: {"lr": 0.1}}},
            ),
            (
                dict(maximize=True, weight_decay=0.02),
                [{}, {"maximize": False, "weight_decay": 0, "lr": 2.0, "rho": 1.0}],
                {80: {0: {"lr": 0.5}}},
            ),
        ],
        roundtrip=(dict(lr=0.5, rho=0.85), [{}, {"weight_decay": 0.1, "maximize": True}]),
        foreign=torch.optim.RMSprop,
        bad=[dict(lr=-1.0), dict(rho=-0.1), dict(rho=1.5), dict(eps=-1e-3), dict(weight_decay=-0.1), "lr_tensor"],
    ),
    "Adamax": dict(
        torch=torch.optim.Adamax,
        compat=C.Adamax,
        core=groupopt.adamax,
        configs=[
            (
                dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
                [{}, {"maximize": True, "weight_decay": 0.1, "lr": 5e-3}, {"betas": (0.95, 0.9), "eps": 1e-3}],
                {100: {1: {"lr": 1e-3}}},
            ),
            (
                dict(lr=5e-3, maximize=True, weight_decay=0.02),
                [{}, {"maximize": False, "weight_decay": 0, "betas": [0.5, 0.9]}],
                {80: {0: {"lr": 2e-2}}},
            ),
        ],
        roundtrip=(dict(lr=1e-2, betas=(0.85, 0.95)), [{}, {"weight_decay": 0.1, "maximize": True}]),
        foreign=torch.optim.Adam,  # same group keys: refused for its state keys
        bad=[
            dict(lr=-1.0), dict(eps=-1e-3), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)),
            dict(weight_decay=-0.1), "lr_tensor",
        ],
    ),
}
NAMES = list(SPECS)


@functools.lru_cache(maxsize=None)
def _diff(name, ci, dtype):
    spec = SPECS[name]
    kwargs, groups, edits = spec["configs"][ci]
    return run_differential(
        spec["torch"], spec["compat"], kwargs=kwargs, groups=groups, dtype=DTYPES[dtype], steps=STEPS, edits=edits,
        shapes=_shapes(len(groups)),
    )


@functools.lru_cache(maxsize=None)
def _roundtrip_in(name):
    """torch -> ours, float64; torch edits group 1's lr before the save."""
    spec = SPECS[name]
    kwargs, groups = spec["roundtrip"]
    lr1 = groups[1].get("lr", kwargs.get("lr")) / 2
    return roundtrip_torch_to_ours(
        spec["torch"], spec["compat"], kwargs=kwargs, groups=groups, dtype=np.float64, k=7, n=7, edits={3: {1: {"lr": lr1}}}
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ci", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_compat_matches_torch_every_step(name, ci, dtype):
    res = _diff(name, ci, dtype)
    assert res.max_err <= TOL[dtype], res.describe()
    assert res.key_orders_match(), res.describe()
    # same groups as torch's after the run (defaults in torch's order, the edits applied)
    ours_pg, torch_pg = res.ours.state_dict()["param_groups"], res.torch_opt.state_dict()["param_groups"]
    assert state_dicts_equal({"g": ours_pg}, {"g": torch_pg}), (ours_pg, torch_pg)


@pytest.mark.parametrize("name", NAMES)
def test_core_factory_matches_torch_under_jit(name):
    spec = SPECS[name]
    kwargs, groups, edits = spec["configs"][0]
    # torch.optim.Adagrad ignores a group's initial_accumulator_value; the core honours it (checked below)
    groups = [{k: v for k, v in g.items() if k != "initial_accumulator_value"} for g in groups]
    res = run_differential(spec["torch"], core_factory=spec["core"], kwargs=kwargs, groups=groups, dtype=np.float32, steps=STEPS, edits=edits,
                           shapes=_shapes(len(groups)))
    assert res.max_err <= TOL["float32"], res.describe()


def test_core_adagrad_honours_group_initial_accumulator_value():
    tree = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    tx = groupopt.adagrad(initial_accumulator_value=0.5, params=tree, groups=[{"params": "a"}, {"params": "b", "initial_accumulator_value": 2.0}])
    state = tx.init(tree)
    assert np.all(np.asarray(state.groups[0].slots["sum"][0]) == 0.5)
    assert np.all(np.asarray(state.groups[1].slots["sum"][0]) == 2.0)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_group_keys_are_torchs(name):
    spec = SPECS[name]
    t = spec["torch"]([torch.zeros(2, requires_grad=True)])
    ours = spec["compat"]({"w": jnp.zeros(2)})
    assert list(ours.defaults) == list(t.defaults)
    assert state_dicts_equal(ours.defaults, t.defaults)
    tg = {k: v for k, v in t.param_groups[0].items() if k != "params"}
    og = {k: v for k, v in ours.param_groups[0].items() if k != "params"}
    assert list(og) == list(tg) and state_dicts_equal(og, tg)


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_torch_to_ours(name):
    err, ours, topt = _roundtrip_in(name)
    assert err <= TOL["float64"]
    assert ours.param_groups[1]["lr"] == topt.param_groups[1]["lr"]  # the saved groups replaced ours


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_ours_to_torch(name):
    spec = SPECS[name]
    kwargs, groups = spec["roundtrip"]
    err, _, _ = roundtrip_ours_to_torch(spec["torch"], spec["compat"], kwargs=kwargs, groups=groups, dtype=np.float32, k=7, n=7)
    assert err <= TOL["float32"]


def _bad_args(case):
    if case == "lr_tensor":
        return dict(lr=torch.tensor([1e-3, 2e-3])), dict(lr=jnp.array([1e-3, 2e-3]))
    return dict(case), dict(case)


@pytest.mark.parametrize(
    "name,case", [(n, c) for n in NAMES for c in SPECS[n]["bad"]], ids=lambda x: x if isinstance(x, str) else str(x)
)
def test_bad_constructor_argument_same_error_as_torch(name, case):
    spec = SPECS[name]
    tkw, okw = _bad_args(case)
    assert_same_error(
        lambda: spec["torch"]([torch.zeros(2, requires_grad=True)], **tkw),
        lambda: spec["compat"]({"w": jnp.zeros(2)}, **okw),
    )


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses_other_optimizers_state(name):
    spec = SPECS[name]
    _, ours, _ = _roundtrip_in(name)
    prob = make_problem(2, np.float64)
    other, params = make_torch(spec["foreign"], prob, {}, [{}, {}])
    torch_step(other, params, prob.grads(0))
    err = assert_load_rejected(ours, other.state_dict())
    assert name in str(err) and "different optimizer" in str(err)


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses_missing_state_keys(name):
    _, ours, topt = _roundtrip_in(name)
    sd = topt.state_dict()
    sd = {"state": {i: dict(e) for i, e in sd["state"].items()}, "param_groups": sd["param_groups"]}
    last = list(sd["state"][0])[-1]  # a buffer (step comes first)
    del sd["state"][0][last]
    err = assert_load_rejected(ours, sd)
    assert repr(last) in str(err) and "lacks" in str(err)


# --------------------------------------------------------------------------- Adagrad's eager state


def _assert_state_dicts_match(ours, topt, tol):
    osd, tsd = ours.state_dict(), topt.state_dict()
    errs, orders = compare_state(osd, tsd)
    assert all(a == b for a, b in orders.values()), orders
    assert max(errs.values(), default=0.0) <= tol, errs
    assert state_dicts_equal({"g": osd["param_groups"]}, {"g": tsd["param_groups"]})


def test_adagrad_eager_state_and_defaults_accumulator_value():
    prob = make_problem(2, np.float64)
    tparams = [[torch.tensor(a.copy(), requires_grad=True) for a in arrs] for arrs in prob.init]
    topt = torch.optim.Adagrad([{"params": tparams[0], "initial_accumulator_value": 5.0}], lr=0.1, initial_accumulator_value=0.3)
    ours = C.Adagrad([{"params": "g0/*", "initial_accumulator_value": 5.0}], model=prob.tree(prob.init), lr=0.1, initial_accumulator_value=0.3)
    # eager: step 0 and sum = the constructor's 0.3 (the group's 5.0 ignored), before any step
    _assert_state_dicts_match(ours, topt, 0.0)
    assert sorted(ours.state_dict()["state"]) == [0, 1]
    assert np.all(ours.state_dict()["state"][0]["sum"] == 0.3)
    assert len(ours.state) == 2
    # a later group gets its state lazily, filled with the constructor's value too
    topt.add_param_group({"params": tparams[1], "initial_accumulator_value": 7.0})
    ours.add_param_group({"params": "g1/*", "initial_accumulator_value": 7.0})
    _assert_state_dicts_match(ours, topt, 0.0)
    assert sorted(ours.state_dict()["state"]) == [0, 1]
    saved = copy.deepcopy(topt.state_dict())

    def run(start, n):
        for t in range(start, start + n):
            g = prob.grads(t)
            torch_step(topt, tparams, g)
            ours.step(prob.tree(g))
            for arrs, ps in zip(prob.flat_from_tree(ours.params), tparams):
                for a, p in zip(arrs, ps):
                    assert rel_err(a, p) <= TOL["float64"]

    run(0, 10)
    _assert_state_dicts_match(ours, topt, TOL["float64"])
    assert sorted(ours.state_dict()["state"]) == [0, 1, 2, 3]
    # loading a state_dict in which the later group has no state: eager entries back, that group lazy again
    ours.load_state_dict(copy.deepcopy(saved))
    topt.load_state_dict(copy.deepcopy(saved))
    _assert_state_dicts_match(ours, topt, 0.0)
    assert sorted(ours.state_dict()["state"]) == [0, 1]
    run(10, 10)
    _assert_state_dicts_match(ours, topt, TOL["float64"])


# --------------------------------------------------------------------------- RMSprop's momentum buffer


def test_rmsprop_momentum_raised_from_zero_after_state_is_refused_unchanged():
    tree = {"w": jnp.arange(3.0)}
    ours = C.RMSprop(tree, lr=0.1)
    tp = torch.tensor(np.arange(3.0), requires_grad=True)
    topt = torch.optim.RMSprop([tp], lr=0.1)
    g = np.array([0.5, -1.0, 2.0])
    ours.step({"w": jnp.asarray(g)})
    tp.grad = torch.tensor(g)
    topt.step()
    topt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(KeyError, match="momentum_buffer"):  # torch cannot do it either
        topt.step()
    ours.param_groups[0]["momentum"] = 0.9
    before = ours.state_dict()
    params_before = np.asarray(ours.params["w"])
    with pytest.raises(ValueError, match="param group 0: momentum was 0 when its state was created"):
        ours.step({"w": jnp.asarray(g)})
    after = ours.state_dict()
    assert state_dicts_equal(before["state"], after["state"])
    assert np.array_equal(params_before, np.asarray(ours.params["w"]))
    ours.param_groups[0]["momentum"] = 0
    ours.step({"w": jnp.asarray(g)})  # usable again
    assert int(ours.state_dict()["state"][0]["step"]) == 2
