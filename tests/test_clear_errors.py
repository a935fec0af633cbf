"""Clear errors instead of deep ones: torch-only functions without torch, and the compat ``opt.step``
under a JAX transformation (refused before anything changes)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import groupopt.compat as optim


@pytest.fixture
def no_torch(monkeypatch):
    """``import torch`` fails, as where torch is not installed."""
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.mark.parametrize("call", ["to_torch", "load_torch_checkpoint", "to_torch_state_dicts"])
def test_torch_functions_without_torch_say_how_to_install_it(no_torch, call, tmp_path):
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    opt = optim.Adam(model, lr=1e-3)
    opt.step(nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model))
    args = {"to_torch": (opt.state_dict(),), "load_torch_checkpoint": (tmp_path / "ckpt.pt",),
            "to_torch_state_dicts": (model, opt)}[call]
    with pytest.raises(ImportError, match=rf"{call} needs PyTorch, which is not installed: pip install torch==2\.13\.0"):
        getattr(optim, call)(*args)
    # everything that does not need torch still works: our own state dicts round-trip
    opt2 = optim.Adam(model, lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert float(opt2.state_dict()["state"][0]["step"]) == 1.0


def _model_and_opt():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    opt = optim.Adam(model, lr=1e-3)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
    opt.step(grads)  # some state to keep
    return model, opt, grads


def _snapshot(model, opt):
    return np.asarray(model.kernel.get_value()).copy(), opt.state_dict(), opt.num_compiles


@pytest.mark.parametrize("how", ["nnx.jit", "nnx.jit (parameters traced)", "jax.jit", "jax.grad"])
def test_step_under_a_transformation_is_refused_with_the_jittable_path(how):
    model, opt, grads = _model_and_opt()
    kernel, sd, compiles = _snapshot(model, opt)
    if how == "nnx.jit":
        run = nnx.jit(lambda m: opt.step(nnx.grad(lambda mm: jnp.sum(mm(jnp.ones((1, 2)))))(m)))
        call = lambda: run(model)  # noqa: E731
    elif how == "nnx.jit (parameters traced)":
        concrete = jax.tree.map(np.asarray, grads)
        run = nnx.jit(lambda m: opt.step(concrete))
        call = lambda: run(model)  # noqa: E731
    elif how == "jax.jit":
        call = lambda: jax.jit(opt.step)(grads)  # noqa: E731
    else:
        call = lambda: jax.grad(lambda s: (opt.step(jax.tree.map(lambda g: g * s, grads)), s)[1])(1.0)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"Adam\.step\(\) was called under a JAX transformation .*(tracers|traced).*"
                                           r"groupopt\.grouped.*nnx\.Optimizer.*docs/nnx_optimizer\.md.*Nothing was changed"):
        call()
    kernel2, sd2, compiles2 = _snapshot(model, opt)
    assert np.array_equal(kernel, kernel2) and compiles2 == compiles
    assert sd2["param_groups"] == sd["param_groups"]
    assert all(np.array_equal(sd["state"][i][k], sd2["state"][i][k]) for i in sd["state"] for k in sd["state"][i])
    opt.step(grads)  # and the optimizer still works outside
    assert float(opt.state_dict()["state"][0]["step"]) == 2.0
