"""SparseAdam: groupopt (compat class and core factory, BCOO gradients) against torch.optim.SparseAdam
(torch sparse COO gradients built from the same indices and values), computed in the same run."""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental.sparse import BCOO

import groupopt
import groupopt.compat as optim
from optim_harness import assert_same_error, rel_err, state_dicts_equal, torch_dtype
from test_optim_nadam import check_signature

# parameters: name -> (group, shape, n_sparse); row-indexed tables (an embedding) and one element-indexed matrix
PARAMS = {"g0/emb": (0, (10, 3), 1), "g0/mat": (0, (4, 5), 2), "g1/emb": (1, (6, 2), 1)}
KW = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6)
GROUPS = [{}, {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": True}]
STEPS = 6
EMPTY = {(2, "g0/mat"), (2, "g1/emb")}  # (step, param): a gradient with no entries (the step still counts)
EDIT_AT, EDIT = 3, {1: {"lr": 0.04}, 0: {"betas": (0.7, 0.95)}}
NSE = 6
TOL = {np.float64: 1e-12, np.float32: 1e-6}


def entries(t: int, name: str):
    """Step ``t``'s gradient entries of parameter ``name``: ``(indices (nse, n_sparse), values)``, numpy.

    Duplicated indices (summed), an explicit 0 value (touched), rows of the tables first touched at
    step 3 (rows >= 4 before that are never drawn), ``nse = 0`` for the (step, param) pairs in EMPTY.
    """
    _, shape, k = PARAMS[name]
    rng = np.random.default_rng([t, len(name), shape[0]])
    if (t, name) in EMPTY:
        return np.zeros((0, k), np.int64), np.zeros((0,) + shape[k:])
    hi = [s if (t >= 3 or k == 2) else min(s, 4) for s in shape[:k]]
    idx = np.stack([rng.integers(0, h, NSE) for h in hi], axis=1)
    idx[1] = idx[0]  # a duplicate
    vals = rng.standard_normal((NSE,) + shape[k:])
    vals[2] = 0.0  # an explicit zero: its entry is touched
    return idx, vals


def torch_grad(t, name, dtype):
    idx, vals = entries(t, name)
    _, shape, k = PARAMS[name]
    return torch.sparse_coo_tensor(torch.tensor(idx.T.copy()).reshape(k, -1), torch.tensor(vals, dtype=torch_dtype(dtype)), shape)


def bcoo_grad(t, name, dtype, pad: bool = True):
    """Our gradient: the same entries, plus (``pad``) one padding entry out of range (BCOO's convention:
    it touches nothing)."""
    idx, vals = entries(t, name)
    _, shape, k = PARAMS[name]
    if pad and len(idx):
        idx = np.concatenate([idx, np.full((1, k), shape[0])])
        vals = np.concatenate([vals, np.ones((1,) + shape[k:])])
    return BCOO((jnp.asarray(vals, dtype), jnp.asarray(idx, np.int32)), shape=shape)


def grads_tree(t, dtype, pad=True):
    tree = {}
    for name in PARAMS:
        g, p = name.split("/")
        tree.setdefault(g, {})[p] = bcoo_grad(t, name, dtype, pad)
    return tree


def init_values(dtype):
    rng = np.random.default_rng(7)
    return {name: rng.standard_normal(shape).astype(dtype) for name, (_, shape, _) in PARAMS.items()}


def make_torch(dtype, kwargs=KW, groups=GROUPS):
    init = init_values(dtype)
    params = {n: torch.tensor(v, requires_grad=True) for n, v in init.items()}
    tgroups = [{"params": [params[n] for n in PARAMS if PARAMS[n][0] == g], **o} for g, o in enumerate(groups)]
    return torch.optim.SparseAdam(tgroups, **kwargs), params


def make_ours(dtype, kwargs=KW, groups=GROUPS):
    tree = {}
    for name, v in init_values(dtype).items():
        g, p = name.split("/")
        tree.setdefault(g, {})[p] = jnp.asarray(v)
    return optim.SparseAdam([{"params": f"g{g}/*", **o} for g, o in enumerate(groups)], model=tree, **kwargs)


def torch_step(topt, tparams, t, dtype):
    for name, p in tparams.items():
        p.grad = torch_grad(t, name, dtype)
    topt.step()


def flat(tree):
    return {f"{g}/{p}": np.asarray(v) for g, sub in tree.items() for p, v in sub.items()}


def compare_state(osd, tsd) -> float:
    """Same state keys and order; ``step`` an int on both sides and equal; max relative error of the arrays."""
    assert list(osd["state"]) == list(tsd["state"])
    err = 0.0
    for i, tentry in tsd["state"].items():
        oentry = osd["state"][i]
        assert list(oentry) == list(tentry) == ["step", "exp_avg", "exp_avg_sq"]
        assert type(oentry["step"]) is int and type(tentry["step"]) is int and oentry["step"] == tentry["step"]
        for k in ("exp_avg", "exp_avg_sq"):
            assert oentry[k].dtype == np.dtype(str(tentry[k].dtype).replace("torch.", ""))
            err = max(err, rel_err(oentry[k], tentry[k]))
    return err


def edit(groups_list, values):
    for g, vals in values.items():
        groups_list[g].update(vals)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compat_matches_torch_every_step(dtype):
    topt, tparams = make_torch(dtype)
    ours = make_ours(dtype)
    err = 0.0
    for t in range(STEPS):
        if t == EDIT_AT:
            edit(topt.param_groups, EDIT)
            edit(ours.param_groups, EDIT)
        torch_step(topt, tparams, t, dtype)
        ours.step(grads_tree(t, dtype))
        mine = flat(ours.params)
        err = max([err] + [rel_err(mine[n], tparams[n]) for n in PARAMS])
        err = max(err, compare_state(ours.state_dict(), topt.state_dict()))
    assert err <= TOL[dtype], err
    # one trace per gradient structure: nse 7 everywhere, and step 2's (two gradients without entries)
    assert ours.num_compiles == 2
    # rows never drawn keep their initial values exactly; the late rows did move
    init = init_values(dtype)
    touched = {int(i) for t in range(STEPS) for i in entries(t, "g0/emb")[0][:, 0]}
    for r in range(10):
        same = np.array_equal(flat(ours.params)["g0/emb"][r], init["g0/emb"][r])
        assert same == (r not in touched), r
    assert any(r >= 4 for r in touched)


def test_core_factory_jitted_apply_matches_torch():
    dtype = np.float64
    topt, tparams = make_torch(dtype)
    params = {g: {p: jnp.asarray(v) for n, v in init_values(dtype).items() if n.startswith(g) for p in [n.split("/")[1]]}
              for g in ("g0", "g1")}
    tx = groupopt.sparse_adam(params=params, groups=[groupopt.group(f"g{g}", **o) for g, o in enumerate(GROUPS)], **KW)
    state = tx.init(params)
    apply = jax.jit(tx.apply)
    err = 0.0
    for t in range(STEPS):
        if t == EDIT_AT:
            edit(topt.param_groups, EDIT)
            for g, vals in EDIT.items():
                state = tx.set_hyperparams(state, g, **vals)
        torch_step(topt, tparams, t, dtype)
        params, state = apply(params, grads_tree(t, dtype), state)
        mine = flat(params)
        err = max([err] + [rel_err(mine[n], tparams[n]) for n in PARAMS])
    assert err <= TOL[dtype], err


def test_golden_values():
    """TORCH_SEMANTICS_2 §3: float64, lr=0.1, two steps on a (6, 3) table; torch run alongside."""
    p0 = np.arange(18).reshape(6, 3) / 10 - 0.8
    steps = [([1, 4], [[.5, -1, 2], [.1, .2, -.3]]), ([4, 5], [[-.4, .6, .8], [1, -2, .5]])]
    ours = optim.SparseAdam({"w": jnp.asarray(p0)}, lr=0.1)
    w = torch.tensor(p0, requires_grad=True)
    topt = torch.optim.SparseAdam([w], lr=0.1)
    for rows, vals in steps:
        ours.step({"w": groupopt.sparse_rows(jnp.asarray(vals), jnp.asarray(rows), 6)})
        w.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.tensor(vals, dtype=torch.float64), (6, 3))
        topt.step()
    got = np.asarray(ours.params["w"])
    assert rel_err(got, w) <= 1e-15
    np.testing.assert_allclose(got[4], [0.3559506227, 0.3082220921, 0.6538369133], atol=1e-10)
    np.testing.assert_allclose(got[5], [0.6255863412, 0.8744136706, 0.8255863647], atol=1e-10)
    np.testing.assert_allclose(got[1], [-0.5999999368, -0.3000000316, -0.3999999842], atol=1e-10)
    np.testing.assert_array_equal(got[[0, 2, 3]], p0[[0, 2, 3]])
    st = ours.state[ours.param_groups[0]["params"][0]]
    assert st["step"] == 2 and type(st["step"]) is int
    np.testing.assert_allclose(np.asarray(st["exp_avg"])[4], [-.031, .078, .053], atol=1e-15)
    np.testing.assert_allclose(np.asarray(st["exp_avg_sq"])[5], [.001, .004, .00025], atol=1e-15)


def test_state_dict_roundtrips_both_ways():
    """torch k steps -> ours (torch's dict as is: tensors, int step) -> n steps -> torch (``to_torch``
    keeps the int step) -> m steps, against torch running k + n + m steps uninterrupted."""
    dtype, k, n, m = np.float64, 3, 2, 1  # no empty gradient after the load: one trace
    tref, tref_params = make_torch(dtype)
    for t in range(k + n + m):
        torch_step(tref, tref_params, t, dtype)
        if t == k + n - 1:
            ref_mid = {name: p.detach().numpy().copy() for name, p in tref_params.items()}
            ref_mid_sd = copy.deepcopy(tref.state_dict())
    topt, tparams = make_torch(dtype)
    for t in range(k):
        torch_step(topt, tparams, t, dtype)
    tree = {}
    for name, p in tparams.items():
        g, leaf = name.split("/")
        tree.setdefault(g, {})[leaf] = jnp.asarray(p.detach().numpy())
    ours = optim.SparseAdam([{"params": f"g{g}/*", **o} for g, o in enumerate(GROUPS)], model=tree, **KW)
    ours.load_state_dict(topt.state_dict())
    assert type(ours.state_dict()["state"][0]["step"]) is int
    for t in range(k, k + n):
        ours.step(grads_tree(t, dtype))
    err = max(rel_err(flat(ours.params)[name], ref_mid[name]) for name in PARAMS)
    err = max(err, compare_state(ours.state_dict(), ref_mid_sd))
    sd = optim.to_torch(ours.state_dict())
    assert type(sd["state"][0]["step"]) is int
    t2, t2params = make_torch(dtype)
    with torch.no_grad():
        for name, p in t2params.items():
            p.copy_(torch.tensor(flat(ours.params)[name]))
    t2.load_state_dict(sd)
    for t in range(k + n, k + n + m):
        torch_step(t2, t2params, t, dtype)
    err = max([err] + [rel_err(t2params[name].detach().numpy(), tref_params[name]) for name in PARAMS])
    err = max(err, compare_state(optim.to_numpy(t2.state_dict()), tref.state_dict()))
    assert err <= TOL[dtype], err


def test_signature_matches_torch():
    check_signature(torch.optim.SparseAdam, optim.SparseAdam)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.0), dict(lr=-1e-3), dict(lr=jnp.array([1e-3, 1e-3])), dict(eps=0.0), dict(eps=-1.0),
     dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)), dict(betas=(0.9, 1.0))],
    ids=repr,
)
def test_bad_constructor_args_raise_like_torch(kwargs):
    t_kwargs = {k: torch.tensor(np.asarray(v)) if hasattr(v, "shape") else v for k, v in kwargs.items()}
    assert_same_error(
        lambda: torch.optim.SparseAdam([torch.zeros(2, requires_grad=True)], **t_kwargs),
        lambda: optim.SparseAdam({"w": jnp.zeros(2)}, **kwargs),
    )


