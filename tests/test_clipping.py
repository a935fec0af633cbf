"""Gradient clipping: groupopt.compat.clip_grad_* and the core transformations vs torch.nn.utils, same run.

Numbers are compared with torch's computed in the test (torch's published golden values of
TORCH_SEMANTICS_2.md §5.1 as an extra check). float64: <= 1e-15 relative (bit-exact on the
golden gradients); float32: bit-exact on small gradients, a few ulps on larger ones (torch
reduces float32 squares in 8 SIMD lanes, XLA in its own order).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import groupopt
import groupopt.compat as C

TD = {np.float64: torch.float64, np.float32: torch.float32, np.float16: torch.float16}
GOLDEN = [np.array([1, -2, 2.0]), np.array([[0.5, 0.5], [0.5, -0.5]]), np.array([0.1, 0.2, 0.3, -0.4])]
NORMS = [2.0, math.inf, -math.inf, 1.0, 3.0, 0.0]
SHAPES = {"dec": {"b": (5,), "w": (3, 5)}, "enc": {"b": (3,), "w": (4, 3)}, "head": (6,)}  # flatten order = sorted keys
F32_REL = 4e-7  # float32: a few ulps (see module docstring); measured max in the report


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.0 if np.array_equal(a, b, equal_nan=True) else math.inf
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def bits_equal(a, b) -> bool:
    """Same values, NaNs in the same places, and the same sign of zero."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))


def torch_params(arrays, dtypes=None):
    """torch leaf tensors whose .grad are ``arrays`` (``None`` entries: no grad)."""
    out = []
    for k, a in enumerate(arrays):
        dt = dtypes[k] if dtypes else (TD[np.dtype(a.dtype).type] if a is not None else torch.float64)
        p = torch.nn.Parameter(torch.zeros(np.shape(a) if a is not None else (1,), dtype=dt))
        p.grad = None if a is None else torch.tensor(np.array(a), dtype=dt)
        out.append(p)
    return out


def torch_clip(arrays, max_norm, p=2.0, **kw):
    ps = torch_params(arrays)
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm, p, **kw)
    return total, [None if q.grad is None else q.grad.numpy() for q in ps]


def random_tree(dtype, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(dtype), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


# ----------------------------------------------------------------------------- compat functions vs torch


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p", NORMS)
def test_golden_grads_bit_exact(dtype, p):
    arrays = [g.astype(dtype) for g in GOLDEN]
    for max_norm in (0.5, 0.7, 100.0):
        t_total, t_grads = torch_clip(arrays, max_norm, p)
        out, total = C.clip_grad_norm_([jnp.asarray(a) for a in arrays], max_norm, p)
        assert bits_equal(total, t_total.numpy()), (max_norm, total, t_total)
        for o, t in zip(out, t_grads):
            assert bits_equal(o, t)


def test_golden_published_values():
    """TORCH_SEMANTICS_2.md §5.1 (torch 2.13), as an extra check of the numbers above."""
    out, total = C.clip_grad_norm_([jnp.asarray(g) for g in GOLDEN], 0.5)
    assert float(total) == 3.2093613071762426
    assert np.asarray(out[0]).tolist() == [0.15579418966876477, -0.31158837933752953, 0.31158837933752953]
    out, total = C.clip_grad_norm_([jnp.asarray(g, jnp.float32) for g in GOLDEN], 0.5)
    assert float(total) == 3.2093613147735596
    assert np.asarray(out[2]).tolist() == [0.01557941921055317, 0.03115883842110634, 0.04673825949430466, -0.06231767684221268]
    assert float(C.get_total_norm([jnp.asarray(g) for g in GOLDEN], 0)) == 3.0
    assert float(C.get_total_norm([jnp.asarray(g) for g in GOLDEN], -math.inf)) == 0.1
    # bf16
    out, total = C.clip_grad_norm_([jnp.asarray(g, jnp.bfloat16) for g in GOLDEN], 0.5)
    assert float(total) == 3.203125 and np.asarray(out[0], np.float64).tolist() == [0.15625, -0.3125, 0.3125]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf, 0.0])
