"""Group hyperparameters by name through any wrapper (groupopt.get/set_hyperparams, hyperparams_for_logging).

* nnx.Optimizer over a grouped AdamW (a frozen group), lrs edited by group name outside ``nnx.jit``
  (in place) and inside it, matches torch.optim.AdamW given the same edits, step by step, in float64 and
  float32; the step is traced once; the optimizer's Variables keep their identity and type.
* Pure states under optax.chain, optax.MultiSteps, groupopt.accumulate, groupopt.reduce_on_plateau and a
  TrainState: get/set outside and inside ``jit``, the edit reaches the update (lr 0 leaves a group's
  leaves exactly as they were), one compiled step for every edit, the logging dict built on tracers.
* Frozen groups, unknown names, schedules, several grouped transformations in one state, overrides,
  nothing half-applied after a bad value, the examples run.
"""

from __future__ import annotations

import pickle
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from flax.training import train_state

import groupopt
from torch_port import compare_models, errlog, grads_like, make_pair  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ nnx.Optimizer against torch


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nnx_optimizer_lr_edits_by_name_match_torch_and_trace_once(dtype, errlog):
    model, tmodel = make_pair("net", dtype=dtype, seed=3)
    tx = groupopt.grouped(model, [
        groupopt.group(model.block1, name="block1"),
        groupopt.group(model.block2, name="block2", lr=5e-3, betas=(0.8, 0.99)),
        groupopt.group(model.fc, name="fc", frozen=True),
    ], rule=groupopt.AdamWRule(), lr=1e-2, weight_decay=1e-2)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    topt = torch.optim.AdamW([
        {"params": tmodel.block1.parameters()},
        {"params": tmodel.block2.parameters(), "lr": 5e-3, "betas": (0.8, 0.99)},
    ], lr=1e-2, weight_decay=1e-2)
    lr_var = opt.opt_state.hyperparams[1]["lr"]
    var_type = type(lr_var)
    traces = 0

    @nnx.jit
    def step(model, opt, grads, lr1):
        nonlocal traces
        traces += 1
        groupopt.set_hyperparams(opt, "block1", lr=lr1)  # inside jit: into the traced Variables
        opt.update(model, grads)
        return groupopt.hyperparams_for_logging(opt)

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(6, 5))).to(tmodel.fc.weight.dtype)
    y = torch.from_numpy(rng.normal(size=(6, 3))).to(tmodel.fc.weight.dtype)
    template = nnx.state(model, nnx.Param)
    for i in range(6):
        if i % 2 == 0:  # outside jit, in place: by name, lr and a tuple
            lr2, betas2 = 5e-3 / (1 + i), (0.8 + 0.01 * i, 0.99)
            assert groupopt.set_hyperparams(opt, "block2", lr=lr2, betas=betas2) is opt
            topt.param_groups[1]["lr"], topt.param_groups[1]["betas"] = lr2, betas2
        lr1 = 1e-2 * (0.7 ** i)
        topt.param_groups[0]["lr"] = lr1
        topt.zero_grad()
        torch.mean((tmodel(x) - y) ** 2).backward()
        grads = grads_like(template, model, tmodel)
        logs = step(model, opt, grads, jnp.asarray(lr1))
        topt.step()
        compare_models(model, tmodel, errlog, "nnx.Optimizer + lr edits by name")
        assert float(logs["block1/lr"]) == pytest.approx(lr1, rel=1e-15)
        assert float(logs["block2/betas/0"]) == pytest.approx(topt.param_groups[1]["betas"][0], rel=1e-15)
        assert not any(k.startswith("fc/") for k in logs)
    assert traces == 1
    # in place: the very same Variable, of the same type, holds the value torch used
    assert opt.opt_state.hyperparams[1]["lr"] is lr_var and type(lr_var) is var_type and isinstance(lr_var, nnx.Variable)
    assert float(groupopt.get_hyperparams(opt, "block2")["lr"]) == topt.param_groups[1]["lr"]
    # a bad value changes nothing (lr checked and valid, betas not): nothing half-applied
    with pytest.raises(ValueError, match=r"group 1 \(block2\): betas must be a sequence of 2 values"):
        groupopt.set_hyperparams(opt, "block2", lr=0.5, betas=(0.9,))
    assert float(lr_var.get_value()) == topt.param_groups[1]["lr"]
    # the tx's own methods reach the Variables too (in place, no type swap; no state[1] by hand)
    assert tx.set_hyperparams(opt.opt_state, "block2", lr=0.25) is opt.opt_state
    assert opt.opt_state.hyperparams[1]["lr"] is lr_var and float(lr_var.get_value()) == 0.25
    assert [hp.get("lr") for hp in tx.hyperparams(opt.opt_state)] == [pytest.approx(1e-2 * 0.7 ** 5), 0.25, None]