def test_dense_gradient_refused_before_anything_changes():
    msg = "SparseAdam does not support dense gradients, please consider Adam instead"
    w = torch.zeros(3, 2, requires_grad=True)
    w.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match=msg):
        torch.optim.SparseAdam([w]).step()
    ours = optim.SparseAdam({"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))})
    good = {"a": groupopt.sparse_rows(jnp.ones((1, 2)), jnp.array([2]), 4),
            "b": groupopt.sparse_rows(jnp.ones((1, 2)), jnp.array([0]), 3)}
    ours.step(good)
    before, params = ours.state_dict(), dict(ours.params)
    with pytest.raises(RuntimeError, match=re.escape(f"gradient for 'b': {msg}")):
        ours.step({"a": good["a"], "b": jnp.ones((3, 2))})
    assert state_dicts_equal(ours.state_dict(), before)
    assert all(np.array_equal(ours.params[n], params[n]) for n in params)
    # the core refuses it too, and a sparse parameter is refused at construction
    tx = groupopt.sparse_adam(params={"w": jnp.zeros((3, 2))})
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        tx.apply({"w": jnp.zeros((3, 2))}, {"w": jnp.ones((3, 2))}, tx.init({"w": jnp.zeros((3, 2))}))
    with pytest.raises(ValueError, match="parameters must be dense arrays"):
        optim.SparseAdam({"w": BCOO.fromdense(jnp.eye(2))})


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adadelta", "Rprop", "ASGD"])
def test_other_optimizers_refuse_sparse_gradients_with_torchs_message(name):
    w = torch.zeros(5, 2, requires_grad=True)
    w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 2), (5, 2))
    with pytest.raises(RuntimeError) as terr:
        getattr(torch.optim, name)([w]).step()
    assert "does not support sparse gradients" in str(terr.value)
    ours = getattr(optim, name)({"w": jnp.zeros((5, 2))})
    before = ours.state_dict()
    g = groupopt.sparse_rows(jnp.ones((2, 2)), jnp.array([1, 3]), 5)
    with pytest.raises(RuntimeError, match=re.escape(f"gradient for 'w': {terr.value}")):
        ours.step({"w": g})
    assert state_dicts_equal(ours.state_dict(), before)
    # the core (grouped) path, too
    tx = getattr(groupopt, name.lower())(params={"w": jnp.zeros((5, 2))})
    with pytest.raises(RuntimeError, match=re.escape(str(terr.value))):
        tx.apply({"w": jnp.zeros((5, 2))}, {"w": g}, tx.init({"w": jnp.zeros((5, 2))}))


