"""Any Optax transformation as a group's rule (groupopt.optax_rule), next to torch-exact groups.

* an ``optax.lion`` group equals plain ``optax.lion`` on its subset (bitwise, float32 and
  float64), while an AdamW group in the same transformation equals torch.optim.AdamW;
* its hyperparameters are groupopt state: ``set_hyperparams`` edits and a schedule, compared
  with plain Optax doing the same, trace and compile exactly once;
* an ``optax.contrib.muon`` group (and its state through Orbax), a chain whose ``clip_by_global_norm``
  acts per group, a ready-made transformation (fixed hyperparameters);
* state through Orbax (``groupopt.checkpoint``), sharding (placed like the parameters,
  ``zero1``), ``report()``; clear errors for what is not a transformation.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import groupopt
from groupopt import schedules
from groupopt.checkpoint import restore_state, save_state
from groupopt.sharding import zero1

STEPS = 6


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "body": {"w": rng.standard_normal((8, 4)).astype(dtype), "b": rng.standard_normal(4).astype(dtype)},
        "head": {"w": rng.standard_normal((4, 8)).astype(dtype), "b": rng.standard_normal(8).astype(dtype)},
    }


def make_grads(p0, n, seed=1):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), p0) for _ in range(n)]


@jax.jit(static_argnums=0)
def optax_step(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def optax_run(tx, params, grads, edit=None):
    """Plain Optax on a subtree, jitted like groupopt's step (so XLA fuses alike): ``edit(k)``
    (optional) rebuilds the transformation before step k."""
    state = tx.init(params)
    for k, g in enumerate(grads):
        params, state = optax_step(tx if edit is None else edit(k), g, state, params)
    return params


def assert_same(a, b, dtype, what):
    """Bitwise, or at most 1e-7 (float32) / 1e-14 (float64) relative to the largest magnitude."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype == dtype, (what, x.dtype, y.dtype)
        err = float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))
        assert err <= (1e-7 if dtype == np.float32 else 1e-14), (what, err)


@contextlib.contextmanager
def count_backend_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------- lion + torch AdamW


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lion_group_is_plain_optax_and_adamw_group_is_torch(dtype):
    p0 = make_params(dtype)
    grads = make_grads(p0, STEPS)
    tx = groupopt.grouped(
        p0,
        [groupopt.group("head/*", name="head", rule=groupopt.optax_rule(optax.lion, learning_rate=3e-3, b1=0.8)),
         groupopt.group("body/*", name="body", lr=1e-2)],
        rule=groupopt.AdamWRule(), weight_decay=0.05,
    )
    # shared defaults reach the lion group's unset keys (weight_decay), never the ones it was given
    assert tx.hyperparams(tx.init(p0))[0] == {"learning_rate": 3e-3, "b1": 0.8, "b2": 0.99, "weight_decay": 0.05}
    step = jax.jit(tx.apply)
    state = tx.init(p0)
    params = p0
    for g in grads:
        params, state = step(params, g, state)

    lion = optax_run(optax.lion(3e-3, b1=0.8, weight_decay=0.05), p0["head"], [g["head"] for g in grads])
    np.testing.assert_array_equal(params["head"]["w"], lion["w"])  # bitwise
    np.testing.assert_array_equal(params["head"]["b"], lion["b"])
    assert params["head"]["w"].dtype == dtype

    t = {k: torch.tensor(v, requires_grad=True) for k, v in p0["body"].items()}
    topt = torch.optim.AdamW([t["b"], t["w"]], lr=1e-2, weight_decay=0.05)
    for g in grads:
        for k in t:
            t[k].grad = torch.tensor(g["body"][k])
        topt.step()
    for k in t:
        a, b = np.asarray(params["body"][k]), t[k].detach().numpy()
        err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        assert err <= (1e-6 if dtype == np.float32 else 1e-14), (k, err)

    text = groupopt.report(tx, p0)
    assert "optax.lion" in text and "learning_rate=0.003" in text


# --------------------------------------------------------------------------- hyperparameters are state


