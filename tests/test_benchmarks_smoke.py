"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` on one tiny workload, JSON schema checked.

It runs in a subprocess (the suite's own process, without this test session's
x64 mode) on the ``mixed_2001`` workload at quick size (21 tensors: AdamW +
SGD + frozen groups), every implementation, 1 warm-up + 2 timed steps. The
timings themselves are not checked, only that every implementation ran, the
records have the documented fields and types, and all implementations
computed the same update.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED = {
    "workload": str,
    "impl": str,
    "step_ms_median": float,
    "step_ms_min": float,
    "compile_s": (float, type(None)),
    "n_params": int,
    "n_leaves": int,
    "n_groups": int,
    "device": str,
    "state_bytes_per_param": float,
}
IMPLS = {"torch_fused", "torch_foreach", "optax", "groupopt", "groupopt_compat"}


def test_quick_suite_writes_valid_json(tmp_path):
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--only", "mixed_2001",
           "--steps", "2", "--warmup", "1", "--out", str(out), "--memory"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = json.loads(out.read_text())
    assert isinstance(records, list)
    assert {r["impl"] for r in records} == IMPLS
    for r in records:
        assert r["error"] is None, r
        for key, typ in REQUIRED.items():
            assert isinstance(r[key], typ), (r["impl"], key, r[key])
        assert r["workload"] == "mixed_2001"
        assert r["step_ms_min"] > 0 and r["step_ms_median"] >= r["step_ms_min"]
        assert r["n_params"] == 10 * (8 * 8 + 8) + 8 * 5
        assert r["n_steps"] == 2
        # frozen quarter has no state; AdamW 8 B/param, SGD 4 B/param on the rest
        assert 0 < r["state_bytes_per_param"] < 8.5
        assert r["vs_torch_fused"] is not None and math.isfinite(r["vs_torch_fused"])
        assert r["vs_optax"] is not None
        # all implementations run the same update on the same numbers
        assert r["update_norm"] > 0
        assert r["update_norm_rel_diff"] < 1e-4, (r["impl"], r["update_norm_rel_diff"])
    by_impl = {r["impl"]: r for r in records}
    assert by_impl["torch_fused"]["compile_s"] is None and by_impl["torch_fused"]["device"] == "cpu"
    for impl in ("optax", "groupopt"):
        r = by_impl[impl]
        assert r["compile_s"] > 0
        mem = r["memory"]
        assert mem is not None and mem["param_bytes"] == 4 * r["n_params"]
        assert mem["extra_param_copies"] <= 1.0  # a donated step holds at most one extra copy of the params
    assert "mixed_2001" in proc.stdout and "groupopt_compat" in proc.stdout  # the table
