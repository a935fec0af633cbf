"""Gradients checked at the door of the core (``tx.apply`` / ``tx.update`` / ``init`` / ``grouped``).

A gradient that does not fit its parameter raises one ValueError naming the path and what was
expected, before anything changes: under ``jax.jit`` with donated buffers the failing call is
refused while tracing, so the parameters and the state are still alive and equal to an untouched
twin's, and the next correct step gives the twin's result bit for bit.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import groupopt
from groupopt.grad_checks import check_grads, unknown_paths_error
from groupopt.transform import apply_groups


def _params():
    return {
        "enc": {"kernel": jnp.arange(12.0).reshape(3, 4) / 10, "bias": jnp.linspace(-1.0, 1.0, 4)},
        "head": {"kernel": jnp.ones((4, 2)) * 0.5},
    }


def _grads(scale=1.0):
    return jax.tree.map(lambda x: scale * jnp.cos(x + 1.0), _params())


def _tx(params):
    return groupopt.adam(lr=0.1, params=params, groups=[{"params": "enc"}, {"params": "head", "lr": 0.01}])


def _with(tree, path, value):
    a, b = path.split("/")
    out = jax.tree.map(lambda x: x, tree)
    out[a][b] = value
    return out


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


BAD = [
    # (path, bad gradient, message pattern)
    ("enc/bias", jnp.ones((3, 4)), r"gradient for 'enc/bias' has shape \(3, 4\), parameter has shape \(4,\)"),
    ("enc/bias", jnp.ones(()), r"gradient for 'enc/bias' has shape \(\), parameter has shape \(4,\)"),
    ("enc/kernel", jnp.ones((4, 3)), r"gradient for 'enc/kernel' has shape \(4, 3\), parameter has shape \(3, 4\)"),
    ("enc/bias", jnp.ones(4, jnp.int32), r"gradient for 'enc/bias' has dtype int32, parameter has float64 \(gradients must be real"),
    ("enc/bias", jnp.ones(4, jnp.bool_), r"gradient for 'enc/bias' has dtype bool, parameter has float64"),
    ("enc/bias", jnp.ones(4, jnp.complex128), r"gradient for 'enc/bias' has dtype complex128, parameter has float64"),
    ("head/kernel", jnp.ones((4, 2), jnp.float32), r"gradient for 'head/kernel' has dtype float32, parameter has float64"),
]


@pytest.mark.parametrize("method", ["apply", "update", "jit_apply_donated"])
@pytest.mark.parametrize("path,bad,match", BAD, ids=[f"{p}:{b.dtype}{b.shape}" for p, b, _ in BAD])
def test_bad_gradient_raises_and_changes_nothing(path, bad, match, method):
    params, twin_params = _params(), _params()
    tx = _tx(params)
    state, twin_state = tx.init(params), tx.init(twin_params)
    grads = _with(_grads(), path, bad)
    if method == "apply":
        call = lambda p, g, s: tx.apply(p, g, s)  # noqa: E731
    elif method == "update":
        call = lambda p, g, s: tx.update(g, s, p)  # noqa: E731
    else:
        call = jax.jit(tx.apply, donate_argnums=(0, 2))
    with pytest.raises(ValueError, match=match):
        call(params, grads, state)
    # nothing was donated or changed: the same objects are still alive and equal to the twin's
    _assert_trees_equal(params, twin_params)
    _assert_trees_equal(state, twin_state)
    # and the next correct step is the twin's, bit for bit
    out = call(params, _grads(), state)
    ref = jax.jit(tx.apply)(twin_params, _grads(), twin_state) if method != "update" else tx.update(_grads(), twin_state, twin_params)
    _assert_trees_equal(out, ref)


def test_every_problem_in_one_error():
    params = _params()
    tx = _tx(params)
    grads = _with(_with(_grads(), "enc/bias", jnp.ones((3, 4))), "head/kernel", jnp.ones((4, 2), jnp.int32))
    with pytest.raises(ValueError) as e:
        tx.apply(params, grads, tx.init(params))
    msg = str(e.value)
    assert msg.startswith("apply(params, grads, state): 2 gradients do not match their parameters: "), msg
    assert "'enc/bias' has shape (3, 4), parameter has shape (4,)" in msg
    assert "'head/kernel' has dtype int32, parameter has float64" in msg


def test_unknown_gradient_paths_name_the_closest_parameter():
    params = _params()
    tx = _tx(params)
    state = tx.init(params)
    g = _grads()
    g["enc"]["kernal"] = g["enc"].pop("kernel")
    g["hed"] = g.pop("head")
    for call in (lambda: tx.apply(params, g, state), lambda: tx.update(g, state, params), lambda: jax.jit(tx.apply)(params, g, state)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "gradients for paths that are not parameters of the model" in msg, msg
        assert "'enc/kernal' (closest parameter: 'enc/kernel')" in msg, msg
        assert "'hed/kernel' (closest parameter: 'head/kernel')" in msg, msg
    # a missing gradient is named too
    g = _grads()
    del g["head"]
    with pytest.raises(ValueError, match=r"no gradient for \['head/kernel'\]"):
        tx.apply(params, g, state)


def test_the_helpers_for_the_compat_layer():
    check_grads(["a", "b"], [None, jnp.ones(2)], [jnp.ones(3), jnp.ones(2)])  # None: skipped
    check_grads(["s"], [0.5], [jnp.float32(1.0)])  # a weakly typed Python float fits a floating parameter
    with pytest.raises(ValueError, match=r"^step: gradient for 'a' has shape \(2,\), parameter has shape \(3,\)$"):
        check_grads(["a"], [jnp.ones(2)], [jnp.ones(3)])
    err = unknown_paths_error(["layer/kernl", "x"], ["layer/kernel", "layer/bias"])
    assert isinstance(err, ValueError)
    assert "'layer/kernl' (closest parameter: 'layer/kernel')" in str(err)


def test_non_floating_parameters_are_refused_unless_frozen():
    params = {"w": jnp.ones(3), "count": jnp.zeros((), jnp.int32), "mask": jnp.ones(3, jnp.bool_)}
    with pytest.raises(ValueError, match=r"grouped\(params\): only real floating point leaves can be optimized, got "
                                         r"'count' \(int32\), 'mask' \(bool\); put them in a frozen group"):
        groupopt.adamw(params=params, groups=[{"params": groupopt.ALL}])
    # params unknown at construction: refused at init
    with pytest.raises(ValueError, match=r"init\(params\): .*'count' \(int32\)"):
        groupopt.adamw().init(params)
    # frozen, or in no group: fine, and left untouched
    for groups in ([{"params": "w"}, {"params": ["count", "mask"], "frozen": True}], [{"params": "w"}]):
        tx = groupopt.adamw(lr=0.1, params=params, groups=groups)
        new, _ = jax.jit(tx.apply)(params, {"w": jnp.ones(3), "count": jnp.zeros((), jnp.float32), "mask": jnp.ones(3)}, tx.init(params))
        assert new["count"].dtype == jnp.int32 and new["mask"].dtype == jnp.bool_
        assert not np.array_equal(np.asarray(new["w"]), np.ones(3))


def test_checks_cost_nothing_correct_results_unchanged_and_one_compile():
    params = _params()
    tx = _tx(params)
    state = tx.init(params)
    traces = []

    def step(p, g, s):
        traces.append(1)
        return tx.apply(p, g, s)

    jstep = jax.jit(step)
    p, s = params, state
    for k in range(3):
        p, s = jstep(p, _grads(1.0 + k), s)
    assert len(traces) == 1  # compiled once; the checks ran at that trace only

    # the same numbers as the unchecked core (apply_groups on flat leaves), bit for bit
    def unchecked(p, g, s):
        leaves, treedef = jax.tree.flatten(p)
        new, ns = apply_groups(tx.configs, tx.plan, s, jax.tree.leaves(g), leaves)
        return jax.tree.unflatten(treedef, new), ns

    q, t = params, state
    for k in range(3):
        q, t = jax.jit(unchecked)(q, _grads(1.0 + k), t)
    _assert_trees_equal((p, s), (q, t))

    # and the same program: the checks add no operation to the lowered step
    def ops(f):
        text = jax.jit(f).lower(params, _grads(), state).as_text()
        return sorted(re.findall(r"= (stablehlo\.\w+|\"?stablehlo\.\w+)", text))

    assert ops(tx.apply) == ops(unchecked)
