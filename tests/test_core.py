"""The functional core against torch: mixed rules per group, frozen leaves, schedules, Optax interop."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import groupopt
from groupopt import schedules

STEPS = 200


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make_tree(rng, dtype):
    return {
        "emb": rng.standard_normal((5, 3)).astype(dtype),
        "enc": {"kernel": rng.standard_normal((3, 4)).astype(dtype), "bias": rng.standard_normal(4).astype(dtype)},
        "head": {"kernel": rng.standard_normal((4, 2)).astype(dtype), "bias": rng.standard_normal(2).astype(dtype)},
    }


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-6), (np.float32, 1e-5)])
def test_mixed_rules_frozen_leaf_and_per_group_schedule_match_torch(dtype, tol):
    rng = np.random.default_rng(0)
    p0 = make_tree(rng, dtype)
    grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(dtype), p0) for _ in range(STEPS)]

    tx = groupopt.grouped(
        p0,
        [
            groupopt.group("enc", name="enc", lr=schedules.step(0.01, step_size=30, gamma=0.5)),  # AdamW, decays
            groupopt.group("head/kernel", name="head", rule=groupopt.SGDRule(nesterov=True), lr=0.05, momentum=0.9, weight_decay=1e-3),
            groupopt.group("head/bias", name="frozen", frozen=True),
        ],
        rule=groupopt.AdamWRule(amsgrad=True),
        lr=0.01,
        weight_decay=0.05,
    )  # "emb" is in no group: untouched, no state
    state = tx.init(p0)
    assert len(state.groups[2].slots) == 0
    step = jax.jit(tx.apply)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in
         {"emb": p0["emb"], "ek": p0["enc"]["kernel"], "eb": p0["enc"]["bias"], "hk": p0["head"]["kernel"], "hb": p0["head"]["bias"]}.items()}
    adamw = torch.optim.AdamW([t["eb"], t["ek"]], lr=0.01, weight_decay=0.05, amsgrad=True)
    sched = torch.optim.lr_scheduler.StepLR(adamw, step_size=30, gamma=0.5)
    sgd = torch.optim.SGD([t["hk"]], lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)

    params = jax.tree.map(jnp.asarray, p0)
    worst = 0.0
    for k in range(STEPS):
        g = grads[k]
        lr_used = adamw.param_groups[0]["lr"]
        for name, arr in [("eb", g["enc"]["bias"]), ("ek", g["enc"]["kernel"]), ("hk", g["head"]["kernel"]), ("hb", g["head"]["bias"]), ("emb", g["emb"])]:
            t[name].grad = torch.tensor(arr)
        adamw.step(); sgd.step(); sched.step()
        params, state = step(params, g, state)
        assert float(state.hyperparams[0]["lr"]) == pytest.approx(lr_used, rel=1e-12)
        worst = max(worst, rel(params["enc"]["kernel"], t["ek"].detach()), rel(params["head"]["kernel"], t["hk"].detach()),
                    rel(params["enc"]["bias"], t["eb"].detach()))
    assert worst <= tol, worst
    # untouched leaves are bit-identical
    np.testing.assert_array_equal(params["emb"], p0["emb"])
    np.testing.assert_array_equal(params["head"]["bias"], p0["head"]["bias"])
    assert params["enc"]["kernel"].dtype == dtype


def test_optax_update_path_and_chain():
    rng = np.random.default_rng(1)
    p0 = make_tree(rng, np.float64)
    g = jax.tree.map(lambda x: rng.standard_normal(x.shape), p0)
    tx = groupopt.adam(lr=0.1, weight_decay=0.01)
    st = tx.init(p0)
    upd, st2 = jax.jit(tx.update)(g, st, p0)
    new_a = optax.apply_updates(p0, upd)
    new_b, st3 = jax.jit(tx.apply)(p0, g, st)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), new_a, new_b)
    # chained after clipping, compared with torch clip_grad_norm_ + Adam
    chained = optax.chain(optax.clip_by_global_norm(0.5), groupopt.adam(lr=0.1))
    cst = chained.init(p0)
    upd, _ = chained.update(g, cst, p0)
    ts = [torch.tensor(x, requires_grad=True) for x in jax.tree.leaves(p0)]
    for tt, gg in zip(ts, jax.tree.leaves(g)):
        tt.grad = torch.tensor(gg)
    torch.nn.utils.clip_grad_norm_(ts, 0.5)
    topt = torch.optim.Adam(ts, lr=0.1)
    topt.step()
    for a, b in zip(jax.tree.leaves(optax.apply_updates(p0, upd)), ts):
        assert rel(a, b.detach()) < 1e-9


def test_hyperparams_are_state_and_set_without_retrace():
    p0 = {"w": jnp.ones(3)}
    tx = groupopt.sgd(lr=0.1, momentum=0.9)
    traces = []

    def f(params, grads, state):
        traces.append(1)
        return tx.apply(params, grads, state)

    step = jax.jit(f)
    st = tx.init(p0)
    p = p0
    for k in range(5):
        st = tx.set_hyperparams(st, 0, lr=0.1 / (k + 1), momentum=0.5)
        p, st = step(p, {"w": jnp.ones(3)}, st)
    assert len(traces) == 1
    assert tx.hyperparams(st)[0]["lr"] == pytest.approx(0.02)
    with pytest.raises(KeyError, match="no hyperparameter 'betas'"):
        tx.set_hyperparams(st, 0, betas=(0.9, 0.99))
    sched_tx = groupopt.sgd(lr=schedules.exponential(0.1, 0.9))
    with pytest.raises(ValueError, match="follows a schedule"):
        sched_tx.set_hyperparams(sched_tx.init(p0), 0, lr=0.3)


def test_bad_group_arguments_name_the_group_and_key():
    p0 = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"group 1: SGD has no option or hyperparameter 'betas'"):
        groupopt.grouped(p0, [groupopt.group("a"), groupopt.group("b", betas=(0.9, 0.9))], rule=groupopt.SGDRule)
    with pytest.raises(ValueError, match="betas must be a sequence of 2 values"):
        groupopt.grouped(p0, [groupopt.group("a", betas=0.9)], rule=groupopt.AdamRule)
    tx = groupopt.adam(params=p0, groups=[groupopt.group("a")])
    with pytest.raises(ValueError, match="missing: \\['b'\\]"):
        tx.update({"a": jnp.ones(2)}, tx.init(p0), {"a": jnp.ones(2)})


class Block(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(3, 3, rngs=rngs)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.block1 = Block(rngs)
        self.block2 = Block(rngs)

    def __call__(self, x):
        return self.block2.l0(jnp.tanh(self.block1.l0(x)))


def test_core_with_nnx_submodule_groups_whose_inner_paths_coincide():
    m = Net(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    tx = groupopt.grouped(m, [groupopt.group(m.block1, lr=0.1), groupopt.group(m.block2, lr=0.0)], rule=groupopt.SGDRule)
    params = nnx.state(m, nnx.Param)
    before = jax.tree.map(np.array, params.to_pure_dict())
    state = tx.init(params)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
    new, state = tx.apply(params, grads, state)
    nnx.update(m, new)
    # block2 has lr 0: unchanged; block1 moved by -0.1 * grad
    np.testing.assert_array_equal(m.block2.l0.kernel[...], before["block2"]["l0"]["kernel"])
    np.testing.assert_allclose(m.block1.l0.kernel[...], before["block1"]["l0"]["kernel"] - 0.1 * grads["block1"]["l0"]["kernel"][...], rtol=1e-12)


def test_float32_without_x64_matches_torch():
    """Most users run without jax_enable_x64: hyperparameters are float32 then."""
    script = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp, torch, groupopt
        assert not jax.config.jax_enable_x64
        rng = np.random.default_rng(0)
        p0 = rng.standard_normal(50).astype(np.float32)
        for make, tcls, kw in [(groupopt.adamw, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                               (groupopt.sgd, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True))]:
            tx = make(**kw); st = tx.init({"w": jnp.asarray(p0)}); step = jax.jit(tx.apply)
            t = torch.tensor(p0, requires_grad=True); opt = tcls([t], **kw); p = {"w": jnp.asarray(p0)}
            for k in range(200):
                g = rng.standard_normal(50).astype(np.float32)
                t.grad = torch.tensor(g); opt.step(); p, st = step(p, {"w": jnp.asarray(g)}, st)
            err = np.max(np.abs(np.asarray(p["w"]) - t.detach().numpy())) / np.max(np.abs(t.detach().numpy()))
            assert err < 1e-5, (make.__name__, err)
            print(make.__name__, err)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "JAX_ENABLE_X64": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
