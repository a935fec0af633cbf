"""schedules.lambda_ under x64: ``fn`` receives a float64 count inside jit, as torch's lambdas compute in Python floats.

torch's LambdaLR values are computed in the same run (x64 is on in the tests: tests/conftest.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
from groupopt import schedules as S

N, BASE = 40, 0.3

# (lambda, max relative error vs torch). Exact where XLA keeps Python's float64 operations;
# XLA compiles a division by a constant as a multiplication by its reciprocal and has its own
# pow, so those differ from Python by an ulp or so.
LAMBDAS = {
    "0.1 * e": (lambda e: 0.1 * e, 0.0),
    "e % 7 * 0.3": (lambda e: e % 7 * 0.3, 0.0),
    "e // 30 + 0.5": (lambda e: e // 30 + 0.5, 0.0),
    "1 / (1 + e)": (lambda e: 1.0 / (1 + e), 0.0),
    "0.97 ** e": (lambda e: 0.97**e, 0.0),
    "e / 10": (lambda e: e / 10, 5e-16),
    "(1 - e / 50) ** 0.9": (lambda e: (1 - e / 50) ** 0.9, 4e-15),
}


def torch_lrs(fn, n=N, base=BASE):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.asarray(out)


@pytest.mark.parametrize("name", list(LAMBDAS))
def test_lambda_matches_torch_in_float64(name):
    fn, tol = LAMBDAS[name]
    ref = torch_lrs(fn)
    sched = S.lambda_(BASE, fn)
    ours = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(N, dtype=jnp.int32)))
    assert ours.dtype == np.float64
    assert np.all(ours[ref == 0] == 0)
    err = np.max(np.abs(ours - ref)[ref != 0] / np.abs(ref[ref != 0]))
    assert err <= tol, (name, err)
    # the host path (compat LambdaLR): a Python int, torch's exact numbers
    assert [sched(c) for c in range(N)] == ref.tolist()


def test_fn_gets_a_float64_count_and_float32_is_gone():
    seen = []

    def fn(e):
        seen.append(e.dtype)
        return e / 10

    v = jax.jit(S.lambda_(1.0, fn))(jnp.int32(3))
    assert seen == [jnp.float64]
    assert float(v) != float(np.float32(0.3))  # what an int32 count gave: 0.30000001192092896
    assert abs(float(v) - 0.3) <= 6e-17
    with jax.enable_x64(False):  # without x64 there is no float64: the integer count, as before
        seen.clear()
        jax.jit(S.lambda_(1.0, fn))(jnp.int32(3))
        assert seen == [jnp.int32]


def test_lambda_as_group_hyperparameter_vs_torch():
    fn = LAMBDAS["0.1 * e"][0]
    params = {"w": jnp.ones(3)}
    tx = groupopt.sgd(S.lambda_(BASE, lambda e: 1.0 + fn(e)))
    state = tx.init(params)
    step = jax.jit(tx.apply)
    ref = torch_lrs(lambda e: 1.0 + fn(e), n=6)
    got = []
    for _ in range(6):
        params, state = step(params, {"w": jnp.ones(3)}, state)
        got.append(tx.hyperparams(state)[0]["lr"])
    assert got == ref.tolist()
