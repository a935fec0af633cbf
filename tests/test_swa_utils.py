"""torch.optim.swa_utils vs groupopt.compat.swa_utils and groupopt.averaging; torch computes every expectation in this run.

The published values of TORCH_SEMANTICS_2 §4 are checked as an extra (against torch and us).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import groupopt.compat as optim
from groupopt import averaging
from groupopt.compat import swa_utils as S
from torch_port import errlog, rel_err  # noqa: F401  (errlog is a fixture)

TSWA = torch.optim.swa_utils
TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}
EXACT = {np.dtype(np.float64): 0.0, np.dtype(np.float32): 0.0}

# §4.2: the model's w at updates 1..3, a float buffer and an integer buffer (num_batches_tracked-like)
WS = [[1.0, 2.0, 3.0], [2.0, 0.0, -1.0], [0.5, 0.5, 4.0]]
FBUF = [10.0, 11.0, 12.0]
IBUF = [3, 8, 20]
GOLDEN = {  # after 3 updates (TORCH_SEMANTICS_2 §4.2)
    ("swa", "float64"): [1.1666666666666667, 0.8333333333333334, 2.0],
    ("swa", "float32"): [1.1666666269302368, 0.8333333134651184, 2.0],
    ("swa_multi", "float64"): [1.1666666567325592, None, None],
    ("ema_multi", "float64"): [1.04, 1.6700000000000002, 2.74],
    ("ema_multi", "float32"): [1.0399999618530273, 1.6699999570846558, 2.740000009536743],
    ("ema_avg", "float64"): [1.04, 1.6700000000000002, 2.74],
    ("ema_avg", "float32"): [1.0399999618530273, 1.6699998378753662, 2.740000009536743],
}


class Vec(nnx.Module):
    def __init__(self, dtype):
        self.w = nnx.Param(jnp.zeros(3, dtype))
        self.fbuf = nnx.BatchStat(jnp.zeros((), dtype))
        self.ibuf = nnx.BatchStat(jnp.zeros((), jnp.int64))

    def __call__(self, x):
        return x * self.w[...] + self.fbuf[...]


class TVec(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        self.register_buffer("fbuf", torch.zeros((), dtype=dtype))
        self.register_buffer("ibuf", torch.zeros((), dtype=torch.long))


def fns(kind, lib):
    """(avg_fn, multi_avg_fn) of a config, from torch's swa_utils or ours."""
    return {
        "swa": (None, None),
        "swa_multi": (None, lib.get_swa_multi_avg_fn()),
        "ema_multi": (None, lib.get_ema_multi_avg_fn(0.9)),
        "ema_avg": (lib.get_ema_avg_fn(0.9), None),
    }[kind]


def set_vec(m, t, k, dtype):
    m.w[...] = jnp.asarray(WS[k], dtype)
    m.fbuf[...] = jnp.asarray(FBUF[k], dtype)
    m.ibuf[...] = jnp.asarray(IBUF[k])
    with torch.no_grad():
        t.w.copy_(torch.tensor(WS[k], dtype=t.w.dtype))
        t.fbuf.fill_(FBUF[k])
        t.ibuf.fill_(IBUF[k])


def snapshot(am):
    return {k: np.asarray(v) for k, v in am.state_dict().items()}


# --------------------------------------------------------------------------- AveragedModel, §4.2


