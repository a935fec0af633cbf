"""State keyed by the parameter (issue: nothing silently lost or mixed up).

Every test runs torch 2.13 side by side where torch has the behaviour, or checks that a refused
call changes nothing (the next step equals that of an untouched twin).
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import jax
import jax.numpy as jnp
from flax import nnx

import groupopt.compat as optim
from groupopt.checkpoint import Checkpointer
from param_edits import NAMES, compare_with_torch, grads_at, init_params, step_both



def _pair(kind, init, split=2):
    """The same two-group optimizer in torch and in compat tree mode; returns (tparams, topt, opt, ours)."""
    tp = {k: torch.tensor(init[k], requires_grad=True) for k in NAMES}
    kw = dict(lr=0.1, momentum=0.9) if kind == "sgd" else dict(lr=0.05, betas=(0.8, 0.9))
    cls_t, cls_o = (torch.optim.SGD, optim.SGD) if kind == "sgd" else (torch.optim.Adam, optim.Adam)
    topt = cls_t([{"params": [tp[k] for k in NAMES[:split]]}, {"params": [tp[k] for k in NAMES[split:]], "lr": 0.02}], **kw)
    opt = cls_o([{"params": NAMES[:split]}, {"params": NAMES[split:], "lr": 0.02}], model={k: jnp.asarray(v) for k, v in init.items()}, **kw)
    ours = {m.path: m for g in opt.param_groups for m in g["params"]}
    return tp, topt, opt, ours


def _apply_edit(edit, topt, tp, opt, ours):
    """One torch-style list edit, applied identically to both optimizers' param_groups."""
    op, gi, i, j = edit
    tg, og = topt.param_groups, opt.param_groups
    gi %= len(tg)
    tl, ol = tg[gi]["params"], og[gi]["params"]
    if op == "del" and tl:
        k = i % len(tl)
        del tl[k]
        del ol[k]
    elif op == "append":
        name = NAMES[i % len(NAMES)]
        if not any(name == m.path for g in og for m in g["params"]):
            tl.append(tp[name])
            ol.append(ours[name])
    elif op == "insert":
        name = NAMES[i % len(NAMES)]
        if not any(name == m.path for g in og for m in g["params"]):
            tl.insert(j % (len(tl) + 1), tp[name])
            ol.insert(j % (len(ol) + 1), ours[name])
    elif op == "reorder" and tl:
        perm = np.random.default_rng(i).permutation(len(tl))
        tg[gi]["params"] = [tl[k] for k in perm]
        og[gi]["params"] = [ol[k] for k in perm]
    elif op == "move" and tl:
        k = i % len(tl)
        dst = (gi + 1) % len(tg)
        tg[dst]["params"].append(tl.pop(k))
        og[dst]["params"].append(ol.pop(k))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Each random edit sequence builds fresh optimizers whose layouts recur: a persistent
    compilation cache turns their identical programs into cache hits (the tracing still runs)."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


EDIT = st.tuples(st.sampled_from(["del", "append", "insert", "reorder", "move"]), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 2), EDIT), min_size=1, max_size=3))
def test_param_group_list_edits_follow_each_parameter_like_torch(compile_cache, kind, edits):
    """del / append / insert / reorder / move between groups by list edits, between steps: state
    follows each tensor, a newly appended one starts fresh, a removed one keeps its state (torch)."""
    tp, topt, opt, ours = _pair(kind, init_params())
    step_both(tp, topt, opt, 0)
    step = 1
    for n_steps, edit in edits:
        _apply_edit(edit, topt, tp, opt, ours)
        for _ in range(n_steps):
            step_both(tp, topt, opt, step)
            step += 1
    step_both(tp, topt, opt, step)
    compare_with_torch(tp, topt, opt, ours)


def test_list_edit_costs_one_recompile_and_reverting_costs_none():
    tp, topt, opt, ours = _pair("adam", init_params())
    step_both(tp, topt, opt, 0)
    assert opt.num_compiles == 1
    moved = opt.param_groups[0]["params"].pop()
    opt.param_groups[1]["params"].append(moved)
    tg = topt.param_groups
    tg[1]["params"].append(tg[0]["params"].pop())
    step_both(tp, topt, opt, 1)
    assert opt.num_compiles == 2
    step_both(tp, topt, opt, 2)
    assert opt.num_compiles == 2
    compare_with_torch(tp, topt, opt, ours)