def test_learning_rate_edits_and_schedule_never_recompile():
    p0 = make_params(np.float32, seed=2)
    grads = make_grads(p0, 12, seed=3)
    sched = schedules.exponential(1e-2, 0.8)
    tx = groupopt.grouped(
        p0,
        [groupopt.group("head/*", name="lion", rule=groupopt.optax_rule(optax.lion, learning_rate=1e-3)),
         groupopt.group("body/*", name="adam", rule=groupopt.optax_rule(optax.adam, learning_rate=sched, b1=0.85))],
        rule=groupopt.AdamWRule(),
    )
    traces = 0

    def f(params, grads, state):
        nonlocal traces
        traces += 1
        return tx.apply(params, grads, state)

    step = jax.jit(f)
    lrs = [1e-3 * (1 + k % 3) for k in range(len(grads))]
    b2s = [0.99 - 1e-3 * (k % 3) for k in range(len(grads))]
    state, params = tx.init(p0), jax.tree.map(jnp.asarray, p0)
    with contextlib.ExitStack() as stack:
        for k, g in enumerate(grads):
            if k == 2:
                events = stack.enter_context(count_backend_compiles())
            state = tx.set_hyperparams(state, "lion", learning_rate=lrs[k], b2=b2s[k])
            params, state = step(params, g, state)
    assert traces == 1 and step._cache_size() == 1
    assert events == [], events
    hp = tx.hyperparams(state)
    assert hp[0]["learning_rate"] == pytest.approx(lrs[-1]) and hp[1]["learning_rate"] == pytest.approx(sched(len(grads) - 1))
    with pytest.raises(ValueError, match="learning_rate follows a schedule"):
        tx.set_hyperparams(state, "adam", learning_rate=0.1)
    with pytest.raises(KeyError, match="no hyperparameter 'lr'"):
        tx.set_hyperparams(state, "lion", lr=0.1)

    # plain Optax with the same edits (the transformation rebuilt with the new Python floats)
    lion = functools.lru_cache(optax.lion)  # one transformation (one compile) per distinct setting
    lion = optax_run(optax.lion(1e-3), p0["head"], [g["head"] for g in grads],
                     edit=lambda k: lion(lrs[k], b2=b2s[k]))
    adam = optax_run(optax.adam(lambda c: sched(c), b1=0.85), p0["body"], [g["body"] for g in grads])
    np.testing.assert_array_equal(params["head"]["w"], lion["w"])
    np.testing.assert_array_equal(params["head"]["b"], lion["b"])
    assert_same(params["body"], adam, np.float32, "scheduled adam")


# --------------------------------------------------------------------------- muon, chains


def test_muon_group_is_plain_optax_and_survives_a_checkpoint(tmp_path):
    """A muon group equals plain optax.contrib.muon; its state (a dict of masked chains) goes through
    Orbax bit-exactly, and the run resumed from the checkpoint continues identically."""
    make, kwargs, dtype = optax.contrib.muon, dict(learning_rate=0.02, beta=0.9, weight_decay=0.01), np.float32
    p0 = make_params(dtype, seed=4)
    grads = make_grads(p0, 5, seed=5)
    rule = groupopt.optax_rule(make, **kwargs)
    assert set(rule.hyperparams) == {"learning_rate", "beta", "eps", "weight_decay", "adam_b1", "adam_b2",
                                     "adam_eps_root", "adam_weight_decay"}  # ns_steps (an int), ns_coeffs: static
    assert rule.options()["ns_steps"] == 5 and rule.options()["nesterov"] is True
    tx = groupopt.grouped(p0, [groupopt.group("body/*", rule=rule), groupopt.group("head/*", lr=1e-2)],
                          rule=groupopt.AdamWRule())
    step = jax.jit(tx.apply)
    state, params = tx.init(p0), jax.tree.map(jnp.asarray, p0)
    for k, g in enumerate(grads):
        if k == 2:
            save_state(tmp_path / "ckpt", state)
            saved = (params, state)
        params, state = step(params, g, state)
    ref = optax_run(make(**kwargs), p0["body"], [g["body"] for g in grads])
    assert_same(params["body"], ref, dtype, "muon")
    assert rule.name == "optax.contrib.muon"
    assert groupopt.report(tx, p0).splitlines()[2].split()[1].startswith(rule.name)  # + its boolean options on

    restored = restore_state(tmp_path / "ckpt", tx.init(p0))
    assert jax.tree.structure(restored) == jax.tree.structure(saved[1])
    jax.tree.map(np.testing.assert_array_equal, restored, saved[1])
    resumed = saved[0], restored
    for g in grads[2:]:
        resumed = step(resumed[0], g, resumed[1])
    jax.tree.map(np.testing.assert_array_equal, resumed, (params, state))


