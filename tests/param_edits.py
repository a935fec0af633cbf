"""One small tree-mode problem shared by the tests of state following each parameter
(``test_param_state.py``, ``test_conformance.py``): four parameters, seeded gradients, a step
on torch and groupopt together, and a comparison of parameters and every state entry."""

from __future__ import annotations

import numpy as np
import torch

import jax.numpy as jnp

NAMES = ["a", "b", "c", "d"]
SHAPES = {"a": (3,), "b": (2, 2), "c": (4,), "d": (1, 3)}


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(SHAPES[k]) for k in NAMES}


def grads_at(step):
    rng = np.random.default_rng(100 + step)
    return {k: rng.standard_normal(SHAPES[k]) for k in NAMES}


def step_both(tp, topt, opt, step):
    """The same gradients to torch (``.grad`` then ``step()``) and to groupopt (``step(grads)``)."""
    g = grads_at(step)
    for k in NAMES:
        tp[k].grad = torch.tensor(g[k])
    topt.step()
    opt.step({k: jnp.asarray(v) for k, v in g.items()})


def compare_with_torch(tp, topt, opt, ours, tol=1e-12):
    """Parameters equal, and each parameter's state has torch's keys and values."""
    for k in NAMES:
        np.testing.assert_allclose(np.asarray(opt.params[k]), tp[k].detach().numpy(), rtol=tol, atol=tol, err_msg=k)
        tstate, ostate = topt.state.get(tp[k], {}), opt.state[ours[k]]
        assert set(tstate) == set(ostate), (k, sorted(tstate), sorted(ostate))
        for key, v in tstate.items():
            np.testing.assert_allclose(np.asarray(ostate[key], np.float64), torch.as_tensor(v).double().numpy(),
                                       rtol=tol, atol=tol, err_msg=f"{k}/{key}")
