"""Library calls in place of hand-written helpers, with the same results.

* ``groups.path_str`` renders key paths with ``jax.tree_util.keystr(..., simple=True, separator="/")``:
  the exact strings of the former hand-written renderer, for every key kind;
* ``accumulate`` equals ``optax.MultiSteps`` bit for bit where both apply (summed gradients, one
  accumulator dtype) -- what it keeps is what MultiSteps lacks (see its docstring);
* ``torch_interop`` converts tensors with one helper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

import groupopt
import groupopt.compat as optim
from groupopt.compat.torch_interop import tensor_to_numpy
from groupopt.groups import flatten_with_paths, path_str


class _CustomKey:
    def __str__(self):
        return "custom"


@pytest.mark.parametrize("keypath, expected", [
    ((DictKey("encoder"), DictKey("kernel")), "encoder/kernel"),
    ((GetAttrKey("body"), GetAttrKey("kernel")), "body/kernel"),
    ((DictKey("blocks"), SequenceKey(3), DictKey("bias")), "blocks/3/bias"),
    ((FlattenedIndexKey(2),), "2"),
    ((DictKey(5),), "5"),                                   # a non-string dict key: str()
    ((DictKey(("x", 1)),), "('x', 1)"),
    ((GetAttrKey("kernel"), GetAttrKey("value")), "kernel"),  # NNX's trailing .value dropped
    ((DictKey("value"),), "value"),                         # ... only as an attribute
    ((GetAttrKey("value"), DictKey("a")), "value/a"),       # ... only at the end
    ((), ""),
    ((_CustomKey(),), "custom"),                            # any other key: str()
])
def test_path_str_is_keystr_with_the_same_strings(keypath, expected):
    assert path_str(keypath) == expected
    assert path_str(list(keypath)) == expected


def test_paths_of_real_trees():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(2, 3, rngs=rngs), nnx.Linear(3, 1, rngs=rngs)])

    paths, _, _ = flatten_with_paths(nnx.state(Net(nnx.Rngs(0)), nnx.Param))
    assert paths == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
    paths, _, _ = flatten_with_paths({"a": [jnp.ones(1), {"b": jnp.ones(1)}], "c": (jnp.ones(1),)})
    assert paths == ["a/0", "a/1/b", "c/0"]


def _micro_grads(k, windows):
    rng = np.random.default_rng(0)
    return [{"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=(2,)))} for _ in range(k * windows)]


@pytest.mark.parametrize("inner", ["grouped sgd", "optax adam"])
def test_accumulate_is_multisteps_bit_for_bit(inner):
    """Summed gradients in float64 (the tests' x64): the same bits as optax.MultiSteps(use_grad_mean=False)."""
    k, windows = 3, 2
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = (groupopt.sgd(0.1, momentum=0.9, params=params, groups=[{"params": "w"}, {"params": "b", "lr": 0.05}])
          if inner == "grouped sgd" else optax.adam(1e-2))
    ours, ref = groupopt.accumulate(tx, k), optax.MultiSteps(tx, k, use_grad_mean=False, accumulator_dtype=jnp.float64)
    so, sr = ours.init(params), ref.init(params)
    po = pr = params
    step_o, step_r = jax.jit(ours.update), jax.jit(ref.update)
    for g in _micro_grads(k, windows):
        uo, so = step_o(g, so, po)
        ur, sr = step_r(g, sr, pr)
        po, pr = optax.apply_updates(po, uo), optax.apply_updates(pr, ur)
        assert bool(ours.has_updated(so)) == bool(ref.has_updated(sr))
    for n in params:
        assert np.array_equal(np.asarray(po[n]), np.asarray(pr[n])), n


def test_accumulate_apply_is_exact_where_multisteps_has_no_apply():
    """What accumulate adds: ``apply`` (parameters unchanged on accumulating calls, then the inner
    ``apply`` on the sum), equal to summing the gradients by hand and applying once."""
    k = 3
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = groupopt.adamw(1e-2, params=params, groups=[{"params": "w"}, {"params": "b", "weight_decay": 0.0}])
    acc = groupopt.accumulate(tx, k)
    state, by_hand = acc.init(params), tx.init(params)
    p_acc = p_hand = params
    grads = _micro_grads(k, 2)
    acc_apply, tx_apply = jax.jit(acc.apply), jax.jit(tx.apply)
    for w in range(2):
        total = None
        for i in range(k):
            g = grads[w * k + i]
            before = p_acc
            p_acc, state = acc_apply(p_acc, g, state)
            total = g if total is None else jax.tree.map(jnp.add, total, g)
            if i < k - 1:
                assert all(p_acc[n] is before[n] or np.array_equal(p_acc[n], before[n]) for n in params)
        p_hand, by_hand = tx_apply(p_hand, total, by_hand)
        for n in params:
            assert np.array_equal(np.asarray(p_acc[n]), np.asarray(p_hand[n])), n


def test_one_tensor_conversion():
    t = torch.arange(4.0)
    a = tensor_to_numpy(t)
    t += 1  # a copy, never aliasing the tensor's memory
    assert a.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert tensor_to_numpy(3) == 3 and tensor_to_numpy(None) is None
    sd = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    out = optim.to_numpy(sd)
    assert isinstance(out["state"][0]["exp_avg"], np.ndarray) and out["param_groups"] == [{"lr": 0.1, "params": [0]}]
