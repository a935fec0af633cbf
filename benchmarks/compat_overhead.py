"""Compat ``Optimizer.step`` vs the core's jitted update on the same workload, timed in alternation.

Machines are noisy; timing the two in alternating pairs (compat step, core step,
compat step, ...) exposes both to the same noise. Prints one JSON object:
medians, minimums, the median of the per-pair ratios and the ratio of minimums.

    .venv/bin/python benchmarks/compat_overhead.py [--workload adamw_2001] [--pairs 60] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import groupopt  # noqa: E402
import groupopt.compat as optim  # noqa: E402
from benchmarks.workloads import build, nest  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", default="adamw_2001")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    w = build(args.workload, quick=args.quick)
    fresh = lambda: nest({k: jnp.asarray(v) for k, v in w.params.items()})  # noqa: E731
    grads = nest({k: jnp.asarray(v) for k, v in w.grads.items()})

    opt = optim.AdamW([{"params": list(g.paths), **g.hparams} for g in w.groups], model=fresh())

    def compat():
        opt.step(grads)
        return opt._binding.leaves

    params = fresh()
    tx = groupopt.grouped(params, [groupopt.group(list(g.paths), **g.hparams) for g in w.groups], rule=groupopt.AdamWRule)
    apply = jax.jit(tx.apply, donate_argnums=(0, 2))
    box = [params, tx.init(params)]

    def core():
        box[0], box[1] = apply(box[0], grads, box[1])
        return box[0]

    for _ in range(3):
        jax.block_until_ready(compat())
        jax.block_until_ready(core())
    cs, ks = [], []
    for _ in range(args.pairs):
        for fn, out in ((compat, cs), (core, ks)):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t)
    res = {
        "workload": w.name,
        "pairs": args.pairs,
        "compat_ms_median": statistics.median(cs) * 1e3,
        "compat_ms_min": min(cs) * 1e3,
        "core_ms_median": statistics.median(ks) * 1e3,
        "core_ms_min": min(ks) * 1e3,
        "median_pair_ratio": statistics.median(c / k for c, k in zip(cs, ks)),
        "ratio_of_mins": min(cs) / min(ks),
        "compat_compiles": opt.num_compiles,
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
