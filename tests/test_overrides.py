"""Overrides across groups: timm's layer decay x no weight decay, precedence, set_hyperparams, errors, cost."""

import fnmatch
import re
from collections import defaultdict
from itertools import chain

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import groupopt
import groupopt.compat as optim
from groupopt.groups import path_str

from optim_harness import rel_err

# ----------------------------------------------------------------------------- timm's reference
# Copied (simplified: no "simple" params, no no_opt_scale, no verbose) from huggingface/pytorch-image-models:
# timm/optim/_param_groups.py::param_groups_layer_decay (+ _matches_pattern), timm/models/_manipulate.py::
# group_with_matcher / group_parameters (dict matcher, reverse=True) and VisionTransformer.group_matcher /
# no_weight_decay from timm/models/vision_transformer.py.

MATCH_PREV_GROUP = (99999,)


def _matches_pattern(name, patterns):
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def group_with_matcher(named_objects, group_matcher, reverse=False):
    compiled = []
    for group_ordinal, (group_name, mspec) in enumerate(group_matcher.items()):
        if mspec is None:
            continue
        if isinstance(mspec, (tuple, list)):
            for sspec in mspec:
                compiled += [(re.compile(sspec[0]), (group_ordinal,), sspec[1])]
        else:
            compiled += [(re.compile(mspec), (group_ordinal,), None)]

    def _get_grouping(name):
        for match_fn, prefix, suffix in compiled:
            r = match_fn.match(name)
            if r:
                parts = (prefix, r.groups(), suffix)
                return tuple(map(float, chain.from_iterable(filter(None, parts))))
        return float("inf"),  # un-matched layers (neck, head) mapped to largest ordinal

    grouping = defaultdict(list)
    for k, v in named_objects:
        grouping[_get_grouping(k)].append(k)
    layer_id_to_param = defaultdict(list)
    lid = -1
    for k in sorted(filter(lambda x: x is not None, grouping.keys())):
        if lid < 0 or k[-1] != MATCH_PREV_GROUP[0]:
            lid += 1
        layer_id_to_param[lid].extend(grouping[k])
    assert reverse
    return {n: lid for lid, lm in layer_id_to_param.items() for n in lm}


def param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=(), weight_decay_exclude_1d=True,
                             layer_decay=0.75, min_scale=0.0):
    param_groups = {}
    layer_map = group_with_matcher(model.named_parameters(), model.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_map.values()) + 1
    layer_max = num_layers - 1
    layer_scales = list(max(min_scale, layer_decay ** (layer_max - i)) for i in range(num_layers))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (weight_decay_exclude_1d and param.ndim <= 1) or _matches_pattern(name, no_weight_decay_list):
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = layer_map.get(name, layer_max)
        this_scale = layer_scales[layer_id]
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in param_groups:
            param_groups[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": [], "names": []}
        param_groups[group_name]["params"].append(param)
        param_groups[group_name]["names"].append(name)  # (timm keeps names in a separate debug dict)
    return param_groups


# ----------------------------------------------------------------------------- a small ViT, torch and NNX

D, DEPTH, LR, WD, DECAY = 4, 2, 1e-3, 0.05, 0.75


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(D)
        self.attn = torch.nn.Module()
        self.attn.qkv, self.attn.proj = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
        self.norm2 = torch.nn.LayerNorm(D)  # (the MLP, two more Linears, is left out: compile time)


class TorchViT(torch.nn.Module):
    """timm's VisionTransformer parameter layout (names, shapes), without its forward."""

    def __init__(self):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, D, dtype=torch.float64))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, D, dtype=torch.float64))
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, D, 2, 2)
        self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(DEPTH)])
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, 5)
        for p in self.parameters():  # LayerNorm's ones/zeros would hide mistakes
            p.data = torch.randn(p.shape, dtype=torch.float64)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    def group_matcher(self, coarse=False):
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


class Node(nnx.Module):
    pass


def nnx_mirror(tm):
    """The NNX model with the torch module's names and values: ``blocks/0/attn/qkv/weight`` is ``blocks.0.attn.qkv.weight``."""
    m = Node()
    for n, p in tm.named_parameters(recurse=False):
        setattr(m, n, nnx.Param(jnp.asarray(p.detach().numpy())))
    for n, c in tm.named_children():
        setattr(m, n, nnx.List([nnx_mirror(x) for x in c]) if isinstance(c, torch.nn.ModuleList) else nnx_mirror(c))
    return m


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    tm = TorchViT()
    return tm, nnx_mirror(tm)


