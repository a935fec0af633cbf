"""Optimizer-state bytes with and without ZeRO-1, Orbax save/restore times, and (with several processes) the cost
of the multi-process agreement checks.

Runs on 8 host devices (``--xla_force_host_platform_device_count=8``, set here
before jax starts) with the ``adamw_48x`` workload (28.3M parameters, 48
tensors, AdamW with 3 groups) through the compat API, parameters replicated
over a (data=8, model=1) mesh (pure data parallelism). Prints one JSON object.

With ``--processes N`` (N > 1) the script launches N copies of itself
(``tests/multihost_launch.py``: local ``jax.distributed`` processes with
``8 // N`` CPU devices each, Gloo collectives) forming one global mesh of the
same 8 devices, and adds what only several processes have:

* per-process state bytes (every shard on the process's devices), besides the per-device bytes;
* save / restore wall times as measured on process 0 and the maximum over the processes;
* ``check_cost``: the compat step with :func:`groupopt.multihost.configure` ``check_every=1`` (its
  hyperparameters compared across processes at every step, a round trip through the coordination
  service) against ``check_every=0`` (compared only when the step compiles), timed in alternating
  blocks of ``--block`` steps, ``--rounds`` rounds, in the same processes (the replicated layout), for
  the workload and for its tiny ``--quick`` variant (where the host's share of a step is largest).

    .venv/bin/python benchmarks/distributed.py [--quick] [--out PATH] [--processes N] [--rounds R] [--block S]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))  # multihost_launch: the launcher the multi-process tests use

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import groupopt.compat as optim  # noqa: E402
from benchmarks.workloads import build, nest  # noqa: E402
from groupopt import multihost  # noqa: E402
from groupopt.checkpoint import Checkpointer  # noqa: E402
from groupopt.sharding import state_bytes_per_device, state_bytes_per_process, zero1  # noqa: E402

DEVICES = 8
LAYOUTS = ("replicated", "zero1")


def put(tree: dict, mesh) -> dict:
    """``{path: numpy array}`` as a nested dict of arrays replicated on ``mesh``, each process filling its own
    devices from the same host values (as ``tests/multihost_worker.py`` does)."""
    rep = NamedSharding(mesh, P())
    return nest({k: jax.make_array_from_callback(v.shape, rep, lambda idx, v=v: v[idx]) for k, v in tree.items()})


def make_optimizer(workload, mesh, layout: str = "replicated"):
    """The compat AdamW over the workload's groups and its fixed gradients, state replicated or ZeRO-1."""
    groups = [{"params": list(g.paths), **g.hparams} for g in workload.groups]
    opt = optim.AdamW(groups, model=put(workload.params, mesh))
    if layout == "zero1":
        opt.set_state_sharding(zero1("data"))
    return opt, put(workload.grads, mesh)


def slots(opt) -> list:
    """The optimizer's per-parameter state arrays (the step counts left out)."""
    return [{k: v for k, v in opt.state[m].items() if k != "step"} for g in opt.param_groups for m in g["params"]]


def state_bytes(opt) -> tuple[int, int]:
    """Bytes of the state held by this process's first device, and by all of its devices together."""
    state = slots(opt)
    return state_bytes_per_device(state)[jax.local_devices()[0]], state_bytes_per_process(state)


def measure_layouts(wl, mesh, directory: str) -> tuple[dict, dict]:
    """One step of each layout, its state bytes, then a save and a restore into a fresh optimizer of each
    (``async_save=False``: until committed; parameters included). Returns this process's figures and the
    stepped optimizers (with their gradients)."""
    out, opts = {}, {}
    for layout in LAYOUTS:
        opt, grads = opts[layout] = make_optimizer(wl, mesh, layout)
        opt.step(grads)
        jax.block_until_ready(opt.params)  # nothing left in flight (CPU/Gloo: docs/multi_host.md, Pitfalls)
        suffix = "" if layout == "replicated" else "_zero1"
        out[f"state_bytes_per_device{suffix}"], out[f"state_bytes_per_process{suffix}"] = state_bytes(opt)
    out["zero1_reduction"] = out["state_bytes_per_device"] / out["state_bytes_per_device_zero1"]
    out["zero1_reduction_per_process"] = out["state_bytes_per_process"] / out["state_bytes_per_process_zero1"]
    for layout in LAYOUTS:
        ckpt = Checkpointer(os.path.join(directory, layout), async_save=False)
        t0 = time.perf_counter()
        ckpt.save(1, opts[layout][0], include_params=True)
        ckpt.wait()
        out[f"save_s_{layout}"] = time.perf_counter() - t0
        fresh, _ = make_optimizer(wl, mesh, layout)
        t0 = time.perf_counter()
        ckpt.restore(fresh, include_params=True)
        jax.block_until_ready([g.slots for g in fresh._groups_state])
        out[f"restore_s_{layout}"] = time.perf_counter() - t0
        ckpt.close()
    return out, opts


