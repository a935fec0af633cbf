"""RAdam: groupopt (compat class and core factory) against torch.optim.RAdam, computed in the same run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
from optim_harness import roundtrip_torch_to_ours, run_differential
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

TORCH, OURS, CORE = torch.optim.RAdam, groupopt.compat.RAdam, groupopt.radam
KW = dict(lr=1e-2, betas=(0.85, 0.995), eps=1e-6, weight_decay=0.01)
GROUPS = [
    {},  # coupled weight decay from the constructor; rectified from step 6 on
    {"lr": 3e-3, "betas": (0.9, 0.9), "maximize": True},  # small beta2: rho_inf = 19
    {"decoupled_weight_decay": True, "weight_decay": 0.1},
    {"decoupled_weight_decay": True, "maximize": True, "eps": 1e-3, "betas": (0.5, 0.999)},
]
EDITS = {0: {2: {"lr": 2e-2}}, 60: {1: {"lr": 1e-3}}, 120: {3: {"betas": (0.7, 0.99), "weight_decay": 0.03}}}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compat_matches_torch_every_step(dtype):
    res = run_differential(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, steps=STEPS, edits=EDITS)
    assert res.max_err <= TOL[dtype], res.describe()
    assert res.ours.num_compiles == 1
    check_layout(res.ours, res.torch_opt)


def test_core_factory_jitted_apply_matches_torch():
    res = run_differential(TORCH, core_factory=CORE, kwargs=KW, groups=GROUPS, dtype=np.float32, steps=STEPS, edits=EDITS)
    assert res.max_err <= TOL[np.float32], res.describe()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_torch_to_ours(dtype):
    # k=4 < 6: the first loaded steps cross the rectification threshold rho_t > 5
    err, _, _ = roundtrip_torch_to_ours(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, k=4, n=10, edits=EDITS)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_ours_to_torch(dtype):
    err = roundtrip_ours_to_torch(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, k=4, n=10)
    assert err <= TOL[dtype]


def test_signature_matches_torch():
    check_signature(TORCH, OURS)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1e-3),
        dict(lr=jnp.array([1e-3, 1e-3])),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(-0.1, 0.999)),
        dict(betas=(0.9, 1.5)),
        dict(weight_decay=-0.1),
    ],
    ids=repr,
)
def test_bad_constructor_args_raise_like_torch(kwargs):
    check_bad_arg(TORCH, OURS, kwargs)


def test_load_state_dict_rejects_bad_input_and_changes_nothing():
    # an Adam state_dict has every state key and hyperparameter RAdam needs: refused for its extra group keys
    check_rejects_bad_loads(TORCH, OURS, KW, GROUPS[:2], other_cls=torch.optim.Adam, drop_keys=("exp_avg", "step"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_resume_torch_state_with_per_parameter_steps(dtype):
    assert check_per_member_resume(TORCH, OURS, KW, GROUPS[:2], dtype) <= TOL[dtype]