def timm_style(model, lr=LR):
    """The acceptance: timm's param_groups_layer_decay for a ViT in groupopt, 4 lines."""
    layers = [["cls_token", "pos_embed", "patch_embed"], *[f"blocks/{i}" for i in range(DEPTH - 1)], [f"blocks/{DEPTH - 1}", "norm"], groupopt.rest()]
    groups = [groupopt.group(sel, lr=lr * DECAY ** (len(layers) - 1 - i), name=f"layer_{i}") for i, sel in enumerate(layers)]
    no_decay = groupopt.override([lambda path, leaf: leaf.ndim <= 1, "cls_token", "pos_embed"], weight_decay=0.0, name="no_decay")
    return groupopt.grouped(model, groups, overrides=[no_decay], rule=groupopt.AdamWRule(), weight_decay=WD), groups, [no_decay]


def timm_reference(tm):
    return param_groups_layer_decay(tm, weight_decay=WD, no_weight_decay_list=tm.no_weight_decay(), layer_decay=DECAY)


def dotted(path):
    return path.replace("/", ".")


def test_timm_layer_decay_groups_equal(vit):
    tm, model = vit
    ref = timm_reference(tm)
    tx, _, _ = timm_style(model)
    hps = tx.hyperparams(tx.init(nnx.state(model, nnx.Param)))
    ours = {}
    for g, c in enumerate(tx.configs):
        timm_name = c.name.replace("+no_decay", "_no_decay") if "+" in c.name else c.name + "_decay"
        ours[timm_name] = (sorted(dotted(tx.plan.paths[i]) for i in tx.plan.members[g]), hps[g]["lr"], hps[g]["weight_decay"])
    want = {k: (sorted(g["names"]), LR * g["lr_scale"], g["weight_decay"]) for k, g in ref.items()}
    assert set(ours) == set(want)
    for k in want:
        assert ours[k][0] == want[k][0], k
        assert ours[k][1] == pytest.approx(want[k][1], rel=1e-15), k
        assert ours[k][2] == want[k][2], k
    # every parameter once
    assert sum(len(v[0]) for v in ours.values()) == len(list(tm.parameters()))


def test_compat_param_groups_equal_timm(vit):
    tm, model = vit
    ref = timm_reference(tm)
    _, groups, overrides = timm_style(model)
    # timm's groups carry lr_scale (its scheduler sets lr = base lr * lr_scale) and weight_decay: the same groups so
    scaled = [groupopt.group(g.select, lr_scale=g.hparams["lr"] / LR, weight_decay=WD, name=g.name) for g in groups]
    with pytest.raises(TypeError, match="group 0 .*AdamW has no group key 'lr_scale'"):
        optim.param_groups(model, scaled, overrides, optimizer=optim.AdamW)
    pg = optim.param_groups(model, scaled, overrides, optimizer=optim.AdamW, extra_keys=["lr_scale"])
    key = lambda names: tuple(sorted(names))  # noqa: E731
    ours = {key(dotted(n) for n in d["param_names"]): d for d in pg}
    assert set(ours) == {key(g["names"]) for g in ref.values()}
    for g in ref.values():
        d = ours[key(g["names"])]
        assert set(d) == {"params", "param_names", "lr_scale", "weight_decay"}
        assert d["lr_scale"] == pytest.approx(g["lr_scale"], rel=1e-15) and d["weight_decay"] == g["weight_decay"]
        # params are the model's Variables (torch: its tensors), listed with their names
        assert all(v is dict(zip(pg_names(model), pg_vars(model)))[n] for v, n in zip(d["params"], d["param_names"]))


