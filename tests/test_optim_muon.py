"""Muon: groupopt (core rule, Optax factory, compat class) against torch.optim.Muon, in the same run.

* The formula: torch's own code with its bfloat16 cast removed (``Tensor.bfloat16`` patched to a
  copy, so the Newton-Schulz iteration runs in the parameter's dtype) against ``ns_dtype`` float64 /
  float32 here, over every option, several groups, hyperparameter edits and state_dict round trips.
* The stock bfloat16 path: torch unpatched against ``ns_dtype="bfloat16"``.
* torch's published golden values (TORCH_SEMANTICS_2 §2.5), torch's errors and their timing.
* The conformance checks (list edits, user state, export/import, gradients at the door) on
  matrices: the shared table's problems are 1-D (``tests/conformance.py``, ``MATRIX_ONLY``).
* Mixed rules: one ``groupopt.grouped`` with a Muon group and an AdamW group equals torch's recipe
  of two optimizers (``Muon`` on the hidden matrices, ``AdamW`` on the rest).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

import groupopt
import groupopt.compat as optim
from conformance import MATRIX_ONLY
from optim_harness import (
    assert_same_error,
    roundtrip_ours_to_torch,
    roundtrip_torch_to_ours,
    run_differential,
    state_dicts_equal,
)

TORCH, OURS = torch.optim.Muon, optim.Muon
COEFS = (3.4445, -4.775, 2.0315)


@pytest.fixture
def torch_ns_in_param_dtype(monkeypatch):
    """torch's Muon with the one down-cast of its Newton-Schulz helper removed (``grad.bfloat16()``
    returns a copy): torch's own iteration, in the parameter's dtype."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.clone())


def ours_ns(dtype):
    """The compat class and the core factory with the Newton-Schulz iteration in ``dtype``."""
    name = np.dtype(dtype).name
    return functools.partial(OURS, ns_dtype=name), functools.partial(groupopt.muon, ns_dtype=name)


# Every option: tall and wide matrices; eps large enough to clamp the norm in group 2.
KW = dict(lr=0.02, weight_decay=0.05)
GROUPS = [
    {},
    {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0, "lr": 0.03},
    {"momentum": 0.8, "ns_coefficients": (2.0, -1.5, 0.5), "eps": 2.0, "ns_steps": 3},
    {"adjust_lr_fn": "original", "weight_decay": 0.3, "ns_steps": 7, "momentum": 0.5, "nesterov": False},
]
SHAPES = [((6, 4), (3, 5)), ((4, 7),), ((8, 3),), ((2, 6),)]
EDITS = {2: {0: {"lr": 0.01}}, 3: {2: {"momentum": 0.9, "ns_coefficients": (3.0, -3.2, 1.2), "eps": 1e-7}}}
STEPS = 5
TOL = {np.float64: 1e-9}


# --------------------------------------------------------------------------- (1) the formula


@pytest.mark.usefixtures("torch_ns_in_param_dtype")
def test_formula_compat_matches_torch_every_step():
    dtype = np.float64  # (float32 params with the float32 iteration on both sides: ~1e-7, not run here)
    compat, _ = ours_ns(dtype)
    res = run_differential(TORCH, compat, kwargs=KW, groups=GROUPS, shapes=SHAPES, dtype=dtype, steps=STEPS, edits=EDITS)
    print(f"Muon formula, compat, {np.dtype(dtype).name}: max rel err {res.max_err:.3g}")
    assert res.max_err <= TOL[dtype], res.describe()
    assert max(res.state_errors.values()) <= TOL[dtype]
    assert res.key_orders_match()  # state keys: momentum_buffer only, as torch
    assert res.ours.num_compiles == 1  # numeric edits (lr, momentum, ns_coefficients, eps): no recompile


