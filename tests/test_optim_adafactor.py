"""Adafactor: groupopt (compat class and core factory) against torch.optim.Adafactor, computed in the same run.

Adafactor is the first rule whose state is not shaped like its parameter (``row_var`` (..., m, 1),
``col_var`` (..., 1, n) for ndim >= 2; ``variance`` for ndim <= 1) and whose update is not
elementwise (norms and means over the whole leaf). Besides the differential runs, these tests
check that the rest of the library follows the rule's slot shapes: state_dict loads both ways,
``opt.state[p][key] = v``, ZeRO placement, Orbax export/import, the conformance tests of
``tests/conformance.py`` (run here on its ``FACTORED`` rows) and non-finite numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import groupopt
import groupopt.compat as optim
from groupopt.compat import to_torch
from groupopt.sharding import zero1
from optim_harness import (
    assert_same_error,
    make_compat,
    make_problem,
    rel_err,
    roundtrip_ours_to_torch,
    roundtrip_torch_to_ours,
    run_differential,
)
from test_optim_nadam import check_layout, check_signature

import conformance
import test_conformance
import test_nonfinite

TORCH, OURS, CORE = torch.optim.Adafactor, optim.Adafactor, groupopt.adafactor
TOL = {np.float64: 1e-9, np.float32: 5e-6}
STEPS = 10
SHAPES = ((3, 4), (5,), (), (2, 3, 5))  # every group: 2-d, 1-d, 0-d, 3-d (a batch of factored matrices)
KW = dict(lr=0.05)
GROUPS = [
    {},  # eps1 None: float machine epsilon
    {"lr": 0.3, "weight_decay": 0.1, "maximize": True},
    {"eps": (1e-4, 1e-2), "d": 1.5, "beta2_decay": -0.5},
    {"eps": (None, 0.0), "weight_decay": 0.05, "lr": 1.0, "d": 1.2},
]
# lr edits between steps, eps1 None <-> number, d, beta2_decay and weight_decay: none recompiles
EDITS = {
    2: {0: {"lr": 0.2}, 3: {"lr": 0.5}},
    5: {2: {"eps": (None, 1e-3)}, 1: {"d": 2.0, "beta2_decay": -0.6}},
    8: {3: {"eps": (1e-5, 1e-3), "weight_decay": 0.0}, 0: {"lr": 0.01}},
}
# every shape once, and a matrix in every group (its options meet the factored path)
SHAPES_ALL = (((3, 4), (5,)), ((), (2, 3, 5)), ((4, 3),), ((2, 2), (3,)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compat_matches_torch_every_step(dtype):
    res = run_differential(TORCH, OURS, kwargs=KW, groups=GROUPS, dtype=dtype, steps=STEPS, edits=EDITS,
                           shapes=SHAPES_ALL)
    assert res.max_err <= TOL[dtype], res.describe()
    assert res.key_orders_match(), res.describe()
    assert res.ours.num_compiles == 1
    check_layout(res.ours, res.torch_opt)


def test_core_factory_jitted_apply_matches_torch():
    edits = {t: {g: e for g, e in ge.items() if g < 2} for t, ge in EDITS.items()}  # eps1 None -> number at 5
    edits[5][0] = {"eps": (1e-6, 1e-3)}
    res = run_differential(TORCH, core_factory=CORE, kwargs=KW, groups=GROUPS[:2], dtype=np.float64, steps=STEPS,
                           edits=edits, shapes=SHAPES_ALL[:2])
    assert res.max_err <= TOL[np.float64], res.describe()
    tx, state, _ = res.ours
    # the factored state of the core: row/col factors for the 2-d and 3-d leaves, a placeholder otherwise
    shapes = [[tuple(a.shape) for a in state.groups[g].slots[n]] for n in ("row_var", "col_var", "variance") for g in (0, 1)]
    assert shapes == [[(3, 1), (0,)], [(0,), (2, 3, 1)], [(1, 4), (0,)], [(0,), (2, 1, 5)], [(0,), (5,)], [(), (0,)]]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_torch_to_ours(dtype):
    err, ours, _ = roundtrip_torch_to_ours(TORCH, OURS, kwargs=KW, groups=GROUPS[:2], dtype=dtype, k=3, n=3,
                                           shapes=SHAPES_ALL[:2], edits={4: {0: {"lr": 0.2}}})
    assert err <= TOL[dtype]
    assert ours.num_compiles == 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_roundtrip_ours_to_torch(dtype):
    err, _, topt = roundtrip_ours_to_torch(TORCH, OURS, kwargs=KW, groups=GROUPS[2:], dtype=dtype, k=3, n=3,
                                           shapes=SHAPES_ALL[:2])
    assert err <= TOL[dtype]
    assert topt.state_dict()["state"][0]["step"].dtype == torch.float32


# --------------------------------------------------------------------------- torch's golden trace (§1.4)

GOLDEN = {
    "defaults": (dict(), {
        1: ([-0.5047494243, -0.4037255903, -0.3027816967, -0.2003343791, -0.09662476025, 0.00358932329, 0.1035558596,
             0.2029385177, 0.2982769912, 0.3968692953, 0.4960076222, 0.5947759052],
            [0.2981291713, -0.1981291713, 0.001870828693, 0.09812917131]),
        3: ([-0.5094819221, -0.4024488891, -0.2958678134, -0.1905860313, -0.08986866503, 0.005573291808, 0.09987671995,
             0.1945378348, 0.2902838484, 0.3918638287, 0.4960902777, 0.6009034005],
            [0.3022066705, -0.1947758358, 0.0003823408137, 0.09407549772]),
    }),
    "lr.6_wd.1": (dict(lr=0.6, weight_decay=0.1), {
        1: ([-0.7549654551, -0.5995354162, -0.4489018045, -0.2080627458, 0.1085143851, 0.2153593974, 0.3073515769,
             0.3643110646, 0.1786194723, 0.1881577206, 0.2304573292, 0.2505543146],
            [0.1697502784, -0.0757502784, 0.1122497216, -0.0182497216]),
        3: ([-0.9576404311, -0.4209603729, 0.0657804973, 0.4394694572, 0.5243711435, 0.295766502, 0.01024978384,
             -0.224502644, -0.3588587911, -0.1412642465, 0.2368645196, 0.6300972879],
            [0.3067342481, 0.05642981713, 0.02829993268, -0.1690157961]),
    }),
}
GOLDEN_STATE = {"row_var": [2.225507926, 2.156423465, 2.129055189],
                "col_var": [2.124893164, 1.462438739, 2.106325041, 2.987658496],
                "variance": [0.03968078856, 0.02020824206, 0.02464989274, 0.03651043821]}


@pytest.mark.parametrize("config", list(GOLDEN))
def test_golden_trace(config):
    kwargs, expected = GOLDEN[config]
    i12, i4 = np.arange(12.0).reshape(3, 4), np.arange(4.0)
    a0, v0 = i12 / 10 - 0.5, np.array([0.3, -0.2, 0.0, 0.1])
    tA, tv = torch.tensor(a0, requires_grad=True), torch.tensor(v0, requires_grad=True)
    topt = TORCH([tA, tv], **kwargs)
    opt = OURS({"A": jnp.asarray(a0), "v": jnp.asarray(v0)}, **kwargs)
    for k in (1, 2, 3):
        gA, gv = np.sin(0.7 * i12 + k) * (1 + 0.5 * k), 0.1 * k * np.cos(1.3 * i4 + k)
        tA.grad, tv.grad = torch.tensor(gA), torch.tensor(gv)
        topt.step()
        opt.step({"A": jnp.asarray(gA), "v": jnp.asarray(gv)})
        assert rel_err(opt.params["A"], tA) <= 1e-13 and rel_err(opt.params["v"], tv) <= 1e-13
        if k in expected:  # torch's published values, to their 10 digits
            np.testing.assert_allclose(np.asarray(opt.params["A"]).ravel(), expected[k][0], rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(np.asarray(opt.params["v"]), expected[k][1], rtol=1e-8, atol=1e-10)
    sd = opt.state_dict()["state"]
    assert list(sd[0]) == ["step", "row_var", "col_var"] and list(sd[1]) == ["step", "variance"]
    assert sd[0]["row_var"].shape == (3, 1) and sd[0]["col_var"].shape == (1, 4)
    assert sd[0]["step"].dtype == np.float32 and float(sd[0]["step"]) == 3.0
    for key, ref in GOLDEN_STATE.items():
        np.testing.assert_allclose(np.ravel(sd[0 if key != "variance" else 1][key]), ref, rtol=1e-8)


# --------------------------------------------------------------------------- construction

def test_signature_and_defaults_match_torch():
    check_signature(TORCH, OURS)
    t = TORCH([torch.zeros(2, requires_grad=True)])
    ours = OURS({"w": jnp.zeros(2)})
    assert list(ours.defaults.items()) == list(t.defaults.items())  # weight_decay 0.0, eps (None, 1e-3)
    assert list(ours.param_groups[0]) == list(t.param_groups[0])


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=np.array([1e-3, 1e-3])), dict(lr=-1.0), dict(beta2_decay=0.1), dict(eps=(-1.0, 1e-3)),
     dict(eps=(None, -1.0)), dict(d=0.5), dict(weight_decay=-1.0),
     dict(lr=-1.0, beta2_decay=0.1, d=0.5)],  # several bad: torch's order decides which is reported
    ids=repr,
)
def test_bad_constructor_args_raise_like_torch(kwargs):
    tkw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    assert_same_error(lambda: TORCH([torch.zeros(2, requires_grad=True)], **tkw),
                      lambda: OURS({"w": jnp.zeros(2)}, **kwargs))


def test_per_slice_hyperparameters_are_refused():
    # the update is not elementwise: a per-slice lr cannot be applied along axis 0
    with pytest.raises(ValueError, match="lr has per-slice .* not elementwise"):
        OURS([{"params": "w", "lr": [0.1, 0.2, 0.3]}], model={"w": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match="lr has per-slice .* not elementwise"):
        CORE(lr=np.array([0.1, 0.2, 0.3]), params={"w": jnp.zeros((3, 4))}, groups=[{"params": "w"}])
    opt = OURS({"w": jnp.ones((3, 4))})
    opt.param_groups[0]["lr"] = [0.1, 0.2, 0.3]  # edited later: refused at the step, nothing changes
    with pytest.raises(ValueError, match="not elementwise"):
        opt.step({"w": jnp.ones((3, 4))})
    np.testing.assert_array_equal(np.asarray(opt.params["w"]), 1.0)
    assert opt.state_dict()["state"] == {}


def test_explicit_nan_eps1_is_refused():
    opt = OURS({"w": jnp.ones(3)})
    opt.param_groups[0]["eps"] = (float("nan"), 1e-3)
    with pytest.raises(ValueError, match="epsilon1"):
        opt.step({"w": jnp.ones(3)})


# --------------------------------------------------------------------------- torch's quirks

@pytest.mark.parametrize("order", [("f32", "f64"), ("f64", "f32")])
def test_mixed_dtype_group_shares_the_first_parameters_eps1(order):
    # torch resolves eps1=None once per group from its first parameter's dtype: [f32, f64] moves both by
    # 8.3886e-06 (float32's eps), [f64, f32] both by 1e-3 (TORCH_SEMANTICS_2 §1.3)
    dts = {"f32": (np.float32, torch.float32), "f64": (np.float64, torch.float64)}
    tp = [torch.zeros(3, dtype=dts[o][1], requires_grad=True) for o in order]
    topt = TORCH(tp, lr=1.0)
    opt = OURS([{"params": ["p0", "p1"]}], model={f"p{i}": jnp.zeros(3, dts[o][0]) for i, o in enumerate(order)}, lr=1.0)
    grads = {f"p{i}": jnp.full(3, 1e-9, dts[o][0]) for i, o in enumerate(order)}
    for p, o in zip(tp, order):
        p.grad = torch.full((3,), 1e-9, dtype=dts[o][1])
    topt.step()
    opt.step(grads)
    for i, p in enumerate(tp):
        ours = np.asarray(opt.params[f"p{i}"])
        assert ours.dtype == dts[order[i]][0]
        assert rel_err(ours, p) <= TOL[dts[order[i]][0]], (ours, p)
    moved = -float(tp[0][0].detach())  # zero parameters: alpha = eps2 * rho = 1e-3
    assert moved == pytest.approx(8.3886e-06 if order[0] == "f32" else 1e-3, rel=1e-4)


def test_zero_gradient_with_eps1_zero_gives_nan_like_torch():
    tp = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    topt = TORCH([tp], eps=(0.0, 1e-3))
    opt = OURS({"w": jnp.ones((2, 3))}, eps=(0.0, 1e-3))
    tp.grad = torch.zeros(2, 3, dtype=torch.float64)
    topt.step()
    opt.step({"w": jnp.zeros((2, 3))})
    assert np.isnan(tp.detach().numpy()).all() and np.isnan(np.asarray(opt.params["w"])).all()


def test_nonfinite_values_follow_torch(torch_float64_default):
    # test_nonfinite's problem (NaN/Inf in values and gradients), compared on the slots torch keeps
    torch_cls, factory, kwargs, options = _nonfinite_case()
    for dtype in (np.float64, np.float32):
        init, grads = test_nonfinite.problem(len(options), dtype)
        # the shared problem is 1-d; give one parameter a matrix shape so the factored path meets NaN/Inf too
        init = [dict(d, a=d["a"].reshape(2, 4)) for d in init]
        grads = [[dict(d, a=d["a"].reshape(2, 4)) for d in step] for step in grads]
        tparams = [{k: torch.tensor(v.copy()).requires_grad_(True) for k, v in d.items()} for d in init]
        topt = torch_cls([{"params": list(d.values()), **o} for d, o in zip(tparams, options)], **kwargs)
        tree = {f"g{g}": {k: jnp.asarray(v) for k, v in d.items()} for g, d in enumerate(init)}
        tx = factory(params=tree, groups=[{"params": f"g{g}/*", **o} for g, o in enumerate(options)], **kwargs)
        state, apply = tx.init(tree), jax.jit(tx.apply)
        rtol = test_nonfinite.RTOL[np.dtype(dtype)]
        problems = []
        for t in range(test_nonfinite.STEPS):
            for d, gd in zip(tparams, grads[t]):
                for k, p in d.items():
                    p.grad = torch.tensor(gd[k].copy())
            topt.step()
            tree, state = apply(tree, {f"g{g}": gd for g, gd in enumerate(grads[t])}, state)
            for g, d in enumerate(tparams):
                for k, p in d.items():
                    why = test_nonfinite.mismatch(tree[f"g{g}"][k], p.detach().numpy(), rtol)
                    if why:
                        problems.append(f"{dtype.__name__} step {t} group {g} param {k}: {why}")
        for g, d in enumerate(tparams):
            for j, (k, p) in enumerate(d.items()):
                assert set(tx.configs[g].rule.slot_shapes(tuple(p.shape))) == set(topt.state[p]) - {"step"}
                for sname, ref in topt.state[p].items():
                    if sname != "step":
                        why = test_nonfinite.mismatch(state.groups[g].slots[sname][j], ref.numpy(), rtol)
                        if why:
                            problems.append(f"{dtype.__name__} final {sname} group {g} param {k}: {why}")
        assert not problems, "\n".join(problems[:12])


def _nonfinite_case():
    row = conformance.FACTORED["Adafactor"]
    return row.torch_cls, row.factory, row.kwargs, [row.groups[0], row.groups[-1]]


# --------------------------------------------------------------------------- state not shaped like the parameter

def _pair(kwargs=None, dtype=np.float64):
    prob = make_problem(2, dtype, shapes=((SHAPES[0], SHAPES[1]), (SHAPES[2], SHAPES[3])))
    ours = make_compat(OURS, prob, kwargs or KW, [{}, {"lr": 0.3}])
    return prob, ours


def test_state_assignment_checks_the_slot_shapes():
    prob, opt = _pair()
    opt.step(prob.tree(prob.grads(0)))
    p2d, p1d = opt.param_groups[0]["params"]
    row = np.full((3, 1), 0.5)
    opt.state[p2d]["row_var"] = row  # torch's shape: accepted
    np.testing.assert_array_equal(np.asarray(opt.state[p2d]["row_var"]), row)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"'col_var' of parameter .* has shape \(3, 4\), but a parameter of shape \(3, 4\) needs \(1, 4\)"):
        opt.state[p2d]["col_var"] = np.zeros((3, 4))  # the parameter's shape is not the slot's
    with pytest.raises(ValueError, match=r"'variance' .* has shape \(3,\), but the parameter has shape \(5,\)"):
        opt.state[p1d]["variance"] = np.zeros(3)
    after = opt.state_dict()
    np.testing.assert_array_equal(after["state"][0]["row_var"], row)
    for i in before["state"]:
        assert list(before["state"][i]) == list(after["state"][i])
    # a key the parameter's shape does not have is the user's own, as in torch
    opt.state[p2d]["variance"] = 3
    assert opt.state_dict()["state"][0]["variance"] == 3
    assert list(opt.state_dict()["state"][0])[:3] == ["step", "row_var", "col_var"]


def test_load_rejects_state_of_the_wrong_shape_and_changes_nothing():
    prob, opt = _pair()
    opt.step(prob.tree(prob.grads(0)))
    good = opt.state_dict()
    bad = {"state": {i: dict(e) for i, e in good["state"].items()}, "param_groups": good["param_groups"]}
    bad["state"][0]["row_var"] = np.zeros((3, 4))  # shaped like the parameter, not like the row factor
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"'row_var' of parameter 0 has shape \(3, 4\).* needs \(3, 1\)"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for i in before["state"]:
        for k in before["state"][i]:
            np.testing.assert_array_equal(before["state"][i][k], after["state"][i][k])
    missing = {"state": {i: dict(e) for i, e in good["state"].items()}, "param_groups": good["param_groups"]}
    del missing["state"][3]["col_var"]
    with pytest.raises(ValueError, match=r"lacks \['col_var'\]"):
        opt.load_state_dict(missing)
    opt.load_state_dict(good)  # and the good one loads


def test_zero1_places_factored_state_and_matches_one_device():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    shapes = {"w": (8, 16), "b": (16,), "s": (2, 8, 24)}
    rng = np.random.default_rng(0)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()} for _ in range(3)]
    plain = OURS({k: jnp.asarray(v) for k, v in init.items()}, lr=0.1, weight_decay=0.01)
    rep = NamedSharding(mesh, P())
    sharded = OURS({k: jax.device_put(jnp.asarray(v), rep) for k, v in init.items()}, lr=0.1, weight_decay=0.01)
    sharded.set_state_sharding(zero1("data"))
    for g in grads:
        plain.step(g)
        sharded.step({k: jax.device_put(v, rep) for k, v in g.items()})
    for k in shapes:
        np.testing.assert_allclose(np.asarray(sharded.params[k]), np.asarray(plain.params[k]), rtol=1e-6, atol=1e-7)
    members = {m.path: m for m in sharded.param_groups[0]["params"]}
    # row factors are split along the data axis like the parameter's state; col factors (a size-1 row) replicated
    def spec(x):
        s = tuple(x.sharding.spec)
        return s + (None,) * (x.ndim - len(s))

    assert spec(sharded.state[members["w"]]["row_var"]) == ("data", None)
    assert spec(sharded.state[members["w"]]["col_var"]) == (None, None)
    assert spec(sharded.state[members["b"]]["variance"]) == ("data",)
    assert spec(sharded.state[members["s"]]["row_var"]) == (None, "data", None)


# --------------------------------------------------------------------------- the shared conformance tests


@pytest.mark.parametrize("test", [
    test_conformance.test_state_follows_each_parameter_through_list_edits_like_torch,
    test_conformance.test_user_state_entries_survive_state_dict_both_ways,
    test_conformance.test_export_then_import_continues_bit_exactly,
    test_conformance.test_wrong_gradients_raise_before_any_change,
], ids=lambda f: f.__name__)
def test_conformance_tests_on_factored_rows(test, monkeypatch, torch_float64_default):
    for name, row in conformance.FACTORED.items():
        monkeypatch.setitem(conformance.TABLE, name, row)
        test(name)


def test_orbax_checkpoint_round_trip(tmp_path):
    from groupopt.checkpoint import Checkpointer

    prob, opt = _pair(dtype=np.float32)
    opt.step(prob.tree(prob.grads(0)))
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ck:
        ck.save(1, opt, include_params=True)
        prob2, fresh = _pair(dtype=np.float32)
        ck.restore(fresh, include_params=True)
    g = prob.tree(prob.grads(1))
    opt.step(g)
    fresh.step(g)
    for a, b in zip(jax.tree.leaves(opt.params), jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sd, fsd = opt.state_dict(), fresh.state_dict()
    assert sd["param_groups"] == fsd["param_groups"]  # eps (None, 1e-3) kept through the JSON metadata
    for i in sd["state"]:
        for k in sd["state"][i]:
            np.testing.assert_array_equal(sd["state"][i][k], fsd["state"][i][k])
    # to_torch of ours loads into torch (factored shapes), and steps equal
    tparams = [torch.tensor(np.asarray(a)).requires_grad_(True) for a in prob2.flat_from_tree(fresh.params)[0]]
    tparams += [torch.tensor(np.asarray(a)).requires_grad_(True) for a in prob2.flat_from_tree(fresh.params)[1]]
    topt = TORCH([{"params": tparams[:2]}, {"params": tparams[2:], "lr": 0.3}], **KW)
    topt.load_state_dict(to_torch(fresh.state_dict()))
    assert topt.state[tparams[0]]["row_var"].shape == (3, 1)
