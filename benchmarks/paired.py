"""Optimizer steps of several implementations timed round-robin on the same workload.

This machine's run-to-run noise is ±20 %; timing the implementations in
alternation (compat step, core step, optax step, plain optax step, torch fused step,
floor step, then the next round, its order rotated by one) exposes all of them to the
same noise, so their ratios are meaningful. torch's OpenMP workers are told to sleep
when idle (``OMP_WAIT_POLICY=PASSIVE`` unless set): spinning, they slowed whichever
implementation ran next. ``floor`` is the hand-written lean per-leaf AdamW of
:mod:`benchmarks.floor` (hyperparameters baked in as constants; ``floor_array``,
with ``--floor-array``: the same with them passed as scalar arrays, as groupopt does).
Prints one JSON object: per implementation the median and minimum, and per
implementation the median of its per-round ratio to the core (``groupopt``) and to
the ``floor``.

    .venv/bin/python benchmarks/paired.py [--workload adamw_2001] [--rounds 60] [--quick] [--floor-array]
"""

from __future__ import annotations

import argparse
import gc
import json
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", default="adamw_2001")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--floor-array", action="store_true", help="also time the floor with hyperparameters as arrays")
    args = ap.parse_args(argv)
    w = build(args.workload, quick=args.quick)
    fresh = lambda: nest({k: jnp.asarray(v) for k, v in w.params.items()})  # noqa: E731
    grads = nest({k: jnp.asarray(v) for k, v in w.grads.items()})
    steps = {}

    opt = optim.AdamW([{"params": list(g.paths), **g.hparams} for g in w.groups], model=fresh())

    def compat():
        opt.step(grads)
        return opt._binding.leaves

    steps["groupopt_compat"] = compat

    def boxed(apply, params, state):
        box = [params, state]

        def run():
            box[0], box[1] = apply(box[0], grads, box[1])
            return box[0]

        return run

    p = fresh()
    tx = groupopt.grouped(p, [groupopt.group(list(g.paths), **g.hparams) for g in w.groups], rule=groupopt.AdamWRule)
    steps["groupopt"] = boxed(jax.jit(tx.apply, donate_argnums=(0, 2)), p, tx.init(p))

    p = fresh()
    labels = nest({path: w.groups[i].name for path, i in sorted(w.group_of().items())})
    mt = optax.multi_transform({g.name: _optax_group(g) for g in w.groups}, labels)
    steps["optax"] = boxed(jitted(mt.update), p, mt.init(p))

    p = fresh()
    g0 = w.groups[0].hparams
    plain = optax.adamw(g0["lr"], b1=g0["betas"][0], b2=g0["betas"][1], eps=g0["eps"], weight_decay=g0["weight_decay"])
    steps["optax_plain"] = boxed(jitted(plain.update), p, plain.init(p))

    import torch

    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in w.params.items()}
    for k, v in w.grads.items():
        tparams[k].grad = torch.tensor(v)
    topt = torch.optim.AdamW(
        [{"params": [tparams[p] for p in g.paths], **g.hparams} for g in w.groups], fused=True
    )
    steps["torch_fused"] = lambda: topt.step()

    for mode in ("const", "array") if args.floor_array else ("const",):
        fl = FloorAdamW(w, mode)
        p = fl.leaves(w.params)
        flat_grads = fl.leaves(w.grads)
        box = [p, fl.init(p)]

        def run(apply=fl.jitted(), box=box, flat_grads=flat_grads):
            box[0], box[1] = apply(box[0], flat_grads, box[1])
            return box[0]

        steps["floor" if mode == "const" else "floor_array"] = run

    for _ in range(3):
        for fn in steps.values():
            jax.block_until_ready(fn())
    times = {k: [] for k in steps}
    gc.collect()
    gc.disable()  # no collection inside a timed step (as in timing.time_steps)
    try:
        names = list(steps)
        for r in range(args.rounds):
            # rotate the order each round: no implementation always runs right after the same one
            for name in names[r % len(names):] + names[: r % len(names)]:
                fn = steps[name]
                t = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t)
    finally:
        gc.enable()
    res = {"workload": w.name, "rounds": args.rounds, "device": jax.devices()[0].device_kind,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads()}
    for name, ts in times.items():
        res[name] = {
            "ms_median": statistics.median(ts) * 1e3,
            "ms_min": min(ts) * 1e3,
            "median_ratio_to_groupopt": statistics.median(a / b for a, b in zip(ts, times["groupopt"])),
            "median_ratio_to_floor": statistics.median(a / b for a, b in zip(ts, times["floor"])),
        }
    res["groupopt_compat"]["compiles"] = opt.num_compiles
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
