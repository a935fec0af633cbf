"""Array (tensor-like) hyperparameters and scheduler details, side by side with torch 2.13.

A JAX or NumPy array plays the role of a torch ``Tensor``: torch's checks on
tensor ``lr`` / ``betas`` (``Tensor lr must be 1-element``, the
``foreach=True`` refusals, Adam's "both floats or both Tensors"), the
``RuntimeError`` of ``bool()`` on a multi-element tensor in the range checks,
the schedulers writing into a tensor lr (``fill_``: same type and dtype, value
rounded to it), and the scheduler's warning when ``optimizer.step`` was
replaced after it was built. Per-slice hyperparameter vectors stay a feature
of group dicts (torch has no counterpart; see ``tests/test_slices.py``).
"""

from __future__ import annotations

import math
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from optim_harness import assert_same_error, rel_err

import groupopt.compat as optim

NAMES = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "Rprop", "ASGD", "LBFGS"]
F64 = torch.float64


def _tparams():
    return [torch.zeros(3, dtype=F64, requires_grad=True)]


def _ours():
    return {"w": np.zeros(3)}


def _both(name, torch_kw, our_kw):
    """The torch and the groupopt constructor calls, for :func:`assert_same_error`."""
    return (lambda: getattr(torch.optim, name)(_tparams(), **torch_kw)), (lambda: getattr(optim, name)(_ours(), **our_kw))


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# --------------------------------------------------------------------------- 1. Tensor lr must be 1-element


@pytest.mark.parametrize("name", NAMES)
def test_array_lr_of_size_other_than_one_is_torchs_value_error(name):
    # torch checks ``isinstance(lr, Tensor) and lr.numel() != 1`` first: before the sign of lr
    cases = [
        (torch.tensor([1e-3, 1e-3], dtype=F64), jnp.asarray([1e-3, 1e-3])),
        (torch.tensor([1e-3, 1e-3], dtype=F64), np.asarray([1e-3, 1e-3])),
        (torch.tensor([-1.0, -1.0], dtype=F64), jnp.asarray([-1.0, -1.0])),
        (torch.ones(2, 2, dtype=F64), jnp.ones((2, 2))),
        (torch.tensor([], dtype=F64), jnp.asarray([])),
    ]
    for tlr, olr in cases:
        err = assert_same_error(*_both(name, {"lr": tlr}, {"lr": olr}))
        assert str(err) == "Tensor lr must be 1-element"


@pytest.mark.parametrize("name", NAMES)
def test_zero_d_array_lr_is_accepted_like_a_scalar_tensor(name):
    _quiet(lambda: getattr(torch.optim, name)(_tparams(), lr=torch.tensor(0.01, dtype=F64)))
    opt = getattr(optim, name)(_ours(), lr=jnp.asarray(0.01))
    assert float(opt.param_groups[0]["lr"]) == 0.01
    # a negative one is torch's "Invalid learning rate" (a 0-d tensor formats as its value)
    assert_same_error(*_both(name, {"lr": torch.tensor(-0.5, dtype=F64)}, {"lr": jnp.asarray(-0.5)}))


def test_per_slice_lr_vectors_stay_a_group_dict_feature():
    """The constructor's ``lr`` is torch's scalar argument; a per-slice vector goes in a group dict."""
    L = 3
    p0 = {"stack": np.arange(L * 2, dtype=np.float64).reshape(L, 2), "head": np.ones(2)}
    lrs = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        optim.SGD(p0, lr=lrs)
    opt = optim.SGD([{"params": "stack", "lr": lrs}, {"params": "head"}], lr=0.5, model=p0)
    assert opt.param_groups[0]["lr"] is lrs
    g = {"stack": np.ones((L, 2)), "head": np.ones(2)}
    opt.step(g)
    np.testing.assert_array_equal(np.asarray(opt.params["stack"]), p0["stack"] - lrs[:, None])
    np.testing.assert_array_equal(np.asarray(opt.params["head"]), p0["head"] - 0.5)


def _t(v):
    return torch.tensor(v, dtype=F64)


