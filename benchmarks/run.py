"""Run the benchmark suite, write ``benchmarks/results.json`` and print a table with ratios.

    python benchmarks/run.py                      # full sizes (make bench)
    python benchmarks/run.py --quick              # tiny sizes, 3 timed steps: a smoke run
    python benchmarks/run.py --only adamw_2001,scan48_llrd --impl groupopt,optax --steps 50
    python benchmarks/run.py --memory             # also check XLA's memory analysis of the groupopt steps

Each record: ``workload, impl, step_ms_median, step_ms_min, compile_s, n_params,
n_leaves, n_groups, device, state_bytes_per_param`` plus ``kind, compile_lower_s, n_steps,
n_warmup, update_norm, update_norm_rel_diff, vs_torch_fused, vs_optax, memory,
note, error``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.workloads import WORKLOADS, build  # noqa: E402

ALL_IMPLS = ("torch_fused", "torch_foreach", "optax", "groupopt", "groupopt_scalar_lr", "groupopt_compat")


def _csv(value: str | None, known, what: str) -> list | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {list(known)}")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 timed steps (a smoke run; timings mean nothing)")
    ap.add_argument("--only", help=f"comma-separated workloads (default: all of {list(WORKLOADS)})")
    ap.add_argument("--impl", help=f"comma-separated implementations (default: all that apply, of {list(ALL_IMPLS)})")
    ap.add_argument("--steps", type=int, help="timed steps per measurement (default 20; --quick: 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps before timing (default 3; --quick: 2)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results.json"), help="JSON output path")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="print XLA's memory analysis of each compiled step and exit 1 if a groupopt optimizer step "
        "needs more than one extra copy of the params",
    )
    args = ap.parse_args(argv)
    args.workloads = _csv(args.only, WORKLOADS, "workload") or list(WORKLOADS)
    args.impls = _csv(args.impl, ALL_IMPLS, "impl")
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    return args


def _record(w, impl, m, n_params, cfg) -> dict:
    return {
        "workload": w.name,
        "impl": impl,
        "step_ms_median": round(m.timing.median_ms, 4),
        "step_ms_min": round(m.timing.min_ms, 4),
        "compile_s": None if m.compile_s is None else round(m.compile_s, 4),
        "n_params": n_params,
        "n_leaves": m.n_leaves,
        "n_groups": m.n_groups,
        "device": m.device,
        "state_bytes_per_param": round(m.state_bytes / n_params, 4),
        "kind": w.kind,
        "compile_lower_s": None if m.lower_s is None else round(m.lower_s, 4),
        "n_steps": cfg.steps,
        "n_warmup": cfg.warmup,
        "update_norm": m.update_norm,
        "memory": m.memory,
        "note": m.note,
        "error": None,
    }


def _error_record(w, impl, exc, cfg) -> dict:
    rec = {k: None for k in report.REQUIRED_FIELDS}
    last = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    rec.update(workload=w.name, impl=impl, kind=w.kind, n_steps=cfg.steps, n_warmup=cfg.warmup, note="", error=last[-1][:500] if last else repr(exc))
    return rec


def measure(w, impl, cfg) -> dict:
    from benchmarks.impls import run_impl

    if w.kind == "train_step":
        from benchmarks.train_step import run_train_impl

        m, n_params = run_train_impl(impl, w, cfg)
    else:
        m, n_params = run_impl(impl, w, cfg), w.n_params
    return _record(w, impl, m, n_params, cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from benchmarks.impls import NOT_COMPARABLE, Config

    cfg = Config(warmup=args.warmup, steps=args.steps)
    t_start = time.perf_counter()
    records = []
    for name in args.workloads:
        w = build(name, args.quick)
        impls = [i for i in w.impls if args.impls is None or i in args.impls]
        for impl in impls:
            t0 = time.perf_counter()
            try:
                rec = measure(w, impl, cfg)
            except Exception as exc:  # noqa: BLE001 - one failing impl must not lose the others
                if os.environ.get("GROUPOPT_BENCH_RAISE"):
                    raise
                rec = _error_record(w, impl, exc, cfg)
            records.append(rec)
            status = f"error: {rec['error']}" if rec["error"] else f"{rec['step_ms_median']:.3f} ms"
            print(f"[{time.perf_counter() - t_start:7.1f}s] {name:<15} {impl:<19} {status} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
            gc.collect()
        del w
        gc.collect()
    report.add_ratios(records, NOT_COMPARABLE)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")

    import torch

    print(
        f"groupopt benchmarks ({'quick' if args.quick else 'full'}): jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, {platform.machine()}; "
        f"{args.warmup} warm-up + {args.steps} timed steps; total {time.perf_counter() - t_start:.1f}s"
    )
    print(report.format_table(records))
    print(f"wrote {len(records)} records to {args.out}")
    rc = 0
    if args.memory:
        text, ok = report.memory_check(records)
        print("\nXLA memory analysis of the compiled steps (extra = temp + output - alias):")
        print(text)
        if not ok:
            print("memory check FAILED: a groupopt step needs more than one extra copy of the params")
            rc = 1
    if any(r["error"] for r in records):
        rc = rc or 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
