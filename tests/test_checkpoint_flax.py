"""Checkpoints the Flax way: model state (frozen params included) + optimizer + scheduler through
Orbax's CheckpointManager; options passed through; step numbering; all-or-nothing restore.

Every resume restores onto *fresh objects built with another init* and must continue exactly as the
uninterrupted run, bit for bit. The model has an embedding in no optimizer group (frozen), batch
statistics and a dropout RNG stream, so any of them left out of a checkpoint shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import groupopt
import groupopt.compat as optim
from groupopt.checkpoint import Checkpointer


class Net(nnx.Module):
    def __init__(self, seed: int, hidden: int = 8):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(10, 4, rngs=rngs)  # in no optimizer group: frozen
        self.a = nnx.Linear(4, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)  # batch statistics: not Params
        self.drop = nnx.Dropout(0.25, rngs=rngs)  # an RNG stream: its count advances
        self.b = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, ids):
        return self.b(self.drop(self.bn(jnp.tanh(self.a(self.embed(ids).mean(1))))))


def loss_fn(model, ids, y):
    return jnp.mean((model(ids) - y) ** 2)


GRAPHDEF, ABSTRACT = nnx.split(nnx.eval_shape(lambda: Net(0)))


@jax.jit
def _grads(pure, ids, y):
    model = nnx.merge(GRAPHDEF, jax.tree.unflatten(jax.tree.structure(ABSTRACT), jax.tree.leaves(pure)))
    grads = nnx.grad(loss_fn)(model, ids, y)
    return grads, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))


def grad_fn(model, ids, y):
    """``nnx.grad(loss_fn)(model, ids, y)`` (an ``nnx.State`` of Params), compiled once for every
    ``Net(seed)`` (``nnx.jit`` would retrace for each model: a compat optimizer tags its Variables);
    the model's batch statistics and RNG count advance as they would there."""
    grads, rest = _grads(nnx.to_pure_dict(nnx.state(model)), ids, y)
    nnx.update(model, rest)
    return grads


_rng = np.random.default_rng(0)
BATCHES = [(_rng.integers(0, 10, (6, 3)), _rng.standard_normal((6, 2)).astype(np.float32)) for _ in range(6)]
K = 3  # save after K steps, then K more


def model_leaves(model):
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]:
        x = jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        out[jax.tree_util.keystr(path)] = np.asarray(x)
    return out


def assert_same_leaves(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def tree_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------ compat optimizer + scheduler


def compat_run(seed, hidden=8, three_children=False):
    model = Net(seed, hidden)
    opt = optim.AdamW([{"params": model.a}, {"params": model.b, "lr": 3e-3, "weight_decay": 0.0}], lr=1e-2,
                      amsgrad=True, model=model)
    children = [optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
                optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)]
    if three_children:
        children.append(optim.lr_scheduler.ExponentialLR(opt, gamma=0.8))
    sched = optim.lr_scheduler.SequentialLR(opt, children, milestones=[2] + ([4] if three_children else []))
    return model, opt, sched


def compat_train(model, opt, sched, batches):
    for ids, y in batches:
        opt.step(nnx.to_pure_dict(grad_fn(model, ids, y)))  # matched by path (model=)
        sched.step()


def compat_snapshot(model, opt, sched):
    sd = opt.state_dict()
    return (model_leaves(model), tree_bytes(sd["state"]), repr(sd["param_groups"]), repr(sched.state_dict()))


@pytest.fixture(scope="module")
def compat_ckpt(tmp_path_factory):
    """A run saved at step K (then continued uninterrupted): the checkpoint and the final state."""
    directory = tmp_path_factory.mktemp("compat")
    model, opt, sched = compat_run(0)
    compat_train(model, opt, sched, BATCHES[:K])
    ckpt = Checkpointer(directory, max_to_keep=2)
    assert ckpt.save(K, opt, sched, model=model)
    compat_train(model, opt, sched, BATCHES[K:])  # the save is async: its arrays were snapshotted
    ckpt.wait()
    return ckpt, compat_snapshot(model, opt, sched)


def test_compat_resume_onto_a_fresh_differently_initialised_model_is_bit_exact(compat_ckpt):
    ckpt, final = compat_ckpt
    model, opt, sched = compat_run(seed=1)  # another init, frozen embedding included
    assert model.embed.embedding.get_value().tobytes() != final[0]["['embed']['embedding']"].tobytes()
    assert ckpt.restore(opt, sched, model=model) == K
    compat_train(model, opt, sched, BATCHES[K:])
    got = compat_snapshot(model, opt, sched)
    assert_same_leaves(got[0], final[0])  # every variable: params, frozen embedding, batch stats, RNG count
    assert got[1:] == final[1:]  # optimizer state bit for bit, param_groups (lr) and scheduler state