# torch's range checks (``0.0 <= value``) on a multi-element tensor raise bool()'s RuntimeError
MULTI = [
    ("SGD", "momentum", {}),
    ("SGD", "weight_decay", {}),
    ("Adam", "eps", {}),
    ("Adam", "weight_decay", {}),
    ("RMSprop", "alpha", {}),
    ("RMSprop", "momentum", {}),
    ("Adagrad", "lr_decay", {}),
    ("Adagrad", "initial_accumulator_value", {}),
    ("Adadelta", "rho", {}),
    ("Adadelta", "eps", {}),
    ("NAdam", "momentum_decay", {}),
    ("ASGD", "weight_decay", {}),
]


@pytest.mark.parametrize("name,key,extra", MULTI)
def test_multi_element_array_in_a_range_check_is_torchs_runtime_error(name, key, extra):
    for tv, ov in [(_t([0.5, 0.5]), jnp.asarray([0.5, 0.5])), (_t([]), np.asarray([]))]:
        err = assert_same_error(*_both(name, {key: tv, **extra}, {key: ov, **extra}))
        assert type(err) is RuntimeError


def test_multi_element_betas_etas_and_nesterov_dampening_are_torchs_runtime_error():
    vec, tvec = jnp.asarray([0.9, 0.8]), _t([0.9, 0.8])
    for name in ["Adam", "AdamW", "Adamax", "NAdam", "RAdam"]:
        assert_same_error(*_both(name, {"betas": (tvec, _t(0.999))}, {"betas": (vec, jnp.asarray(0.999))}))
        assert_same_error(*_both(name, {"betas": (_t(0.9), tvec)}, {"betas": (jnp.asarray(0.9), vec)}))
    assert_same_error(*_both("Rprop", {"etas": (tvec, 1.2)}, {"etas": (vec, 1.2)}))
    assert_same_error(*_both("Rprop", {"etas": (0.5, _t([1.2, 1.3]))}, {"etas": (0.5, jnp.asarray([1.2, 1.3]))}))
    # the chain stops at the first failing comparison: an invalid etas[0] is reported, etas[1] never compared
    err = _quiet(lambda: pytest.raises(ValueError, optim.Rprop, _ours(), etas=(1.5, vec)))
    assert str(err.value).startswith("Invalid eta values: 1.5, ")
    kw = dict(momentum=0.9, nesterov=True)
    assert_same_error(*_both("SGD", {**kw, "dampening": tvec}, {**kw, "dampening": vec}))


def test_fused_flags_are_checked_after_the_params_as_in_torch():
    for name in ["SGD", "Adam", "AdamW", "Adagrad"]:
        assert_same_error(
            lambda: getattr(torch.optim, name)([], fused=True, foreach=True),
            lambda: getattr(optim, name)([], fused=True, foreach=True),
        )
        assert_same_error(*_both(name, {"fused": True, "foreach": True}, {"fused": True, "foreach": True}))


# --------------------------------------------------------------------------- 2. foreach=True and tensor lr / betas


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_refuses_array_lr_and_betas_with_foreach(name):
    for tlr, olr in [
        (_t(1e-3), jnp.asarray(1e-3)),
        (_t([1e-3]), jnp.asarray([1e-3])),
        (_t([1e-3]), np.asarray([1e-3], np.float32)),
        (_t([1e-3, 1e-3]), jnp.asarray([1e-3, 1e-3])),  # foreach is checked before the size
        (_t(-1.0), jnp.asarray(-1.0)),  # ... and before the sign
    ]:
        err = assert_same_error(*_both(name, {"lr": tlr, "foreach": True}, {"lr": olr, "foreach": True}))
        assert str(err) == "lr as a Tensor is not supported for capturable=False and foreach=True"
    tb, ob = (_t(0.9), _t(0.999)), (jnp.asarray(0.9), jnp.asarray(0.999))
    err = assert_same_error(*_both(name, {"betas": tb, "foreach": True}, {"betas": ob, "foreach": True}))
    assert str(err) == "betas[0] as a Tensor is not supported for capturable=False and foreach=True"
    # capturable=True lifts both refusals, in torch's constructor and ours
    _quiet(lambda: getattr(torch.optim, name)(_tparams(), lr=_t(1e-3), betas=tb, foreach=True, capturable=True))
    getattr(optim, name)(_ours(), lr=jnp.asarray(1e-3), betas=ob, foreach=True, capturable=True)


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "Rprop", "ASGD"])
def test_other_optimizers_accept_array_lr_with_foreach(name):
    _quiet(lambda: getattr(torch.optim, name)(_tparams(), lr=_t(1e-3), foreach=True))
    getattr(optim, name)(_ours(), lr=jnp.asarray(1e-3), foreach=True)