def test_accumulate_and_zero_grad_like_torch_backward():
    """Two backward() calls add sparse grads (uncoalesced); zero_grad(set_to_none=False) leaves an empty
    sparse grad, whose step still counts (bias correction of the next step)."""
    table0 = np.random.default_rng(3).standard_normal((8, 3))
    emb = torch.nn.Embedding(8, 3, sparse=True, _weight=torch.tensor(table0))
    topt = torch.optim.SparseAdam(emb.parameters(), lr=0.1)
    ours = optim.SparseAdam({"w": jnp.asarray(table0)}, lr=0.1)
    weights = np.linspace(-1, 1, 3)
    batches = [[1, 2, 1], [2, 5], [7, 7, 0]]

    def both_backward(ids):
        (emb(torch.tensor(ids)) * torch.tensor(weights)).sum().backward()
        rows_grad = jnp.broadcast_to(jnp.asarray(weights), (len(ids), 3))
        ours.accumulate_grad({"w": groupopt.sparse_rows(rows_grad, jnp.asarray(ids), 8)})

    both_backward(batches[0])
    both_backward(batches[1])
    topt.step()
    ours.step()
    topt.zero_grad(set_to_none=False)
    ours.zero_grad(set_to_none=False)
    topt.step()
    ours.step()  # empty: counts the step, changes nothing
    assert ours.state_dict()["state"][0]["step"] == topt.state_dict()["state"][0]["step"] == 2
    both_backward(batches[2])
    topt.step()
    ours.step()
    assert rel_err(ours.params["w"], emb.weight) <= 1e-12
    assert compare_state(ours.state_dict(), topt.state_dict()) <= 1e-12