def test_a_failed_restore_changes_nothing(compat_ckpt):
    """A scheduler of another structure fails last (at its load): model, optimizer and scheduler are
    exactly as their twin's, which no restore touched; so is a model of another shape (found first)."""
    ckpt, _ = compat_ckpt
    other_shape = r"model: a/bias is float32\(8,\) in the checkpoint, float32\(16,\) in this model"
    for kwargs, match in [(dict(three_children=True), "SequentialLR state does not fit"), (dict(hidden=16), other_shape)]:
        objs, twin = compat_run(1, **kwargs), compat_run(1, **kwargs)
        trained = "hidden" not in kwargs  # (the other shape is found first, before any array is read)
        if trained:
            compat_train(*objs, BATCHES[:1])
            compat_train(*twin, BATCHES[:1])
        with pytest.raises(ValueError, match=match):
            ckpt.restore(*objs[1:], model=objs[0])
        a, b = compat_snapshot(*objs), compat_snapshot(*twin)
        assert_same_leaves(a[0], b[0])
        assert a[1:] == b[1:]
        if trained:  # and both go on alike
            compat_train(*objs, BATCHES[1:2])
            compat_train(*twin, BATCHES[1:2])
            assert compat_snapshot(*objs)[1:] == compat_snapshot(*twin)[1:]
            assert_same_leaves(model_leaves(objs[0]), model_leaves(twin[0]))


def test_restore_checks_what_is_given_against_what_is_stored(compat_ckpt):
    ckpt, _ = compat_ckpt
    model, opt, sched = compat_run(1)
    before = compat_snapshot(model, opt, sched)
    with pytest.raises(ValueError, match="holds a model; give model="):
        ckpt.restore(opt, sched)
    with pytest.raises(ValueError, match="holds a AdamW optimizer; give it"):
        ckpt.restore(None, sched, model=model)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .*steps \[3\]"):
        ckpt.restore(opt, sched, model=model, step=7)
    with pytest.raises(TypeError, match="model must be an NNX Module"):
        ckpt.restore(opt, sched, model={"w": jnp.ones(3)})
    a = compat_snapshot(model, opt, sched)
    assert_same_leaves(a[0], before[0])
    assert a[1:] == before[1:]
    # the model alone (evaluation): partial=True
    assert ckpt.restore(model=model, partial=True) == K
    assert model.embed.embedding.get_value().tobytes() != before[0]["['embed']['embedding']"].tobytes()


# ------------------------------------------------------------------ nnx.Optimizer


# groups by path: one transformation serves every Net (its plan is paths), so each step compiles once
NNX_TX = groupopt.grouped(nnx.eval_shape(lambda: Net(0)),
                          [groupopt.group("a", lr=groupopt.schedules.exponential(1e-2, 0.9)), groupopt.group("b", lr=3e-3)],
                          rule=groupopt.AdamWRule(), weight_decay=0.01)


def nnx_run(seed):
    model = Net(seed)
    return model, nnx.Optimizer(model, NNX_TX, wrt=nnx.Param)


@nnx.jit
def _nnx_update(model, optimizer, grads):
    optimizer.update(model, grads)


def nnx_step(model, optimizer, ids, y):
    _nnx_update(model, optimizer, grad_fn(model, ids, y))


def test_nnx_optimizer_resume_is_bit_exact(tmp_path):
    model, opt = nnx_run(0)
    for ids, y in BATCHES[:K]:
        nnx_step(model, opt, ids, y)
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.save(K, opt, model=model)
    for ids, y in BATCHES[K:]:
        nnx_step(model, opt, ids, y)
    model2, opt2 = nnx_run(1)
    assert ckpt.restore(opt2, model=model2) == K
    for ids, y in BATCHES[K:]:
        nnx_step(model2, opt2, ids, y)
    assert_same_leaves(model_leaves(model2), model_leaves(model))
    assert tree_bytes(nnx.state(opt2)) == tree_bytes(nnx.state(opt))
    assert int(opt2.step.get_value()) == len(BATCHES)
    # an optimizer of another kind is refused before anything changes
    plain = nnx.Optimizer(model2, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ValueError, match="optimizer: the checkpoint has no entry for"):
        ckpt.restore(plain, model=model2)


# ------------------------------------------------------------------ the functional core under optax.chain


