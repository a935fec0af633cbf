"""Compile time of the core step, the floor and Optax, timed round-robin on one workload.

For each implementation, ``jax.jit(step, donate_argnums=(0, 2)).lower(params, grads,
state)`` (tracing + lowering to StableHLO: ``lower_s``) then ``.compile()`` (XLA:
``xla_s``), with JAX's in-memory caches cleared and a fresh function object each time,
so every repetition traces and compiles from scratch. Repetitions alternate the
implementations (order rotated each repetition), like ``paired.py``, so that the load
of this shared machine hits all of them alike. Prints one JSON object: per
implementation the median / min of ``lower_s``, ``xla_s`` and ``total_s``, the number
of XLA kernels (fusions + custom calls, from the optimized HLO of the last repetition),
and the median per-repetition ratio of ``total_s`` to the floor's and to the core's.

    .venv/bin/python benchmarks/compile_paired.py [--workload adamw_2001] [--reps 3] [--quick] [--impl groupopt,floor,optax_plain]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import groupopt  # noqa: E402
from benchmarks.floor import FloorAdamW  # noqa: E402
from benchmarks.impls import _optax_group  # noqa: E402
from benchmarks.workloads import build, nest  # noqa: E402

IMPLS = ("groupopt", "floor", "floor_array", "optax_plain", "optax")
DEFAULT = ("groupopt", "floor", "optax_plain")


def _optax_step(tx):
    def make():
        def step(params, grads, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step

    return make


def setups(w, impls):
    """Per implementation: ``(make_fn, args)``; ``make_fn()`` returns a new step function object."""
    fresh = lambda: nest({k: jnp.asarray(v) for k, v in w.params.items()})  # noqa: E731
    grads = nest({k: jnp.asarray(v) for k, v in w.grads.items()})
    out = {}
    for impl in impls:
        if impl == "groupopt":
            p = fresh()
            tx = groupopt.grouped(p, [groupopt.group(list(g.paths), **g.hparams) for g in w.groups], rule=groupopt.AdamWRule)

            def make(tx=tx):
                return lambda params, grads, state: tx.apply(params, grads, state)

            out[impl] = (make, (p, grads, tx.init(p)))
        elif impl in ("floor", "floor_array"):
            fl = FloorAdamW(w, "const" if impl == "floor" else "array")
            p = fl.leaves(w.params)

            def make(fl=fl):
                return lambda params, grads, state: fl.step(params, grads, state)

            out[impl] = (make, (p, fl.leaves(w.grads), fl.init(p)))
        elif impl == "optax_plain":
            g0 = w.groups[0].hparams
            tx = optax.adamw(g0["lr"], b1=g0["betas"][0], b2=g0["betas"][1], eps=g0["eps"], weight_decay=g0["weight_decay"])
            p = fresh()
            out[impl] = (_optax_step(tx), (p, grads, tx.init(p)))
        elif impl == "optax":
            labels = nest({path: w.groups[i].name for path, i in sorted(w.group_of().items())})
            tx = optax.multi_transform({g.name: _optax_group(g) for g in w.groups}, labels)
            p = fresh()
            out[impl] = (_optax_step(tx), (p, grads, tx.init(p)))
        else:
            raise KeyError(f"unknown impl {impl!r}; known: {IMPLS}")
    return out


def kernels(hlo_text: str) -> int:
    """XLA CPU kernels in an optimized HLO module: fusions and custom calls of the entry computation."""
    entry = hlo_text[hlo_text.index("ENTRY"):]
    return len(re.findall(r"= \S+ (?:fusion|custom-call)\(", entry))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", default="adamw_2001")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--impl", default=",".join(DEFAULT), help=f"comma-separated, of {IMPLS} (floor is always included)")
    args = ap.parse_args(argv)
    impls = [i for i in args.impl.split(",") if i]
    if "floor" not in impls:
        impls.append("floor")
    w = build(args.workload, quick=args.quick)
    todo = setups(w, impls)
    times = {k: {"lower_s": [], "xla_s": [], "total_s": []} for k in impls}
    n_kernels = {}
    for r in range(args.reps):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            make, a = todo[impl]
            jax.clear_caches()
            gc.collect()
            fn = make()
            t0 = time.perf_counter()
            lowered = jax.jit(fn, donate_argnums=(0, 2)).lower(*a)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            times[impl]["lower_s"].append(t1 - t0)
            times[impl]["xla_s"].append(t2 - t1)
            times[impl]["total_s"].append(t2 - t0)
            print(f"rep {r} {impl}: lower {t1 - t0:.2f}s xla {t2 - t1:.2f}s", file=sys.stderr, flush=True)
            if r == args.reps - 1:
                n_kernels[impl] = kernels(compiled.as_text())
            del compiled, lowered
    res = {"workload": w.name, "reps": args.reps, "n_leaves": w.n_leaves, "device": jax.devices()[0].device_kind}
    for impl, t in times.items():
        rec = {}
        for k, v in t.items():
            rec[k + "_median"] = statistics.median(v)
            rec[k + "_min"] = min(v)
        for ref in ("floor", "groupopt"):
            if ref in times:
                rec[f"median_ratio_to_{ref}"] = statistics.median(a / b for a, b in zip(t["total_s"], times[ref]["total_s"]))
        rec["kernels"] = n_kernels.get(impl)
        res[impl] = rec
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