@pytest.mark.usefixtures("torch_ns_in_param_dtype")
def test_formula_core_factory_matches_torch():
    _, core = ours_ns(np.float64)
    res = run_differential(TORCH, core_factory=core, kwargs=KW, groups=GROUPS, shapes=SHAPES, dtype=np.float64,
                           steps=STEPS, edits=EDITS)
    print(f"Muon formula, core factory, float64: max rel err {res.max_err:.3g}")
    assert res.max_err <= TOL[np.float64], res.describe()


@pytest.mark.usefixtures("torch_ns_in_param_dtype")
def test_state_dict_round_trips_both_ways():
    compat, _ = ours_ns(np.float64)
    kw = dict(kwargs=KW, groups=GROUPS[:2], shapes=SHAPES[:2], dtype=np.float64, k=2, n=2)
    err, ours, topt = roundtrip_torch_to_ours(TORCH, compat, **kw)
    assert err <= 1e-9
    assert list(ours.state_dict()["state"][0]) == list(topt.state_dict()["state"][0]) == ["momentum_buffer"]
    err, _, _ = roundtrip_ours_to_torch(TORCH, compat, **kw)
    assert err <= 1e-9


# --------------------------------------------------------------------------- (2) stock bfloat16


def _golden_grad(k, shape):
    i, j = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]
    return np.sin(k + 0.9 * i * j + 0.5 * i - 0.3 * j**2)


_ns_bf16 = jax.jit(lambda g: groupopt.optimizers.muon.newton_schulz(g, COEFS, 5, 1e-7))


def test_bf16_newton_schulz_matches_torch():
    """Full-rank inputs. Small matrices: bit for bit. Larger ones: the float32 accumulation order of
    the products (XLA vs oneDNN) flips a rare rounding of an intermediate to bfloat16, and the 5
    iterations spread it; we stay as close to the float64 iteration as torch is."""
    for shape in [(4, 3), (3, 5), (16, 32), (128, 96)]:
        g = np.random.default_rng(shape).standard_normal(shape)
        t = torch_ns(torch.tensor(g), COEFS, 5, 1e-7).double().numpy()
        o = np.asarray(_ns_bf16(jnp.asarray(g)).astype(jnp.float64))
        rel = np.linalg.norm(o - t) / np.linalg.norm(t)
        print(f"bf16 NS {shape}: {(o != t).sum()}/{t.size} entries differ, rel Frobenius {rel:.2e}")
        if max(shape) <= 64:
            np.testing.assert_array_equal(o, t)
            continue
        x = np.asarray(groupopt.optimizers.muon.newton_schulz(jnp.asarray(g), COEFS, 5, 1e-7, "float64"))
        t_err, o_err = (np.linalg.norm(v - x) / np.linalg.norm(x) for v in (t, o))
        print(f"  from the float64 iteration: torch {t_err:.2e}, ours {o_err:.2e}")
        assert rel <= 1e-2 and o_err <= 1.2 * t_err


