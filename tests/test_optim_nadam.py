"""NAdam: groupopt (compat class and core factory) against torch.optim.NAdam, computed in the same run.

The helpers at the top (``check_*``) are shared with the RAdam, Rprop and ASGD
test files, which import them from here.
"""

from __future__ import annotations

import copy
import inspect

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
from groupopt.compat import to_torch
from optim_harness import (
    Problem,
    assert_load_rejected,
    assert_same_error,
    make_compat,
    make_problem,
    make_torch,
    rel_err,
    roundtrip_torch_to_ours,
    run_differential,
    run_torch,
    state_dicts_equal,
    torch_step,
)

TOL = {np.float64: 1e-6, np.float32: 1e-5}
STEPS = 200


# --------------------------------------------------------------------------- shared checks


def check_layout(ours, topt):
    """Our state_dict has torch's layout: indices, per-param key order, dtypes/shapes; equal param_groups and defaults."""
    osd, tsd = ours.state_dict(), topt.state_dict()
    assert list(osd["state"]) == list(tsd["state"])
    for idx, tentry in tsd["state"].items():
        oentry = osd["state"][idx]
        assert list(oentry) == list(tentry), (idx, list(oentry), list(tentry))
        for k, tv in tentry.items():
            ov = np.asarray(oentry[k])
            assert ov.shape == tuple(tv.shape), (idx, k, ov.shape, tuple(tv.shape))
            assert str(ov.dtype) == str(tv.dtype).replace("torch.", ""), (idx, k, ov.dtype, tv.dtype)
    assert state_dicts_equal({"g": osd["param_groups"]}, {"g": tsd["param_groups"]}), (osd["param_groups"], tsd["param_groups"])
    assert list(ours.defaults.items()) == list(topt.defaults.items())


def check_signature(torch_cls, our_cls):
    """Same parameters (names, kinds, defaults, order) as torch's constructor, plus our keyword-only ``model``."""
    tp = list(inspect.signature(torch_cls.__init__).parameters.values())
    op = [p for p in inspect.signature(our_cls.__init__).parameters.values() if p.name != "model"]
    assert [(p.name, p.kind, p.default) for p in op] == [(p.name, p.kind, p.default) for p in tp]


def check_bad_arg(torch_cls, our_cls, kwargs):
    """Constructing with ``kwargs`` raises the same exception type and message in torch and groupopt."""

    def to_torch_value(v):
        return torch.tensor(np.asarray(v)) if hasattr(v, "shape") else v

    t_kwargs = {k: to_torch_value(v) for k, v in kwargs.items()}
    assert_same_error(
        lambda: torch_cls([torch.zeros(2, requires_grad=True)], **t_kwargs),
        lambda: our_cls({"w": jnp.zeros(2)}, **kwargs),
    )


def check_rejects_bad_loads(torch_cls, our_cls, kwargs, groups, *, other_cls, drop_keys):
    """Refused loads leave the optimizer unchanged: another optimizer's state_dict, missing
    per-parameter keys, a missing hyperparameter; torch's own state_dict then loads exactly."""
    prob = make_problem(len(groups), np.float64)
    ours = make_compat(our_cls, prob, kwargs, groups)
    for t in range(3):
        ours.step(prob.tree(prob.grads(t)))
    # a different optimizer class, same parameters
    other, oparams = make_torch(other_cls, prob, {}, [{} for _ in groups])
    for t in range(3):
        torch_step(other, oparams, prob.grads(t))
    assert_load_rejected(ours, other.state_dict(), match=rf"different optimizer than {our_cls.__name__}")
    # torch's own state_dict of this class, damaged
    topt, _, _ = run_torch(torch_cls, prob, kwargs, groups, 3)
    good = topt.state_dict()
    for key in drop_keys:
        bad = copy.deepcopy(good)
        del bad["state"][1][key]
        assert_load_rejected(ours, bad, match=rf"lacks \['{key}'\]")
    bad = copy.deepcopy(good)
    hp = [k for k in our_cls._rule_cls.hyperparams if k != "lr"][0]
    del bad["param_groups"][0][hp]
    assert_load_rejected(ours, bad, match=rf"lacks \['{hp}'\]")
    # and the undamaged one loads exactly
    ours.load_state_dict(good)
    assert state_dicts_equal(
        {i: {k: np.asarray(v) for k, v in e.items()} for i, e in ours.state_dict()["state"].items()},
        {i: {k: v.numpy() for k, v in e.items()} for i, e in good["state"].items()},
    )