def clipped_sgd(learning_rate, max_norm, momentum=0.9):
    """A chain: clip by the global norm (of whatever tree it is given), then SGD with momentum."""
    return optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(learning_rate, momentum=momentum))


def test_chain_clips_by_each_groups_own_norm():
    p0 = make_params(np.float64, seed=6)
    grads = make_grads(p0, 4, seed=7)
    grads = [dict(g, head=jax.tree.map(lambda x: 10 * x, g["head"])) for g in grads]  # head's norm dominates
    rule = groupopt.optax_rule(clipped_sgd, learning_rate=0.1, max_norm=1.0)
    assert set(rule.hyperparams) == {"learning_rate", "max_norm", "momentum"}
    tx = groupopt.grouped(p0, [groupopt.group("body/*", name="body"), groupopt.group("head/*", name="head", max_norm=2.0)],
                          rule=rule)
    step = jax.jit(tx.apply)
    state, params = tx.init(p0), p0
    for g in grads:
        params, state = step(params, g, state)
    for name, max_norm in [("body", 1.0), ("head", 2.0)]:
        ref = optax_run(clipped_sgd(0.1, max_norm), p0[name], [g[name] for g in grads])
        assert_same(params[name], ref, np.float64, name)
    # clipping the whole tree at once gives other numbers: the group-level clip is what acted
    whole = optax_run(clipped_sgd(0.1, 1.0), p0, grads)
    assert float(np.max(np.abs(np.asarray(whole["body"]["w"]) - np.asarray(params["body"]["w"])))) > 1e-3

    # a ready-made transformation: hyperparameters fixed (nothing in groupopt's state)
    fixed = groupopt.grouped(p0, [groupopt.group("body/*", rule=clipped_sgd(0.1, 1.0))], rule=groupopt.SGDRule)
    st, pp, fixed_step = fixed.init(p0), p0, jax.jit(fixed.apply)
    for g in grads:
        pp, st = fixed_step(pp, g, st)
    assert_same(pp["body"], optax_run(clipped_sgd(0.1, 1.0), p0["body"], [g["body"] for g in grads]), np.float64, "fixed")
    np.testing.assert_array_equal(pp["head"]["w"], p0["head"]["w"])  # in no group
    assert fixed.hyperparams(st)[0] == {}
    with pytest.raises(KeyError, match="no hyperparameter 'learning_rate'"):
        fixed.set_hyperparams(st, 0, learning_rate=0.2)


# --------------------------------------------------------------------------- state: checkpoint, sharding


def test_state_is_placed_like_the_parameters():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    p0 = make_params(np.float32, seed=10)
    g = make_grads(p0, 1, seed=11)[0]
    shard = {"body": {"w": P("model", None), "b": P()}, "head": {"w": P(None, "model"), "b": P("model")}}
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), p0, shard)
    groups = [groupopt.group("head/*", rule=groupopt.optax_rule(optax.lion, learning_rate=1e-3)), groupopt.group("body/*")]
    for state_sharding, spec in [(None, P(None, "model")), (zero1("data"), P("data", "model"))]:
        tx = groupopt.grouped(params, groups, rule=groupopt.AdamWRule(), state_sharding=state_sharding)
        state = tx.init(params)
        lion = state.groups[0].slots["optax_state"][0]  # chain: (ScaleByLionState, decay, lr)
        assert lion.mu[1].sharding.spec == spec  # member order: head/b, head/w
        assert lion.count.sharding.spec == P()  # replicated on the parameters' mesh
        new, state = jax.jit(tx.apply)(params, g, state)
        lion = state.groups[0].slots["optax_state"][0]
        assert lion.mu[1].sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)
        assert new["head"]["w"].sharding.is_equivalent_to(params["head"]["w"].sharding, 2)
        ref = optax_run(optax.lion(1e-3), p0["head"], [g["head"]])
        np.testing.assert_array_equal(new["head"]["w"], ref["w"])