@pytest.mark.parametrize("use_buffers", [False, True], ids=["sync_buffers", "use_buffers"])
@pytest.mark.parametrize("kind", ["swa", "swa_multi", "ema_multi", "ema_avg"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
def test_averaged_model_matches_torch(dtype, kind, use_buffers, errlog):
    dtype = np.dtype(dtype)
    m, t = Vec(dtype), TVec(TORCH_DTYPE[dtype])
    avg_fn, multi = fns(kind, S)
    tavg_fn, tmulti = fns(kind, TSWA)
    am = S.AveragedModel(m, avg_fn=avg_fn, multi_avg_fn=multi, use_buffers=use_buffers)
    tam = TSWA.AveragedModel(t, avg_fn=tavg_fn, multi_avg_fn=tmulti, use_buffers=use_buffers)
    if kind == "swa_multi" and use_buffers:
        # torch's float32-weight lerp is not defined for the integer buffer: torch's error, raised at the first
        # update (the whole update is traced once), not at the second as in torch; nothing changed
        set_vec(m, t, 0, dtype)
        tam.update_parameters(t)
        set_vec(m, t, 1, dtype)
        with pytest.raises(RuntimeError) as terr:
            tam.update_parameters(t)
        before = snapshot(am)
        with pytest.raises(RuntimeError) as err:
            am.update_parameters(m)
        assert str(err.value) == str(terr.value)
        after = snapshot(am)
        assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
        assert int(am.n_averaged[...]) == 0
        return
    for k in range(3):
        set_vec(m, t, k, dtype)
        tam.update_parameters(t)
        am.update_parameters(m)
        tw = tam.module.w.detach().numpy()
        w = np.asarray(am.module.w[...])
        assert w.dtype == tw.dtype
        e = errlog.record(f"AveragedModel {kind}", dtype, rel_err(w, tw))
        assert e <= EXACT[dtype], (k, w.tolist(), tw.tolist())
        assert float(am.module.fbuf[...]) == float(tam.module.fbuf)
        assert int(am.module.ibuf[...]) == int(tam.module.ibuf)  # truncated like torch's copy_
        assert int(am.n_averaged[...]) == int(tam.n_averaged) == k + 1
    golden = GOLDEN.get((kind, dtype.name))
    if golden is not None:
        for ours, theirs, g in zip(np.asarray(am.module.w[...]).tolist(), tam.module.w.tolist(), golden):
            assert g is None or ours == theirs == g
    if use_buffers:  # §4.2: 11 (SWA), 10.29 (EMA); int 10 / 4
        assert float(am.module.fbuf[...]) == pytest.approx(11.0 if kind.startswith("swa") else 10.29, rel=1e-6)
        assert int(am.module.ibuf[...]) == (10 if kind.startswith("swa") else 4)
    else:
        assert float(am.module.fbuf[...]) == 12.0 and int(am.module.ibuf[...]) == 20
    assert am.num_compiles == 1  # one trace for the three updates (the first copy included)
    assert np.array_equal(np.asarray(am(jnp.ones(3, dtype))), np.asarray(am.module.w[...]) + np.asarray(am.module.fbuf[...]))


@pytest.mark.parametrize("method", ["swa", "swa_lerp", "ema", "ema_lerp"])
def test_core_averaging_matches_torch_fns(method, errlog):
    """groupopt.averaging (init/update under one jit) against torch's four functions, float64 and float32."""
    torch_fn = {
        "swa": TSWA.get_swa_avg_fn(),
        "swa_lerp": TSWA.get_swa_multi_avg_fn(),
        "ema": TSWA.get_ema_avg_fn(0.9),
        "ema_lerp": TSWA.get_ema_multi_avg_fn(0.9),
    }[method]
    traces = []

    @jax.jit
    def step(state, params):
        traces.append(1)
        return averaging.update(state, params, method=method)

    for dtype in (np.float64, np.float32):
        decay = 0.9 if method.startswith("ema") else None
        state = averaging.init({"w": jnp.zeros(3, dtype)}, decay=decay)
        ta = torch.zeros(3, dtype=TORCH_DTYPE[np.dtype(dtype)])
        for k, w in enumerate(WS):
            x = torch.tensor(w, dtype=ta.dtype)
            if k == 0:
                ta.copy_(x)
            elif method.endswith("lerp"):
                torch_fn([ta], [x], torch.tensor(k))
            else:
                ta.copy_(torch_fn(ta, x, torch.tensor(k)))
            state = step(state, {"w": jnp.asarray(w, dtype)})
            e = errlog.record(f"core averaging.update {method}", dtype, rel_err(state.avg["w"], ta.numpy()))
            assert e == 0.0, (method, dtype, k, np.asarray(state.avg["w"]).tolist(), ta.tolist())
        assert int(state.n) == 3
    assert len(traces) == 2  # one per dtype
    if method.startswith("ema"):  # the decay is data: editing it never recompiles
        state = step(state._replace(decay=jnp.asarray(0.5, state.decay.dtype)), {"w": jnp.zeros(3, np.float32)})
        assert len(traces) == 2
        assert np.allclose(np.asarray(state.avg["w"]), np.asarray(ta) * 0.5)


def test_averaged_model_errors_match_torch():
    m = Vec(np.float64)
    with pytest.raises(AssertionError, match="^Only one of avg_fn and multi_avg_fn should be provided$"):
        S.AveragedModel(m, avg_fn=S.get_swa_avg_fn(), multi_avg_fn=S.get_swa_multi_avg_fn())
    for factory in ("get_ema_avg_fn", "get_ema_multi_avg_fn"):
        for bad in (1.1, -0.5):
            with pytest.raises(ValueError) as terr:
                getattr(TSWA, factory)(bad)
            with pytest.raises(ValueError) as err:
                getattr(S, factory)(bad)
            assert str(err.value) == str(terr.value)
        getattr(S, factory)(1.0), getattr(S, factory)(0.0)  # the bounds are allowed, as in torch
    with pytest.raises(ValueError, match="Invalid decay value"):
        averaging.init({"w": jnp.zeros(2)}, decay=2.0)
    with pytest.raises(ValueError, match=r"'w': expected shape \(2,\) \(the averaged leaf\), got \(3,\)"):
        averaging.update(averaging.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="needs a decay"):
        averaging.update(averaging.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)}, method="ema")

    # another architecture: refused with the paths (torch zips and silently ignores the surplus)
    class Other(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3))
            self.v = nnx.Param(jnp.zeros(2))

    am = S.AveragedModel(m)
    am.update_parameters(m)
    before = snapshot(am)
    with pytest.raises(ValueError, match=r"parameters do not match.*not in the averaged model: \['v'\]"):
        am.update_parameters(Other())

    class Wide(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(4))
            self.fbuf = nnx.BatchStat(jnp.zeros(()))
            self.ibuf = nnx.BatchStat(jnp.zeros((), jnp.int64))

    with pytest.raises(ValueError, match=r"parameter 'w' has shape \(4,\), the averaged model's has \(3,\)"):
        am.update_parameters(Wide())
    with pytest.raises(TypeError, match="NNX Module"):
        am.update_parameters({"w": jnp.zeros(3)})
    after = snapshot(am)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_averaged_model_state_dict_round_trip():
    dtype = np.dtype(np.float64)
    m, t = Vec(dtype), TVec(torch.float64)
    am = S.AveragedModel(m, multi_avg_fn=S.get_ema_multi_avg_fn(0.9), use_buffers=True)
    tam = TSWA.AveragedModel(t, multi_avg_fn=TSWA.get_ema_multi_avg_fn(0.9), use_buffers=True)
    for k in range(2):
        set_vec(m, t, k, dtype)
        am.update_parameters(m)
        tam.update_parameters(t)
    sd, tsd = am.state_dict(), tam.state_dict()
    # n_averaged first, then "module." + the NNX path ('/' -> '.'): the same names as torch's for this model
    assert list(sd)[0] == list(tsd)[0] == "n_averaged"
    assert sorted(sd) == sorted(tsd) == ["module.fbuf", "module.ibuf", "module.w", "n_averaged"]
    for key in tsd:
        assert np.array_equal(np.asarray(sd[key]), tsd[key].numpy()), key
    # round trip into a fresh model, then one more update on both: the same numbers as torch
    device = jax.devices()[-1]  # device=: the copy lives there (conftest gives 8 host devices); the model's values are moved
    fresh = S.AveragedModel(Vec(dtype), device=device, multi_avg_fn=S.get_ema_multi_avg_fn(0.9), use_buffers=True)
    assert fresh.load_state_dict({k: np.asarray(v) for k, v in sd.items()}) == ([], [])
    tfresh = TSWA.AveragedModel(TVec(torch.float64), multi_avg_fn=TSWA.get_ema_multi_avg_fn(0.9), use_buffers=True)
    tfresh.load_state_dict(tsd)
    set_vec(m, t, 2, dtype)
    fresh.update_parameters(m)
    tfresh.update_parameters(t)
    assert np.array_equal(np.asarray(fresh.module.w[...]), tfresh.module.w.detach().numpy())
    assert int(fresh.n_averaged[...]) == 3 and int(fresh.module.ibuf[...]) == int(tfresh.module.ibuf) == 4
    assert fresh.module.w.get_value().devices() == fresh.n_averaged.get_value().devices() == {device}
    # bad loads: torch's messages, nothing written
    before = snapshot(fresh)
    bad = dict(sd)
    del bad["module.w"]
    bad["module.x"] = np.zeros(1)
    with pytest.raises(RuntimeError) as err:
        fresh.load_state_dict(bad)
    with pytest.raises(RuntimeError) as terr:
        tfresh.load_state_dict({**{k: v for k, v in tsd.items() if k != "module.w"}, "module.x": torch.zeros(1)})
    assert str(err.value) == str(terr.value)
    with pytest.raises(RuntimeError, match=r"size mismatch for module.w: copying a param with shape \(2,\)"):
        fresh.load_state_dict({**sd, "module.w": np.zeros(2)})
    assert all(np.array_equal(before[k], np.asarray(v)) for k, v in snapshot(fresh).items())


