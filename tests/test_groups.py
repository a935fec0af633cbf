"""Group selection: whole tree, NNX identity, globs, regexes, predicates, rest(), and errors."""

import re

import jax.numpy as jnp
import pytest
from flax import nnx

import groupopt
from groupopt.groups import partition


def tree():
    return {
        "encoder": {"layer0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}, "layer1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}},
        "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)},
    }


def selected(plan, g):
    return [plan.paths[i] for i in plan.members[g]]


def test_whole_tree_is_one_group_in_flatten_order():
    plan = partition(tree(), [groupopt.ALL])
    assert selected(plan, 0) == [
        "encoder/layer0/bias", "encoder/layer0/kernel", "encoder/layer1/bias", "encoder/layer1/kernel", "head/bias", "head/kernel",
    ]
    assert plan.frozen() == ()


def test_glob_selects_nodes_and_subtrees():
    plan = partition(tree(), ["encoder/**/kernel", "head"])
    assert selected(plan, 0) == ["encoder/layer0/kernel", "encoder/layer1/kernel"]
    assert selected(plan, 1) == ["head/bias", "head/kernel"]
    # biases of the encoder are in no group: frozen
    assert [plan.paths[i] for i in plan.frozen()] == ["encoder/layer0/bias", "encoder/layer1/bias"]


def test_single_star_stays_inside_one_segment():
    plan = partition(tree(), ["*/kernel"])
    assert selected(plan, 0) == ["head/kernel"]


def test_regex_and_predicate_and_rest():
    plan = partition(
        tree(),
        [re.compile(r".*/bias"), lambda path, leaf: leaf.ndim == 2 and path.startswith("head"), groupopt.rest()],
    )
    assert selected(plan, 0) == ["encoder/layer0/bias", "encoder/layer1/bias", "head/bias"]
    assert selected(plan, 1) == ["head/kernel"]
    assert selected(plan, 2) == ["encoder/layer0/kernel", "encoder/layer1/kernel"]


def test_double_match_lists_every_clash_with_both_groups():
    with pytest.raises(ValueError) as e:
        partition(tree(), ["encoder/**", "**/kernel"], names=["enc", "kernels"])
    msg = str(e.value)
    assert "'encoder/layer0/kernel' is in group 0 (enc) and group 1 (kernels)" in msg
    assert "'encoder/layer1/kernel' is in group 0 (enc) and group 1 (kernels)" in msg


def test_selector_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="group 1 .*selects no parameter"):
        partition(tree(), ["head", "decoder/**"])


class Block(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(2, 2, rngs=rngs)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.block1 = Block(rngs)
        self.block2 = Block(rngs)


def test_nnx_modules_and_variables_by_identity_even_with_coinciding_inner_paths():
    m = Net(nnx.Rngs(0))
    plan = partition(m, [m.block2, m.block1.l0.kernel])
    assert selected(plan, 0) == ["block2/l0/bias", "block2/l0/kernel"]
    assert selected(plan, 1) == ["block1/l0/kernel"]
    assert [plan.paths[i] for i in plan.frozen()] == ["block1/l0/bias"]


def test_nnx_selector_needs_variables_not_raw_arrays():
    m = Net(nnx.Rngs(0))
    raw = nnx.state(m, nnx.Param).to_pure_dict()
    with pytest.raises(TypeError, match="must hold the Variables"):
        partition(raw, [m.block1])


def test_unknown_selector_type():
    with pytest.raises(TypeError, match="cannot select parameters with int"):
        partition(tree(), [3])


def test_require_all_lists_every_unmatched_and_doubly_matched_leaf_at_once():
    with pytest.raises(ValueError) as e:
        partition(tree(), ["encoder/layer0", "**/kernel"], require_all=True)
    msg = str(e.value)
    assert "'encoder/layer0/kernel' is in group 0 (0) and group 1 (1)" in msg
    assert "2 parameters are in no group (require_all=True): 'encoder/layer1/bias', 'head/bias'" in msg
    tx = groupopt.adam(params=tree(), groups=[groupopt.group("encoder"), groupopt.group("head")])
    assert tx.plan.frozen() == ()
    with pytest.raises(ValueError, match="1 parameters are in no group"):
        groupopt.grouped(tree(), [groupopt.group("encoder"), groupopt.group("head/kernel")], rule=groupopt.AdamRule, require_all=True)
