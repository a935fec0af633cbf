"""Rprop: groupopt (compat class and core factory) against torch.optim.Rprop, computed in the same run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
from optim_harness import make_problem, rel_err, roundtrip_torch_to_ours, run_differential, run_torch
from test_optim_nadam import (
    STEPS,
    TOL,
    check_bad_arg,
    check_layout,
    check_per_member_resume,
    check_rejects_bad_loads,
    check_signature,
    roundtrip_ours_to_torch,
)

TORCH, OURS, CORE = torch.optim.Rprop, groupopt.compat.Rprop, groupopt.rprop
KW = dict(lr=2e-2, etas=(0.4, 1.3), step_sizes=(1e-4, 0.5))
GROUPS = [
    {},
    {"lr": 0.05, "step_sizes": (1e-3, 0.02), "maximize": True},  # lr above the max step size: clamped at once
    {"etas": (0.6, 1.1), "step_sizes": (1e-6, 50)},
]
# lr edited before the first step (sets the initial step size, as in torch), then mid-run (ignored, as in torch)
FIRST_EDIT = {0: {1: {"lr": 0.01}}}
EDITS = {**FIRST_EDIT, 60: {0: {"lr": 0.5}}, 120: {2: {"lr": 1e-5}}, 150: {1: {"etas": (0.3, 1.5)}}}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compat_matches_torch_every_step(dtype):
    res = run_differential(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, steps=STEPS, edits=EDITS)
    assert res.max_err <= TOL[dtype], res.describe()
    assert res.ours.num_compiles == 1
    check_layout(res.ours, res.torch_opt)
    # the mid-run lr edits changed nothing: torch without them gives the same parameters
    prob = make_problem(len(GROUPS), dtype)
    no_lr_edits = {t: e for t, e in EDITS.items() if t == 0 or "lr" not in next(iter(e.values()))}
    _, tparams, _ = run_torch(TORCH, prob, KW, GROUPS, STEPS, edits=no_lr_edits)
    mine = prob.flat_from_tree(res.ours.params)
    assert max(rel_err(a, p) for ma, ps in zip(mine, tparams) for a, p in zip(ma, ps)) <= TOL[dtype]
    # ... while the edit before the first step did matter
    _, tparams, _ = run_torch(TORCH, prob, KW, GROUPS, STEPS, edits={150: EDITS[150]})
    assert max(rel_err(a, p) for a, p in zip(mine[1], tparams[1])) > 1e-3


def test_core_factory_jitted_apply_matches_torch():
    res = run_differential(TORCH, core_factory=CORE, kwargs=KW, groups=GROUPS, dtype=np.float32, steps=STEPS, edits=EDITS)
    assert res.max_err <= TOL[np.float32], res.describe()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_torch_to_ours(dtype):
    # the lr edit after loading is ignored on both sides (step_size comes from the state)
    err, _, _ = roundtrip_torch_to_ours(
        TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, k=15, n=10, edits={**FIRST_EDIT, 17: {0: {"lr": 0.3}}}
    )
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_ours_to_torch(dtype):
    err = roundtrip_ours_to_torch(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, k=15, n=10)
    assert err <= TOL[dtype]


def test_signature_matches_torch():
    check_signature(TORCH, OURS)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1e-3),
        dict(lr=jnp.array([1e-3, 1e-3])),
        dict(etas=(1.5, 1.2)),
        dict(etas=(0.0, 1.2)),
        dict(etas=(0.5, 1.0)),
        dict(etas=(0.5, 0.9)),
        dict(etas=(0.5,)),
    ],
    ids=repr,
)
def test_bad_constructor_args_raise_like_torch(kwargs):
    check_bad_arg(TORCH, OURS, kwargs)


def test_load_state_dict_rejects_bad_input_and_changes_nothing():
    check_rejects_bad_loads(TORCH, OURS, KW, GROUPS[:2], other_cls=torch.optim.ASGD, drop_keys=("prev", "step_size"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_resume_torch_state_with_per_parameter_steps(dtype):
    assert check_per_member_resume(TORCH, OURS, KW, GROUPS[:2], dtype, lr_edit=0.03) <= TOL[dtype]