# --------------------------------------------------------------------------- SWALR, §4.3


class Two(nnx.Module):
    def __init__(self):
        self.a = nnx.Param(jnp.zeros(1))
        self.b = nnx.Param(jnp.zeros(1))


def sgd_pair(lrs):
    m = Two()
    ours = optim.SGD([{"params": [v], "lr": lr} for v, lr in zip([m.a, m.b], lrs)], lr=lrs[0])
    theirs = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs], lr=lrs[0])
    return ours, theirs


def lrs_of(opt):
    return [g["lr"] for g in opt.param_groups]


SWALR_CASES = {
    # name: (group lrs, build(opt, lib) -> schedulers, plan: which scheduler index steps at each iteration, golden)
    "E3_cos": ([0.1], dict(swa_lr=0.05, anneal_epochs=3), [[0]] * 10, [0.1, 0.0875, 0.0625, 0.05, 0.05]),
    "E3_linear": ([0.1], dict(swa_lr=0.05, anneal_epochs=3, anneal_strategy="linear"), [[0]] * 10, [0.1, 0.083333333, 0.066666667, 0.05]),
    "E10_cos": ([0.1], dict(swa_lr=0.05, anneal_epochs=10), [[0]] * 10,
                [0.1, 0.098776413, 0.095225425, 0.089694631, 0.082725425, 0.075, 0.067274575, 0.060305369, 0.054774575, 0.051223587, 0.05]),
    "E0": ([0.1], dict(swa_lr=0.05, anneal_epochs=0), [[0]] * 3, [0.05, 0.05, 0.05, 0.05]),
    "E1": ([0.1], dict(swa_lr=0.05, anneal_epochs=1), [[0]] * 3, [0.1, 0.05, 0.05, 0.05]),
    "two_groups": ([0.1, 0.2], dict(swa_lr=[0.05, 0.01], anneal_epochs=2, anneal_strategy="linear"), [[0]] * 3, None),
    "cosine_then_swalr": ([0.1], "cosine", [[1]] * 4 + [[0]] * 6,
                          [0.1, 0.09755283, 0.09045085, 0.07938926, 0.06545085, 0.06158814, 0.05386271, 0.05, 0.05, 0.05, 0.05]),
    "steplr_and_swalr": ([0.1], "steplr", [[1, 0]] * 6, [0.1, 0.0875, 0.04583333, 0.04791667, 0.05, 0.05, 0.05]),
}