def test_random_trees(dtype, p):
    worst = 0.0
    for seed, max_norm in [(1, 0.3), (3, 1e3)]:  # the last one does not clip (coef 1, still multiplied)
        tree = random_tree(dtype, seed)
        leaves = jax.tree.leaves(tree)
        t_total, t_grads = torch_clip(leaves, max_norm, p)
        out, total = C.clip_grad_norm_(jax.tree.map(jnp.asarray, tree), max_norm, p)
        assert jax.tree.structure(out) == jax.tree.structure(tree)
        errs = [rel(total, t_total.numpy())] + [rel(o, t) for o, t in zip(jax.tree.leaves(out), t_grads)]
        assert all(np.asarray(o).dtype == dtype for o in jax.tree.leaves(out))
        worst = max(worst, *errs)
    assert worst <= (1e-15 if dtype == np.float64 else F32_REL), worst


def test_mixed_dtypes_and_half():
    cases = [
        [GOLDEN[0].astype(np.float32), GOLDEN[1], GOLDEN[2].astype(np.float32)],  # f32 + f64 -> f64 total
        [GOLDEN[0].astype(np.float16), GOLDEN[1].astype(np.float32), GOLDEN[2].astype(np.float16)],  # f16 + f32
        [np.full(3, 300.0, np.float16)],  # f16 total accumulated wider (519.5, no overflow)
        [g.astype(np.float16) for g in GOLDEN],
    ]
    for arrays in cases:
        for p in (2.0, math.inf, 1.0):
            for max_norm in (0.7,):
                t_total, t_grads = torch_clip(arrays, max_norm, p)
                out, total = C.clip_grad_norm_([jnp.asarray(a) for a in arrays], max_norm, p)
                assert bits_equal(total, t_total.numpy()), (arrays, p, total, t_total)
                assert all(bits_equal(o, t) for o, t in zip(out, t_grads)), (arrays, p)
    assert float(C.get_total_norm([jnp.full(3, 300.0, jnp.float16)])) == 519.5
    # bfloat16 (numpy has no bf16: compare through float32)
    arrays = [jnp.asarray(g, jnp.bfloat16) for g in GOLDEN]
    ps = torch_params([np.asarray(a, np.float32) for a in arrays], [torch.bfloat16] * 3)
    t_total = torch.nn.utils.clip_grad_norm_(ps, 0.7)
    out, total = C.clip_grad_norm_(arrays, 0.7)
    assert total.dtype == jnp.bfloat16 and float(total) == t_total.float().item()
    for o, q in zip(out, ps):
        assert o.dtype == jnp.bfloat16 and np.array_equal(np.asarray(o, np.float32), q.grad.float().numpy())


def test_none_grads_are_skipped_and_kept():
    arrays = [GOLDEN[0], None, GOLDEN[2]]
    t_total, t_grads = torch_clip(arrays, 0.5)
    assert t_total.item() == 3.0495901363953815  # golden
    out, total = C.clip_grad_norm_([jnp.asarray(GOLDEN[0]), None, jnp.asarray(GOLDEN[2])], 0.5)
    assert out[1] is None and bits_equal(total, t_total.numpy())
    assert bits_equal(out[0], t_grads[0]) and bits_equal(out[2], t_grads[2])
    d = {"a": jnp.asarray(GOLDEN[0]), "b": None, "c": jnp.asarray(GOLDEN[2])}
    out, total = C.clip_grad_norm_(d, 0.5)
    assert out["b"] is None and bits_equal(out["c"], t_grads[2])
    assert C.clip_grad_value_([None, jnp.asarray(GOLDEN[0])], 1.0)[0] is None


