"""What every optimizer of the conformance table must do, against torch where torch has it.

The rows are in ``tests/conformance.py``; a new optimizer gets all of these by adding its row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from conformance import TABLE
from param_edits import NAMES, compare_with_torch, grads_at, init_params, step_both



pytestmark = pytest.mark.usefixtures("torch_float64_default")


def _groups(row):
    """Two groups with the row's richest options (the last), the second with another lr."""
    opts = dict(row.groups[-1])
    lr = row.kwargs.get("lr", 1.0)
    return [dict(opts), dict(opts, lr=lr / 3)]


def _pair(row, init):
    g0, g1 = _groups(row)
    tp = {k: torch.tensor(init[k], requires_grad=True) for k in NAMES}
    topt = row.torch_cls([dict(g0, params=[tp["a"], tp["b"]]), dict(g1, params=[tp["c"], tp["d"]])], **row.kwargs)
    opt = row.compat_cls([dict(g0, params=["a", "b"]), dict(g1, params=["c", "d"])],
                         model={k: jnp.asarray(v) for k, v in init.items()}, **row.kwargs)
    ours = {m.path: m for g in opt.param_groups for m in g["params"]}
    return tp, topt, opt, ours


@pytest.mark.parametrize("name", list(TABLE))
def test_state_follows_each_parameter_through_list_edits_like_torch(name):
    row = TABLE[name]
    tp, topt, opt, ours = _pair(row, init_params())
    step_both(tp, topt, opt, 0)
    def move(gs, aside):  # a parameter from group 0 to group 1
        gs[1]["params"].append(gs[0]["params"].pop(0))

    def reorder(gs, aside):
        gs[1]["params"].reverse()

    def remove(gs, aside):  # out of every group: its state is kept aside
        aside.append(gs[0]["params"].pop())

    def re_add(gs, aside):  # back: resumes from its state
        gs[1]["params"].insert(1, aside.pop())

    aside_t, aside_o = [], []
    for t, edit in enumerate((move, reorder, remove, re_add), start=1):
        edit(topt.param_groups, aside_t)
        edit(opt.param_groups, aside_o)
        step_both(tp, topt, opt, t)
    compare_with_torch(tp, topt, opt, ours)
    assert opt.num_compiles == 5  # one per structure


@pytest.mark.parametrize("name", list(TABLE))
def test_user_state_entries_survive_state_dict_both_ways(name):
    row = TABLE[name]
    tp, topt, opt, ours = _pair(row, init_params())
    step_both(tp, topt, opt, 0)
    opt.state[ours["c"]]["mine"] = 7
    topt.state[tp["c"]]["mine"] = 7
    osd, tsd = opt.state_dict(), topt.state_dict()
    assert osd["state"][2]["mine"] == tsd["state"][2]["mine"] == 7
    assert list(osd["state"][2]) == list(tsd["state"][2])
    tp2, topt2, opt2, ours2 = _pair(row, init_params(1))
    opt2.load_state_dict(tsd)
    topt2.load_state_dict({"state": {i: {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in e.items()}
                                     for i, e in osd["state"].items()}, "param_groups": osd["param_groups"]})
    assert opt2.state[ours2["c"]]["mine"] == topt2.state[tp2["c"]]["mine"] == 7


@pytest.mark.parametrize("name", list(TABLE))
def test_export_then_import_continues_bit_exactly(name):
    row = TABLE[name]
    init = init_params()
    _, _, opt, ours = _pair(row, init)
    g = {k: jnp.asarray(v) for k, v in grads_at(0).items()}
    opt.step(g)
    opt.state[ours["a"]]["note"] = "kept"
    arrays, meta = opt.export_state(include_params=True)
    arrays = {k: v for k, v in arrays.items()}
    _, _, fresh, fresh_ours = _pair(row, init_params(5))
    before = fresh.state_dict()
    commit = fresh.prepare_import(arrays, meta, include_params=True)
    after = fresh.state_dict()  # nothing applied before commit
    assert before.keys() == after.keys() and before["param_groups"] == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for i in before["state"]:
        for k in before["state"][i]:
            np.testing.assert_array_equal(np.asarray(before["state"][i][k]), np.asarray(after["state"][i][k]))
    commit()
    g1 = {k: jnp.asarray(v) for k, v in grads_at(1).items()}
    opt.step(g1)
    fresh.step(g1)
    for k in NAMES:
        np.testing.assert_array_equal(np.asarray(fresh.params[k]), np.asarray(opt.params[k]))
    assert fresh.state[fresh_ours["a"]]["note"] == "kept"


@pytest.mark.parametrize("name", list(TABLE))
def test_wrong_gradients_raise_before_any_change(name):
    row = TABLE[name]
    init = init_params()
    _, _, opt, _ = _pair(row, init)
    _, _, twin, _ = _pair(row, init)
    g = {k: jnp.asarray(v) for k, v in grads_at(0).items()}
    for bad in (dict(g, a=jnp.ones((3, 3))), dict(g, a=jnp.ones(3, jnp.int32)), dict(g, aa=g["a"])):
        with pytest.raises(ValueError, match="'a"):
            opt.step(bad)
    opt.step(g)
    twin.step(g)
    for k in NAMES:
        np.testing.assert_array_equal(np.asarray(opt.params[k]), np.asarray(twin.params[k]))
