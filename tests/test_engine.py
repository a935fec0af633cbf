"""The step engine's compiled program: each member's kernels read the group's coefficients as one operand.

On a step over thousands of small leaves, what a kernel costs beyond its memory traffic grows with its
operands (benchmarks/README.md, adamw_2001). ``engine.update_group`` computes a group's coefficients once
and stacks them into one array per dtype and shape (flags as 0.0/1.0 in the floating one); these tests read the compiled HLO and check that no
per-leaf kernel takes a hyperparameter, or more than one coefficient array, as an operand, and that the
packed step still equals torch.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
from conformance import MATRIX_ONLY, TABLE

DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ")
FUSION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (\S+?)(?:\{[^}]*\})? fusion\((.*?)\), kind=")


def leaf_kernels(hlo: str, leaf_type: str):
    """Per fusion of the entry computation whose result is ``leaf_type`` (e.g. ``f32[8,8]``): its operands as
    ``(name, type)`` pairs."""
    entry = hlo[hlo.index("\nENTRY"):]
    types = {m.group(1): m.group(2) for m in map(DEF.match, entry.splitlines()) if m}
    out = []
    for line in entry.splitlines():
        m = FUSION.match(line)
        if m and m.group(1) == leaf_type:
            names = re.findall(r"%([\w.\-]+)", m.group(2))
            out.append([(n, types[n]) for n in names])
    return out


def params(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return {f"w{i}": jnp.asarray(rng.standard_normal(shape), jnp.float32) for i in range(n)}


ROWS = {**TABLE, **MATRIX_ONLY}


@pytest.mark.parametrize("options", ["defaults", "last"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_leaf_kernels_take_one_coefficient_operand(name, options):
    """Every elementwise optimizer of the conformance table (and Muon), with its defaults and with its last
    (most featured) group's options, over two groups of three 8x8 leaves."""
    row = ROWS[name]
    p = params(6, (8, 8))
    opts = {} if options == "defaults" else row.groups[-1]
    tx = row.factory(**{**row.kwargs, **opts}, params=p, groups=[groupopt.group(["w0", "w1", "w2"]),
                                                                 groupopt.group(["w3", "w4", "w5"])])
    hlo = jax.jit(tx.apply).lower(p, p, tx.init(p)).compile().as_text()
    kernels = leaf_kernels(hlo, "f32[8,8]")
    assert len(kernels) >= 6  # at least one kernel a leaf
    for ops in kernels:
        assert not [n for n, _ in ops if "hyperparams" in n], f"a leaf kernel reads a hyperparameter directly: {ops}"
        coef = [(n, t) for n, t in ops if not t.endswith("[8,8]")]  # a leaf-shaped operand of any dtype is data
        assert len(coef) <= 1, f"a leaf kernel takes {len(coef)} coefficient operands: {coef}"


def test_packed_step_equals_torch_adamw_two_groups():
    """Two groups with their own numbers, one of a single member: still torch's AdamW, step by step."""
    rng = np.random.default_rng(1)
    shapes = {"a": (4, 3), "b": (3,), "c": (5,)}
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(5)]
    groups = [{"params": ["a", "b"], "lr": 3e-2, "weight_decay": 0.2}, {"params": ["c"], "lr": 1e-2, "betas": (0.8, 0.99)}]
    tx = groupopt.grouped(p0, [groupopt.group(g["params"], **{k: v for k, v in g.items() if k != "params"}) for g in groups],
                          rule=groupopt.AdamWRule)
    step = jax.jit(tx.apply)
    p = {k: jnp.asarray(v) for k, v in p0.items()}
    state = tx.init(p)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.AdamW([{**g, "params": [tp[k] for k in g["params"]]} for g in groups])
    for g in grads:
        p, state = step(p, {k: jnp.asarray(v) for k, v in g.items()}, state)
        for k, v in g.items():
            tp[k].grad = torch.tensor(v)
        topt.step()
    for k in shapes:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), rtol=2e-6, atol=1e-7)