CORE_TX = optax.chain(optax.clip_by_global_norm(1.0),
                      groupopt.grouped(nnx.eval_shape(lambda: Net(0)),
                                       [groupopt.group("a", lr=groupopt.schedules.cosine(1e-2, T_max=6)),
                                        groupopt.group("b", lr=3e-3)], rule=groupopt.AdamWRule()))


@jax.jit
def _core_update(params, grads, opt_state):
    updates, opt_state = CORE_TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def core_step(model, opt_state, ids, y):
    grads = nnx.to_pure_dict(grad_fn(model, ids, y))
    params, opt_state = _core_update(nnx.to_pure_dict(nnx.state(model, nnx.Param)), grads, opt_state)
    nnx.update(model, params)
    return opt_state


def test_core_state_under_optax_chain_resume_is_bit_exact(tmp_path):
    model = Net(0)
    tx = CORE_TX
    opt_state = tx.init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for ids, y in BATCHES[:K]:
        opt_state = core_step(model, opt_state, ids, y)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.save(K, model=model, state=opt_state)
    for ids, y in BATCHES[K:]:
        opt_state = core_step(model, opt_state, ids, y)
    model2 = Net(1)
    like = tx.init(nnx.to_pure_dict(nnx.state(model2, nnx.Param)))
    step, opt_state2 = ckpt.restore(model=model2, state=like)
    assert step == K and isinstance(opt_state2[1], groupopt.GroupedState)
    assert int(opt_state2[1].count) == K
    for ids, y in BATCHES[K:]:
        opt_state2 = core_step(model2, opt_state2, ids, y)
    assert_same_leaves(model_leaves(model2), model_leaves(model))
    assert tree_bytes(opt_state2) == tree_bytes(opt_state)
    # another state structure (no clipping stage: a GroupedState alone) is refused, naming the paths
    with pytest.raises(ValueError, match=r"state: the checkpoint has no entry for \['count'"):
        ckpt.restore(model=model2, state=like[1])


# ------------------------------------------------------------------ Orbax options, step numbering


def small(i):
    return {"w": jnp.full((3,), float(i))}


def test_options_pass_through(tmp_path):
    keep = Checkpointer(tmp_path / "keep", options=ocp.CheckpointManagerOptions(max_to_keep=5), max_to_keep=2,
                        async_save=False)  # keywords win over options
    assert keep.options.max_to_keep == 2 and keep.options.enable_async_checkpointing is False
    for i in range(4):
        assert keep.save(i, state=small(i))
    assert keep.all_steps() == [2, 3]
    every2 = Checkpointer(tmp_path / "every2", save_interval_steps=2)
    assert [every2.save(i, state=small(i)) for i in range(5)] == [True, False, True, False, True]
    every2.wait()
    assert every2.all_steps() == [0, 2, 4]
    assert every2.save(5, state=small(5), force=True)  # force overrides the interval
    every2.wait()
    assert every2.all_steps() == [0, 2, 4, 5]
    with pytest.raises(TypeError, match="unknown option 'max_to_kep'"):
        Checkpointer(tmp_path / "typo", max_to_kep=2)


def test_best_fn_keeps_the_best(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min", async_save=False)
    losses = [5.0, 1.0, 4.0, 0.5, 3.0]
    for i, loss in enumerate(losses, start=1):
        ckpt.save(i, state=small(i), metrics={"loss": loss})
    assert ckpt.all_steps() == [2, 4]
    assert ckpt.best_step() == 4
    step, got = ckpt.restore(state=small(0), step=ckpt.best_step())
    assert step == 4 and np.asarray(got["w"]).tolist() == [4.0] * 3


def test_step_numbering(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore(state=small(0))
    for i in (10, 20):
        ckpt.save(i, state=small(i))
    with pytest.raises(ValueError, match="step 20 is not after the latest saved step 20"):
        ckpt.save(20, state=small(99))  # never silently dropped
    with pytest.raises(ValueError, match="step 15 is not after the latest saved step 20"):
        ckpt.save(15, state=small(99))
    assert ckpt.all_steps() == [10, 20] and ckpt.latest_step() == 20
    assert ckpt.restore(state=small(0))[1]["w"].tolist() == [20.0] * 3  # step=None: the latest
    assert ckpt.restore(state=small(0), step=10)[1]["w"].tolist() == [10.0] * 3
    with pytest.raises(ValueError, match="nothing to save"):
        ckpt.save(30)
    # a fresh Checkpointer on the directory sees the same steps (numbering survives the process)
    assert Checkpointer(tmp_path).all_steps() == [10, 20]