def check_per_member_resume(torch_cls, our_cls, kwargs, groups, dtype, *, k=8, n=12, lr_edit=None):
    """torch's per-parameter state differs within a group (a parameter without a gradient
    is skipped: no step, and its lazily created state sees a later lr); we load it and
    continue like torch. Returns the max relative error (every step, and the final state).

    Group 0: member 1 has no gradient for the first 3 steps; group 1: member 0 has none
    for all ``k`` steps (no torch state at all when we load). ``lr_edit`` is applied to
    group 0 before step 2 on torch's side (our groups come from the state_dict).
    """
    prob = make_problem(len(groups), dtype)
    topt, tparams = make_torch(torch_cls, prob, kwargs, groups)
    skip = {(0, 1): 3, (1, 0): k}
    for t in range(k):
        if t == 2 and lr_edit is not None:
            topt.param_groups[0]["lr"] = lr_edit
        grads = prob.grads(t)
        for g, (ps, gs) in enumerate(zip(tparams, grads)):
            for j, (p, gr) in enumerate(zip(ps, gs)):
                p.grad = None if t < skip.get((g, j), 0) else torch.tensor(gr.copy())
        topt.step()
    sd = topt.state_dict()
    steps = {i: float(e["step"]) for i, e in sd["state"].items()}
    assert len(set(steps.values())) > 1 and len(steps) < sum(len(ps) for ps in tparams), steps
    mid = Problem(prob.dtype, prob.shapes, [[p.detach().numpy().copy() for p in ps] for ps in tparams], prob.seed)
    ours = make_compat(our_cls, mid, kwargs, groups)
    ours.load_state_dict(sd)
    err = 0.0
    for t in range(k, k + n):
        grads = prob.grads(t)
        torch_step(topt, tparams, grads)
        ours.step(prob.tree(grads))
        mine = prob.flat_from_tree(ours.params)
        err = max([err] + [rel_err(a, p) for ma, ps in zip(mine, tparams) for a, p in zip(ma, ps)])
    osd, tsd = ours.state_dict(), topt.state_dict()
    assert sorted(osd["state"]) == sorted(tsd["state"])  # torch lists them in order of creation
    for idx, tentry in tsd["state"].items():
        assert list(osd["state"][idx]) == list(tentry)
        for key, tv in tentry.items():
            err = max(err, rel_err(osd["state"][idx][key], tv))
    return err


def roundtrip_ours_to_torch(torch_cls, our_cls, *, kwargs, groups, dtype, k, n, scalar_keys=()):
    """We run ``k`` steps -> ``to_torch(state_dict())`` -> ``torch_cls.load_state_dict`` -> torch runs ``n`` more;
    returns the max relative error (parameters at every step, state at the end) against us running ``k + n``.

    Like ``optim_harness.roundtrip_ours_to_torch``, except for the dtype of the float scalar state
    (``scalar_keys``): torch's ``load_state_dict`` casts every non-``step`` state tensor to its
    parameter's dtype, so after loading torch keeps them in float64 for float64 parameters, where
    our uninterrupted run (like torch's uninterrupted run) keeps float32. Checked here: ours is
    float32, torch's is exactly the parameter dtype; every other entry has identical dtypes.
    """
    prob = make_problem(len(groups), dtype)
    ours = make_compat(our_cls, prob, kwargs, groups)
    for t in range(k):
        ours.step(prob.tree(prob.grads(t)))
    sd = ours.state_dict()
    mid = Problem(prob.dtype, prob.shapes, prob.flat_from_tree(ours.params), prob.seed)
    topt, tparams = make_torch(torch_cls, mid, kwargs, groups)
    topt.load_state_dict(to_torch(sd))
    err = 0.0
    for t in range(k, k + n):
        grads = prob.grads(t)
        torch_step(topt, tparams, grads)
        ours.step(prob.tree(grads))
        mine = prob.flat_from_tree(ours.params)
        err = max([err] + [rel_err(a, p) for ma, ps in zip(mine, tparams) for a, p in zip(ma, ps)])
    osd, tsd = ours.state_dict(), topt.state_dict()
    assert list(osd["state"]) == list(tsd["state"])
    for idx, tentry in tsd["state"].items():
        assert list(osd["state"][idx]) == list(tentry)
        for key, tv in tentry.items():
            ov = np.asarray(osd["state"][idx][key])
            want = prob.dtype if key in scalar_keys else np.dtype(str(tv.dtype).replace("torch.", ""))
            assert ov.dtype == (np.float32 if key in scalar_keys else want), (idx, key, ov.dtype)
            assert str(tv.dtype).replace("torch.", "") == want.name, (idx, key, tv.dtype)
            err = max(err, rel_err(ov, tv))
    return err