def test_nnx_optimizer_under_multisteps_and_chain():
    model, _ = make_pair("net", seed=1)
    tx = groupopt.grouped(model, [groupopt.group(model.block1, name="b1", lr=0.1),
                                  groupopt.group(groupopt.rest(), name="rest", frozen=True)], rule=groupopt.SGDRule())
    opt = nnx.Optimizer(model, optax.MultiSteps(optax.chain(optax.identity(), tx), every_k_schedule=2), wrt=nnx.Param)
    assert set(groupopt.get_hyperparams(opt)) == {"b1"}
    groupopt.set_hyperparams(opt, "b1", lr=0.0, momentum=0.5)
    inner = opt.opt_state.inner_opt_state[1]
    assert isinstance(inner.hyperparams[0]["lr"], nnx.Variable)
    assert float(inner.hyperparams[0]["lr"].get_value()) == 0.0 and float(tx.hyperparams(opt.opt_state)[0]["momentum"]) == 0.5
    with pytest.raises(ValueError, match="group 1 \\(rest\\) is frozen"):
        groupopt.get_hyperparams(opt, "rest")


# ------------------------------------------------------------------ pure states through wrappers

PARAMS = {"enc": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}, "head": {"w": jnp.linspace(0.5, -0.5, 8).reshape(4, 2)},
          "emb": jnp.ones(3)}
GRADS = jax.tree.map(lambda p: 0.1 * jnp.cos(p) + 0.05, PARAMS)


def _grouped():
    return groupopt.grouped(PARAMS, [
        groupopt.group("enc/**", name="enc", lr=1e-2),
        groupopt.group("head/**", name="head", lr=2e-2, weight_decay=0.0),
        groupopt.group("emb", name="emb", frozen=True),
    ], rule=groupopt.AdamWRule())