def test_empty():
    t_total = torch.nn.utils.clip_grad_norm_([], 1.0)
    out, total = C.clip_grad_norm_([], 1.0)
    assert out == [] and total.dtype == jnp.float32 and bits_equal(total, t_total.numpy())
    out, total = C.clip_grad_norm_([None, None], 1.0, error_if_nonfinite=True)
    assert out == [None, None] and float(total) == 0.0
    assert C.clip_grad_value_([], 1.0) == [] and C.clip_grads_with_norm_([], 1.0, total) == []
    # an empty generator warns as torch does; an empty list does not
    with pytest.warns(UserWarning) as rec:
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning) as ours:
        C.clip_grad_norm_((g for g in []), 1.0)
    assert str(ours[0].message) == str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.clip_grad_norm_([], 1.0)
    # torch's errors for the norms without an identity on an empty array
    for p in (math.inf, -math.inf, -1.0):
        with pytest.raises(RuntimeError) as te:
            torch.nn.utils.get_total_norm([torch.zeros(0), torch.ones(2)], p)
        with pytest.raises(RuntimeError) as oe:
            C.get_total_norm([jnp.zeros(0), jnp.ones(2)], p)
        assert str(oe.value) == str(te.value)


@pytest.mark.parametrize("p", [2.0, math.inf, 1.0])
def test_error_if_nonfinite_message_and_nothing_clipped(p):
    for bad in (np.nan, np.inf):
        arrays = [GOLDEN[0], np.array([1.0, bad])]
        with pytest.raises(RuntimeError) as te:
            torch_clip(arrays, 0.5, p, error_if_nonfinite=True)
        grads = [jnp.asarray(a) for a in arrays]
        with pytest.raises(RuntimeError) as oe:
            C.clip_grad_norm_(grads, 0.5, p, error_if_nonfinite=True)
        assert str(oe.value) == str(te.value)
        with pytest.raises(RuntimeError):
            C.get_total_norm(grads, p, error_if_nonfinite=True)
    # inside jit the host check is impossible: a clear error, not a silent skip
    with pytest.raises(TypeError, match="inside jit"):
        jax.jit(lambda g: C.clip_grad_norm_(g, 1.0, error_if_nonfinite=True))([jnp.ones(3)])


def test_nonfinite_totals_and_odd_max_norms_like_torch():
    cases = [
        ([GOLDEN[0], np.array([1.0, np.nan])], 0.5),  # NaN total: every gradient NaN
        ([GOLDEN[0], np.array([1.0, np.inf])], 0.5),  # inf total: ±0, inf entries NaN
        ([GOLDEN[0], np.array([-1.0, -np.inf])], 0.5),
        (GOLDEN, -0.5),  # negative max_norm flips the gradients (not validated, as torch)
        (GOLDEN, 0.0),  # ±0
        ([g.astype(np.float32) for g in GOLDEN], -2.0),
    ]
    for arrays, max_norm in cases:
        for p in (2.0, math.inf):
            t_total, t_grads = torch_clip(arrays, max_norm, p)
            out, total = C.clip_grad_norm_([jnp.asarray(a) for a in arrays], max_norm, p)
            assert bits_equal(total, t_total.numpy())
            assert all(bits_equal(o, t) for o, t in zip(out, t_grads)), (arrays, max_norm, p, out, t_grads)


