"""The step engine's compiled program: each member's kernels read the group's coefficients as one operand.

On a step over thousands of small leaves, what a kernel costs beyond its memory traffic grows with its
operands (benchmarks/README.md, adamw_2001). ``engine.update_group`` computes a group's coefficients once
and stacks them into one array per dtype and shape (flags as 0.0/1.0 in the floating one); this test reads
the compiled HLO and checks that no per-leaf kernel takes a hyperparameter, or more than one coefficient
array, as an operand. That the packed step still equals torch is what every differential test checks.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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