def test_bf16_optimizer_matches_stock_torch_bit_for_bit():
    """Golden problem (small full-rank matrices), both configs of §2.5, 3 steps, parameters and buffers,
    float32 (float64: test_wrong_gradients_raise_before_any_change)."""
    dtype = np.float32
    res = run_differential(TORCH, OURS, kwargs=dict(lr=0.02), groups=[{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw"}],
                           shapes=[((4, 3), (3, 5)), ((4, 3), (3, 5))], dtype=dtype, steps=3)
    assert res.max_err == 0.0 and max(res.state_errors.values()) == 0.0, res.describe()


# --------------------------------------------------------------------------- (3) golden values (§2.5)

W43 = np.arange(12).reshape(4, 3) / 10 - 0.5
W35 = np.arange(15).reshape(3, 5) / 15 - 0.4
GOLD_A1 = ([-.5101862, -.4109274, -.294912, -.2154771, -.1103096, -.01353165, .09014743, .2002597, .3123904, .3910359, .5159597, .58599],
           [-.4021883, -.3388776, -.2641314, -.1872563, -.1436135, -.07641615, -.005898438, .05891615, .1209573, .201309,
            .2557427, .3373932, .40795, .4714755, .5458604])
GOLD_A3 = ([-.5346421, -.4296041, -.3155961, -.2347063, -.1031573, -.0175921, .0797247, .233257, .3241592, .3926185, .5299489, .5544497],
           [-.4193179, -.3555509, -.2793154, -.1739063, -.1354012, -.09897063, .001662398, .06243265, .1069624, .1794696,
            .244504, .361022, .4233673, .4772586, .5561445])
GOLD_A3_F64NS = ([-.534896, -.4293808, -.3158284, -.2348423, -.1030192, -.01721468, .07959773, .2331354, .3237813, .3925539, .5300637, .5542434],
                 [-.4189658, -.3555359, -.2795537, -.1739721, -.1354915, -.09895813, .001563629, .06224192, .1066835, .1793396,
                  .2445955, .3614076, .4235239, .4771252, .5563215])
GOLD_BUF43 = [.08821901, .0975434, .07380184, .05590023, 1.354858e-05, 1.354858e-05, .009895122, -.09753879, -.0738199,
              -.03853265, -.03317033, .09835531]
GOLD_B3 = ([-.5106536, -.409627, -.3026203, -.2134275, -.1027819, -.008476268, .09062337, .2102787, .3083049, .3924474, .5119083, .5812471],
           [-.4068983, -.3428646, -.2693583, -.1858369, -.1370696, -.08384605, -.0013689, .0630554, .1188039, .1919044, .2526065,
            .3443514, .4112399, .4704886, .5431037])
GOLD_O1_F64 = ([.4854263, .50279824, -.19171224, .68735096, .44503554, .56547735, .42253722, -.024949072, -.54350251, .35990266,
                -.7353442, .55470022],
               [.14433654, .31257629, -.098267896, -.62138224, .53326601, .49308857, .29854437, .39110952, .61759811, -.08231048,
                .51665627, -.24571929, -.44224028, -.28711463, -.68651209])
GOLD_O1_BF16 = ([.4844, .5078, -.1943, .6875, .4551, .5859, .418, -.02856, -.5625, .3535, -.7344, .5547],
                [.1494, .3105, -.1001, -.6172, .5273, .4941, .2949, .3809, .6055, -.08545, .5195, -.2363, -.4375, -.2871, -.6797])


def test_golden_values():
    # one transformation, three groups on copies of the golden pair: config A (torch's bf16 path),
    # config B, and config A with the float64 iteration
    params = {f"{c}{n}": jnp.asarray(w) for c in "ABF" for n, w in (("a", W43), ("b", W35))}
    tx = groupopt.grouped(params, [
        groupopt.group("A*", name="A"),
        groupopt.group("B*", nesterov=False, adjust_lr_fn="match_rms_adamw", name="B"),
        groupopt.group("F*", rule=groupopt.MuonRule(ns_dtype="float64"), name="F"),
    ], rule=groupopt.MuonRule(), lr=0.02)
    state = tx.init(params)
    apply = jax.jit(tx.apply)
    after = []
    for k in (1, 2, 3):
        grads = {key: jnp.asarray(_golden_grad(k, np.shape(v))) for key, v in params.items()}
        params, state = apply(params, grads, state)
        after.append(params)
    for n, i in (("a", 0), ("b", 1)):
        _close(after[0]["A" + n], GOLD_A1[i], 7)
        _close(after[2]["A" + n], GOLD_A3[i], 7)
        _close(after[2]["B" + n], GOLD_B3[i], 7)
        _close(after[2]["F" + n], GOLD_A3_F64NS[i], 7)
    buf = state.groups[0].slots["momentum_buffer"][0]
    np.testing.assert_allclose(np.ravel(np.asarray(buf)), GOLD_BUF43, rtol=1e-6, atol=1e-12)
    # the step-1 orthogonalized update: u = (1 - mu^2) g (Nesterov), in bfloat16 and in float64
    ns = groupopt.optimizers.muon.newton_schulz
    for shape, i in (((4, 3), 0), ((3, 5), 1)):
        u = jnp.asarray((1 - 0.95**2) * _golden_grad(1, shape))
        np.testing.assert_allclose(np.ravel(np.asarray(ns(u, COEFS, 5, 1e-7, "float64"))), GOLD_O1_F64[i], rtol=0, atol=6e-8)
        o16 = np.ravel(np.asarray(ns(u, COEFS, 5, 1e-7).astype(jnp.float64)))
        np.testing.assert_allclose(o16, GOLD_O1_BF16[i], rtol=2e-3)  # published with 4 digits


def _close(ours, gold, digits):
    np.testing.assert_allclose(np.ravel(np.asarray(ours)), gold, rtol=0, atol=0.6 * 10.0 ** -digits)


# --------------------------------------------------------------------------- (4) errors


def test_signature_matches_torch():
    tp = [(p.name, p.kind, p.default) for p in inspect.signature(TORCH.__init__).parameters.values()]
    op = [(p.name, p.kind, p.default) for p in inspect.signature(OURS.__init__).parameters.values()
          if p.name not in ("model", "ns_dtype")]
    assert op == tp


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1.0), dict(lr=np.array([1e-3, 1e-3])), dict(momentum=-0.1), dict(weight_decay=-1.0), dict(adjust_lr_fn="foo")],
    ids=repr,
)
def test_bad_constructor_args_raise_like_torch(kwargs):
    t_kwargs = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    assert_same_error(lambda: TORCH([torch.zeros(2, 2, requires_grad=True)], **t_kwargs),
                      lambda: OURS({"w": jnp.zeros((2, 2))}, **kwargs))