def test_get_total_norm_and_clip_grads_with_norm():
    arrays = [g.astype(np.float32) for g in GOLDEN]
    tt = torch.nn.utils.get_total_norm([torch.tensor(a) for a in arrays], 3.0)
    ours = C.get_total_norm([jnp.asarray(a) for a in arrays], 3.0)
    assert bits_equal(ours, tt.numpy())
    assert bits_equal(C.get_total_norm(jnp.asarray(arrays[0])), torch.nn.utils.get_total_norm(torch.tensor(arrays[0])).numpy())
    # f64 gradients scaled with an f32 total: the coefficient is computed in float32
    ps = torch_params(GOLDEN)
    torch.nn.utils.clip_grads_with_norm_(ps, 0.5, torch.tensor(1.0))
    out = C.clip_grads_with_norm_([jnp.asarray(g) for g in GOLDEN], 0.5, jnp.asarray(1.0, jnp.float32))
    assert all(bits_equal(o, q.grad.numpy()) for o, q in zip(out, ps))
    assert float(out[0][0]) / GOLDEN[0][0] == 0.4999995231628418
    # a single array in, a single array out
    one = C.clip_grads_with_norm_(jnp.asarray(GOLDEN[0]), 0.5, jnp.asarray(3.0))
    assert isinstance(one, jax.Array) and one.shape == (3,)
    # a Python float total: an error, as torch's TypeError from clamp
    with pytest.raises(TypeError):
        torch.nn.utils.clip_grads_with_norm_(ps, 0.5, 2.0)
    with pytest.raises(TypeError, match="total_norm must be an array"):
        C.clip_grads_with_norm_([jnp.ones(2)], 0.5, 2.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_clip_grad_value(dtype):
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((4, 3)).astype(dtype), np.array([np.nan, -np.inf, np.inf, 0.1], dtype)]
    for v in (0.5, 0.1, 1e-3, 0.0, -0.25, 7):
        ps = torch_params(arrays)
        torch.nn.utils.clip_grad_value_(ps, v)
        out = C.clip_grad_value_([jnp.asarray(a) for a in arrays], v)
        assert all(bits_equal(o, q.grad.numpy()) for o, q in zip(out, ps)), v
    core = groupopt.clip_grad_value(0.1)
    got, _ = core.update({"a": jnp.asarray(arrays[0])}, core.init(None))
    ps = torch_params(arrays[:1])
    torch.nn.utils.clip_grad_value_(ps, 0.1)
    assert bits_equal(got["a"], ps[0].grad.numpy())
    with pytest.raises(ValueError, match="clip_value"):
        groupopt.clip_grad_value(-1.0)


def test_deprecated_alias_warns_like_torch():
    with pytest.warns(FutureWarning) as rec:
        torch.nn.utils.clip_grad_norm(torch_params(GOLDEN), 0.5)
    with pytest.warns(FutureWarning) as ours:
        out, total = C.clip_grad_norm([jnp.asarray(g) for g in GOLDEN], 0.5)
    assert str(ours[0].message) == str(rec[0].message)
    assert float(total) == 3.2093613071762426


def test_foreach_jit_nnx_and_bad_inputs():
    tree = jax.tree.map(jnp.asarray, random_tree(np.float32, 7))
    ref, ref_total = C.clip_grad_norm_(tree, 0.9)
    for fe in (True, False):
        out, total = C.clip_grad_norm_(tree, 0.9, foreach=fe)
        assert bits_equal(total, ref_total) and all(bits_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    with pytest.raises(TypeError, match="foreach"):
        C.clip_grad_norm_(tree, 0.9, foreach="yes")
    # inside jit, max_norm traced too: same numbers as eagerly
    out, total = jax.jit(lambda g, m: C.clip_grad_norm_(g, m))(tree, jnp.asarray(0.9, jnp.float32))
    assert rel(total, ref_total) <= F32_REL
    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))) <= F32_REL
    # nnx.grad's State in, State out
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3))) ** 2))(model)
    out, total = C.clip_grad_norm_(grads, 0.1)
    assert type(out) is type(grads)
    t_total, t_grads = torch_clip([np.asarray(x) for x in jax.tree.leaves(grads)], 0.1)
    assert bits_equal(total, t_total.numpy())
    assert all(bits_equal(o, t) for o, t in zip(jax.tree.leaves(out), t_grads))
    # bad leaves are named
    with pytest.raises(TypeError, match="'b'.*int32"):
        C.clip_grad_norm_({"a": jnp.ones(2), "b": jnp.ones(2, jnp.int32)}, 1.0)
    with pytest.raises(TypeError, match="max_norm"):
        C.clip_grad_norm_([jnp.ones(2)], "big")


# ----------------------------------------------------------------------------- training runs vs torch


def grad_fn(step, leaves, dtype):
    """The gradients at ``step`` from each side's own parameters (numpy, identical arithmetic on both sides)."""
    rng = np.random.default_rng([11, step])
    return [(np.asarray(p, dtype) * dtype(0.5) + (3.0 * rng.standard_normal(np.shape(p))).astype(dtype)) for p in leaves]


