"""Pure jit-able schedules vs torch 2.13 schedulers, in the same run.

A pure schedule evaluated at count ``c`` must be torch's lr at ``last_epoch == c``
on an untouched run (scheduler stepped once per optimizer step). Each family
is checked over 300 counts, jitted (``vmap`` over the counts), in float64 and
in float32 (``jax.enable_x64(False)``: int32 counts, float32 arithmetic),
against torch's Python-float values. Errors are measured relative to the
group's base lr, ``|pure - torch| / base``, because torch's recursive
(chainable) forms and the closed forms used here differ by rounding, and
schedules pass through 0 (cosine minima, polynomial end).

Also: the schedules as per-group hyperparameters of ``groupopt.grouped``
against a torch run with one optimizer and scheduler per group (lrs read from
``state.hyperparams`` at every step, and the parameters).
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt
from groupopt import schedules as S

N = 300
BASES = [0.1, 0.05, 0.3]
TL = torch.optim.lr_scheduler

# measured maxima: see the report; these bounds leave room across platforms
TOL64 = 1e-12
TOL32 = 2e-6
TOL32_PRODUCT = 5e-5


def torch_trace(factory, bases=BASES, n=N):
    """torch's lr of each group at last_epoch = 0..n-1 (an untouched run): shape (n, groups)."""
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": b} for b in bases], lr=bases[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's order warning when nested composites are built
        sched = factory(opt)
    out = [[g["lr"] for g in opt.param_groups]]
    for _ in range(n - 1):
        opt.step()
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return np.asarray(out, dtype=np.float64)


def pure_traces(makes, bases=BASES, n=N, x64=True):
    """Each pure factory ``make(base)``, jitted (one program for all) and vmapped over counts 0..n-1.

    Returns shape (configs, n, groups) in float64.
    """
    with jax.enable_x64(x64):
        fns = [[make(b) for b in bases] for make in makes]
        want = jnp.float64 if x64 else jnp.float32

        def values(c):
            out = [[f(c) for f in row] for row in fns]
            assert all(v.dtype == want for row in out for v in row)  # every schedule, in the default float dtype
            return jnp.stack([jnp.stack(row) for row in out])

        v = jax.jit(jax.vmap(values))(jnp.arange(n, dtype=jnp.int32))
    return np.moveaxis(np.asarray(v, dtype=np.float64), 0, 1)


def err(pure, ref, bases=BASES) -> float:
    """Largest ``|pure - torch| / base``."""
    return float(np.max(np.abs(pure - ref) / np.asarray(bases)[None, :]))


def check_family(pairs, bases=BASES, n=N, tol32=None):
    """torch vs pure (jitted fp64 and fp32, and the host Python path); returns the max errors (fp64, fp32)."""
    refs = [torch_trace(tf, bases, n) for tf, _ in pairs]
    makes = [mk for _, mk in pairs]
    p64, p32 = pure_traces(makes, bases, n, True), pure_traces(makes, bases, n, False)
    e64 = [err(p, r, bases) for p, r in zip(p64, refs)]
    e32 = [err(p, r, bases) for p, r in zip(p32, refs)]
    assert np.all(np.asarray(e64) <= TOL64), e64  # (NaN fails)
    assert np.all(np.asarray(e32) <= (tol32 or TOL32)), e32
    # where torch's lr is exactly 0 (ends of decays), so is the pure schedule's, in both precisions
    for p, r in [*zip(p64, refs), *zip(p32, refs)]:
        assert np.all(p[r == 0] == 0)
    # the host path of the same formulas: Python ints in, Python floats out
    for make, ref in zip(makes, refs):
        host = np.asarray([[float(make(b)(c)) for b in bases] for c in range(0, n, 7)])
        assert np.all(err(host, ref[::7], bases) <= TOL64)
    return max(e64), max(e32)


def _sel(cond, a, b):
    return jnp.where(cond, a, b) if isinstance(cond, jax.Array) else (a if cond else b)