def test_non_matrix_parameter_raises_like_torch_after_the_groups():
    assert_same_error(lambda: TORCH([torch.zeros(2, 2, requires_grad=True), torch.zeros(3, requires_grad=True)]),
                      lambda: OURS([{"params": ["w", "b"]}], model={"w": jnp.zeros((2, 2)), "b": jnp.zeros(3)}))
    # never validated by torch: eps of any sign, momentum > 1, ns_steps <= 0
    TORCH([torch.zeros(2, 2, requires_grad=True)], eps=-1.0, momentum=1.5, ns_steps=0)
    OURS({"w": jnp.zeros((2, 2))}, eps=-1.0, momentum=1.5, ns_steps=0)


def _pair_2d(**kw):
    init = {"w": np.arange(6.0).reshape(2, 3) / 7, "v": np.arange(8.0).reshape(4, 2) / 9, "b": np.ones(3)}
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    topt = TORCH([tp["w"], tp["v"]], **kw)
    opt = OURS([{"params": ["w", "v"]}], model={k: jnp.asarray(v) for k, v in init.items()}, **kw)
    return init, tp, topt, opt


@pytest.mark.parametrize(
    "edit",
    [
        {"ns_steps": 100},
        {"ns_coefficients": (1.0, 2.0)},
        "add_vector",
    ],
    ids=repr,
)
def test_step_time_errors_like_torch_and_nothing_changes(edit):
    init, tp, topt, opt = _pair_2d(lr=0.1)
    grads = {k: np.cos(np.arange(np.size(v)).reshape(np.shape(v)) + 1.0) for k, v in init.items()}
    for k in tp:
        tp[k].grad = torch.tensor(grads[k])
    if edit == "add_vector":  # add_param_group does not check; the step does
        topt.add_param_group({"params": [tp["b"]]})
        opt.add_param_group({"params": ["b"]})
    else:
        topt.param_groups[0].update(edit)
        opt.param_groups[0].update(edit)  # accepted until a step uses it, as in torch
    before = opt.state_dict()
    params_before = {k: np.asarray(v) for k, v in opt.params.items()}
    assert_same_error(topt.step, lambda: opt.step({k: jnp.asarray(v) for k, v in grads.items()}))
    assert state_dicts_equal(before, opt.state_dict())
    for k, v in opt.params.items():
        np.testing.assert_array_equal(np.asarray(v), params_before[k])