def build(opt, lib, spec):
    """[SWALR, other scheduler?] on ``opt``; ``lib`` is torch.optim or groupopt.compat."""
    swa = lib.swa_utils.SWALR
    if spec == "cosine":
        other = lib.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return [swa(opt, swa_lr=0.05, anneal_epochs=3), other]
    if spec == "steplr":
        other = lib.lr_scheduler.StepLR(opt, 2, 0.5)
        return [swa(opt, swa_lr=0.05, anneal_epochs=4, anneal_strategy="linear"), other]
    return [swa(opt, **spec)]


@pytest.mark.parametrize("case", list(SWALR_CASES))
def test_swalr_traces_match_torch(case):
    lrs, spec, plan, golden = SWALR_CASES[case]
    ours, theirs = sgd_pair(lrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        scheds, tscheds = build(ours, optim, spec), build(theirs, torch.optim, spec)
        trace, ttrace = [lrs_of(ours)], [lrs_of(theirs)]
        for which in plan:
            for i in which:
                scheds[i].step()
                tscheds[i].step()
            trace.append(lrs_of(ours))
            ttrace.append(lrs_of(theirs))
    assert trace == ttrace  # the same Python floats
    assert list(ours.param_groups[0])[-2:] == list(theirs.param_groups[0])[-2:]  # torch's key order ('swa_lr' first)
    assert [g["initial_lr"] for g in ours.param_groups] == lrs
    if golden is not None:
        assert [t[0] for t in trace[: len(golden)]] == pytest.approx(golden, abs=1e-8)
    if case == "two_groups":
        assert np.allclose(trace, [[0.1, 0.2], [0.075, 0.105], [0.05, 0.01], [0.05, 0.01]], rtol=0, atol=1e-15)


def test_swalr_state_dict_epoch_arg_and_construction_errors():
    ours, theirs = sgd_pair([0.1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = optim.swa_utils.SWALR(ours, swa_lr=0.05, anneal_epochs=5, anneal_strategy="linear")
        ts = torch.optim.swa_utils.SWALR(theirs, swa_lr=0.05, anneal_epochs=5, anneal_strategy="linear")
        for _ in range(2):
            s.step()
            ts.step()
        sd, tsd = s.state_dict(), ts.state_dict()
        assert list(sd) == list(tsd)  # torch's keys, in torch's order; no anneal_func
        assert sd == tsd
        # round trip into a scheduler built with other settings: it continues as torch's
        ours2, theirs2 = sgd_pair([0.1])
        s2 = optim.swa_utils.SWALR(ours2, swa_lr=0.05, anneal_epochs=9)
        ts2 = torch.optim.swa_utils.SWALR(theirs2, swa_lr=0.05, anneal_epochs=9)
        s2.load_state_dict(sd)
        ts2.load_state_dict(tsd)
        assert s2.anneal_func(0.5) == ts2.anneal_func(0.5) == 0.5
        ours2.param_groups[0]["lr"] = theirs2.param_groups[0]["lr"] = lrs_of(ours)[0]
        for _ in range(4):
            s2.step(7)  # step(epoch) sets last_epoch only: the same lr as a plain step
            ts2.step(7)
            assert lrs_of(ours2) == lrs_of(theirs2)
        assert s2.last_epoch == ts2.last_epoch == 7 and s2._step_count == ts2._step_count
        with pytest.raises(ValueError, match="anneal_strategy must be one of"):
            s2.load_state_dict({**sd, "_anneal_strategy": "exp"})
        assert s2.state_dict() == ts2.state_dict()

    # construction errors: torch's messages; torch leaves 'swa_lr' in the groups, we leave them untouched
    bad = [
        dict(swa_lr=[0.05, 0.01]),
        dict(swa_lr=0.05, anneal_strategy="exp"),
        dict(swa_lr=0.05, anneal_epochs=2.0),
        dict(swa_lr=0.05, anneal_epochs=-1),
    ]
    for kw in bad:
        ours, theirs = sgd_pair([0.1])
        before = [dict(g) for g in ours.param_groups]
        with pytest.raises(ValueError) as terr:
            torch.optim.swa_utils.SWALR(theirs, **kw)
        with pytest.raises(ValueError) as err:
            optim.swa_utils.SWALR(ours, **kw)
        assert str(err.value) == str(terr.value)
        assert ("swa_lr" in theirs.param_groups[0]) == (kw["swa_lr"] == 0.05)  # torch's half-applied write
        assert [dict(g) for g in ours.param_groups] == before
    # a failure inside LRScheduler.__init__ (resuming without initial_lr) also leaves nothing behind
    ours, _ = sgd_pair([0.1])
    with pytest.raises(KeyError, match="initial_lr"):
        optim.swa_utils.SWALR(ours, swa_lr=0.05, last_epoch=3)
    assert "swa_lr" not in ours.param_groups[0]


# --------------------------------------------------------------------------- update_bn, §4.4


class LinBN(nnx.Module):
    """Linear(2, 2) -> BatchNorm(2) -> Dropout(0): float64 throughout (NNX's statistics are float32 by default)."""

    def __init__(self, d_in=2, d=2, momentum=0.7):
        rngs = nnx.Rngs(0)
        self.lin = nnx.Linear(d_in, d, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
        self.bn = nnx.BatchNorm(d, momentum=momentum, use_fast_variance=False, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
        self.bn.mean = nnx.BatchStat(jnp.zeros(d, jnp.float64))
        self.bn.var = nnx.BatchStat(jnp.ones(d, jnp.float64))
        self.drop = nnx.Dropout(0.0)

    def __call__(self, x):
        return _linbn_forward(self, x)  # compiled: NNX ops run eagerly would compile one by one


@nnx.jit
def _linbn_forward(m, x):
    return m.drop(m.bn(m.lin(x)))


def golden_pair():
    m = LinBN()
    m.lin.kernel[...] = jnp.eye(2, dtype=jnp.float64)
    m.lin.bias[...] = jnp.zeros(2, jnp.float64)
    m.bn.mean[...] = jnp.full(2, 5.0)
    m.bn.var[...] = jnp.full(2, 7.0)
    m.eval()
    m.drop.deterministic = False  # a sub-module in train mode inside an eval model
    t = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2, momentum=0.3), torch.nn.Dropout(0.0)).double()
    with torch.no_grad():
        t[0].weight.copy_(torch.eye(2))
        t[0].bias.zero_()
        t[1].running_mean.fill_(5)
        t[1].running_var.fill_(7)
        t[1].num_batches_tracked.fill_(9)
    t.eval()
    t[2].train()
    return m, t


def torch_batch_vars(batches):
    """torch's running_var after update_bn over each batch alone: that batch's unbiased variance."""
    out = []
    for b in batches:
        _, t = golden_pair()
        TSWA.update_bn([torch.tensor(b)], t)
        out.append(t[1].running_var.numpy().copy())
    return out


def test_update_bn_golden_against_torch(errlog):
    b1 = np.array([[1.0, 2.0], [3.0, 6.0]])
    b2 = np.array([[0.0, 0.0], [2.0, 1.0], [4.0, -1.0]])
    m, t = golden_pair()
    S.update_bn([(jnp.asarray(b1), "y"), [jnp.asarray(b2), 0]], m)
    TSWA.update_bn([(torch.tensor(b1), "y"), [torch.tensor(b2), 0]], t)
    tmean, tvar = t[1].running_mean.numpy(), t[1].running_var.numpy()
    assert tmean.tolist() == [2.0, 2.0] and tvar.tolist() == [3.0, 4.5]  # §4.4's published values
    # the mean: torch's (batches weighted equally)
    assert errlog.record("update_bn running mean", np.float64, rel_err(m.bn.mean[...], tmean)) <= 1e-15
    # the variance: NNX's batch variance is the biased one; torch's per-batch unbiased ones times (n_k - 1) / n_k, averaged
    ns = [len(b1), len(b2)]
    expected = np.mean([v * (n - 1) / n for v, n in zip(torch_batch_vars([b1, b2]), ns)], axis=0)
    assert errlog.record("update_bn running var (biased, per batch)", np.float64, rel_err(m.bn.var[...], expected)) <= 1e-15
    assert not np.allclose(np.asarray(m.bn.var[...]), tvar)  # the documented difference
    # momenta and modes restored: ours per module; torch flattens the Dropout's train mode into eval
    assert m.bn.momentum == 0.7 and t[1].momentum == 0.3
    assert m.bn.use_running_average is True and not t.training
    assert m.drop.deterministic is False and t[2].training is False
    assert int(t[1].num_batches_tracked) == 2


def test_update_bn_equal_batches_n_over_n_minus_1(errlog):
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 3)) for _ in range(3)]
    m = LinBN(3, 2)
    t = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).double()
    with torch.no_grad():
        t[0].weight.copy_(torch.tensor(np.asarray(m.lin.kernel[...]).T))
        t[0].bias.copy_(torch.tensor(np.asarray(m.lin.bias[...])))
    S.update_bn(iter([jnp.asarray(b) for b in batches]), m)
    TSWA.update_bn([torch.tensor(b) for b in batches], t)
    assert errlog.record("update_bn running mean", np.float64, rel_err(m.bn.mean[...], t[1].running_mean.numpy())) <= 1e-14
    e = rel_err(np.asarray(m.bn.var[...]) * 4 / 3, t[1].running_var.numpy())  # equal batches of n = 4
    assert errlog.record("update_bn var * n/(n-1)", np.float64, e) <= 1e-14