# (torch factory(opt), pure factory(base))
FAMILIES = {
    "LambdaLR": [
        (lambda o: TL.LambdaLR(o, lambda e: 0.97**e), lambda b: S.lambda_(b, lambda e: 0.97**e)),
        (lambda o: TL.LambdaLR(o, lambda e: 1.0 / (1 + e)), lambda b: S.lambda_(b, lambda e: 1.0 / (1 + e))),
        (lambda o: TL.LambdaLR(o, lambda e: e // 30 + 0.5), lambda b: S.lambda_(b, lambda e: e // 30 + 0.5)),
    ],
    "MultiplicativeLR": [
        (lambda o: TL.MultiplicativeLR(o, lambda e: 0.99), lambda b: S.multiplicative(b, lambda e: 0.99)),
        (
            lambda o: TL.MultiplicativeLR(o, lambda e: 1.0 - 0.002 * (e % 7)),
            lambda b: S.multiplicative(b, lambda e: 1.0 - 0.002 * (e % 7)),
        ),
        (
            lambda o: TL.MultiplicativeLR(o, lambda e: _sel(e < 50, 1.001, 0.98)),
            lambda b: S.multiplicative(b, lambda e: _sel(e < 50, 1.001, 0.98)),
        ),
    ],
    "StepLR": [
        (lambda o: TL.StepLR(o, 3, 0.1), lambda b: S.step(b, 3, 0.1)),
        (lambda o: TL.StepLR(o, 7, 0.5), lambda b: S.step(b, 7, 0.5)),
        (lambda o: TL.StepLR(o, 1, 0.99), lambda b: S.step(b, 1, 0.99)),
    ],
    "MultiStepLR": [
        (lambda o: TL.MultiStepLR(o, [2, 5, 5], 0.1), lambda b: S.multistep(b, [2, 5, 5], 0.1)),
        (lambda o: TL.MultiStepLR(o, [30, 30, 100, 200], 0.5), lambda b: S.multistep(b, [30, 30, 100, 200], 0.5)),
        (lambda o: TL.MultiStepLR(o, [0, 10, 299], 0.5), lambda b: S.multistep(b, [0, 10, 299], 0.5)),
    ],
    "ExponentialLR": [
        (lambda o: TL.ExponentialLR(o, 0.9), lambda b: S.exponential(b, 0.9)),
        (lambda o: TL.ExponentialLR(o, 0.99), lambda b: S.exponential(b, 0.99)),
        (lambda o: TL.ExponentialLR(o, 1.001), lambda b: S.exponential(b, 1.001)),
    ],
    "ConstantLR": [
        (lambda o: TL.ConstantLR(o, 0.5, 3), lambda b: S.constant(b, 0.5, 3)),
        (lambda o: TL.ConstantLR(o), lambda b: S.constant(b, 1.0 / 3, 5)),
        (lambda o: TL.ConstantLR(o, 0.1, 250), lambda b: S.constant(b, factor=0.1, total_iters=250)),
        (lambda o: TL.ConstantLR(o, 1.0, 7), lambda b: S.constant(b)),
    ],
    "LinearLR": [
        (lambda o: TL.LinearLR(o, 0.25, 1.0, 4), lambda b: S.linear(b, 0.25, 1.0, 4)),
        (lambda o: TL.LinearLR(o, 1.0, 0.0, 4), lambda b: S.linear(b, 1.0, 0.0, 4)),
        (lambda o: TL.LinearLR(o, 0.5, 0.8, 100), lambda b: S.linear(b, 0.5, 0.8, 100)),
        (lambda o: TL.LinearLR(o), lambda b: S.linear(b)),
        (lambda o: TL.LinearLR(o, 0.01, 1.0, 299), lambda b: S.linear(b, 0.01, 1.0, 299)),
        (lambda o: TL.LinearLR(o, 1.0, 0.0, 3), lambda b: S.linear(b, 1.0, 0.0, 3)),
        (lambda o: TL.LinearLR(o, 0.3, 0.0, 7), lambda b: S.linear(b, 0.3, 0.0, 7)),
    ],
    "PolynomialLR": [
        (lambda o: TL.PolynomialLR(o, 5, 2.0), lambda b: S.polynomial(b, 5, 2.0)),
        (lambda o: TL.PolynomialLR(o, 100, 0.9), lambda b: S.polynomial(b, 100, 0.9)),
        (lambda o: TL.PolynomialLR(o, 300), lambda b: S.polynomial(b, 300)),
        (lambda o: TL.PolynomialLR(o, 50, 0.5), lambda b: S.polynomial(b, total_iters=50, power=0.5)),
        (lambda o: TL.PolynomialLR(o, 3, 0.3), lambda b: S.polynomial(b, total_iters=3, power=0.3)),
    ],
    "CosineAnnealingLR": [
        (lambda o: TL.CosineAnnealingLR(o, 4, 0.01), lambda b: S.cosine(b, 4, 0.01)),
        (lambda o: TL.CosineAnnealingLR(o, 50), lambda b: S.cosine(b, 50)),
        (lambda o: TL.CosineAnnealingLR(o, 7, 1e-3), lambda b: S.cosine(b, 7, 1e-3)),
        (lambda o: TL.CosineAnnealingLR(o, 1), lambda b: S.cosine(b, 1)),
    ],
    "CosineAnnealingWarmRestarts": [
        (lambda o: TL.CosineAnnealingWarmRestarts(o, 3, 2), lambda b: S.cosine_warm_restarts(b, 3, 2)),
        (lambda o: TL.CosineAnnealingWarmRestarts(o, 10, 1, 1e-3), lambda b: S.cosine_warm_restarts(b, 10, 1, 1e-3)),
        (lambda o: TL.CosineAnnealingWarmRestarts(o, 1, 3), lambda b: S.cosine_warm_restarts(b, 1, 3)),
        (lambda o: TL.CosineAnnealingWarmRestarts(o, 5, 2, 0.01), lambda b: S.cosine_warm_restarts(b, T_0=5, T_mult=2, eta_min=0.01)),
    ],
    "SequentialLR": [
        (
            lambda o: TL.SequentialLR(o, [TL.LinearLR(o, 0.1, 1, 3), TL.ExponentialLR(o, 0.9)], [3]),
            lambda b: S.join([S.linear(b, 0.1, 1, 3), S.exponential(b, 0.9)], [3]),
        ),
        (
            lambda o: TL.SequentialLR(o, [TL.ConstantLR(o, 0.1, 10), TL.CosineAnnealingLR(o, 4)], [2]),
            lambda b: S.join([S.constant(b, 0.1, 10), S.cosine(b, 4)], [2]),
        ),
        (
            lambda o: TL.SequentialLR(o, [TL.LinearLR(o, 0.1, 1, 3), TL.LambdaLR(o, lambda e: 0.5**e)], [2]),
            lambda b: S.join([S.linear(b, 0.1, 1, 3), S.lambda_(b, lambda e: 0.5**e)], [2]),
        ),
        (
            lambda o: TL.SequentialLR(
                o, [TL.LinearLR(o, 0.2, 1, 20), TL.CosineAnnealingWarmRestarts(o, 10, 2, 1e-3), TL.StepLR(o, 7, 0.7)], [20, 170]
            ),
            lambda b: S.join([S.linear(b, 0.2, 1, 20), S.cosine_warm_restarts(b, 10, 2, 1e-3), S.step(b, 7, 0.7)], [20, 170]),
        ),
        (
            lambda o: TL.SequentialLR(
                o,
                [TL.SequentialLR(o, [TL.LinearLR(o, 0.5, 1, 5), TL.ExponentialLR(o, 0.98)], [5]), TL.PolynomialLR(o, 100, 2.0)],
                [60],
            ),
            # torch quirk: the outer construction steps the nested SequentialLR once more, so it switches
            # to its second child one count early (milestone 5 acts as 4)
            lambda b: S.join([S.join([S.linear(b, 0.5, 1, 5), S.exponential(b, 0.98)], [4]), S.polynomial(b, 100, 2.0)], [60]),
        ),
        (
            lambda o: TL.SequentialLR(
                o, [TL.ChainedScheduler([TL.ConstantLR(o, 0.5, 8), TL.ExponentialLR(o, 0.97)]), TL.MultiStepLR(o, [10, 20], 0.5)], [40]
            ),
            # torch quirk: the outer construction steps the nested ChainedScheduler once more: ExponentialLR,
            # not in its initial mode then, applies one extra factor 0.97 (ConstantLR's count-0 rule is idempotent)
            lambda b: S.join([S.multiply(S.constant(b, 0.5, 8), S.exponential(0.97, 0.97)), S.multistep(b, [10, 20], 0.5)], [40]),
        ),
    ],
    "ChainedScheduler": [
        (
            lambda o: TL.ChainedScheduler([TL.ConstantLR(o, 0.1, 2), TL.ExponentialLR(o, 0.9)]),
            lambda b: S.multiply(S.constant(b, 0.1, 2), S.exponential(1.0, 0.9)),
        ),
        (
            # a chained CosineAnnealingLR is multiplicative only up to T_max (then its special branch adds base lr)
            lambda o: TL.ChainedScheduler([TL.LinearLR(o, 0.1, 1, 10), TL.CosineAnnealingLR(o, 400), TL.MultiStepLR(o, [50, 150])]),
            lambda b: S.multiply(S.linear(b, 0.1, 1, 10), S.cosine(1.0, 400), S.multistep(1.0, [50, 150])),
        ),
        (
            lambda o: TL.ChainedScheduler(
                [TL.PolynomialLR(o, 250, 1.5), TL.StepLR(o, 30, 0.5), TL.MultiplicativeLR(o, lambda e: 1.001)]
            ),
            lambda b: S.multiply(S.polynomial(b, 250, 1.5), S.step(1.0, 30, 0.5), S.multiplicative(1.0, lambda e: 1.001)),
        ),
    ],
}


from hf_reference import _hf_constant, _hf_cosine, _hf_linear  # noqa: E402


FAMILIES["warmup"] = [
    (lambda o: TL.LambdaLR(o, partial(_hf_linear, W=10, N=200)), lambda b: S.warmup_linear(b, 10, 200)),
    (lambda o: TL.LambdaLR(o, partial(_hf_linear, W=0, N=350)), lambda b: S.warmup_linear(b, 0, 350)),
    (lambda o: TL.LambdaLR(o, partial(_hf_cosine, W=25, N=300, num_cycles=0.5)), lambda b: S.warmup_cosine(b, 25, 300)),
    (lambda o: TL.LambdaLR(o, partial(_hf_cosine, W=0, N=100, num_cycles=2.0)), lambda b: S.warmup_cosine(b, 0, 100, num_cycles=2.0)),
    (lambda o: TL.LambdaLR(o, partial(_hf_cosine, W=40, N=250, num_cycles=0.3)), lambda b: S.warmup_cosine(b, 40, 250, 0.3)),
    (lambda o: TL.LambdaLR(o, partial(_hf_constant, W=37)), lambda b: S.warmup_constant(b, 37)),
    (lambda o: TL.LambdaLR(o, partial(_hf_constant, W=1)), lambda b: S.warmup_constant(b, 1)),
]

# float32 error of a power or product over 300 counts: the factor is rounded to float32 (rel. ~3e-8)
# and raised to the count, or 300 roundings accumulate
PRODUCTS = {"LambdaLR", "MultiplicativeLR", "ExponentialLR", "StepLR", "ChainedScheduler", "SequentialLR"}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pure_matches_torch(name):
    check_family(FAMILIES[name], tol32=TOL32_PRODUCT if name in PRODUCTS else TOL32)


def test_join_is_optax_join_schedules():
    import optax

    a, b, c = S.linear(0.1, 0.2, 1.0, 10), S.cosine(0.1, 30, 1e-3), S.step(0.05, 7)
    both = jax.jit(jax.vmap(lambda t: (S.join([a, b, c], [10, 100])(t), optax.join_schedules([a, b, c], [10, 100])(t))))
    ours, ref = both(jnp.arange(N, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_warm_restarts_cycle_is_torch_recursion():
    """(T_cur, T_i) of the jitted closed form == torch's step() recursion, over many cycles."""
    for T_0, T_mult in [(1, 2), (3, 2), (2, 3), (4, 1), (1, 10)]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        s = TL.CosineAnnealingWarmRestarts(opt, T_0, T_mult)
        ref = []
        for _ in range(700):
            ref.append((s.T_cur, s.T_i))
            opt.step()
            s.step()
        cyc = jax.jit(jax.vmap(lambda t: S.warm_restarts_cycle(t, T_0, T_mult)))(jnp.arange(700, dtype=jnp.int32))
        got = list(zip(np.asarray(cyc[0]).tolist(), np.asarray(cyc[1]).tolist()))
        assert got == ref
        assert [S.warm_restarts_cycle(t, T_0, T_mult) for t in range(700)] == ref


# ------------------------------------------------------------------ per-group schedules in the core


def test_grouped_per_group_schedules_match_torch():
    """groupopt.grouped with a schedule per group == torch with one optimizer + scheduler per group."""
    n = N
    groups = {
        "a": (
            lambda b: S.warmup_cosine(b, 10, n),
            lambda o: TL.LambdaLR(o, partial(_hf_cosine, W=10, N=n, num_cycles=0.5)),
            0.1,
        ),
        "b": (lambda b: S.step(b, 30, 0.5), lambda o: TL.StepLR(o, 30, 0.5), 0.05),
        "c": (None, None, 0.1),
        "d": (
            lambda b: S.join([S.linear(b, 0.1, 1.0, 20), S.cosine_warm_restarts(b, 13, 2, 1e-4)], [20]),
            lambda o: TL.SequentialLR(o, [TL.LinearLR(o, 0.1, 1.0, 20), TL.CosineAnnealingWarmRestarts(o, 13, 2, 1e-4)], [20]),
            0.2,
        ),
        "e": (
            lambda b: S.multiply(S.constant(b, 0.5, 40), S.polynomial(1.0, 250, 2.0)),
            lambda o: TL.ChainedScheduler([TL.ConstantLR(o, 0.5, 40), TL.PolynomialLR(o, 250, 2.0)]),
            0.3,
        ),
    }
    shapes = {"a": (3,), "b": (2, 2), "c": (1,), "d": (4,), "e": (2,)}
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = {k: rng.standard_normal((n,) + s) for k, s in shapes.items()}  # one gradient per step
    names = list(groups)

    # torch: one SGD + scheduler per group (torch has one scheduler per optimizer)
    t_params, t_lrs = {}, {k: [] for k in names}
    for k, (_, tfac, base) in groups.items():
        p = torch.tensor(p0[k], requires_grad=True)
        opt = torch.optim.SGD([p], lr=base, momentum=0.9)
        sched = tfac(opt) if tfac else None
        for t in range(n):
            t_lrs[k].append(opt.param_groups[0]["lr"])
            p.grad = torch.tensor(grads[k][t])
            opt.step()
            if sched:
                sched.step()
        t_params[k] = p.detach().numpy()

    # groupopt: one grouped transformation, lr schedules per group, n steps in one lax.scan
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    tx = groupopt.grouped(
        params,
        [groupopt.group(k, name=k, lr=(make(base) if make else base)) for k, (make, _, base) in groups.items()],
        rule=groupopt.SGDRule(),
        momentum=0.9,
    )

    def body(carry, g):
        p, st = carry
        p, st = tx.apply(p, g, st)
        return (p, st), tuple(hp["lr"] for hp in st.hyperparams)

    (p_fin, _), lrs = jax.jit(lambda p, st, gs: jax.lax.scan(body, (p, st), gs))(params, tx.init(params), jax.tree.map(jnp.asarray, grads))
    for gi, k in enumerate(names):
        base = groups[k][2]
        lr_err = float(np.max(np.abs(np.asarray(lrs[gi]) - np.asarray(t_lrs[k])))) / base
        assert np.all(lr_err <= TOL64), (k, lr_err)
        np.testing.assert_allclose(np.asarray(p_fin[k]), t_params[k], rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------ validation of the pure schedules

BAD = [
    (lambda: S.constant(0.1, factor=1.5), ValueError, "Constant multiplicative factor expected to be between 0 and 1."),
    (lambda: S.constant(0.1, factor=0.5, total_iters=0), ValueError, "total_iters must be a positive integer"),
    (lambda: S.constant(0.1, factor=0.0, total_iters=3), ValueError, "divide by zero"),
    (lambda: S.linear(0.1, start_factor=0.0), ValueError, "Starting multiplicative factor expected"),
    (lambda: S.linear(0.1, end_factor=1.5), ValueError, "Ending multiplicative factor expected"),
    (lambda: S.linear(0.1, total_iters=0), ValueError, "total_iters must be a positive integer"),
    (lambda: S.polynomial(0.1, total_iters=0), ValueError, "total_iters must be a positive integer"),
    (lambda: S.cosine_warm_restarts(0.1, 0), ValueError, "Expected positive integer T_0, but got 0"),
    (lambda: S.cosine_warm_restarts(0.1, 3, 1.5), ValueError, "Expected integer T_mult >= 1, but got 1.5"),
    (lambda: S.multiplicative(0.1, 0.9), TypeError, "lr_lambda should be a function, but got float"),
    (lambda: S.join([S.constant(0.1)], [3]), ValueError, "one more than the number of boundaries"),
    (lambda: S.join([], []), ValueError, "at least one schedule"),
    (lambda: S.join([S.constant(0.1)] * 3, [5, 2]), ValueError, "increasing"),
    (lambda: S.multiply(), ValueError, "at least one schedule"),
    (lambda: S.warmup_cosine(0.1, -1, 10), ValueError, "warmup_steps >= 0"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_pure_validation(i):
    fn, exc, msg = BAD[i]
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        fn()