# --------------------------------------------------------------------------- NAdam

TORCH, OURS, CORE = torch.optim.NAdam, groupopt.compat.NAdam, groupopt.nadam
KW = dict(lr=1e-2, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.01, momentum_decay=6e-3)
GROUPS = [
    {},  # coupled weight decay from the constructor
    {"lr": 5e-3, "betas": (0.8, 0.99), "weight_decay": 0.1, "maximize": True},
    # large momentum_decay: mu_t -> beta1 fast, so mu_product (float32) is still far from underflow after 200 steps
    {"decoupled_weight_decay": True, "weight_decay": 0.05, "momentum_decay": 0.5, "betas": (0.95, 0.999), "eps": 1e-6},
    {"decoupled_weight_decay": True, "maximize": True, "weight_decay": 0.0},
]
# before step 0 (state not created yet), then mid-run: lr, and betas/momentum_decay (mu_product carries on)
EDITS = {0: {2: {"lr": 2e-2}}, 60: {1: {"lr": 1e-3}}, 120: {3: {"betas": (0.7, 0.9), "momentum_decay": 0.02}}}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compat_matches_torch_every_step(dtype):
    res = run_differential(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, steps=STEPS, edits=EDITS)
    assert res.max_err <= TOL[dtype], res.describe()
    assert res.ours.num_compiles == 1
    check_layout(res.ours, res.torch_opt)
    for key in ("mu_product",):  # float32 scalar state, rounded exactly as torch rounds it
        assert res.state_errors[key] == 0.0, res.describe()


def test_core_factory_jitted_apply_matches_torch():
    res = run_differential(TORCH, core_factory=CORE, kwargs=KW, groups=GROUPS, dtype=np.float32, steps=STEPS, edits=EDITS)
    assert res.max_err <= TOL[np.float32], res.describe()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_torch_to_ours(dtype):
    err, _, _ = roundtrip_torch_to_ours(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, k=15, n=10, edits=EDITS)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_ours_to_torch(dtype):
    err = roundtrip_ours_to_torch(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, k=15, n=10, scalar_keys=("mu_product",))
    assert err <= TOL[dtype]


def test_signature_matches_torch():
    check_signature(TORCH, OURS)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1e-3),
        dict(lr="0.1"),
        dict(lr=jnp.array([1e-3, 1e-3])),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(-0.1, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(betas=(0.9,)),
        dict(weight_decay=-0.1),
        dict(momentum_decay=-1e-3),
    ],
    ids=repr,
)
def test_bad_constructor_args_raise_like_torch(kwargs):
    check_bad_arg(TORCH, OURS, kwargs)


def test_load_state_dict_rejects_bad_input_and_changes_nothing():
    check_rejects_bad_loads(TORCH, OURS, KW, GROUPS[:2], other_cls=torch.optim.Adam, drop_keys=("mu_product", "exp_avg_sq"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_resume_torch_state_with_per_parameter_steps(dtype):
    # per-member step counts and mu_products (vectors in the group state)
    assert check_per_member_resume(TORCH, OURS, KW, GROUPS[:2], dtype) <= TOL[dtype]