def torch_run(init_leaves, dtype, steps, make_opt, clip, micro=1):
    params = [torch.tensor(np.array(a)).requires_grad_(True) for a in init_leaves]
    opt = make_opt(params)
    totals = []
    for t in range(steps):
        for p in params:
            p.grad = None
        for k in range(micro):
            gs = grad_fn(t * micro + k, [p.detach().numpy() for p in params], dtype)
            for p, g in zip(params, gs):
                p.grad = torch.tensor(g) if p.grad is None else p.grad + torch.tensor(g)
        totals.append(clip(params))
        opt.step()
    return [p.detach().numpy() for p in params], totals


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_120_steps_adamw_with_clipping_every_step(dtype):
    """compat AdamW + compat clip_grad_norm_ (jitted), and the core transformation + grouped apply."""
    steps, max_norm = 120, 2.0
    init = random_tree(dtype, 0)
    leaves0 = jax.tree.leaves(init)
    t_params, t_totals = torch_run(leaves0, dtype, steps, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                   lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm).item())
    clip_jit = jax.jit(lambda g: C.clip_grad_norm_(g, max_norm))
    opt = C.AdamW(jax.tree.map(jnp.asarray, init), lr=1e-2, weight_decay=0.1)
    core_clip = groupopt.clip_grad_norm(max_norm)
    core_opt = groupopt.adamw(1e-2, weight_decay=0.1)
    params = jax.tree.map(jnp.asarray, init)
    cstate, ostate = core_clip.init(params), core_opt.init(params)

    @jax.jit
    def core_step(params, grads, cstate, ostate):
        grads, cstate = core_clip.update(grads, cstate)
        params, ostate = core_opt.apply(params, grads, ostate)
        return params, cstate, ostate

    treedef = jax.tree.structure(init)
    tot_err = 0.0
    for t in range(steps):
        g = jax.tree.unflatten(treedef, grad_fn(t, jax.tree.leaves(opt.params), dtype))
        clipped, total = clip_jit(g)
        tot_err = max(tot_err, rel(total, t_totals[t]))
        opt.step(clipped)
        g = jax.tree.unflatten(treedef, grad_fn(t, jax.tree.leaves(params), dtype))
        params, cstate, ostate = core_step(params, g, cstate, ostate)
    err_compat = max(rel(a, b) for a, b in zip(jax.tree.leaves(opt.params), t_params))
    err_core = max(rel(a, b) for a, b in zip(jax.tree.leaves(params), t_params))
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert tot_err <= (1e-15 if dtype == np.float64 else F32_REL), tot_err
    assert err_compat <= tol and err_core <= tol, (err_compat, err_core)
    assert rel(cstate.total_norm, t_totals[-1]) <= (1e-15 if dtype == np.float64 else 1e-5)