def test_nnx_module_selects_by_identity(vit):
    _, model = vit
    _, groups, overrides = timm_style(model)
    tx = groupopt.grouped(model, groups, overrides=[*overrides, groupopt.override(model.blocks[0].attn, lr=0.0, name="lr0")],
                          rule=groupopt.AdamWRule())
    sub = {c.name: sorted(tx.plan.paths[i] for i in tx.plan.members[g]) for g, c in enumerate(tx.configs)}
    assert sub["layer_1+lr0"] == ["blocks/0/attn/proj/weight", "blocks/0/attn/qkv/weight"]
    assert sub["layer_1+no_decay+lr0"] == ["blocks/0/attn/proj/bias", "blocks/0/attn/qkv/bias"]
    assert sub["layer_1+no_decay"] == ["blocks/0/norm1/bias", "blocks/0/norm1/weight", "blocks/0/norm2/bias", "blocks/0/norm2/weight"]
    assert "layer_1" not in sub and {tx.configs[g].spec["lr"] for g, c in enumerate(tx.configs) if "lr0" in c.name} == {0.0}


def pg_names(model):
    return groupopt.groups.flatten_with_paths(nnx.state(model, nnx.Param))[0]


def pg_vars(model):
    return groupopt.groups.flatten_with_paths(nnx.state(model, nnx.Param))[1]


def test_training_equals_torch_adamw_over_timm_groups(vit):
    """Core (grouped + override) and compat (param_groups helper) against torch AdamW over timm's groups, f64."""
    tm, model = vit
    tm = TorchViT()  # fresh copies: the fixture's models stay untouched
    tm.load_state_dict(vit[0].state_dict())
    model = nnx_mirror(tm)
    ref = timm_reference(tm)
    for g in ref.values():
        g["lr"] = LR * g["lr_scale"]  # what timm's scheduler writes into each group
    topt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in ref.values()], lr=LR,
                             weight_decay=WD, foreach=False)
    tx, groups, overrides = timm_style(model)
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    step = jax.jit(tx.apply)
    cmodel = nnx_mirror(tm)
    copt = optim.AdamW(optim.param_groups(cmodel, groups, overrides), lr=LR, weight_decay=WD, model=cmodel)
    named = dict(tm.named_parameters())
    rng = np.random.default_rng(0)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    for _ in range(3):
        g = {dotted(path_str(kp)): rng.standard_normal(np.shape(x)) for kp, x in flat}
        for n, p in named.items():
            p.grad = torch.from_numpy(g[n])
        topt.step()
        grads = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(g[dotted(path_str(kp))]) for kp, _ in flat])
        params, state = step(params, grads, state)
        copt.step(grads)
    out = dict(zip(pg_names(model), jax.tree.leaves(params)))
    cout = {n: v.get_value() for n, v in zip(pg_names(cmodel), pg_vars(cmodel))}
    err = max(rel_err(out[n], named[dotted(n)]) for n in out)
    cerr = max(rel_err(cout[n], named[dotted(n)]) for n in cout)
    assert err < 1e-14 and cerr < 1e-14, (err, cerr)


# ----------------------------------------------------------------------------- semantics


def tree():
    f = lambda *s: jnp.asarray(np.random.default_rng(sum(s)).standard_normal(s))  # noqa: E731
    return {"l0": {"kernel": f(3, 2), "bias": f(2)}, "l1": {"kernel": f(2, 2), "bias": f(2)}, "emb": f(4, 3)}


def test_precedence_names_and_report():
    sched = groupopt.schedules.exponential(0.1, 0.5)
    tx = groupopt.grouped(
        tree(),
        [groupopt.group("l0", lr=sched, weight_decay=0.3, name="l0"), groupopt.group("l1", lr=0.2, name="l1"),
         groupopt.group("emb", frozen=True, name="emb")],
        overrides=[groupopt.override(groupopt.ALL, weight_decay=0.0, name="no_decay"),
                   groupopt.override("l1/bias", weight_decay=0.7, lr=sched, name="special"),
                   groupopt.override("l0/bias", lr=0.05)],
        rule=groupopt.AdamWRule(), weight_decay=0.01)
    # sub-groups group by group, in order of their first leaf; the frozen group is not split
    assert [c.name for c in tx.configs] == ["l0+no_decay+lr=0.05", "l0+no_decay", "l1+no_decay+special", "l1+no_decay", "emb"]
    spec = {c.name: c.spec for c in tx.configs}
    # later override > earlier override > group value > defaults; an override replaces a schedule and vice versa
    assert spec["l0+no_decay+lr=0.05"]["lr"] == 0.05 and spec["l0+no_decay"]["lr"] is sched
    assert spec["l1+no_decay+special"]["weight_decay"] == 0.7 and spec["l1+no_decay+special"]["lr"] is sched
    assert spec["l1+no_decay"]["weight_decay"] == 0.0 and spec["l0+no_decay"]["weight_decay"] == 0.0
    assert tx.configs[-1].frozen and tx.plan.members[-1] == (tx.plan.paths.index("emb"),)
    text = groupopt.report(tx, tree())
    assert "weight_decay=0.7 <special>" in text and "lr=0.05 <lr=0.05>" in text
    assert "0 no_decay: ALL -> weight_decay=0; 4 leaves in 4 sub-groups" in text
    assert "1 special: 'l1/bias' -> weight_decay=0.7, lr=schedule; 1 leaves in 1 sub-groups: l1+no_decay+special" in text
    assert "overridden by a later override in some sub-groups: ['weight_decay']" in text