WRAPPERS = {
    "plain": lambda t: t,
    "optax.chain": lambda t: optax.chain(optax.clip_by_global_norm(10.0), t),
    "optax.MultiSteps": lambda t: optax.MultiSteps(t, every_k_schedule=2),
    "groupopt.accumulate": lambda t: groupopt.accumulate(t, 2),
    "groupopt.reduce_on_plateau": lambda t: groupopt.reduce_on_plateau(t, patience=5),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_get_set_through_wrapper_outside_and_inside_jit(wrapper):
    wtx = WRAPPERS[wrapper](_grouped())
    extra = {"value": jnp.asarray(1.0)} if wrapper == "groupopt.reduce_on_plateau" else {}
    state = wtx.init(PARAMS)
    seen = []

    @jax.jit
    def run(params, state, enc_lr):
        state = groupopt.set_hyperparams(state, "enc", lr=enc_lr)  # inside jit: a traced value
        for _ in range(2):  # two calls: one update for the accumulating wrappers
            updates, state = wtx.update(GRADS, state, params, **extra)
            params = optax.apply_updates(params, updates)
        logs = groupopt.hyperparams_for_logging(state)
        seen.append(all(isinstance(v, jax.core.Tracer) for v in logs.values()))
        return params, state, groupopt.get_hyperparams(state, "enc")["lr"], logs

    assert float(groupopt.get_hyperparams(state, "head")["lr"]) == 2e-2
    s0 = groupopt.set_hyperparams(state, "head", lr=0.0)  # outside jit: a new state, the old one untouched
    assert float(groupopt.get_hyperparams(state, "head")["lr"]) == 2e-2
    assert jax.tree.structure(s0) == jax.tree.structure(state)
    p1, s1, enc_lr, logs = run(PARAMS, s0, jnp.asarray(0.05))
    np.testing.assert_array_equal(p1["head"]["w"], PARAMS["head"]["w"])  # lr 0 (set outside): unchanged
    assert np.all(np.asarray(p1["enc"]["w"]) != np.asarray(PARAMS["enc"]["w"]))
    assert float(enc_lr) == 0.05 and float(logs["enc/lr"]) == 0.05 and float(logs["head/lr"]) == 0.0
    s1 = groupopt.set_hyperparams(s1, "head", lr=0.05)
    p2, s2, _, logs = run(p1, s1, jnp.asarray(0.0))
    np.testing.assert_array_equal(p2["enc"]["w"], p1["enc"]["w"])  # lr 0 (set inside jit): unchanged
    assert np.all(np.asarray(p2["head"]["w"]) != np.asarray(p1["head"]["w"]))
    np.testing.assert_array_equal(p2["emb"], PARAMS["emb"])  # frozen
    assert run._cache_size() == 1 and seen == [True]  # one trace for all edits; logging on tracers
    assert sorted(logs) == sorted(f"{g}/{k}" for g in ("enc", "head")
                                  for k in ("lr", "betas/0", "betas/1", "eps", "weight_decay"))
    assert float(logs["enc/betas/1"]) == 0.999 and float(logs["head/weight_decay"]) == 0.0


def test_train_state_and_errors():
    tx = _grouped()
    ts = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
    ts2 = groupopt.set_hyperparams(ts, "head", lr=0.5, betas=[0.5, 0.6])
    assert isinstance(ts2, train_state.TrainState) and ts2.tx is tx
    hp = groupopt.get_hyperparams(ts2, "head")
    assert float(hp["lr"]) == 0.5 and tuple(map(float, hp["betas"])) == (0.5, 0.6)
    assert hp["lr"].dtype == groupopt.get_hyperparams(ts, "head")["lr"].dtype  # dtype kept: no recompile
    assert list(groupopt.get_hyperparams(ts)) == ["enc", "head"]  # frozen groups left out
    with pytest.raises(ValueError, match=r"group 2 \(emb\) is frozen: it has no hyperparameters"):
        groupopt.get_hyperparams(ts, "emb")
    with pytest.raises(ValueError, match=r"group 2 \(emb\) is frozen"):
        groupopt.set_hyperparams(ts, "emb", lr=0.1)
    with pytest.raises(KeyError, match=r"no group named 'dec'; groups: \['enc', 'head', 'emb'\]"):
        groupopt.get_hyperparams(ts, "dec")
    with pytest.raises(KeyError, match=r"group 0 \(enc\) has no hyperparameter 'momentum'"):
        groupopt.set_hyperparams(ts, "enc", momentum=0.9)
    with pytest.raises(ValueError, match="no groupopt GroupedState"):
        groupopt.get_hyperparams(optax.adam(1e-3).init(PARAMS))
    assert float(groupopt.get_hyperparams(ts, 1)["lr"]) == 2e-2  # by index too


def test_several_grouped_transformations_in_one_state():
    a = _grouped()
    b = groupopt.grouped(PARAMS, [  # the same names; enc's lr follows a schedule, so a and b differ
        groupopt.group("enc/**", name="enc", lr=groupopt.schedules.warmup_linear(1e-2, 4, 10)),
        groupopt.group("head/**", name="head", lr=2e-2, weight_decay=0.0),
        groupopt.group("emb", name="emb", frozen=True),
    ], rule=groupopt.AdamWRule())
    c = groupopt.sgd(lr=0.1, params=PARAMS)  # one group, named "all"
    tx = optax.chain(a, b, c)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"holds 3 grouped transformations .*pass tx="):
        groupopt.get_hyperparams(state)
    with pytest.raises(ValueError, match=r"group 'head' is in 2 grouped transformations of this state \(at \['0', '1'\]\)"):
        groupopt.set_hyperparams(state, "head", lr=0.3)
    assert float(groupopt.get_hyperparams(state, "all")["lr"]) == 0.1  # a name found once needs no tx=
    s2 = groupopt.set_hyperparams(state, "head", tx=b, lr=0.3)
    assert float(groupopt.get_hyperparams(s2, "head", tx=b)["lr"]) == 0.3
    assert float(groupopt.get_hyperparams(s2, "head", tx=a)["lr"]) == 2e-2
    with pytest.raises(ValueError, match=r"group 0 \(enc\): lr follows a schedule; it cannot be set by hand"):
        groupopt.set_hyperparams(state, "enc", tx=b, lr=0.3)
    logs = groupopt.hyperparams_for_logging(s2, tx=c, prefix="sgd/")
    assert set(logs) == {"sgd/all/lr", "sgd/all/momentum", "sgd/all/dampening", "sgd/all/weight_decay"}
    with pytest.raises(ValueError, match="no grouped state of this tx"):
        groupopt.get_hyperparams(state[0], tx=b)
    with pytest.raises(TypeError, match="tx= must be a groupopt grouped transformation"):
        groupopt.get_hyperparams(state, tx=tx)