def test_adam_step_refuses_a_group_array_lr_or_betas_with_foreach():
    """torch's step (``_init_group`` / ``_multi_tensor_adam``): a group's tensor lr or betas with foreach=True."""
    g = np.ones(3)

    def torch_step(group):
        p = torch.zeros(3, dtype=F64, requires_grad=True)
        opt = torch.optim.Adam([{"params": [p], **group}], foreach=True)
        p.grad = torch.tensor(g)
        opt.step()

    for tgroup, ogroup in [
        ({"lr": _t(0.01)}, {"lr": jnp.asarray(0.01)}),
        ({"betas": (_t(0.9), _t(0.999))}, {"betas": (jnp.asarray(0.9), jnp.asarray(0.999))}),
        ({"betas": (0.9, _t(0.999))}, {"betas": (0.9, np.asarray(0.999))}),
    ]:
        opt = optim.Adam([{"params": "w", **ogroup}], foreach=True, model=_ours())
        before = np.asarray(opt.params["w"]).copy()
        assert_same_error(lambda: torch_step(tgroup), lambda: opt.step({"w": g}))
        np.testing.assert_array_equal(np.asarray(opt.params["w"]), before)  # nothing applied
        assert opt.state_dict()["state"] == {}


# --------------------------------------------------------------------------- 3. tensor betas


def test_adam_betas_rules_and_storage():
    # mixed (or an int beta, or a NumPy scalar that is not a float) is torch's error
    for tb, ob in [
        ((_t(0.9), 0.999), (jnp.asarray(0.9), 0.999)),
        ((0.9, _t(0.999)), (0.9, np.asarray(0.999))),
        ((0, 0.999), (0, 0.999)),
    ]:
        err = assert_same_error(*_both("Adam", {"betas": tb}, {"betas": ob}))
        assert str(err) == "betas must be either both floats or both Tensors"
    assert_same_error(*_both("Adam", {"betas": (_t(1.0), _t(0.9))}, {"betas": (jnp.asarray(1.0), jnp.asarray(0.9))}))
    # accepted tensors are squeezed to 0-d (torch's _to_scalar) and stored as a tuple
    for ob in [(jnp.asarray([0.9]), jnp.asarray([0.999])), [np.asarray([[0.9]]), np.asarray(0.999)]]:
        opt = optim.Adam(_ours(), betas=ob)
        tb = torch.optim.Adam(_tparams(), betas=[torch.tensor(np.asarray(b)) for b in ob]).defaults["betas"]
        ours = opt.defaults["betas"]
        assert type(ours) is tuple and type(tb) is tuple
        assert [np.shape(b) for b in ours] == [tuple(b.shape) for b in tb] == [(), ()]
        assert [type(b) for b in ours] == [type(b) for b in ob]
        assert opt.param_groups[0]["betas"] is ours


@pytest.mark.parametrize(
    "name,kw,shape",
    [
        ("Adam", {}, ()),
        ("Adam", {"amsgrad": True, "weight_decay": 0.1}, (1,)),  # (1,): squeezed by torch's Adam and ours
        ("AdamW", {}, ()),
        ("Adamax", {}, ()),
        ("NAdam", {}, ()),
        ("RAdam", {}, ()),
    ],
)
def test_steps_with_array_betas_match_torch_with_tensor_betas(name, kw, shape, torch_float64_default):
    # NAdam's mu_product is float64 on both sides (see the fixture)
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((4, 3))
    b1, b2 = 0.8, 0.95  # not the defaults: the step must use them
    tp = torch.tensor(p0, requires_grad=True)
    topt = getattr(torch.optim, name)([tp], lr=0.05, betas=(torch.full(shape, b1, dtype=F64), torch.full(shape, b2, dtype=F64)), **kw)
    opt = getattr(optim, name)({"w": p0}, lr=0.05, betas=(jnp.full(shape, b1), jnp.full(shape, b2)), **kw)
    for _ in range(6):
        g = rng.standard_normal((4, 3))
        tp.grad = torch.tensor(g)
        topt.step()
        opt.step({"w": g})
    assert rel_err(opt.params["w"], tp) < 1e-12
    # ... and the defaults would give something else
    ref = getattr(optim, name)({"w": p0}, lr=0.05, **kw)
    rng = np.random.default_rng(3)
    rng.standard_normal((4, 3))
    for _ in range(6):
        ref.step({"w": rng.standard_normal((4, 3))})
    assert rel_err(ref.params["w"], tp) > 1e-6


