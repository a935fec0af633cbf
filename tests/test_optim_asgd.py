"""ASGD: groupopt (compat class and core factory) against torch.optim.ASGD, computed in the same run."""

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

TORCH, OURS, CORE = torch.optim.ASGD, groupopt.compat.ASGD, groupopt.asgd
KW = dict(lr=1e-2, lambd=1e-3, alpha=0.6, t0=50.0, weight_decay=0.01)
GROUPS = [
    {},  # averaging (mu != 1) from step 52 on
    {"lr": 5e-3, "lambd": 0.05, "alpha": 0.9, "t0": 1e6, "weight_decay": 0.0, "maximize": True},  # ax = p
    {"t0": 5.0, "lambd": 1e-4, "maximize": False},
]
# lr edited before the first step (eta starts from it, as in torch), then mid-run (eta follows from the next step)
EDITS = {0: {1: {"lr": 2e-2}}, 60: {0: {"lr": 1e-3}}, 100: {2: {"t0": 150.0, "alpha": 0.75}}}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compat_matches_torch_every_step(dtype):
    res = run_differential(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, steps=STEPS, edits=EDITS)
    assert res.max_err <= TOL[dtype], res.describe()
    assert res.ours.num_compiles == 1
    check_layout(res.ours, res.torch_opt)
    for key in ("eta", "mu"):  # float32 scalar state, rounded exactly as torch rounds it
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
    err = roundtrip_ours_to_torch(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, k=15, n=10, scalar_keys=("eta", "mu"))
    assert err <= TOL[dtype]


def test_signature_matches_torch():
    check_signature(TORCH, OURS)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1e-3), dict(lr=jnp.array([1e-3, 1e-3])), dict(weight_decay=-0.1)],
    ids=repr,
)
def test_bad_constructor_args_raise_like_torch(kwargs):
    check_bad_arg(TORCH, OURS, kwargs)


def test_load_state_dict_rejects_bad_input_and_changes_nothing():
    check_rejects_bad_loads(TORCH, OURS, KW, GROUPS[:2], other_cls=torch.optim.Rprop, drop_keys=("eta", "ax"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_resume_torch_state_with_per_parameter_steps(dtype):
    assert check_per_member_resume(TORCH, OURS, KW, GROUPS[:2], dtype, lr_edit=0.03) <= TOL[dtype]