def test_user_state_entries_are_kept_exported_and_loaded_like_torch():
    tp, topt, opt, ours = _pair("adam", init_params())
    step_both(tp, topt, opt, 0)
    topt.state[tp["a"]]["my_key"] = 5
    topt.state[tp["c"]]["ema"] = torch.tensor([1.0, 2.0])
    opt.state[ours["a"]]["my_key"] = 5
    opt.state[ours["c"]]["ema"] = jnp.asarray([1.0, 2.0])
    step_both(tp, topt, opt, 1)
    assert opt.state[ours["a"]]["my_key"] == 5 and "my_key" in dict(opt.state[ours["a"]])
    tsd, osd = topt.state_dict(), opt.state_dict()
    assert tsd["state"][0]["my_key"] == osd["state"][0]["my_key"] == 5
    np.testing.assert_array_equal(osd["state"][2]["ema"], tsd["state"][2]["ema"].numpy())
    assert list(tsd["state"][0]) == list(osd["state"][0])  # torch's key order: its own keys, then the user's
    # loaded back, both ways
    _, _, opt2, ours2 = _pair("adam", init_params(1))
    opt2.load_state_dict(tsd)
    assert opt2.state[ours2["a"]]["my_key"] == 5
    np.testing.assert_array_equal(np.asarray(opt2.state[ours2["c"]]["ema"]), [1.0, 2.0])
    _, topt3, _, _ = _pair("adam", init_params(1))
    topt3.load_state_dict({"state": {k: {n: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for n, v in e.items()}
                                     for k, e in osd["state"].items()}, "param_groups": osd["param_groups"]})
    assert topt3.state_dict()["state"][0]["my_key"] == 5
    # a user key on a parameter without optimizer state (before its first step)
    _, _, fresh, ours4 = _pair("adam", init_params())
    fresh.state[ours4["b"]]["note"] = "x"
    assert fresh.state_dict()["state"] == {1: {"note": "x"}}
    # optimizer keys can be replaced (shape checked), not deleted
    opt.state[ours["a"]]["exp_avg"] = jnp.zeros(3)
    np.testing.assert_array_equal(np.asarray(opt.state[ours["a"]]["exp_avg"]), np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        opt.state[ours["a"]]["exp_avg"] = jnp.zeros(4)
    with pytest.raises(KeyError):
        del opt.state[ours["a"]]["exp_avg"]


def test_del_state_resets_a_parameter_like_torch():
    tp, topt, opt, ours = _pair("adam", init_params())
    step_both(tp, topt, opt, 0)
    del topt.state[tp["b"]]
    del opt.state[ours["b"]]
    step_both(tp, topt, opt, 1)
    compare_with_torch(tp, topt, opt, ours)


# --------------------------------------------------------------------------- NNX: names and identity


class Twin(nnx.Module):
    """Two same-shaped layers: their inner paths coincide."""

    def __init__(self, rngs):
        self.a = nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)
        self.b = nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_grads_of_submodules_never_give_one_layer_anothers_state_on_a_named_load():
    x = jnp.ones((2, 3))
    m = Twin(nnx.Rngs(0))
    opt = optim.Adam([{"params": m.a}, {"params": m.b}], lr=0.1, model=m)
    opt.step(nnx.grad(lambda a: jnp.sum(a(x) ** 2))(m.a))  # grads of one submodule: paths 'kernel', 'bias'
    opt.step(nnx.grad(lambda b: jnp.sum(b(x) ** 3))(m.b))
    sd = opt.state_dict()
    assert sorted(sd["param_names"].values()) == ["a/bias", "a/kernel", "b/bias", "b/kernel"]
    m2 = Twin(nnx.Rngs(1))
    opt2 = optim.Adam([{"params": [m2.b, m2.a]}], lr=0.1, model=m2)  # other grouping and order: matched by name
    opt2.load_state_dict(sd, strict=False)
    for layer in ("a", "b"):
        for leaf in ("kernel", "bias"):
            ours = opt2.state[getattr(getattr(m2, layer), leaf)]["exp_avg"]
            saved = opt.state[getattr(getattr(m, layer), leaf)]["exp_avg"]
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(saved))
    assert not np.array_equal(np.asarray(opt.state[m.a.kernel]["exp_avg"]), np.asarray(opt.state[m.b.kernel]["exp_avg"]))