# --------------------------------------------------------------------------- shape-(1,) hyperparameters


def test_one_element_1d_array_hyperparameters_step_like_torch():
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(3)
    tp = torch.tensor(p0, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=_t([0.1]), momentum=_t([0.5]))
    opt = optim.SGD({"w": p0}, lr=jnp.asarray([0.1]), momentum=np.asarray([0.5]))
    for _ in range(3):
        g = rng.standard_normal(3)
        tp.grad = torch.tensor(g)
        topt.step()
        opt.step({"w": g})
    assert rel_err(opt.params["w"], tp) < 1e-12


# --------------------------------------------------------------------------- 4. schedulers keep an array lr's type and dtype


def _lr_pair(kind):
    """(our lr, torch's lr): a float32 0-d array and a float32 0-d tensor."""
    ours = jnp.asarray(0.1, jnp.float32) if kind == "jax" else np.asarray(0.1, np.float32)
    return ours, torch.tensor(0.1, dtype=torch.float32)


def _assert_same_lr(ours, theirs, kind):
    if not isinstance(theirs, torch.Tensor):  # torch has a float there: so do we
        assert type(ours) is float and ours == theirs
        return
    assert isinstance(ours, jax.Array if kind == "jax" else np.ndarray), type(ours)
    assert ours.dtype == np.float32 and ours.shape == tuple(theirs.shape)
    assert float(ours) == theirs.item()  # the same float32


@pytest.mark.parametrize("kind", ["jax", "numpy"])
def test_plateau_reduces_an_array_lr_in_its_dtype(kind):
    olr, tlr = _lr_pair(kind)
    opt = optim.SGD([{"params": "a", "lr": olr}, {"params": "b"}], lr=0.1, model={"a": np.zeros(2), "b": np.zeros(2)})
    topt = torch.optim.SGD(
        [{"params": [torch.zeros(2, requires_grad=True)], "lr": tlr}, {"params": [torch.zeros(2, requires_grad=True)]}], lr=0.1
    )
    kw = dict(factor=0.3, patience=1, min_lr=1e-4)
    sched, tsched = optim.lr_scheduler.ReduceLROnPlateau(opt, **kw), torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
    seen = []
    for epoch in range(24):
        metric = 1.0 if epoch < 16 else 1.0 - epoch  # a plateau, then improvements
        sched.step(metric)
        tsched.step(metric)
        _assert_same_lr(opt.param_groups[0]["lr"], topt.param_groups[0]["lr"], kind)
        assert opt.param_groups[1]["lr"] == topt.param_groups[1]["lr"] and type(opt.param_groups[1]["lr"]) is float
        last, tlast = sched.get_last_lr(), tsched.get_last_lr()
        _assert_same_lr(last[0], tlast[0], kind)
        assert last[0] is not opt.param_groups[0]["lr"] or kind == "jax"  # a copy (torch clones)
        seen.append(float(opt.param_groups[0]["lr"]))
    assert len(set(seen)) == 7 and seen[-1] == np.float32(1e-4)  # six reductions, the last one to min_lr
    assert opt.param_groups[0]["lr"] is not olr and float(olr) == np.float32(0.1)  # the user's array is untouched


SCHEDULERS = [
    ("ExponentialLR", dict(gamma=0.3)),
    ("StepLR", dict(step_size=2, gamma=0.3)),
    ("LambdaLR", dict(lr_lambda=lambda e: 1.0 / (e + 3))),
    ("CosineAnnealingLR", dict(T_max=5, eta_min=1e-3)),
    ("OneCycleLR", dict(max_lr=0.7, total_steps=12)),
    ("CyclicLR", dict(base_lr=0.013, max_lr=0.1, step_size_up=3, cycle_momentum=False)),
]