def test_group_adjust_lr_fn_foo_means_ratio_one_like_torch():
    init, tp, topt, opt = _pair_2d(lr=0.1)
    topt.param_groups[0]["adjust_lr_fn"] = "foo"
    opt.param_groups[0]["adjust_lr_fn"] = "foo"
    grads = {k: np.sin(np.arange(np.size(v)).reshape(np.shape(v)) + 0.5) for k, v in init.items()}
    for k in tp:
        tp[k].grad = torch.tensor(grads[k])
    topt.step()
    opt.step({k: jnp.asarray(v) for k, v in grads.items()})
    for k in ("w", "v"):  # "v" is tall (4, 2): ratio sqrt(2) by default, 1 here
        np.testing.assert_array_equal(np.asarray(opt.params[k]), tp[k].detach().numpy())
    with pytest.raises(ValueError, match="Adjust learning rate function foo is not supported"):
        groupopt.muon(adjust_lr_fn="foo")


def test_core_rejects_non_matrix_gradients_and_bad_options():
    tx = groupopt.muon()
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="Param gradient must be a 2D matrix"):
        tx.apply(params, {"w": jnp.ones(3)}, tx.init(params))
    with pytest.raises(ValueError, match="ns_dtype"):
        groupopt.muon(ns_dtype="float16")
    with pytest.raises(TypeError, match="ns_steps"):
        groupopt.MuonRule(ns_steps=2.5)


# --------------------------------------------------------------------------- conformance on matrices

ROW = MATRIX_ONLY["Muon"]
MNAMES = ["a", "b", "c", "d"]
MSHAPES = {"a": (3, 2), "b": (2, 2), "c": (2, 4), "d": (1, 3)}


def _minit(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(MSHAPES[k]) for k in MNAMES}


def _mgrads(step):
    rng = np.random.default_rng(100 + step)
    return {k: rng.standard_normal(MSHAPES[k]) for k in MNAMES}


def _mpair(init, ns64=True):
    g0, g1 = dict(ROW.groups[1]), dict(ROW.groups[2], lr=ROW.kwargs["lr"] / 3)
    tp = {k: torch.tensor(init[k], requires_grad=True) for k in MNAMES}
    topt = TORCH([dict(g0, params=[tp["a"], tp["b"]]), dict(g1, params=[tp["c"], tp["d"]])], **ROW.kwargs)
    cls = ours_ns(np.float64)[0] if ns64 else OURS
    opt = cls([dict(g0, params=["a", "b"]), dict(g1, params=["c", "d"])], model={k: jnp.asarray(v) for k, v in init.items()},
              **ROW.kwargs)
    return tp, topt, opt, {m.path: m for g in opt.param_groups for m in g["params"]}


def _mstep(tp, topt, opt, step):
    g = _mgrads(step)
    for k in MNAMES:
        tp[k].grad = torch.tensor(g[k])
    topt.step()
    opt.step({k: jnp.asarray(v) for k, v in g.items()})


