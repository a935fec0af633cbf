"""Optimizer steps of several implementations timed round-robin on the same workload.

This machine's run-to-run noise is ±20 %; timing the implementations in
alternation (compat step, core step, optax step, plain optax step, torch fused step,
floor step; each round in a new random order) exposes all of them to the same noise,
so their ratios are meaningful. torch's OpenMP workers are told to sleep
when idle (``OMP_WAIT_POLICY=PASSIVE`` unless set): spinning, they slowed whichever
implementation ran next. ``floor`` is the hand-written lean per-leaf AdamW of
:mod:`benchmarks.floor` (hyperparameters baked in as constants; ``floor_array``,
with ``--floor-array``: the same with them passed as scalar arrays, as groupopt does;
``floor_tree``, with ``--floor-tree``: params and grads as nested dicts, as groupopt gets them).
Prints one JSON object: per implementation the median and minimum, and per
implementation the median of its per-round ratio to the core (``groupopt``) and to
the ``floor``.

When an implementation is built matters by itself: its buffers (and, with 2001 leaves, its compiled
code) depend on it, and the same compiled step with buffers built at different times ran 28.2-29.9 ms
on ``adamw_48x``; on ``adamw_2001`` copies built later ran up to 20 % slower than the first. So every
implementation gets its own parameters, state *and gradients* and compiles its own step when it is built
(the order of compiled programs matters as much as that of buffers), and
``--balanced`` builds, after one untimed copy, one copy of each in every rotation of the order (every
implementation holds every build position once) and reports the mean of the copies per round. Use it (or at least ``--mirror``)
before reading a few percent into the ratios.

    .venv/bin/python benchmarks/paired.py [--workload adamw_2001] [--rounds 60] [--quick] [--floor-array] [--floor-tree] [--order A,B,..] [--reverse] [--mirror | --balanced] [--overhead]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torch's OpenMP worker threads spin-wait after each op by default; on a shared 2-core box they then
# steal the CPU from whichever implementation is timed next (and torch's own step degrades to
# ~80 ms on tiny tensors). Sleeping workers keep the round-robin fair. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import groupopt  # noqa: E402
import groupopt.compat as optim  # noqa: E402
from benchmarks.floor import FloorAdamW  # noqa: E402
from benchmarks.impls import _optax_group  # noqa: E402
from benchmarks.workloads import build, nest  # noqa: E402


def jitted(tx_update):
    def step(params, grads, state):
        updates, state = tx_update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 2))


IMPLS = ("groupopt_compat", "groupopt", "optax", "optax_plain", "torch_fused", "floor")


def builders(w, fresh, fresh_grads, floor_array: bool = False, floor_tree: bool = False) -> dict:
    """Per implementation, a function that builds one copy of it (its params and state) and returns ``step()``.

    Every copy compiles its own step, as a compat optimizer must: copies sharing one compiled program ran
    20-25 % faster on the 2001-leaf steps (their code stays in the CPU caches between them), which would
    favour whichever implementation shares."""

    def boxed(apply, params, state, g=None):
        g = fresh_grads() if g is None else g
        box = [params, state]

        def run():
            box[0], box[1] = apply(box[0], g, box[1])
            return box[0]

        return run

    def compat():
        opt = optim.AdamW([{"params": list(g.paths), **g.hparams} for g in w.groups], model=fresh())
        grads = fresh_grads()

        def run():
            opt.step(grads)
            return opt._binding.leaves

        run.opt = opt
        return run

    def core():
        p = fresh()
        tx = groupopt.grouped(p, [groupopt.group(list(g.paths), **g.hparams) for g in w.groups], rule=groupopt.AdamWRule)
        return boxed(jax.jit(tx.apply, donate_argnums=(0, 2)), p, tx.init(p))

    def optax_grouped():
        p = fresh()
        labels = nest({path: w.groups[i].name for path, i in sorted(w.group_of().items())})
        mt = optax.multi_transform({g.name: _optax_group(g) for g in w.groups}, labels)
        return boxed(jitted(mt.update), p, mt.init(p))

    def optax_plain():
        p = fresh()
        g0 = w.groups[0].hparams
        plain = optax.adamw(g0["lr"], b1=g0["betas"][0], b2=g0["betas"][1], eps=g0["eps"], weight_decay=g0["weight_decay"])
        return boxed(jitted(plain.update), p, plain.init(p))

    def torch_fused():
        import torch

        tparams = {k: torch.tensor(v, requires_grad=True) for k, v in w.params.items()}
        for k, v in w.grads.items():
            tparams[k].grad = torch.tensor(v)
        topt = torch.optim.AdamW([{"params": [tparams[p] for p in g.paths], **g.hparams} for g in w.groups], fused=True)
        return lambda: topt.step()

    def floor(mode, tree=False):
        def build_floor():
            fl = FloorAdamW(w, mode, tree)
            p = fl.leaves(w.params)
            return boxed(fl.jitted(), p, fl.init(p), fl.leaves(w.grads))

        return build_floor

    out = {"groupopt_compat": compat, "groupopt": core, "optax": optax_grouped, "optax_plain": optax_plain,
           "torch_fused": torch_fused, "floor": floor("const")}
    if floor_array:
        out["floor_array"] = floor("array")
    if floor_tree:
        out["floor_tree"] = floor("const", tree=True)
    return out


def build_sequence(order: list, mirror: bool = False, balanced: bool = False) -> list:
    """The build order: ``(implementation, copy number)`` pairs, every copy timed, each implementation
    reported by the mean of its copies in each round.

    The buffers an implementation gets depend on when it is built, and that alone moves its step time by
    several percent here (the same compiled step, 6 copies of its buffers: 28.2-29.9 ms on adamw_48x).
    ``mirror``: the order, then its reverse (2 copies each; a linear trend cancels, but whoever comes first
    also comes last). ``balanced``: the n rotations of the order, one after another (n copies each): every
    implementation is built once at every position within a rotation, and every one's positions add up
    to the same sum, so neither a linear trend nor a favoured slot in each rotation can favour one of them.
    """
    if balanced:
        n = len(order)
        return [(order[(r + i) % n], r + 1) for r in range(n) for i in range(n)]
    if mirror:
        return [(name, 1) for name in order] + [(name, 2) for name in order[::-1]]
    return [(name, 1) for name in order]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", default="adamw_2001")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--floor-array", action="store_true", help="also time the floor with hyperparameters as arrays")
    ap.add_argument("--floor-tree", action="store_true", help="also time the floor taking nested dicts (as groupopt does)")
    ap.add_argument("--order", help=f"comma-separated: the order in which the implementations are built (default {','.join(IMPLS)}); "
                    "also their order within a round")
    ap.add_argument("--reverse", action="store_true", help="build (and time) them in the reverse of that order")
    ap.add_argument("--mirror", action="store_true",
                    help="build every implementation twice, in the order and then in reverse, time all copies "
                         "round-robin, and report each implementation by the mean of its two copies per round "
                         "(the build-position effect cancels)")
    ap.add_argument("--balanced", action="store_true",
                    help="build every implementation once in each of the n rotations of the order (n copies each), "
                         "time all copies round-robin and report each implementation by the mean of its copies per "
                         "round: every implementation holds every build position once")
    ap.add_argument("--overhead", action="store_true",
                    help="the workload's tree and groups with 2-element leaves: what is left is each step's per-leaf "
                         "and per-call cost (dispatch, kernel launches), not its memory traffic")
    args = ap.parse_args(argv)
    w = build(args.workload, quick=args.quick)
    if args.overhead:
        w = dataclasses.replace(w, name=w.name + " --overhead",
                                params={k: np.asarray(v).reshape(-1)[:2].copy() for k, v in w.params.items()},
                                grads={k: np.asarray(v).reshape(-1)[:2].copy() for k, v in w.grads.items()})
    # every copy gets its own params, state *and gradients*, allocated when it is built: gradients shared by
    # several copies (allocated before all of them) made those copies 4-5 % slower than the floor, which
    # always had its own (adamw_48x, --balanced)
    fresh = lambda: nest({k: jnp.array(v) for k, v in w.params.items()})  # noqa: E731
    fresh_grads = lambda: nest({k: jnp.array(v) for k, v in w.grads.items()})  # noqa: E731
    make = builders(w, fresh, fresh_grads, args.floor_array, args.floor_tree)
    order = args.order.split(",") if args.order else list(make)
    for must in ("groupopt", "floor"):
        if must not in order:
            order.append(must)
    if args.reverse:
        order = order[::-1]
    if args.balanced and args.mirror:
        ap.error("--balanced and --mirror are two ways of cancelling the build position: choose one")
    sequence = build_sequence(order, mirror=args.mirror, balanced=args.balanced)
    # The first copy built in a process runs unlike its later twins (adamw_48x: 29.1 ms against 27.1-27.3 ms): an
    # untimed copy takes that place. Every copy, this one too, runs (compiles) when it is built, so that its program
    # takes its build position as its buffers do: compiled later, in the warm-up, the first *compiled* program went to
    # the first timed copy, up to 20 % faster than its twins on adamw_2001.
    if args.balanced or args.mirror:
        untimed = make[order[-1]]()  # kept alive, never timed
        jax.block_until_ready(untimed())
    steps = {}
    for name, copy in sequence:
        steps[f"{name}#{copy}"] = fn = make[name]()
        jax.block_until_ready(fn())
    n_copies = max(copy for _, copy in sequence)
    import torch

    for _ in range(3):
        for fn in steps.values():
            jax.block_until_ready(fn())
    times = {k: [] for k in steps}
    gc.collect()
    gc.disable()  # no collection inside a timed step (as in timing.time_steps)
    try:
        rng = random.Random(0)
        for _ in range(args.rounds):
            names = list(steps)
            rng.shuffle(names)  # a new order each round: nobody always runs first, or after the same one
            for name in names:
                fn = steps[name]
                t = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t)
    finally:
        gc.enable()
    copies = {name: {k: statistics.median(times[f"{name}#{k}"]) * 1e3 for k in range(1, n_copies + 1)} for name in order}
    times = {name: [statistics.fmean(t) for t in zip(*(times[f"{name}#{k}"] for k in range(1, n_copies + 1)))]
             for name in order}
    res = {"workload": w.name, "rounds": args.rounds, "device": jax.devices()[0].device_kind, "order": order,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads()}
    for name, ts in times.items():
        res[name] = {
            "ms_median": statistics.median(ts) * 1e3,
            "ms_min": min(ts) * 1e3,
            "median_ratio_to_groupopt": statistics.median(a / b for a, b in zip(ts, times["groupopt"])),
            "median_ratio_to_floor": statistics.median(a / b for a, b in zip(ts, times["floor"])),
        }
        if n_copies > 1:
            res[name]["ms_median_copies"] = copies[name]  # by copy: see build_sequence for their build positions
    compat = steps.get("groupopt_compat#1")
    if compat is not None:
        res["groupopt_compat"]["compiles"] = compat.opt.num_compiles
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