def test_overrides_base_name_and_pickled_state():
    params = {"l0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "l1": {"kernel": jnp.ones((3, 1))}}
    tx = groupopt.grouped(params, [groupopt.group("l0/**", name="l0"), groupopt.group("l1/**", name="l1")],
                          rule=groupopt.AdamWRule(), lr=1e-2, weight_decay=0.1,
                          overrides=[groupopt.override("*/bias", weight_decay=0.0, name="no_decay")])
    state = optax.chain(optax.identity(), tx).init(params)
    s2 = groupopt.set_hyperparams(state, "l0", lr=0.3)  # the group as given: both its sub-groups
    hps = groupopt.get_hyperparams(s2)
    assert {g: float(h["lr"]) for g, h in hps.items()} == {"l0": 0.3, "l0+no_decay": 0.3, "l1": 1e-2}
    back = pickle.loads(pickle.dumps(jax.device_get(state)))  # the overrides are not pickled
    with pytest.raises(ValueError, match=r"split by overrides into sub-groups \['l0\+no_decay', 'l0'\].*pass tx="):
        groupopt.set_hyperparams(back, "l0", lr=0.3)
    s3 = groupopt.set_hyperparams(back, "l0", tx=tx, lr=0.3)
    assert {g: float(h["lr"]) for g, h in groupopt.get_hyperparams(s3).items()} == {"l0": 0.3, "l0+no_decay": 0.3, "l1": 1e-2}
    s4 = groupopt.set_hyperparams(state, "l0", weight_decay=0.5)  # not where the override fixed it
    assert {g: float(h["weight_decay"]) for g, h in groupopt.get_hyperparams(s4).items()} == {
        "l0": 0.5, "l0+no_decay": 0.0, "l1": 0.1}


# ------------------------------------------------------------------ the examples


@pytest.mark.parametrize("name", ["nnx_optimizer.py", "linen_train_state.py"])
def test_example_runs(name, capsys):
    ns = runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    out = capsys.readouterr().out
    assert ns["traces"] == 1 and "train_step traced 1 time(s)" in out
    lrs = [float(v) for v in __import__("re").findall(r"head/lr=([0-9.e-]+)", out)]
    first = lrs[0]
    assert lrs == pytest.approx([first * 0.5 ** e for e in range(len(lrs))]) and len(lrs) == 3  # one edit per epoch, seen in the logs
    losses = [float(v) for v in __import__("re").findall(r"loss ([0-9.]+)", out)]
    assert losses[-1] < losses[0]