def test_frozen_stays_frozen_and_set_hyperparams_reaches_sub_groups():
    p = tree()
    tx = groupopt.grouped(
        p, [groupopt.group("l0", name="l0"), groupopt.group("l1", name="l1"), groupopt.group("emb", frozen=True)],
        overrides=[groupopt.override("**/bias", weight_decay=0.0, name="no_decay")],
        rule=groupopt.AdamWRule(), lr=0.1, weight_decay=0.5)
    state = tx.init(p)
    assert state.groups[-1].slots == {} or all(len(v) == 0 for v in state.groups[-1].slots.values())
    new, _ = jax.jit(tx.apply)(p, jax.tree.map(jnp.ones_like, p), state)
    assert np.array_equal(new["emb"], p["emb"])
    # a group's name: every sub-group, but not the keys an override fixed there
    s2 = tx.set_hyperparams(state, "l0", lr=0.3, weight_decay=0.9)
    hp = dict(zip([c.name for c in tx.configs], tx.hyperparams(s2)))
    assert hp["l0"]["lr"] == hp["l0+no_decay"]["lr"] == 0.3
    assert hp["l0"]["weight_decay"] == 0.9 and hp["l0+no_decay"]["weight_decay"] == 0.0
    assert hp["l1"]["lr"] == 0.1
    # a sub-group's name: that sub-group, any key
    s3 = tx.set_hyperparams(state, "l0+no_decay", weight_decay=0.2)
    assert tx.hyperparams(s3)[0]["weight_decay"] == 0.2 and tx.hyperparams(s3)[1]["weight_decay"] == 0.5
    # a key fixed in every sub-group of a group cannot be reached through the group's name
    only = groupopt.grouped(p, [groupopt.group("l0/bias", name="b")], overrides=[groupopt.override("**/bias", weight_decay=0.0, name="nd")],
                            rule=groupopt.AdamWRule())
    with pytest.raises(ValueError, match=r"group 'b': \['weight_decay'\] fixed by override \['nd'\] in every sub-group \(\['b\+nd'\]\)"):
        only.set_hyperparams(only.init(p), "b", weight_decay=0.1)


