"""Selecting like torch users: ``named_parameters`` pairs and ``of_type`` selectors (by module type).

The expected selections are computed from a torch model of the same architecture with torch's own
idiom (``isinstance(module, nn.LayerNorm)`` over ``named_modules()``), translated to NNX paths with
the name table.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch import nn

import groupopt
import groupopt.compat as optim


class TNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(2)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


class JNet(nnx.Module):
    def __init__(self):
        r = nnx.Rngs(0)
        self.embed = nnx.Embed(7, 4, rngs=r)
        self.blocks = nnx.List([nnx.Sequential(nnx.LayerNorm(4, rngs=r), nnx.Linear(4, 4, rngs=r)) for _ in range(2)])
        self.norm = nnx.LayerNorm(4, rngs=r)
        self.head = nnx.Linear(4, 2, rngs=r)


def torch_selection(types) -> set:
    """NNX paths of the parameters torch's idiom selects: every parameter of every module of ``types``."""
    t = TNet()
    names = {f"{mn}.{pn}" if mn else pn for mn, m in t.named_modules() if isinstance(m, types)
             for pn, _ in m.named_parameters()}
    table = optim.torch_name_table(JNet())
    return {p for r in table if r.torch_name in names for p in r.nnx_paths}


def test_named_parameters_are_nnx_paths_and_variables():
    model = JNet()
    pairs = groupopt.named_parameters(model)
    paths = [p for p, _ in pairs]
    assert paths == ["/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert dict(pairs)["blocks/0/layers/1/kernel"] is model.blocks[0].layers[1].kernel
    assert len(pairs) == len(list(TNet().parameters())) == len(optim.torch_name_table(model))
    # a compat optimizer takes them as torch's take named parameters
    opt = optim.AdamW([(n, p) for n, p in pairs if not n.endswith("bias")], lr=1e-3)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in pairs if not n.endswith("bias")]
    with pytest.raises(TypeError, match="takes an NNX Module"):
        groupopt.named_parameters(nnx.state(model))


@pytest.mark.parametrize("types", [(nn.LayerNorm,), (nn.LayerNorm, nn.Embedding), (nn.Linear,)])
def test_of_type_selects_what_isinstance_selects_in_torch(types):
    nnx_types = tuple({nn.LayerNorm: nnx.LayerNorm, nn.Embedding: nnx.Embed, nn.Linear: nnx.Linear}[t] for t in types)
    model = JNet()
    plan = groupopt.partition(model, [groupopt.of_type(*nnx_types)])
    assert {plan.paths[i] for i in plan.members[0]} == torch_selection(types)
    if len(nnx_types) == 1:  # the class itself is the same selector
        assert groupopt.partition(model, [nnx_types[0]]).members == plan.members


def test_of_type_in_grouped_overrides_and_compat():
    model = JNet()
    want = torch_selection((nn.LayerNorm, nn.Embedding))
    no_decay = groupopt.override(groupopt.of_type(nnx.LayerNorm, nnx.Embed), weight_decay=0.0)
    tx = groupopt.grouped(
        model, [groupopt.group()], rule=groupopt.AdamWRule, lr=0.1, weight_decay=0.5, overrides=[no_decay])
    sub = {sg.name: sg for sg in tx.resolution.subgroups}
    plan = tx.resolution.plan
    got = {plan.paths[i] for g, sg in enumerate(tx.resolution.subgroups) if sg.values.get("weight_decay") == 0.0
           for i in plan.members[g]}
    assert got == want and len(sub) == 2

    # compat: torch-style groups by type; the optimizer's names are the same paths
    opt = optim.AdamW([{"params": groupopt.of_type(nnx.LayerNorm, nnx.Embed), "weight_decay": 0.0},
                       {"params": nnx.Linear}], model=model, lr=0.1, weight_decay=0.5)
    sd = opt.state_dict()
    first = {sd["param_names"][i] for i in sd["param_groups"][0]["params"]}
    assert first == want and opt.param_groups[0]["weight_decay"] == 0.0
    # one step: decay acts on the Linear group only (AdamW: p -= lr * wd * p, then the Adam step)
    grads = nnx.grad(lambda m: jnp.sum(m.head(m.norm(m.embed(jnp.arange(3))))))(model)
    before = {p: np.asarray(v.get_value()).copy() for p, v in groupopt.named_parameters(model)}
    opt.step(grads)
    emb = np.asarray(model.embed.embedding.get_value())
    untouched_rows = np.arange(3, 7)  # rows without gradient: moved only by weight decay, which is 0 here
    np.testing.assert_array_equal(emb[untouched_rows], before["embed/embedding"][untouched_rows])


def test_selectors_that_match_nothing_or_lack_the_model_say_which():
    model = JNet()
    with pytest.raises(ValueError, match=r"group 1 \(norms\) selects no parameter: selector of_type\(BatchNorm\)"):
        groupopt.partition(model, [nnx.Linear, nnx.BatchNorm], names=["linears", "norms"])
    with pytest.raises(ValueError, match=r"group 0 \(0\) selects no parameter: selector 'encoder/\*\*'"):
        groupopt.partition(model, ["encoder/**"])
    with pytest.raises(TypeError, match=r"of_type\(LayerNorm\) selects by module type, which needs the model"):
        groupopt.partition(nnx.state(model, nnx.Param), [groupopt.of_type(nnx.LayerNorm)])
    with pytest.raises(TypeError, match="takes NNX Module classes"):
        groupopt.of_type(nn.LayerNorm)