@pytest.mark.usefixtures("torch_ns_in_param_dtype")
def test_state_follows_each_parameter_through_list_edits_like_torch():
    tp, topt, opt, ours = _mpair(_minit())
    _mstep(tp, topt, opt, 0)

    def move(gs, aside):
        gs[1]["params"].append(gs[0]["params"].pop(0))

    def reorder(gs, aside):
        gs[1]["params"].reverse()

    def remove(gs, aside):
        aside.append(gs[0]["params"].pop())

    def re_add(gs, aside):
        gs[1]["params"].insert(1, aside.pop())

    aside_t, aside_o = [], []
    for t, edit in enumerate((move, reorder, remove, re_add), start=1):
        edit(topt.param_groups, aside_t)
        edit(opt.param_groups, aside_o)
        _mstep(tp, topt, opt, t)
    for k in MNAMES:
        np.testing.assert_allclose(np.asarray(opt.params[k]), tp[k].detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=k)
        tstate, ostate = topt.state.get(tp[k], {}), opt.state[ours[k]]
        assert list(tstate) == list(ostate) == ["momentum_buffer"], k
        np.testing.assert_allclose(np.asarray(ostate["momentum_buffer"]), tstate["momentum_buffer"].numpy(), rtol=1e-12, atol=1e-12)
    assert opt.num_compiles == 5


def test_user_state_entries_survive_state_dict_both_ways():
    tp, topt, opt, ours = _mpair(_minit(), ns64=False)
    _mstep(tp, topt, opt, 0)
    opt.state[ours["c"]]["mine"] = 7
    topt.state[tp["c"]]["mine"] = 7
    osd, tsd = opt.state_dict(), topt.state_dict()
    assert osd["state"][2]["mine"] == tsd["state"][2]["mine"] == 7
    assert list(osd["state"][2]) == list(tsd["state"][2])
    tp2, topt2, opt2, ours2 = _mpair(_minit(1), ns64=False)
    opt2.load_state_dict(tsd)
    topt2.load_state_dict({"state": {i: {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in e.items()}
                                     for i, e in osd["state"].items()}, "param_groups": osd["param_groups"]})
    assert opt2.state[ours2["c"]]["mine"] == topt2.state[tp2["c"]]["mine"] == 7


def test_export_then_import_continues_bit_exactly():
    _, _, opt, ours = _mpair(_minit(), ns64=False)
    opt.step({k: jnp.asarray(v) for k, v in _mgrads(0).items()})
    opt.state[ours["a"]]["note"] = "kept"
    arrays, meta = opt.export_state(include_params=True)
    _, _, fresh, fresh_ours = _mpair(_minit(5), ns64=False)
    before = fresh.state_dict()
    commit = fresh.prepare_import(dict(arrays), meta, include_params=True)
    assert state_dicts_equal(before, fresh.state_dict())  # nothing applied before commit
    commit()
    g1 = {k: jnp.asarray(v) for k, v in _mgrads(1).items()}
    opt.step(g1)
    fresh.step(g1)
    for k in MNAMES:
        np.testing.assert_array_equal(np.asarray(fresh.params[k]), np.asarray(opt.params[k]))
    assert fresh.state[fresh_ours["a"]]["note"] == "kept"


def test_wrong_gradients_raise_before_any_change():
    tp, topt, opt, _ = _mpair(_minit(), ns64=False)
    g = {k: jnp.asarray(v) for k, v in _mgrads(0).items()}
    for bad in (dict(g, a=jnp.ones((2, 3))), dict(g, a=jnp.ones((3, 2), jnp.int32)), dict(g, aa=g["a"])):
        with pytest.raises(ValueError, match="'a"):
            opt.step(bad)
    _mstep(tp, topt, opt, 0)  # then the same step as torch's stock (bfloat16) Muon, bit for bit
    for k in MNAMES:
        np.testing.assert_array_equal(np.asarray(opt.params[k]), tp[k].detach().numpy())


# --------------------------------------------------------------------------- (5) mixed rules

MIXED_SHAPES = {"embed": (11, 8), "w1": (8, 16), "b1": (16,), "w2": (16, 12), "b2": (12,), "ln": (12,), "head": (12, 5)}
HIDDEN = ["w1", "w2"]
REST = ["embed", "b1", "b2", "ln", "head"]


def _mixed_loss(p, tokens, targets):
    h = p["embed"][tokens]
    h = jnp.tanh(h @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    h = h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * p["ln"]
    logits = h @ p["head"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1))


