"""Non-finite numbers (NaN, +Inf, -Inf) flow through every rule exactly as through torch.optim.

One problem per optimizer and dtype, run by torch and by the core factory (jitted
``tx.apply``) in the same process; each option set is one parameter group, so one
compilation covers all of them. Per group, three parameters of 8 elements:

* ``a``: finite values; its gradients carry NaN, +Inf and -Inf at a few elements
  (different elements at different steps, so non-finite state meets finite gradients);
* ``b``: +Inf / -Inf / NaN values, finite gradients (weight decay on or off matters here);
* ``c``: finite values, finite gradients with exact zeros (Rprop's ``sign == 0``).

After every step the parameters must agree: NaN at the same positions, the same
infinities (with their sign), finite values within fp64 1e-12 / fp32 1e-5 relative.
The per-parameter state is compared the same way at the end.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from conformance import TABLE

NAN, INF = float("nan"), float("inf")
N = 8
STEPS = 4
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}

# optimizer -> (torch class, core factory, kwargs, per-group options): the shared conformance table
CASES = {name: (row.torch_cls, row.factory, row.kwargs, row.groups) for name, row in TABLE.items()}


def problem(n_groups, dtype, seed=0):
    """Initial parameters and per-step gradients: per group ``{"a", "b", "c"}`` of numpy arrays."""
    rng = np.random.default_rng(seed)
    init, grads = [], [[] for _ in range(STEPS)]
    for _ in range(n_groups):
        b = rng.standard_normal(N)
        b[[0, 3]], b[[1, 6]], b[5] = INF, -INF, NAN
        init.append({"a": rng.standard_normal(N), "b": b, "c": rng.standard_normal(N)})
        for t in range(STEPS):
            a = rng.standard_normal(N)
            if t < 3:  # at step t, elements t, t+3 and t+5 (mod N) are NaN, +Inf, -Inf
                a[t], a[(t + 3) % N], a[(t + 5) % N] = NAN, INF, -INF
            c = rng.standard_normal(N)
            c[[2, 7]] = 0.0
            grads[t].append({"a": a, "b": rng.standard_normal(N), "c": c})
    cast = lambda d: {k: v.astype(dtype) for k, v in d.items()}  # noqa: E731
    return [cast(d) for d in init], [[cast(d) for d in step] for step in grads]


def mismatch(ours, ref, rtol) -> str | None:
    """None when NaN positions, infinities and finite values (within ``rtol``) agree, else why not."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return f"shape {ours.shape} vs torch {ref.shape}"
    if not np.array_equal(np.isnan(ours), np.isnan(ref)):
        return f"NaN positions differ: ours {np.flatnonzero(np.isnan(ours))}, torch {np.flatnonzero(np.isnan(ref))}"
    inf = np.isinf(ref)
    if not np.array_equal(np.isinf(ours), inf) or not np.array_equal(ours[inf], ref[inf]):
        return f"infinities differ: ours {ours}, torch {ref}"
    fin = np.isfinite(ref)
    scale = max(np.max(np.abs(ref[fin]), initial=0.0), 1e-30)
    err = np.max(np.abs(ours[fin] - ref[fin]), initial=0.0) / scale
    return None if err <= rtol else f"finite values differ by {err:.3g} (relative): ours {ours}, torch {ref}"


def run_both(name, dtype):
    torch_cls, factory, kwargs, options = CASES[name]
    init, grads = problem(len(options), dtype)
    tparams = [{k: torch.tensor(v.copy()).requires_grad_(True) for k, v in d.items()} for d in init]
    topt = torch_cls([{"params": list(d.values()), **o} for d, o in zip(tparams, options)], **kwargs)
    tree = {f"g{g}": {k: jax.numpy.asarray(v) for k, v in d.items()} for g, d in enumerate(init)}
    tx = factory(params=tree, groups=[{"params": f"g{g}/*", **o} for g, o in enumerate(options)], **kwargs)
    state = tx.init(tree)
    apply = jax.jit(tx.apply)
    problems = []
    for t in range(STEPS):
        for d, gd in zip(tparams, grads[t]):
            for k, p in d.items():
                p.grad = torch.tensor(gd[k].copy())
        topt.step()
        tree, state = apply(tree, {f"g{g}": gd for g, gd in enumerate(grads[t])}, state)
        for g, d in enumerate(tparams):
            for k, p in d.items():
                why = mismatch(tree[f"g{g}"][k], p.detach().numpy(), RTOL[np.dtype(dtype)])
                if why:
                    problems.append(f"step {t} group {g} {options[g]} param {k}: {why}")
    for g, d in enumerate(tparams):
        slots = state.groups[g].slots
        for j, (k, p) in enumerate(d.items()):
            for sname, arrs in slots.items():
                why = mismatch(arrs[j], topt.state[p][sname].numpy(), RTOL[np.dtype(dtype)])
                if why:
                    problems.append(f"final state {sname!r} group {g} {options[g]} param {k}: {why}")
    return problems




@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_nonfinite_values_follow_torch(name, dtype, torch_float64_default):
    problems = run_both(name, dtype)
    assert not problems, "\n".join(problems[:12]) + (f"\n... {len(problems) - 12} more" if len(problems) > 12 else "")