def test_core_in_chain_with_groups_set_max_norm_and_optax_difference():
    dtype = np.float64
    init = random_tree(dtype, 0)
    params = jax.tree.map(jnp.asarray, init)
    gtx = groupopt.sgd(0.05, momentum=0.9, params=params, groups=[groupopt.group("enc", lr=0.02), groupopt.group(groupopt.rest())])
    clip = groupopt.clip_grad_norm(1.5)
    tx = optax.chain(clip, gtx)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, grads, state):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # torch: the same groups (tree order: dec/b, dec/w, enc/b, enc/w, head)
    tp = [torch.tensor(np.array(a)).requires_grad_(True) for a in jax.tree.leaves(init)]
    topt = torch.optim.SGD([{"params": tp[2:4], "lr": 0.02}, {"params": tp[:2] + tp[4:]}], lr=0.05, momentum=0.9)
    treedef = jax.tree.structure(init)
    for t in range(12):
        if t == 6:  # a new max_norm, in the state: no recompilation
            state = (clip.set_max_norm(state[0], 0.4),) + tuple(state[1:])
        mn = 1.5 if t < 6 else 0.4
        g = jax.tree.unflatten(treedef, grad_fn(t, jax.tree.leaves(params), dtype))
        params, state = step(params, g, state)
        for p, gg in zip(tp, grad_fn(t, [p.detach().numpy() for p in tp], dtype)):
            p.grad = torch.tensor(gg)
        total = torch.nn.utils.clip_grad_norm_(tp, mn)
        topt.step()
        assert rel(state[0].total_norm, total.numpy()) <= 1e-15
    assert len(traces) == 1
    assert max(rel(a, b.detach().numpy()) for a, b in zip(jax.tree.leaves(params), tp)) <= 1e-14
    assert float(state[0].max_norm) == 0.4 and state[0].max_norm.dtype == jnp.float64
    # optax's clip_by_global_norm is not torch's (no 1e-6): the two differ
    g = jax.tree.map(jnp.asarray, random_tree(dtype, 3))
    ours, _ = clip.update(g, clip.init(g))
    theirs, _ = optax.clip_by_global_norm(1.5).update(g, optax.clip_by_global_norm(1.5).init(g))
    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs))) > 1e-8
    with pytest.raises(ValueError, match="max_norm"):
        groupopt.clip_grad_norm(-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip.set_max_norm(state[0], float("nan"))


def test_core_inside_accumulate_vs_torch():
    dtype, k, steps, max_norm = np.float64, 3, 5, 1.0
    init = random_tree(dtype, 4)
    params = jax.tree.map(jnp.asarray, init)
    tx = groupopt.accumulate(optax.chain(groupopt.clip_grad_norm(max_norm), groupopt.sgd(0.1, momentum=0.5)), k)
    state = tx.init(params)
    step = jax.jit(lambda p, g, s: tx.update(g, s, p))
    treedef = jax.tree.structure(init)
    for t in range(steps):
        for m in range(k):
            g = jax.tree.unflatten(treedef, grad_fn(t * k + m, jax.tree.leaves(params), dtype))
            updates, state = step(params, g, state)
            params = optax.apply_updates(params, updates)
    t_params, t_totals = torch_run(jax.tree.leaves(init), dtype, steps, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5),
                                   lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm).item(), micro=k)
    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(params), t_params)) <= 1e-14
    assert rel(state.inner[0].total_norm, t_totals[-1]) <= 1e-15


def test_per_group_clipping_vs_torch_loop():
    dtype = np.float64
    init = random_tree(dtype, 8)
    params = jax.tree.map(jnp.asarray, init)
    gtx = groupopt.adamw(1e-2, params=params, groups=[groupopt.group("enc", lr=3e-3), groupopt.group("dec"),
                                                     groupopt.group("head", weight_decay=0.0)])
    per = groupopt.clip_grad_norm_per_group([0.5, 2.0, 0.1], gtx)
    tx = optax.chain(per, gtx)
    state = tx.init(params)
    step = jax.jit(lambda p, g, s: tx.update(g, s, p))
    leaves = jax.tree.leaves(init)  # dec/b, dec/w, enc/b, enc/w, head
    tp = [torch.tensor(np.array(a)).requires_grad_(True) for a in leaves]
    topt = torch.optim.AdamW([{"params": tp[2:4], "lr": 3e-3, "max_norm": 0.5}, {"params": tp[0:2], "max_norm": 2.0},
                              {"params": tp[4:5], "weight_decay": 0.0, "max_norm": 0.1}], lr=1e-2)
    treedef = jax.tree.structure(init)
    for t in range(10):
        g = jax.tree.unflatten(treedef, grad_fn(t, jax.tree.leaves(params), dtype))
        updates, state = step(params, g, state)
        params = optax.apply_updates(params, updates)
        for p, gg in zip(tp, grad_fn(t, [p.detach().numpy() for p in tp], dtype)):
            p.grad = torch.tensor(gg)
        totals = [torch.nn.utils.clip_grad_norm_(grp["params"], grp["max_norm"]).item() for grp in topt.param_groups]
        topt.step()
        assert rel(state[0].total_norm, totals) <= 1e-15
    assert max(rel(a, b.detach().numpy()) for a, b in zip(jax.tree.leaves(params), tp)) <= 1e-13
    # selectors + params; a leaf in no group is returned unchanged
    sel = groupopt.clip_grad_norm_per_group(0.3, ["enc", groupopt.group("head")], params=params)
    g = jax.tree.map(jnp.asarray, random_tree(dtype, 9))
    out, s = sel.update(g, sel.init(params))
    assert all(bits_equal(out["dec"][k], g["dec"][k]) for k in ("b", "w"))
    tp = torch_params([np.asarray(x) for x in (g["enc"]["b"], g["enc"]["w"], g["head"])])
    t_enc = torch.nn.utils.clip_grad_norm_(tp[:2], 0.3)
    t_head = torch.nn.utils.clip_grad_norm_(tp[2:], 0.3)
    assert bits_equal(out["enc"]["w"], tp[1].grad.numpy()) and bits_equal(out["head"], tp[2].grad.numpy())
    assert np.asarray(s.total_norm).tolist() == [t_enc.item(), t_head.item()]
    s2 = sel.set_max_norm(s, [0.1, 0.2])
    assert np.asarray(s2.max_norm).tolist() == [0.1, 0.2]
    with pytest.raises(ValueError, match="one value per group"):
        groupopt.clip_grad_norm_per_group([1.0], gtx)
    with pytest.raises(ValueError, match="grads tree does not match"):
        sel.update({"enc": g["enc"]}, s)


