"""Parameters without a gradient are skipped exactly like torch's ``p.grad is None``."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import groupopt.compat as optim


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


CASES = [
    (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    (optim.Adam, torch.optim.Adam, dict(lr=0.05, amsgrad=True)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    (optim.NAdam, torch.optim.NAdam, dict(lr=0.05)),
    (optim.RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
]




@pytest.mark.parametrize("ours_cls,torch_cls,kw", CASES, ids=[c[0].__name__ for c in CASES])
def test_tree_mode_params_without_grads_are_skipped_like_torch(ours_cls, torch_cls, kw, torch_float64_default):
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    p0 = {n: rng.standard_normal(3 + i) for i, n in enumerate(names)}
    opt = ours_cls([{"params": ["a", "b"]}, {"params": "c", "lr": 0.02}], model={k: jnp.asarray(v) for k, v in p0.items()}, **kw)
    t = {n: torch.tensor(p0[n], requires_grad=True) for n in names}
    topt = torch_cls([{"params": [t["a"], t["b"]]}, {"params": [t["c"]], "lr": 0.02}], **kw)
    # which parameters get a gradient at each step (b skips a while, then c, then all again)
    schedule = [("a", "b", "c"), ("a", "c"), ("a", "c"), ("a", "b"), ("a", "b", "c"), ("b", "c"), ("a", "b", "c")]
    for have in schedule:
        g = {n: rng.standard_normal(p0[n].shape) for n in have}
        for n in names:
            t[n].grad = torch.tensor(g[n]) if n in g else None
        topt.step()
        opt.step({n: jnp.asarray(v) for n, v in g.items()})
        for n in names:
            assert rel(opt.params[n], t[n].detach()) < 1e-12, (n, have)
    tsd, osd = topt.state_dict(), opt.state_dict()
    assert sorted(tsd["state"]) == sorted(osd["state"])
    for idx, entry in tsd["state"].items():
        for k, v in entry.items():
            np.testing.assert_allclose(np.asarray(osd["state"][idx][k]), v.numpy(), rtol=1e-12, atol=1e-15)


def test_a_parameter_never_given_a_gradient_gets_no_state_like_torch():
    opt = optim.Adam({"a": jnp.ones(2), "b": jnp.ones(3)}, lr=0.1)
    opt.step({"a": jnp.ones(2)})
    sd = opt.state_dict()
    assert list(sd["state"]) == [0] and float(sd["state"][0]["step"]) == 1.0
    with pytest.raises(ValueError, match="not parameters of the model: 'z'"):
        opt.step({"z": jnp.ones(2)})  # none of the optimizer's parameters: a mistake, not a skip


class Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


def test_nnx_grads_of_a_submodule_update_only_its_parameters():
    m = Net(nnx.Rngs(0))
    opt = optim.SGD([{"params": m.body}, {"params": m.head, "lr": 0.05}], lr=0.1, momentum=0.9)
    body_before = np.array(m.body.kernel[...])
    h = jnp.ones((2, 4))
    opt.step(nnx.grad(lambda head: jnp.sum(head(h) ** 2))(m.head))  # the head only
    np.testing.assert_array_equal(m.body.kernel[...], body_before)
    assert opt.state[m.body.kernel] == {} and "momentum_buffer" in opt.state[m.head.kernel]
    x = jnp.ones((2, 3))
    opt.step(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))  # then everything
    assert "momentum_buffer" in opt.state[m.body.kernel]