_mixed_grad = jax.jit(jax.grad(_mixed_loss))
MUON_KW = dict(lr=0.02, momentum=0.9, weight_decay=0.05)
ADAMW_KW = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
MIXED_STEPS, LR_EDIT_AT = 6, 3


def _mixed_data(step):
    rng = np.random.default_rng(7 + step)
    return jnp.asarray(rng.integers(0, 11, 9)), jnp.asarray(rng.integers(0, 5, 9))


def _torch_recipe(init):
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    muon = TORCH([tp[k] for k in HIDDEN], **MUON_KW)
    adamw = torch.optim.AdamW([tp[k] for k in REST], **ADAMW_KW)
    hist = []
    for t in range(MIXED_STEPS):
        if t == LR_EDIT_AT:
            muon.param_groups[0]["lr"] = 0.01
            adamw.param_groups[0]["lr"] = 1e-3
        g = _mixed_grad({k: jnp.asarray(v.detach().numpy()) for k, v in tp.items()}, *_mixed_data(t))
        for k in tp:
            tp[k].grad = torch.tensor(np.asarray(g[k]))
        muon.step()
        adamw.step()
        hist.append({k: v.detach().numpy().copy() for k, v in tp.items()})
    return hist


def _max_rel(ours, ref):
    return max(float(np.abs(np.asarray(ours[k]) - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)


@pytest.mark.usefixtures("torch_ns_in_param_dtype")
def test_mixed_muon_adamw_grouped_equals_torch_two_optimizer_recipe():
    rng = np.random.default_rng(3)
    init = {k: rng.standard_normal(s) * 0.5 for k, s in MIXED_SHAPES.items()}
    ref = _torch_recipe(init)

    # the core: one transformation, two rules
    params = {k: jnp.asarray(v) for k, v in init.items()}
    tx = groupopt.grouped(params, [
        groupopt.group(HIDDEN, rule=groupopt.MuonRule(ns_dtype="float64"), name="hidden", **MUON_KW),
        groupopt.group(REST, rule=groupopt.AdamWRule(), name="rest", **ADAMW_KW),
    ], rule=groupopt.AdamWRule(), require_all=True)
    state = tx.init(params)
    apply = jax.jit(tx.apply)
    core_err = 0.0
    for t in range(MIXED_STEPS):
        if t == LR_EDIT_AT:
            state = tx.set_hyperparams(state, "hidden", lr=0.01)
            state = tx.set_hyperparams(state, "rest", lr=1e-3)
        params, state = apply(params, _mixed_grad(params, *_mixed_data(t)), state)
        core_err = max(core_err, _max_rel(params, ref[t]))

    # the compat way: two optimizers over the same parameters, as in torch
    model = {k: jnp.asarray(v) for k, v in init.items()}
    muon = ours_ns(np.float64)[0]([{"params": HIDDEN}], model=model, **MUON_KW)
    adamw = optim.AdamW([{"params": REST}], model=model, **ADAMW_KW)
    compat_err = 0.0
    for t in range(MIXED_STEPS):
        if t == LR_EDIT_AT:
            muon.param_groups[0]["lr"] = 0.01
            adamw.param_groups[0]["lr"] = 1e-3
        current = {**{k: adamw.params[k] for k in REST}, **{k: muon.params[k] for k in HIDDEN}}
        g = _mixed_grad(current, *_mixed_data(t))
        muon.step(g)
        adamw.step(g)
        compat_err = max(compat_err, _max_rel({**adamw.params, **{k: muon.params[k] for k in HIDDEN}}, ref[t]))
    print(f"mixed Muon + AdamW vs torch's two optimizers, float64, {MIXED_STEPS} steps: "
          f"core {core_err:.3g}, compat {compat_err:.3g}")
    assert core_err <= 1e-9 and compat_err <= 1e-9
    assert muon.num_compiles == 1 and adamw.num_compiles == 1
