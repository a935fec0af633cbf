"""Scalar state (``step``, NAdam's ``mu_product``, ASGD's ``eta``/``mu``) in torch's default dtype.

torch keeps these in its default dtype (``_get_scalar_dtype()``); JAX's analogue is x64 mode
(on in this test suite), under which groupopt keeps them in float64. Against torch with
``torch.set_default_dtype(torch.float64)`` a float64 run then agrees to ~1e-15 where float32
scalars drifted by 1e-9..4e-8; with torch's default float32 the exported state still has
torch's float32 scalars.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import groupopt
from optim_harness import make_problem, rel_err, run_differential, run_torch

TORCH_CLASSES = {"NAdam": torch.optim.NAdam, "ASGD": torch.optim.ASGD}




def random_groups(name, seed, n=3):
    rng = np.random.default_rng([seed, 7])
    groups = []
    for _ in range(n):
        if name == "NAdam":
            groups.append({
                "lr": float(10 ** rng.uniform(-3, -1)),
                "betas": (float(rng.uniform(0.7, 0.95)), float(rng.uniform(0.9, 0.999))),
                "weight_decay": float(rng.choice([0.0, 0.01, 0.1])),
                "momentum_decay": float(10 ** rng.uniform(-3, -1)),
                "decoupled_weight_decay": bool(rng.integers(2)),
                "maximize": bool(rng.integers(2)),
            })
        else:
            groups.append({
                "lr": float(10 ** rng.uniform(-3, -1)),
                "lambd": float(10 ** rng.uniform(-4, -1)),
                "alpha": float(rng.uniform(0.5, 1.0)),
                "t0": float(rng.integers(1, 150)),  # averaging (mu != 1) starts within the run
                "weight_decay": float(rng.choice([0.0, 0.01])),
                "maximize": bool(rng.integers(2)),
            })
    return groups


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_float64_scalars_match_torch_with_float64_default(name, seed, torch_float64_default):
    groups = random_groups(name, seed)
    core = getattr(groupopt, name.lower())
    res = run_differential(TORCH_CLASSES[name], core_factory=core, groups=groups, dtype=np.float64, steps=200, seed=seed)
    assert res.max_err <= 1e-12, res.describe()
    _, state, _ = res.ours
    for gs in state.groups:
        for v in gs.scalars.values():
            assert v.dtype == np.float64


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_exported_scalars_have_torchs_dtype_and_values(name, torch_float64_default):
    """compat state_dict: step/mu_product/eta/mu are float64 like torch's under its float64
    default, equal to torch's to 1e-12 after 200 steps, and load back into torch exactly."""
    groups = random_groups(name, 2, n=2)
    res = run_differential(TORCH_CLASSES[name], getattr(groupopt.compat, name), groups=groups, dtype=np.float64, steps=200)
    assert res.max_err <= 1e-12, res.describe()  # includes every state entry, dtypes checked equal
    sd = res.ours.state_dict()
    keys = ("step", "mu_product") if name == "NAdam" else ("step", "eta", "mu")
    for entry in sd["state"].values():
        for k in keys:
            assert np.asarray(entry[k]).dtype == np.float64, (k, np.asarray(entry[k]).dtype)


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_float32_default_torch_still_gets_float32_scalars(name):
    """With torch's default float32, exports keep torch's float32 scalar state (what torch itself
    would hold), so torch-format state dicts compare and load as before."""
    assert torch.get_default_dtype() == torch.float32
    groups = random_groups(name, 3, n=1)
    prob = make_problem(1, np.float64)
    topt, _, _ = run_torch(TORCH_CLASSES[name], prob, {}, groups, 3)
    ours = getattr(groupopt.compat, name)([{"params": "g0/*", **groups[0]}], model=prob.tree(prob.init))
    for t in range(3):
        ours.step(prob.tree(prob.grads(t)))
    osd, tsd = ours.state_dict(), topt.state_dict()
    for idx, tentry in tsd["state"].items():
        for k, tv in tentry.items():
            if tv.ndim == 0:
                assert np.asarray(osd["state"][idx][k]).dtype == np.float32 == tv.numpy().dtype, k
                assert rel_err(osd["state"][idx][k], tv) <= 1e-6, k
