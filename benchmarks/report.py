"""Reading results: ratios against torch_fused and optax on the same workload, the cross-check, the table.

Ratios are ``step_ms_median(impl) / step_ms_median(reference)`` within one run
(below 1: faster than the reference). ``update_norm_rel_diff`` compares each
implementation's ``||params_final - params_0||`` with the reference
implementation's (``torch_foreach``, else the first one measured): all
implementations run the same update, so it should be ~1e-6; a large value
means a benchmark is not comparing like with like.
"""

from __future__ import annotations

__all__ = ["REQUIRED_FIELDS", "add_ratios", "format_table", "memory_check"]

REQUIRED_FIELDS = (
    "workload",
    "impl",
    "step_ms_median",
    "step_ms_min",
    "compile_s",
    "n_params",
    "n_leaves",
    "n_groups",
    "device",
    "state_bytes_per_param",
)

CHECK_REFERENCES = ("torch_foreach", "torch_fused")


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def add_ratios(records: list[dict], not_comparable=frozenset()) -> list[dict]:
    """Add ``vs_torch_fused``, ``vs_optax`` and ``update_norm_rel_diff`` to each record (in place)."""
    by_wl: dict = {}
    for r in records:
        by_wl.setdefault(r["workload"], {})[r["impl"]] = r
    for impls in by_wl.values():
        ok = {k: v for k, v in impls.items() if v.get("error") is None}
        ref_norm = None
        for name in CHECK_REFERENCES + tuple(ok):
            if name in ok and name not in not_comparable and ok[name].get("update_norm") is not None:
                ref_norm = ok[name]["update_norm"]
                break
        for r in impls.values():
            med = r.get("step_ms_median")
            r["vs_torch_fused"] = _ratio(med, ok.get("torch_fused", {}).get("step_ms_median"))
            r["vs_optax"] = _ratio(med, ok.get("optax", {}).get("step_ms_median"))
            un = r.get("update_norm")
            if un is None or ref_norm is None or r["impl"] in not_comparable:
                r["update_norm_rel_diff"] = None
            else:
                r["update_norm_rel_diff"] = float(f"{abs(un - ref_norm) / max(abs(ref_norm), 1e-30):.2e}")
    return records


def _f(x, fmt):
    if x is None:
        width = "".join(c for c in fmt.split(".")[0] if c.isdigit())
        return format("-", ">" + width) if width else "-"
    return format(x, fmt)


def format_table(records: list[dict]) -> str:
    """A plain-text table, one line per record, grouped by workload."""
    head = (
        f"{'workload':<15} {'impl':<19} {'median ms':>10} {'min ms':>9} {'x torch_f':>9} {'x optax':>8} "
        f"{'compile s':>9} {'(lower)':>7} {'B/param':>7} {'leaves':>6} {'grp':>4} {'check':>8}  device"
    )
    lines = [head, "-" * len(head)]
    last = None
    for r in records:
        if last is not None and r["workload"] != last:
            lines.append("")
        last = r["workload"]
        if r.get("error"):
            lines.append(f"{r['workload']:<15} {r['impl']:<19} ERROR: {r['error']}")
            continue
        lines.append(
            f"{r['workload']:<15} {r['impl']:<19} {_f(r['step_ms_median'], '10.3f')} {_f(r['step_ms_min'], '9.3f')} "
            f"{_f(r.get('vs_torch_fused'), '9.2f')} {_f(r.get('vs_optax'), '8.2f')} {_f(r['compile_s'], '9.2f')} "
            f"{_f(r.get('compile_lower_s'), '7.2f')} {_f(r['state_bytes_per_param'], '7.2f')} {r['n_leaves']:>6} {r['n_groups']:>4} "
            f"{_f(r.get('update_norm_rel_diff'), '8.0e')}  {r['device']}"
        )
    return "\n".join(lines)


def memory_check(records: list[dict], limit: float = 1.0) -> tuple[str, bool]:
    """XLA's memory analysis of each compiled step; fails if a groupopt optimizer step needs more than ``limit`` param copies."""
    lines = [
        f"{'workload':<15} {'impl':<19} {'args MB':>9} {'out MB':>9} {'alias MB':>9} {'temp MB':>9} {'extra/params':>12}"
    ]
    ok = True
    for r in records:
        m = r.get("memory")
        if not m:
            continue
        mb = 1 / 2**20
        extra = m["extra_param_copies"]
        flag = ""
        if r["impl"].startswith("groupopt") and r.get("kind") == "optimizer" and extra is not None and extra > limit:
            ok, flag = False, f"  > {limit} (FAIL)"
        lines.append(
            f"{r['workload']:<15} {r['impl']:<19} {m['argument_bytes'] * mb:9.2f} {m['output_bytes'] * mb:9.2f} "
            f"{m['alias_bytes'] * mb:9.2f} {m['temp_bytes'] * mb:9.2f} {_f(extra, '12.3f')}{flag}"
        )
    return "\n".join(lines), ok