# ----------------------------------------------------------------------------- compat: accumulated gradients


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compat_clipping_of_accumulated_grads_vs_torch(dtype):
    k, steps, max_norm = 2, 4, 1.5
    init = random_tree(dtype, 12)
    opt = C.SGD(jax.tree.map(jnp.asarray, init), lr=0.1, momentum=0.9)
    treedef = jax.tree.structure(init)
    totals = []
    for t in range(steps):
        for m in range(k):
            opt.accumulate_grad(jax.tree.unflatten(treedef, grad_fn(t * k + m, jax.tree.leaves(opt.params), dtype)))
        totals.append(float(C.clip_grad_norm_(opt, max_norm)))
        if t == 1:
            assert C.clip_grad_value_(opt, 10.0) is None  # a no-op clamp here, through the same path
        opt.step()
        opt.zero_grad()
    t_params, t_totals = torch_run(jax.tree.leaves(init), dtype, steps, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                   lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm).item(), micro=k)
    tol = 1e-15 if dtype == np.float64 else 1e-6
    assert max(rel(a, b) for a, b in zip(totals, t_totals)) <= tol
    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(opt.params), t_params)) <= tol
    # nothing accumulated: torch's tensor(0.), nothing changes
    assert float(C.clip_grad_norm_(opt, 1.0)) == 0.0 and opt.accumulated_grads is None


def test_compat_failed_clip_changes_nothing():
    opt = C.SGD({"w": jnp.ones(3), "b": jnp.ones(2)}, lr=0.1)
    g = {"w": jnp.asarray([1.0, jnp.nan, 2.0]), "b": jnp.asarray([3.0, 4.0])}
    opt.accumulate_grad(g)
    before = opt.accumulated_grads
    with pytest.raises(RuntimeError, match="non-finite"):
        C.clip_grad_norm_(opt, 1.0, error_if_nonfinite=True)
    assert opt.accumulated_grads is before
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        opt.accumulated_grads = C.clip_grad_norm_(before, 1.0)  # the (grads, total) pair by mistake
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        opt.accumulated_grads = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(2)}
    assert opt.accumulated_grads is before
    # clip_grad_value_ on the optimizer replaces them; NaN stays NaN as in torch
    C.clip_grad_value_(opt, 2.5)
    assert np.array_equal(np.asarray(opt.accumulated_grads["b"]), [2.5, 2.5])
    assert np.isnan(np.asarray(opt.accumulated_grads["w"])[1])
    opt.accumulated_grads = None
    assert opt.accumulated_grads is None