@pytest.mark.parametrize("name,kw", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_schedulers_write_an_array_lr_in_its_dtype(name, kw):
    olr, tlr = _lr_pair("jax")
    opt = optim.SGD(_ours(), lr=olr)
    topt = torch.optim.SGD(_tparams(), lr=tlr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no optimizer steps here: torch's order warning
        sched = getattr(optim.lr_scheduler, name)(opt, **kw)
        tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kw)
        for _ in range(11):
            _assert_same_lr(opt.param_groups[0]["lr"], topt.param_groups[0]["lr"], "jax")
            _assert_same_lr(sched.get_last_lr()[0], tsched.get_last_lr()[0], "jax")
            sched.step()
            tsched.step()
    _assert_same_lr(opt.param_groups[0]["initial_lr"], topt.param_groups[0]["initial_lr"], "jax")


def test_sequential_lr_resets_an_array_lr_in_its_dtype():
    def build(mod, o):
        a = mod.lr_scheduler.ConstantLR(o, factor=0.3, total_iters=2)
        b = mod.lr_scheduler.ExponentialLR(o, gamma=0.7)
        return mod.lr_scheduler.SequentialLR(o, [a, b], milestones=[3])

    olr, tlr = _lr_pair("numpy")
    opt, topt = optim.SGD(_ours(), lr=olr), torch.optim.SGD(_tparams(), lr=tlr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched, tsched = build(optim, opt), build(torch.optim, topt)
        for _ in range(7):
            _assert_same_lr(opt.param_groups[0]["lr"], topt.param_groups[0]["lr"], "numpy")
            sched.step()
            tsched.step()


# --------------------------------------------------------------------------- 5. optimizer.step replaced after the scheduler


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [(w.category, str(w.message)) for w in rec]


def test_scheduler_warns_when_optimizer_step_was_replaced_after_it():
    opt, topt = optim.SGD(_ours(), lr=0.1), torch.optim.SGD(_tparams(), lr=0.1)
    sched, tsched = optim.lr_scheduler.StepLR(opt, 2), torch.optim.lr_scheduler.StepLR(topt, 2)
    opt.step = lambda *a, **k: None
    topt.step = lambda *a, **k: None
    ours, theirs = _warnings_of(sched.step), _warnings_of(tsched.step)
    assert ours == theirs and len(ours) == 1
    assert ours[0][0] is UserWarning and ours[0][1].startswith("Seems like `optimizer.step()` has been overridden")
    assert _warnings_of(sched.step) == _warnings_of(tsched.step) == []  # only at the first step()


def test_scheduler_order_warning_and_step_replaced_before_it():
    # not replaced, not called: torch's order warning (not the override one)
    opt, topt = optim.SGD(_ours(), lr=0.1), torch.optim.SGD(_tparams(), lr=0.1)
    sched, tsched = optim.lr_scheduler.StepLR(opt, 2), torch.optim.lr_scheduler.StepLR(topt, 2)
    ours, theirs = _warnings_of(sched.step), _warnings_of(tsched.step)
    assert ours == theirs and ours[0][1].startswith("Detected call of `lr_scheduler.step()` before `optimizer.step()`")
    # a bound method put there before the scheduler is wrapped: no override warning; calling it counts
    for o in (opt, topt):
        o.step = types.MethodType(lambda self, *a, **k: None, o)
    sched, tsched = optim.lr_scheduler.StepLR(opt, 2), torch.optim.lr_scheduler.StepLR(topt, 2)
    opt.step()
    topt.step()
    assert _warnings_of(sched.step) == _warnings_of(tsched.step) == []
    # a plain function put there before the scheduler: torch's AttributeError when building it
    opt2, topt2 = optim.SGD(_ours(), lr=0.1), torch.optim.SGD(_tparams(), lr=0.1)
    opt2.step = topt2.step = lambda *a, **k: None
    assert_same_error(lambda: torch.optim.lr_scheduler.StepLR(topt2, 2), lambda: optim.lr_scheduler.StepLR(opt2, 2))


def test_wrapped_step_runs_the_real_step_and_hooks_once():
    opt = optim.SGD(_ours(), lr=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    s1 = optim.lr_scheduler.StepLR(opt, 2)
    wrapped = opt.step
    s2 = optim.lr_scheduler.ExponentialLR(opt, 0.5)
    assert opt.step is wrapped and wrapped._wrapped_by_lr_sched  # patched once
    opt.step({"w": np.ones(3)})
    assert calls == ["pre"] and opt._opt_called
    np.testing.assert_array_equal(np.asarray(opt.params["w"]), -0.5 * np.ones(3))
    assert _warnings_of(s1.step) == [] and _warnings_of(s2.step) == []
    assert math.isclose(opt.param_groups[0]["lr"], 0.5 * 0.5)
