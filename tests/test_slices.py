"""Per-slice hyperparameters on stacked (scanned) parameters, against torch with one group per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt

L = 6


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-6), (np.float32, 1e-5)])
def test_layerwise_lr_decay_frozen_layers_and_per_layer_weight_decay_match_torch_groups(dtype, tol):
    rng = np.random.default_rng(0)
    p0 = {"kernel": rng.standard_normal((L, 3, 4)).astype(dtype), "bias": rng.standard_normal((L, 4)).astype(dtype)}
    lrs = groupopt.freeze_first(2, L, groupopt.layerwise_decay(0.05, 0.8, L))
    wds = np.linspace(0.0, 0.1, L)
    tx = groupopt.adamw(lr=lrs, weight_decay=wds)
    state = tx.init(p0)
    step = jax.jit(tx.apply)

    tk = [torch.tensor(p0["kernel"][i], requires_grad=True) for i in range(L)]
    tb = [torch.tensor(p0["bias"][i], requires_grad=True) for i in range(L)]
    topt = torch.optim.AdamW([{"params": [tb[i], tk[i]], "lr": float(lrs[i]), "weight_decay": float(wds[i])} for i in range(L)])
    params = jax.tree.map(jnp.asarray, p0)
    worst = 0.0
    for k in range(200):
        g = {"kernel": rng.standard_normal((L, 3, 4)).astype(dtype), "bias": rng.standard_normal((L, 4)).astype(dtype)}
        for i in range(L):
            tk[i].grad = torch.tensor(g["kernel"][i])
            tb[i].grad = torch.tensor(g["bias"][i])
        topt.step()
        params, state = step(params, g, state)
        for i in range(L):
            worst = max(worst, rel(params["kernel"][i], tk[i].detach()), rel(params["bias"][i], tb[i].detach()))
    assert worst <= tol, worst
    np.testing.assert_array_equal(params["kernel"][:2], p0["kernel"][:2])  # frozen slices: bit-identical


def test_per_slice_vectors_are_state_and_replaceable_without_retrace():
    p0 = {"w": jnp.ones((4, 2))}
    tx = groupopt.sgd(lr=np.full(4, 0.1), momentum=0.9)
    traces = []

    def f(p, g, s):
        traces.append(1)
        return tx.apply(p, g, s)

    step = jax.jit(f)
    st = tx.init(p0)
    p, st = step(p0, {"w": jnp.ones((4, 2))}, st)
    st = tx.set_hyperparams(st, 0, lr=np.array([0.0, 0.1, 0.2, 0.3]))
    before = np.array(p["w"])
    p, st = step(p, {"w": jnp.ones((4, 2))}, st)
    assert len(traces) == 1
    np.testing.assert_array_equal(p["w"][0], before[0])
    with pytest.raises(ValueError, match=r"lr has shape \(4,\); got a value of shape \(3,\)"):
        tx.set_hyperparams(st, 0, lr=np.ones(3))


def test_per_slice_length_must_match_every_member():
    p0 = {"stack": jnp.ones((4, 2)), "head": jnp.ones((3,))}
    with pytest.raises(ValueError, match=r"lr has 4 per-slice values, but member 'head' has shape \(3,\)"):
        groupopt.adam(lr=np.ones(4), params=p0, groups=[groupopt.group(groupopt.ALL)])
    tx = groupopt.adam(params=p0, groups=[groupopt.group("stack", lr=np.ones(4)), groupopt.group("head", lr=0.1)])
    assert tx.init(p0).hyperparams[0]["lr"].shape == (4,)


def test_compat_group_with_per_layer_lr_vector_matches_torch_per_layer_groups():
    import groupopt.compat as optim

    rng = np.random.default_rng(5)
    p0 = {"stack": {"kernel": rng.standard_normal((L, 3, 3)), "bias": rng.standard_normal((L, 3))}, "head": rng.standard_normal(3)}
    lrs = groupopt.layerwise_decay(0.01, 0.7, L)
    opt = optim.AdamW([{"params": "stack", "lr": lrs}, {"params": "head", "lr": 0.02}], model=p0)
    tk = [torch.tensor(p0["stack"]["kernel"][i], requires_grad=True) for i in range(L)]
    tb = [torch.tensor(p0["stack"]["bias"][i], requires_grad=True) for i in range(L)]
    th = torch.tensor(p0["head"], requires_grad=True)
    topt = torch.optim.AdamW([{"params": [tb[i], tk[i]], "lr": float(lrs[i])} for i in range(L)] + [{"params": [th], "lr": 0.02}])
    for k in range(50):
        g = {"stack": {"kernel": rng.standard_normal((L, 3, 3)), "bias": rng.standard_normal((L, 3))}, "head": rng.standard_normal(3)}
        for i in range(L):
            tk[i].grad, tb[i].grad = torch.tensor(g["stack"]["kernel"][i]), torch.tensor(g["stack"]["bias"][i])
        th.grad = torch.tensor(g["head"])
        if k == 25:  # a per-layer lr edit, as a scheduler would make: no recompile
            opt.param_groups[0]["lr"] = lrs * 0.5
            for i in range(L):
                topt.param_groups[i]["lr"] = float(lrs[i] * 0.5)
        topt.step()
        opt.step(g)
    for i in range(L):
        assert rel(opt.params["stack"]["kernel"][i], tk[i].detach()) < 1e-12
    assert rel(opt.params["head"], th.detach()) < 1e-12
    assert opt.num_compiles == 1
    with pytest.raises(ValueError, match=r"lr has 4 per-slice values, but member 'head' has shape \(3,\)"):
        optim.SGD([{"params": "head", "lr": np.ones(4)}], model=p0)