def test_embedding_and_dense_layer_training_loop():
    """torch users' pattern: nn.Embedding(sparse=True) with SparseAdam, the rest with Adam. Ours: the
    compat pair, and the core with one grouped transformation (two rules), both jitted."""
    V, D, B, S = 12, 4, 3, 5
    rng = np.random.default_rng(11)
    table0, w0, b0 = rng.standard_normal((V, D)), rng.standard_normal((1, D)), rng.standard_normal(1)
    data = [(rng.integers(0, V, (B, S)), rng.standard_normal(B)) for _ in range(5)]

    emb = torch.nn.Embedding(V, D, sparse=True, _weight=torch.tensor(table0))
    lin = torch.nn.Linear(D, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w0))
        lin.bias.copy_(torch.tensor(b0))
    t_sparse = torch.optim.SparseAdam(emb.parameters(), lr=0.05)
    t_dense = torch.optim.Adam(lin.parameters(), lr=0.01)

    def loss_rows(rows, dense, y):  # rows = table[ids]: (B, S, D)
        pred = rows.mean(axis=1) @ dense["w"].T + dense["b"]
        return jnp.mean((pred[:, 0] - y) ** 2)

    @jax.jit
    def grads_of(table, dense, ids, y):
        g_rows, g_dense = jax.grad(loss_rows, argnums=(0, 1))(table[ids], dense, y)
        return groupopt.sparse_rows(g_rows, ids, V), g_dense

    o_sparse = optim.SparseAdam({"embed": jnp.asarray(table0)}, lr=0.05)
    o_dense = optim.Adam({"w": jnp.asarray(w0), "b": jnp.asarray(b0)}, lr=0.01)
    params = {"embed": jnp.asarray(table0), "dense": {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}}
    tx = groupopt.grouped(params, [groupopt.group("embed", rule=groupopt.SparseAdamRule, lr=0.05),
                                   groupopt.group(groupopt.rest(), rule=groupopt.AdamRule, lr=0.01)],
                          rule=groupopt.AdamRule)
    state = tx.init(params)

    @jax.jit
    def core_step(params, state, ids, y):
        dense_grad = jax.grad(lambda p: loss_rows(p["embed"][ids], p["dense"], y))(params)
        grads = {"embed": groupopt.sparse_rows_from_dense(dense_grad["embed"], ids), "dense": dense_grad["dense"]}
        return tx.apply(params, grads, state)

    for ids, y in data:
        t_sparse.zero_grad()
        t_dense.zero_grad()
        pred = lin(emb(torch.tensor(ids)).mean(dim=1))[:, 0]
        ((pred - torch.tensor(y)) ** 2).mean().backward()
        t_sparse.step()
        t_dense.step()
        g_sparse, g_dense = grads_of(o_sparse.params["embed"], o_dense.params, jnp.asarray(ids), jnp.asarray(y))
        o_sparse.step({"embed": g_sparse})
        o_dense.step(g_dense)
        params, state = core_step(params, state, jnp.asarray(ids), jnp.asarray(y))
    assert rel_err(o_sparse.params["embed"], emb.weight) <= 1e-12
    assert rel_err(o_dense.params["w"], lin.weight) <= 1e-12
    assert rel_err(o_dense.params["b"], lin.bias) <= 1e-12
    assert rel_err(params["embed"], emb.weight) <= 1e-12
    assert rel_err(params["dense"]["w"], lin.weight) <= 1e-12
    assert not np.array_equal(np.asarray(params["embed"]), table0)


def test_sparse_rows_checks_its_input():
    with pytest.raises(ValueError, match=r"must start with the indices' shape \(2, 3\)"):
        groupopt.sparse_rows(jnp.ones((3, 2, 4)), jnp.zeros((2, 3), jnp.int32), 5)
    with pytest.raises(TypeError, match="indices must be integers"):
        groupopt.sparse_rows(jnp.ones((2, 4)), jnp.zeros(2), 5)
    g = groupopt.sparse_rows(jnp.ones((2, 3, 4)), jnp.array([[0, 1, 1], [4, 4, 4]]), 5)
    assert g.shape == (5, 4) and g.nse == 6
    np.testing.assert_array_equal(np.asarray(g.todense()).sum(axis=1), [4, 8, 0, 0, 12])