def test_errors():
    p = tree()
    g = [groupopt.group("l0", name="l0"), groupopt.group("emb", frozen=True, name="emb")]
    adamw = groupopt.AdamWRule()
    with pytest.raises(ValueError, match=r"override 0 \(weight_decay=0\) selects no parameter: selector '\*\*/gamma'"):
        groupopt.grouped(p, g, overrides=[groupopt.override("**/gamma", weight_decay=0.0)], rule=adamw)
    with pytest.raises(ValueError, match=r"override 0 \(x\) selects only parameters that no rule updates .*\['emb', 'l1/bias'\]"):
        groupopt.grouped(p, g, overrides=[groupopt.override(["emb", "l1/bias"], lr=0.0, name="x")], rule=adamw)
    with pytest.raises(TypeError, match=r"override 0 \(momentum=0.9\): the rule of group 0 \(l0\) has no option or hyperparameter 'momentum'"):
        groupopt.grouped(p, g, overrides=[groupopt.override("l0", momentum=0.9)], rule=adamw)
    mixed = [groupopt.group("l0", name="adam"), groupopt.group("l1", rule=groupopt.SGDRule(), name="sgd")]
    with pytest.raises(TypeError, match=r"group 1 \(sgd\) has no option or hyperparameter 'betas'.*selects 'l1/bias'"):
        groupopt.grouped(p, mixed, overrides=[groupopt.override("**/bias", betas=(0.8, 0.9))], rule=adamw)
    with pytest.raises(TypeError, match="rest\\(\\) selects by group membership"):
        groupopt.grouped(p, g, overrides=[groupopt.override(groupopt.rest(), lr=0.0)], rule=adamw)
    with pytest.raises(TypeError, match="needs at least one hyperparameter"):
        groupopt.override("**/bias")
    with pytest.raises(ValueError, match="two groups are named 'l0\\+x'"):
        groupopt.grouped(p, [groupopt.group("l0", name="l0"), groupopt.group("l1", name="l0+x")],
                         overrides=[groupopt.override("l0/bias", lr=0.0, name="x")], rule=adamw)
    with pytest.raises(ValueError, match="overrides need the parameter tree"):
        groupopt.grouped(None, None, overrides=[groupopt.override("a", lr=0.0)], rule=adamw)
    # compat: frozen groups are left out, keys checked against the optimizer's signature
    pg = optim.param_groups(p, [groupopt.group("l0", lr=0.1), {"params": "emb", "frozen": True}],
                            [groupopt.override("**/bias", weight_decay=0.0)], optimizer=optim.AdamW, param_names=False)
    assert [sorted(d) for d in pg] == [["lr", "params", "weight_decay"], ["lr", "params"]]
    assert pg[0]["weight_decay"] == 0.0 and pg[0]["lr"] == 0.1 and pg[0]["params"][0] is p["l0"]["bias"]
    with pytest.raises(TypeError, match="override 0 \\(wd=0\\): the rule of group 0 \\(0\\) has no option or hyperparameter 'wd'"):
        optim.param_groups(p, [groupopt.group("l0")], [groupopt.override("**/bias", wd=0.0)], optimizer=optim.AdamW)


def test_no_run_time_cost_and_one_compile():
    """The override's groups trace to the same program as the hand-written cross product; one compile."""
    p = tree()
    kw = dict(rule=groupopt.AdamWRule(), weight_decay=0.5)
    tx = groupopt.grouped(p, [groupopt.group("l0", lr=0.1, name="l0"), groupopt.group("l1", lr=0.2, name="l1")],
                          overrides=[groupopt.override("**/bias", weight_decay=0.0, name="no_decay")], **kw)
    hand = groupopt.grouped(p, [groupopt.group("l0/bias", lr=0.1, weight_decay=0.0), groupopt.group("l0/kernel", lr=0.1),
                                groupopt.group("l1/bias", lr=0.2, weight_decay=0.0), groupopt.group("l1/kernel", lr=0.2)], **kw)
    grads = jax.tree.map(jnp.ones_like, p)
    j1 = jax.make_jaxpr(tx.apply)(p, grads, tx.init(p))
    j2 = jax.make_jaxpr(hand.apply)(p, grads, hand.init(p))
    assert len(j1.jaxpr.eqns) == len(j2.jaxpr.eqns) and str(j1) == str(j2)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        return tx.apply(params, grads, state)

    state = tx.init(p)
    for lr in (0.3, 0.4, 0.5):
        p, state = step(p, tx.set_hyperparams(state, "l1", lr=lr))
    assert len(traces) == 1
    assert tx.hyperparams(state)[2]["lr"] == 0.5 and tx.hyperparams(state)[3]["lr"] == 0.5


def test_docs_section_runs():
    """docs/core.md's overrides section runs as written (its printed results are checked here)."""
    import contextlib
    import io
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "core.md").read_text()
    section = text.split("## Overrides: values for a selection across groups")[1].split("\n## ")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ns = {}
        for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
            exec(compile(block, "docs/core.md", "exec"), ns)
    printed = out.getvalue()
    assert "'block0+no_decay', 'block0', 'block1+no_decay'" in printed
    assert "0.1 0.0 0.0002" in printed and "[(3, 0.000422, 0.0), (1, 0.000422, 0.05)]" in printed
    shared = {"a": jnp.zeros(2)}
    shared["b"] = shared["a"]
    with pytest.raises(ValueError, match="the arrays at 'a' and 'b' are one object"):
        optim.param_groups(shared)
