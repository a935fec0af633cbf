"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` on one tiny workload, JSON schema checked.

It runs in a subprocess (the suite's own process, without this test session's
x64 mode) on the ``mixed_2001`` workload at quick size (21 tensors: AdamW +
SGD + frozen groups), every implementation, 1 warm-up + 2 timed steps. The
timings themselves are not checked, only that every implementation ran, the
records have the documented fields and types, and all implementations
computed the same update.

``test_distributed_two_processes`` runs ``benchmarks/distributed.py --processes 2 --quick``
(two local jax.distributed processes on one 8-device mesh) and checks its figures against
what the workload's shapes imply.
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


def test_distributed_two_processes(tmp_path):
    """Per-process ZeRO-1 bytes are what the shapes give (AdamW: exp_avg + exp_avg_sq, float32; a leaf is split 8
    ways when one of its dimensions divides by 8), every process agrees on them, times are positive, and the
    check_every=1 blocks made one agreement check per step, the check_every=0 blocks none."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks.workloads import build  # numpy only: the workload's shapes

    out = tmp_path / "distributed.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "distributed.py"), "--processes", "2", "--quick",
           "--rounds", "3", "--block", "5", "--timeout", "100", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())

    wl = build("adamw_48x", quick=True)
    assert (r["workload"], r["n_params"]) == ("adamw_48x", wl.n_params)
    assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
    state = [8 * p.size for p in wl.params.values()]
    zero1 = [b // 8 if any(d % 8 == 0 for d in p.shape) else b for b, p in zip(state, wl.params.values())]
    assert r["state_bytes_per_device"] == sum(state)
    assert r["state_bytes_per_device_zero1"] == sum(zero1)
    assert r["state_bytes_per_process"] == 4 * sum(state)
    assert r["state_bytes_per_process_zero1"] == 4 * sum(zero1)
    assert r["zero1_reduction_per_process"] == r["state_bytes_per_process"] / r["state_bytes_per_process_zero1"]
    assert r["zero1_reduction"] == 8.0  # every quick leaf (32x32, 32) divides by 8

    per = sorted(r["per_process"], key=lambda p: p["process"])
    assert [p["process"] for p in per] == [0, 1]
    bytes_keys = [k for k in r if k.startswith("state_bytes")]
    for p in per:
        assert {k: p[k] for k in bytes_keys} == {k: r[k] for k in bytes_keys}
    for layout in ("replicated", "zero1"):
        for what in ("save_s", "restore_s"):
            key = f"{what}_{layout}"
            assert r[key] == per[0][key] > 0
            assert r[key + "_max"] == max(p[key] for p in per)
    assert r["checkpoint_bytes_both"] > 0

    [cost] = r["check_cost"]
    assert cost == per[0]["check_cost"][0]
    assert (cost["workload"], cost["n_params"], cost["n_tensors"]) == ("adamw_48x --quick", wl.n_params, 48)
    assert (cost["rounds"], cost["block_steps"]) == (3, 5)
    for p in per:
        c = p["check_cost"][0]
        assert (c["checks_per_step_check_every_1"], c["checks_per_step_check_every_0"]) == (1.0, 0.0)
        assert c["step_ms_check_every_1"] > 0 and c["step_ms_check_every_0"] > 0 and c["ratio"] > 0
        assert c["extra_ms_per_step"] == c["step_ms_check_every_1"] - c["step_ms_check_every_0"]


def test_paired_build_sequence_is_balanced():
    """``--balanced``: every implementation is built once in every rotation and holds every within-rotation position
    once, so all of them have the same sum of build positions (a linear trend cancels); ``--mirror``: the order, then
    its reverse."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks.paired import build_sequence

    order = ["groupopt", "floor", "groupopt_compat", "optax_plain"]
    seq = build_sequence(order, balanced=True)
    n = len(order)
    assert len(seq) == n * n and len(set(seq)) == n * n
    for r in range(n):
        rotation = seq[r * n:(r + 1) * n]
        assert sorted(name for name, _ in rotation) == sorted(order)
        assert {copy for _, copy in rotation} == {r + 1}
    for name in order:
        slots = [i % n for i, (m, _) in enumerate(seq) if m == name]
        assert sorted(slots) == list(range(n))
    sums = {name: sum(i for i, (m, _) in enumerate(seq) if m == name) for name in order}
    assert len(set(sums.values())) == 1
    assert build_sequence(order, mirror=True) == [(m, 1) for m in order] + [(m, 2) for m in order[::-1]]
    assert build_sequence(order) == [(m, 1) for m in order]


def test_paired_balanced_quick_run():
    """``paired.py --balanced`` on a quick workload: every implementation reported with one median per copy, the
    core's ratio to itself exactly 1, and the compat optimizer compiled once."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "paired.py"), "--workload", "adamw_48x", "--quick",
           "--balanced", "--rounds", "3", "--order", "groupopt,floor,groupopt_compat"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert r["order"] == ["groupopt", "floor", "groupopt_compat"] and r["rounds"] == 3
    for name in r["order"]:
        assert sorted(r[name]["ms_median_copies"]) == ["1", "2", "3"]
        assert all(v > 0 for v in r[name]["ms_median_copies"].values())
        assert r[name]["ms_min"] <= r[name]["ms_median"]
    assert r["groupopt"]["median_ratio_to_groupopt"] == 1.0 and r["floor"]["median_ratio_to_floor"] == 1.0
    assert r["groupopt_compat"]["compiles"] == 1
