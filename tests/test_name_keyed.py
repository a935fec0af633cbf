"""Name-keyed optimizer state (strict / non-strict loads after model edits) and regrouping, against torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import groupopt.compat as optim


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree(rng, names):
    return {n: jnp.asarray(rng.standard_normal(3 + i)) for i, n in enumerate(names)}


def grads_for(params, rng):
    return {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}


def test_state_dict_carries_names_and_torch_ignores_them():
    rng = np.random.default_rng(0)
    p = tree(rng, ["a", "b"])
    opt = optim.Adam(p, lr=0.1)
    opt.step(grads_for(p, rng))
    sd = opt.state_dict()
    assert sd["param_names"] == {0: "a", 1: "b"}
    tp = [torch.tensor(np.asarray(opt.params[k]), requires_grad=True) for k in ("a", "b")]
    topt = torch.optim.Adam(tp, lr=0.1)
    topt.load_state_dict(optim.to_torch(sd))  # the extra key is ignored by torch
    assert torch.equal(topt.state[tp[1]]["exp_avg"], torch.tensor(np.asarray(opt.state[opt.param_groups[0]["params"][1]]["exp_avg"])))


def test_model_edited_between_save_and_load_strict_and_non_strict():
    rng = np.random.default_rng(1)
    p = tree(rng, ["enc", "old", "head"])
    opt = optim.Adam([{"params": ["enc", "old"]}, {"params": "head", "lr": 0.01}], lr=0.1, model=p)
    for _ in range(3):
        opt.step(grads_for(opt.params, rng))
    sd = opt.state_dict()
    saved = {n: opt.state[m] for g in opt.param_groups for m, n in zip(g["params"], [m.path for m in g["params"]])}

    # the model changed: "old" removed, "new" added (same shape as old, into the first group)
    edited = {"enc": opt.params["enc"], "new": jnp.asarray(rng.standard_normal(4)), "head": opt.params["head"]}
    opt2 = optim.Adam([{"params": ["enc", "new"]}, {"params": "head", "lr": 0.01}], lr=0.1, model=edited)
    before = opt2.state_dict()
    with pytest.raises(ValueError) as e:
        opt2.load_state_dict(sd)
    assert "Missing key(s) in state_dict: 'new'." in str(e.value)
    assert "Unexpected key(s) in state_dict: 'old'." in str(e.value)
    assert opt2.state_dict()["state"] == before["state"] == {}  # unchanged after the failed strict load

    report = opt2.load_state_dict(sd, strict=False)
    assert report.missing_keys == ["new"] and report.unexpected_keys == ["old"] and report.mismatched_keys == []
    by_path = {m.path: m for g in opt2.param_groups for m in g["params"]}
    for name in ("enc", "head"):  # untouched parameters keep their moments and steps
        for k, v in saved[name].items():
            np.testing.assert_array_equal(opt2.state[by_path[name]][k], v)
    assert opt2.state[by_path["new"]] == {}  # fresh, like a tensor torch never stepped

    # continue and compare with torch holding the same states (the new param without state)
    t = {k: torch.tensor(np.asarray(opt2.params[k]), requires_grad=True) for k in ("enc", "new", "head")}
    topt = torch.optim.Adam([{"params": [t["enc"], t["new"]]}, {"params": [t["head"]], "lr": 0.01}], lr=0.1)
    tsd = topt.state_dict()
    for idx, name in [(0, "enc"), (2, "head")]:
        tsd["state"][idx] = {k: torch.tensor(np.asarray(v)) for k, v in saved[name].items()}
    topt.load_state_dict(tsd)
    for _ in range(4):
        g = grads_for(opt2.params, rng)
        for k in t:
            t[k].grad = torch.tensor(np.asarray(g[k]))
        topt.step()
        opt2.step(g)
    for k in t:
        assert rel(opt2.params[k], t[k].detach()) < 1e-12, k


def test_shape_mismatch_is_reported():
    rng = np.random.default_rng(2)
    p = {"w": jnp.ones(3), "b": jnp.ones(2)}
    opt = optim.SGD(p, lr=0.1, momentum=0.9)
    opt.step(grads_for(p, rng))
    sd = opt.state_dict()
    opt2 = optim.SGD({"w": jnp.ones(5), "b": jnp.ones(2)}, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"Shape mismatch: w: saved \(3,\), now \(5,\)"):
        opt2.load_state_dict(sd)
    report = opt2.load_state_dict(sd, strict=False)
    assert report.mismatched_keys == ["w: saved (3,), now (5,)"]
    b = [m for m in opt2.param_groups[0]["params"] if m.path == "b"][0]
    np.testing.assert_array_equal(opt2.state[b]["momentum_buffer"], sd["state"][0]["momentum_buffer"])


class Net(nnx.Module):
    def __init__(self, rngs, extra=False):
        self.body = nnx.Linear(3, 4, rngs=rngs)
        if extra:
            self.extra = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.body(x))
        if hasattr(self, "extra"):
            h = self.extra(h)
        return self.head(h)


def test_nnx_names_come_from_the_model_never_from_grads_and_torch_param_names():
    x = jnp.ones((2, 3))
    m = Net(nnx.Rngs(0))
    # submodules without model=: no root, so no names (torch's positional state_dict), even after a step
    anonymous = optim.AdamW([{"params": m.body}, {"params": m.head, "lr": 0.01}], lr=0.1)
    anonymous.step(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))
    assert "param_names" not in anonymous.state_dict()
    # the model as params, or model=: names are paths from it
    assert sorted(optim.AdamW(m, lr=0.1).state_dict()["param_names"].values()) == [
        "body/bias", "body/kernel", "head/bias", "head/kernel"]
    opt = optim.AdamW([{"params": m.body}, {"params": m.head, "lr": 0.01}], lr=0.1, model=m)
    opt.step(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))
    assert sorted(opt.state_dict()["param_names"].values()) == ["body/bias", "body/kernel", "head/bias", "head/kernel"]
    sd = opt.state_dict()
    m2 = Net(nnx.Rngs(1), extra=True)  # a layer inserted: positions shift, names do not
    opt2 = optim.AdamW([{"params": [m2.body, m2.extra]}, {"params": m2.head, "lr": 0.01}], lr=0.1, model=m2)
    report = opt2.load_state_dict(sd, strict=False)
    assert sorted(report.missing_keys) == ["extra/bias", "extra/kernel"]
    np.testing.assert_array_equal(opt2.state[m2.head.kernel]["exp_avg"], opt.state[m.head.kernel]["exp_avg"])
    # torch-style named parameters
    named = optim.SGD([("w", m.body.kernel), ("b", m.body.bias)], lr=0.1, momentum=0.9)
    assert named.param_groups[0]["param_names"] == ["w", "b"]
    named.step(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))
    assert named.state_dict()["param_names"] == {0: "w", 1: "b"}


def test_regroup_unfreeze_and_split_keep_moments_with_one_recompile_like_torch():
    rng = np.random.default_rng(3)
    names = ["backbone", "body", "head"]
    p = tree(rng, names)
    # backbone held by an lr=0 group, body+head in the main group
    opt = optim.Adam([{"params": "backbone", "lr": 0.0}, {"params": ["body", "head"]}], lr=0.05, model=p)
    t = {k: torch.tensor(np.asarray(p[k]), requires_grad=True) for k in names}
    topt = torch.optim.Adam([{"params": [t["backbone"]], "lr": 0.0}, {"params": [t["body"], t["head"]]}], lr=0.05)

    def both_step():
        g = grads_for(opt.params, rng)
        for k in names:
            t[k].grad = torch.tensor(np.asarray(g[k]))
        topt.step()
        opt.step(g)

    for _ in range(3):
        both_step()
    assert opt.num_compiles == 1
    # unfreeze: move the backbone into the main group (torch: list surgery, state kept)
    opt.move_params("backbone", to=1)
    def remove(lst, x):  # list.remove compares tensors elementwise; torch users remove by identity
        lst[:] = [y for y in lst if y is not x]

    remove(topt.param_groups[0]["params"], t["backbone"])
    topt.param_groups[1]["params"].append(t["backbone"])
    # split: the head gets its own group with lr 0.01
    opt.move_params("head", to={"lr": 0.01})
    remove(topt.param_groups[1]["params"], t["head"])
    topt.add_param_group({"params": [t["head"]], "lr": 0.01})
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in topt.param_groups] == [0, 2, 1]
    for _ in range(4):
        both_step()
    assert opt.num_compiles == 2  # one recompile for the regrouping
    for k in names:
        assert rel(opt.params[k], t[k].detach()) < 1e-12, k
    head = opt.param_groups[2]["params"][0]
    assert float(opt.state[head]["step"]) == 7.0