# --------------------------------------------------------------------------- errors


def branchy(learning_rate, weight_decay=0.0):
    """Uses a hyperparameter's value in Python: it must be static."""
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))
    return optax.sgd(learning_rate)


def test_clear_errors():
    p0 = {"w": jnp.ones(3), "v": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"rule must be .*optax.GradientTransformation.*optax_rule\(optax.lion"):
        groupopt.grouped(p0, [groupopt.group("w", rule=optax.lion)], rule=groupopt.SGDRule)  # the factory, not called
    with pytest.raises(TypeError, match="rule must be .* got int"):
        groupopt.grouped(p0, [groupopt.group("w", rule=3)], rule=groupopt.SGDRule)
    with pytest.raises(TypeError, match=r"optax_rule\(<lambda>\): it returned int, not an optax.GradientTransformation"):
        groupopt.optax_rule(lambda learning_rate: 3, learning_rate=0.1)
    with pytest.raises(TypeError, match="expected an Optax factory .* got str"):
        groupopt.optax_rule("lion")
    with pytest.raises(TypeError, match=r"optax.lion has no argument 'lr'; its arguments: \['learning_rate'"):
        groupopt.optax_rule(optax.lion, lr=1e-3)
    with pytest.raises(TypeError, match="missing required argument 'learning_rate'"):
        groupopt.optax_rule(optax.lion)
    with pytest.raises(TypeError, match="takes no arguments"):
        groupopt.optax_rule(optax.lion(1e-3), learning_rate=1e-3)
    with pytest.raises(TypeError, match=r"group 0: optax.lion has no option or hyperparameter 'lr'"):
        groupopt.grouped(p0, [groupopt.group("w", rule=groupopt.optax_rule(optax.lion, learning_rate=1e-3), lr=0.1)],
                         rule=groupopt.SGDRule)
    # values given to optax_rule win over grouped()'s shared defaults; a group's own values win over both
    bound = groupopt.grouped(p0, [groupopt.group("w", name="w"), groupopt.group("v", name="v", weight_decay=0.3)],
                             rule=groupopt.optax_rule(optax.lion, learning_rate=1e-3, weight_decay=0.2), weight_decay=0.05)
    assert [h["weight_decay"] for h in bound.hyperparams(bound.init(p0))] == [0.2, 0.3]
    with pytest.raises(ValueError, match="per-slice values"):
        groupopt.grouped(p0, [groupopt.group("w", learning_rate=[0.1, 0.2, 0.3])],
                         rule=groupopt.optax_rule(optax.lion, learning_rate=1e-3))
    # a hyperparameter used in Python: a clear error when traced, then fixed with static=
    tx = groupopt.grouped(p0, [groupopt.group("w")], rule=groupopt.optax_rule(branchy, learning_rate=0.1, weight_decay=0.5))
    with pytest.raises(TypeError, match=r"group 0 \(branchy\): .*static=\(\.\.\.\)"):
        jax.jit(tx.apply)(p0, p0, tx.init(p0))
    tx = groupopt.grouped(p0, [groupopt.group("w")],
                          rule=groupopt.optax_rule(branchy, learning_rate=0.1, weight_decay=0.5, static="weight_decay"))
    new, _ = jax.jit(tx.apply)(p0, p0, tx.init(p0))
    np.testing.assert_array_equal(new["w"], optax_run(branchy(0.1, 0.5), p0["w"], [p0["w"]]))
    np.testing.assert_array_equal(new["v"], p0["v"])