def check_cost(opt, grads, rounds: int, block: int) -> dict:
    """Per-step wall time of ``opt.step(grads)`` with ``check_every=1`` and with ``check_every=0``.

    Each round times one block of ``block`` steps per setting (their order alternating between
    rounds), waited for at the end (the parameters); the processes meet before each block (an
    untimed :func:`~groupopt.multihost.agree`) so every block starts together. ``checks_per_step``
    counts the agreement checks the timed steps made (1 and 0 expected)."""
    before = multihost.settings().check_every
    ms = {1: [], 0: []}
    checks = {1: 0, 0: 0}
    opt.step(grads)  # warm: compiled, buffers in place
    try:
        for r in range(rounds):
            for every in ((1, 0) if r % 2 == 0 else (0, 1)):
                multihost.configure(check_every=every)
                multihost.agree("benchmarks/distributed.py: block", [r, every])
                gc.collect()
                gc.disable()
                made = multihost.checks_made()
                t0 = time.perf_counter()
                for _ in range(block):
                    opt.step(grads)
                jax.block_until_ready(opt.params)
                ms[every].append(1e3 * (time.perf_counter() - t0) / block)
                gc.enable()
                checks[every] += multihost.checks_made() - made
    finally:
        gc.enable()
        multihost.configure(check_every=before)
    med = {e: statistics.median(v) for e, v in ms.items()}
    return {"rounds": rounds, "block_steps": block, "layout": "replicated",
            "step_ms_check_every_1": med[1], "step_ms_check_every_0": med[0],
            "ratio": statistics.median(a / b for a, b in zip(ms[1], ms[0])),  # per-round ratios: paired
            "extra_ms_per_step": med[1] - med[0],
            "checks_per_step_check_every_1": checks[1] / (rounds * block),
            "checks_per_step_check_every_0": checks[0] / (rounds * block)}


def worker(args) -> None:
    """One launched process: joins the others, measures, prints ``RESULT <json>`` (its own figures)."""
    from multihost_launch import init

    pid, n = init()
    wl = build("adamw_48x", quick=args.quick)
    mesh = jax.make_mesh((DEVICES, 1), ("data", "model"))
    rec, opts = measure_layouts(wl, mesh, args.dir)
    rec.update(process=pid, processes=n, local_devices=jax.local_device_count(), devices=jax.device_count())
    del opts["zero1"]  # its memory: only the replicated layout is timed
    runs = [(wl, args.quick, opts.pop("replicated"))]
    if not args.quick:
        tiny = build("adamw_48x", quick=True)
        runs.append((tiny, True, make_optimizer(tiny, mesh)))
    costs = []
    for w, quick, (opt, grads) in runs:
        costs.append({"workload": w.name + (" --quick" if quick else ""), "n_params": w.n_params,
                      "n_tensors": len(w.params), **check_cost(opt, grads, args.rounds, args.block)})
    rec["check_cost"] = costs
    print("RESULT", json.dumps(rec), flush=True)


def launch_processes(args, wl) -> dict:
    """Runs ``args.processes`` workers on one global mesh and combines their records: process 0's figures, the
    maximum of each time over the processes (``*_max``), and every process's record (``per_process``)."""
    import multihost_launch

    directory = tempfile.mkdtemp(prefix="groupopt-ckpt-")
    try:
        flags = ["--worker", "--dir", directory, "--rounds", args.rounds, "--block", args.block]
        procs = multihost_launch.check(multihost_launch.launch(
            os.path.abspath(__file__), args.processes, flags + (["--quick"] if args.quick else []), devices=DEVICES,
            timeout=args.timeout))
        size = directory_bytes(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    recs = [json.loads(p.lines("RESULT")[0]) for p in procs]
    first = recs[0]
    result = {"workload": wl.name, "n_params": wl.n_params, "devices": first["devices"], "processes": args.processes,
              "local_devices": first["local_devices"]}
    for key in ("state_bytes_per_device", "state_bytes_per_device_zero1", "zero1_reduction",
                "state_bytes_per_process", "state_bytes_per_process_zero1", "zero1_reduction_per_process"):
        result[key] = first[key]
    for layout in LAYOUTS:
        for what in ("save_s", "restore_s"):
            key = f"{what}_{layout}"
            result[key], result[key + "_max"] = first[key], max(r[key] for r in recs)
    result["checkpoint_bytes_both"] = size
    result["check_cost"] = first["check_cost"]
    result["per_process"] = recs
    return result


def directory_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny variant of the workload (48 tensors of 32x32 / 32)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--processes", type=int, default=1, help="local jax.distributed processes (dividing 8)")
    ap.add_argument("--rounds", type=int, default=None, help="check_cost rounds (default 10; quick 4)")
    ap.add_argument("--block", type=int, default=None, help="steps per timed block (default 20; quick 10)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the launched processes are killed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 10)
    args.block = args.block or (10 if args.quick else 20)
    if args.worker:
        return worker(args)
    if DEVICES % args.processes:
        ap.error(f"--processes must divide {DEVICES}")
    if args.processes > 1 and args.block > 30:  # steps dispatched before a block is waited for
        ap.error("--block must be at most 30 with several processes: on CPU more than ~36 multi-process "
                 "computations in flight deadlock (docs/multi_host.md, Pitfalls)")
    wl = build("adamw_48x", quick=args.quick)
    if args.processes > 1:
        result = launch_processes(args, wl)
    else:
        mesh = jax.make_mesh((DEVICES, 1), ("data", "model"))
        directory = tempfile.mkdtemp(prefix="groupopt-ckpt-")
        try:
            figures, _ = measure_layouts(wl, mesh, directory)
            size = directory_bytes(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        result = {"workload": wl.name, "n_params": wl.n_params, "devices": jax.device_count(), **figures,
                  "checkpoint_bytes_both": size}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