def test_update_bn_no_batchnorm_and_failures():
    def never():
        raise AssertionError("the loader must not be iterated")
        yield  # pragma: no cover

    S.update_bn(never(), Vec(np.float64))  # no BatchNorm: returns without iterating (as torch)

    m, _ = golden_pair()

    def breaks():
        yield jnp.ones((3, 2))
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        S.update_bn(breaks(), m)
    # nothing half-applied: statistics, momentum and modes as before
    assert np.asarray(m.bn.mean[...]).tolist() == [5.0, 5.0] and np.asarray(m.bn.var[...]).tolist() == [7.0, 7.0]
    assert m.bn.momentum == 0.7 and m.bn.use_running_average is True and m.drop.deterministic is False


# --------------------------------------------------------------------------- the SWA recipe


class MLPBN(nnx.Module):
    """Linear(3, 8, no bias) -> BatchNorm(8) -> tanh -> Linear(8, 2), float64 (statistics included)."""

    def __init__(self):
        rngs = nnx.Rngs(3)
        self.l0 = nnx.Linear(3, 8, use_bias=False, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)  # BN follows
        self.bn = nnx.BatchNorm(8, momentum=0.9, use_fast_variance=False, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
        self.bn.mean = nnx.BatchStat(jnp.zeros(8, jnp.float64))
        self.bn.var = nnx.BatchStat(jnp.ones(8, jnp.float64))
        self.l1 = nnx.Linear(8, 2, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return _mlpbn_forward(self, x)


@nnx.jit
def _mlpbn_forward(m, x):
    return m.l1(jnp.tanh(m.bn(m.l0(x))))


def make_mlpbn(seed=1):
    """MLPBN filled from numpy (built under eval_shape: no initializer compiles)."""
    m = nnx.eval_shape(MLPBN)
    rng = np.random.default_rng(seed)
    fills = {"l0/kernel": rng.uniform(-0.5, 0.5, (3, 8)), "bn/scale": 1 + 0.1 * rng.normal(size=8), "bn/bias": 0.1 * rng.normal(size=8),
             "bn/mean": np.zeros(8), "bn/var": np.ones(8), "l1/kernel": rng.uniform(-0.35, 0.35, (8, 2)), "l1/bias": 0.1 * rng.normal(size=2)}
    from groupopt.groups import flatten_with_paths

    paths, leaves, _ = flatten_with_paths(nnx.state(m))
    assert sorted(paths) == sorted(fills)
    for path, var in zip(paths, leaves):
        var.set_value(jax.device_put(fills[path]))
    return m


def torch_twin(m):
    t = torch.nn.Sequential(torch.nn.Linear(3, 8, bias=False), torch.nn.BatchNorm1d(8, momentum=0.1), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    with torch.no_grad():
        t[0].weight.copy_(torch.tensor(np.asarray(m.l0.kernel[...]).T))
        t[3].weight.copy_(torch.tensor(np.asarray(m.l1.kernel[...]).T))
        t[3].bias.copy_(torch.tensor(np.asarray(m.l1.bias[...])))
        t[1].weight.copy_(torch.tensor(np.asarray(m.bn.scale[...])))
        t[1].bias.copy_(torch.tensor(np.asarray(m.bn.bias[...])))
    return t


def twin_params(m, t):
    """(name, ours, torch's in NNX layout) for every parameter."""
    return [
        ("l0.kernel", m.l0.kernel[...], t[0].weight.detach().numpy().T),
        ("bn.scale", m.bn.scale[...], t[1].weight.detach().numpy()),
        ("bn.bias", m.bn.bias[...], t[1].bias.detach().numpy()),
        ("l1.kernel", m.l1.kernel[...], t[3].weight.detach().numpy().T),
        ("l1.bias", m.l1.bias[...], t[3].bias.detach().numpy()),
    ]


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


mse_grad = nnx.jit(nnx.grad(mse))


def test_swa_recipe_matches_torch(errlog):
    """SGD + cosine, SWA from epoch 3 with SWALR, AveragedModel each epoch, update_bn, evaluation."""
    rng = np.random.default_rng(1)
    n_batch, epochs, swa_start = 8, 7, 3
    X = rng.normal(size=(4, n_batch, 3))
    Y = np.tanh(X @ rng.normal(size=(3, 2))) + 0.1 * rng.normal(size=(4, n_batch, 2))
    model = make_mlpbn()
    tmodel = torch_twin(model)
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9)
    sched, tsched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10), torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=10)
    swa_model, tswa_model = S.AveragedModel(model), TSWA.AveragedModel(tmodel)
    swa_sched, tswa_sched = S.SWALR(opt, swa_lr=0.02, anneal_epochs=2), TSWA.SWALR(topt, swa_lr=0.02, anneal_epochs=2)
    for epoch in range(epochs):
        model.train()
        tmodel.train()
        for x, y in zip(X, Y):
            opt.step(mse_grad(model, jnp.asarray(x), jnp.asarray(y)))
            topt.zero_grad()
            torch.mean((tmodel(torch.tensor(x)) - torch.tensor(y)) ** 2).backward()
            topt.step()
        if epoch >= swa_start:
            swa_model.update_parameters(model)
            tswa_model.update_parameters(tmodel)
            swa_sched.step()
            tswa_sched.step()
        else:
            sched.step()
            tsched.step()
        assert lrs_of(opt) == lrs_of(topt)
    assert int(swa_model.n_averaged[...]) == int(tswa_model.n_averaged) == epochs - swa_start
    assert swa_model.num_compiles == 1
    for name, ours, theirs in twin_params(model, tmodel):
        assert errlog.record("recipe: trained params", np.float64, rel_err(ours, theirs)) <= 1e-10, name
    for name, ours, theirs in twin_params(swa_model.module, tswa_model.module):
        assert errlog.record("recipe: averaged params", np.float64, rel_err(ours, theirs)) <= 1e-10, name

    loader = [(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(X, Y)]
    S.update_bn(loader, swa_model)
    TSWA.update_bn([(torch.tensor(x), torch.tensor(y)) for x, y in zip(X, Y)], tswa_model)
    tbn = tswa_model.module[1]
    assert errlog.record("recipe: update_bn mean", np.float64, rel_err(swa_model.module.bn.mean[...], tbn.running_mean.numpy())) <= 1e-10
    # equal batches of n: NNX's running var (biased) * n / (n - 1) is torch's (unbiased)
    e = rel_err(np.asarray(swa_model.module.bn.var[...]) * n_batch / (n_batch - 1), tbn.running_var.numpy())
    assert errlog.record("recipe: update_bn var * n/(n-1)", np.float64, e) <= 1e-10

    # evaluation: the same outputs once torch's running var is put in NNX's convention; not before
    swa_model.eval()
    tswa_model.eval()
    xt = rng.normal(size=(5, 3))
    out = np.asarray(swa_model(jnp.asarray(xt)))
    with torch.no_grad():
        raw = tswa_model(torch.tensor(xt)).numpy()
        tbn.running_var.mul_((n_batch - 1) / n_batch)
        biased = tswa_model(torch.tensor(xt)).numpy()
    assert errlog.record("recipe: eval outputs (biased var)", np.float64, rel_err(out, biased)) <= 1e-10
    assert rel_err(out, raw) > 1e-6  # the documented BatchNorm variance difference