def test_mean_teacher_clone_made_after_the_optimizer_trains_the_student_like_torch():
    """timm's order: optimizer, then the EMA/teacher copy; loss through stop_gradient(teacher(x))."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 3)) for _ in range(4)]
    student = Twin(nnx.Rngs(0))
    opt = optim.SGD(student, lr=0.1, momentum=0.9)
    teacher = nnx.clone(student)  # copies the metadata groupopt matches gradients by
    tstudent = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    with torch.no_grad():
        for tl, ol in ((tstudent[0], student.a), (tstudent[2], student.b)):
            tl.weight.copy_(torch.tensor(np.asarray(ol.kernel[...]).T))
            tl.bias.copy_(torch.tensor(np.asarray(ol.bias[...])))
    topt = torch.optim.SGD(tstudent.parameters(), lr=0.1, momentum=0.9)
    import copy

    tteacher = copy.deepcopy(tstudent)

    def loss(s, t, x):
        return jnp.sum((s(x) - jax.lax.stop_gradient(t(x))) ** 2) + jnp.sum(s(x) ** 2)

    for i, x in enumerate(xs):
        opt.step(nnx.grad(loss)(student, teacher, jnp.asarray(x)))
        topt.zero_grad()
        xt = torch.tensor(x)
        (((tstudent(xt) - tteacher(xt).detach()) ** 2).sum() + (tstudent(xt) ** 2).sum()).backward()
        topt.step()
        with torch.no_grad():  # EMA of the teacher, both sides
            for pt, ps in zip(tteacher.parameters(), tstudent.parameters()):
                pt.mul_(0.5).add_(ps, alpha=0.5)
        var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        for tv, sv in zip(jax.tree.leaves(nnx.state(teacher, nnx.Param), is_leaf=var),
                          jax.tree.leaves(nnx.state(student, nnx.Param), is_leaf=var)):
            tv.set_value(0.5 * tv.get_value() + 0.5 * sv.get_value())
    np.testing.assert_allclose(np.asarray(student.a.kernel[...]).T, tstudent[0].weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(student.b.bias[...]), tstudent[2].bias.detach().numpy(), rtol=1e-12)
    # gradients of the student and the clone together carry the same identities: refused, naming both paths
    before = np.asarray(student.a.kernel[...]).copy()
    with pytest.raises(ValueError, match="several gradients belong to the same parameter: '0/a/bias' and '1/a/bias'"):
        opt.step(nnx.grad(loss, argnums=(0, 1))(student, teacher, jnp.asarray(xs[0])))
    np.testing.assert_array_equal(np.asarray(student.a.kernel[...]), before)
    # an optimizer built on the clone gets identities of its own: the two never mix
    opt_t = optim.SGD(teacher, lr=0.1)
    g_t = nnx.grad(lambda t: jnp.sum(t(jnp.asarray(xs[0])) ** 2))(teacher)
    with pytest.raises(ValueError, match="none of the gradients belongs to this optimizer's parameters"):
        opt.step(g_t)  # the teacher's gradients belong to none of the student's parameters
    np.testing.assert_array_equal(np.asarray(student.a.kernel[...]), before)
    opt_t.step(g_t)
    assert not np.array_equal(np.asarray(teacher.a.kernel[...]), np.asarray(student.a.kernel[...]))


# --------------------------------------------------------------------------- gradients at the door


def test_wrong_shape_or_dtype_gradients_raise_before_any_change_in_every_mode():
    init = init_params()
    opt = optim.Adam({k: jnp.asarray(v) for k, v in init.items()}, lr=0.1)
    twin = optim.Adam({k: jnp.asarray(v) for k, v in init.items()}, lr=0.1)
    good = {k: jnp.asarray(v) for k, v in grads_at(0).items()}
    for bad_value, match in [(jnp.ones((3, 3)), r"'a'.*\(3, 3\)"), (jnp.ones(()), r"'a'.*\(\)"),
                             (jnp.ones(3, jnp.int32), "int32"), (jnp.ones(3, jnp.complex64), "complex64"),
                             (jnp.ones(3, jnp.float32), "float32")]:
        with pytest.raises(ValueError, match=match):
            opt.step(dict(good, a=bad_value))
    with pytest.raises(ValueError, match=r"'cc' \(closest parameter: 'c'\)"):
        opt.step(dict(good, cc=good["c"]))
    opt.step(good)
    twin.step(good)
    for k in NAMES:
        np.testing.assert_array_equal(np.asarray(opt.params[k]), np.asarray(twin.params[k]))
    # NNX mode
    m = Twin(nnx.Rngs(0))
    nopt = optim.SGD(m, lr=0.1)
    g = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3))) ** 2))(m)
    g["a"]["bias"].value = jnp.ones((3, 3))
    before = np.asarray(m.a.bias[...]).copy()
    with pytest.raises(ValueError, match=r"'a/bias'.*\(3, 3\)"):
        nopt.step(g)
    assert m.a.bias[...].shape == (3,)
    np.testing.assert_array_equal(np.asarray(m.a.bias[...]), before)


def test_non_floating_parameters_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"'i' \(int32\)"):
        optim.Adam({"w": jnp.ones(2), "i": jnp.arange(3, dtype=jnp.int32)}, lr=0.1)
    with pytest.raises(ValueError, match="bool"):
        optim.SGD([{"params": "m"}], lr=0.1, model={"m": jnp.ones(2, bool)})


def test_empty_groups_all_none_grads_and_zeroed_grads_like_torch():
    init = init_params()
    # an empty group (an HF-style "no decay" split on a model without biases) is accepted, as in torch
    tp = {k: torch.tensor(init[k], requires_grad=True) for k in NAMES}
    topt = torch.optim.AdamW([{"params": [tp[k] for k in NAMES]}, {"params": [], "weight_decay": 0.0}], lr=0.1)
    opt = optim.AdamW([{"params": NAMES}, {"params": [], "weight_decay": 0.0}], lr=0.1,
                      model={k: jnp.asarray(v) for k, v in init.items()})
    assert len(opt.param_groups) == len(topt.param_groups) == 2 and opt.param_groups[1]["params"] == []
    # every gradient None: a no-op
    opt.step({k: None for k in NAMES})
    topt.step()
    assert opt.state_dict()["state"] == {} and topt.state_dict()["state"] == {}
    # zero_grad(set_to_none=False) then step(): a real step on zero gradients (weight decay acts)
    g = grads_at(0)
    opt.accumulate_grad({k: jnp.asarray(v) for k, v in g.items()})
    opt.step()
    for k in NAMES:
        tp[k].grad = torch.tensor(g[k])
    topt.step()
    opt.zero_grad(set_to_none=False)
    topt.zero_grad(set_to_none=False)
    opt.step()
    topt.step()
    for k in NAMES:
        np.testing.assert_allclose(np.asarray(opt.params[k]), tp[k].detach().numpy(), rtol=1e-12)
    assert float(opt.state_dict()["state"][0]["step"]) == 2.0


def test_two_parameters_holding_one_array_step_independently_like_torch():
    m = Twin(nnx.Rngs(0))
    m.b.bias.value = m.a.bias.value  # one buffer, two parameters
    opt = optim.SGD(m, lr=0.1, momentum=0.9)
    t = {n: torch.tensor(np.asarray(getattr(m, n).bias[...]), requires_grad=True) for n in ("a", "b")}
    topt = torch.optim.SGD([t["a"], t["b"]], lr=0.1, momentum=0.9)
    for i in range(3):
        g = nnx.grad(lambda m: jnp.sum(m(jnp.full((2, 3), float(i))) ** 2))(m)
        t["a"].grad, t["b"].grad = (torch.tensor(np.asarray(g[n]["bias"][...])) for n in ("a", "b"))
        opt.step(g)
        topt.step()
    for n in ("a", "b"):
        np.testing.assert_allclose(np.asarray(getattr(m, n).bias[...]), t[n].detach().numpy(), rtol=1e-12)


# --------------------------------------------------------------------------- checkpoints: all or nothing


def _seq(opt, n):
    sched = [optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2) for _ in range(n)]
    return optim.lr_scheduler.SequentialLR(opt, sched, milestones=list(range(3, 3 + 2 * (n - 1), 2)))


def test_checkpoint_restore_with_an_unfitting_scheduler_changes_nothing(tmp_path):
    init = init_params()
    opt = optim.Adagrad({k: jnp.asarray(v) for k, v in init.items()}, lr=0.1)
    sched = _seq(opt, 3)
    opt.state[opt.param_groups[0]["params"][0]]["my_key"] = [1, 2]
    for i in range(3):
        opt.step({k: jnp.asarray(v) for k, v in grads_at(i).items()})
        sched.step()
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(3, opt, sched)
    target = optim.Adagrad({k: jnp.asarray(v) for k, v in init.items()}, lr=0.1)
    twin = optim.Adagrad({k: jnp.asarray(v) for k, v in init.items()}, lr=0.1)
    s_target, s_twin = _seq(target, 2), _seq(twin, 2)
    target.step({k: jnp.asarray(v) for k, v in grads_at(9).items()})
    twin.step({k: jnp.asarray(v) for k, v in grads_at(9).items()})
    with Checkpointer(tmp_path / "ck") as ck, pytest.raises(ValueError, match="child schedulers"):
        ck.restore(target, s_target)
    assert target.state_dict().keys() == twin.state_dict().keys()
    for a, b in zip(jax.tree.leaves(target.state_dict()), jax.tree.leaves(twin.state_dict())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert s_target.state_dict().keys() == s_twin.state_dict().keys() and s_target.last_epoch == s_twin.last_epoch
    # the fitting scheduler restores everything, user entries and Adagrad's state included
    target2 = optim.Adagrad({k: jnp.asarray(v) for k, v in init.items()}, lr=0.1)
    s2 = _seq(target2, 3)
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.restore(target2, s2) == 3
    sd, sd2 = opt.state_dict(), target2.state_dict()
    assert sd2["state"][0]["my_key"] == [1, 2]
    for a, b in zip(jax.tree.leaves(sd), jax.tree.leaves(sd2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adagrad_eager_state_follows_each_parameter():
    """torch creates Adagrad's state for the constructor's parameters: it moves with them."""
    init = init_params()
    tp = {k: torch.tensor(init[k], requires_grad=True) for k in NAMES}
    topt = torch.optim.Adagrad([{"params": [tp["a"], tp["b"]]}], lr=0.1)
    opt = optim.Adagrad([{"params": ["a", "b"]}], lr=0.1, model={k: jnp.asarray(v) for k, v in init.items()})
    topt.add_param_group({"params": [tp["c"]]})
    opt.add_param_group({"params": "c"})
    topt.param_groups[1]["params"].append(topt.param_groups[0]["params"].pop(0))
    opt.param_groups[1]["params"].append(opt.param_groups[0]["params"].pop(0))
    tsd, osd = topt.state_dict(), opt.state_dict()
    assert sorted(tsd["state"]) == sorted(osd["state"])
    for k in tsd["state"]:
        assert set(tsd["state"][k]) == set(osd["state"][k])


def test_lbfgs_history_survives_an_orbax_round_trip(tmp_path):
    def closure_for(o):
        def closure():
            p = o.params
            loss, g = jax.value_and_grad(lambda p: jnp.sum((p["x"] - 3.0) ** 4) + jnp.sum(p["y"] ** 2))(p)
            return loss, g
        return closure

    init = {"x": jnp.asarray([1.0, 2.0]), "y": jnp.asarray([0.5])}
    a = optim.LBFGS(init, lr=1, max_iter=3)
    b = optim.LBFGS(init, lr=1, max_iter=3)
    for o in (a,):
        o.step(closure_for(o))
    with Checkpointer(tmp_path / "lb", async_save=False) as ck:
        ck.save(1, a, include_params=True)
    with Checkpointer(tmp_path / "lb") as ck:
        ck.restore(b, include_params=True)
    a.step(closure_for(a))
    b.step(closure_for(b))
    for k in init:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))
    sa, sb = a.state_dict()["state"][0], b.state_dict()["state"][0]
    assert sa["n_iter"] == sb["n_iter"] and len(sa["old_dirs"]) == len(sb["old_dirs"]) > 0


def test_a_parameter_popped_then_given_to_add_param_group_keeps_its_state_like_torch():
    tp, topt, opt, ours = _pair("adam", init_params())
    step_both(tp, topt, opt, 0)
    topt.add_param_group({"params": [topt.param_groups[0]["params"].pop()], "lr": 0.3})
    opt.add_param_group({"params": [opt.param_groups[0]["params"].pop()], "lr": 0.3})
    for i in (1, 2):
        step_both(tp, topt, opt, i)
    compare_with_torch(tp, topt, opt, ours)
    assert float(opt.state[ours["b"]]["step"]) == 3.0
