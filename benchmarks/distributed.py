"""Per-device optimizer-state bytes with and without ZeRO-1, and Orbax save/restore times.

Runs on 8 host devices (``--xla_force_host_platform_device_count=8``, set here
before jax starts) with the ``adamw_48x`` workload (28.3M parameters, 48
tensors, AdamW with 3 groups) through the compat API, parameters replicated
over a (data=8, model=1) mesh (pure data parallelism). Prints one JSON object.

    .venv/bin/python benchmarks/distributed.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import groupopt.compat as optim  # noqa: E402
from benchmarks.workloads import build, nest  # noqa: E402
from groupopt.checkpoint import Checkpointer  # noqa: E402
from groupopt.sharding import state_bytes_per_device, zero1  # noqa: E402


def make_optimizer(workload, mesh):
    rep = NamedSharding(mesh, P())
    params = jax.device_put(nest({k: jnp.asarray(v) for k, v in workload.params.items()}), rep)
    groups = [{"params": list(g.paths), **{k: v for k, v in g.hparams.items()}} for g in workload.groups]
    return optim.AdamW(groups, model=params), jax.device_put(nest({k: jnp.asarray(v) for k, v in workload.grads.items()}), rep)


def state_bytes(opt):
    slots = [{k: v for k, v in opt.state[m].items() if k != "step"} for g in opt.param_groups for m in g["params"]]
    return state_bytes_per_device(slots)[jax.devices()[0]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    wl = build("adamw_48x", quick=args.quick)
    mesh = jax.make_mesh((8, 1), ("data", "model"))
    result = {"workload": wl.name, "n_params": int(sum(v.size for v in wl.params.values())), "devices": jax.device_count()}

    opt, grads = make_optimizer(wl, mesh)
    opt.step(grads)
    result["state_bytes_per_device"] = state_bytes(opt)
    opt_z, grads_z = make_optimizer(wl, mesh)
    opt_z.set_state_sharding(zero1("data"))
    opt_z.step(grads_z)
    result["state_bytes_per_device_zero1"] = state_bytes(opt_z)
    result["zero1_reduction"] = result["state_bytes_per_device"] / result["state_bytes_per_device_zero1"]

    directory = tempfile.mkdtemp(prefix="groupopt-ckpt-")
    try:
        for name, o in (("replicated", opt), ("zero1", opt_z)):
            ckpt = Checkpointer(os.path.join(directory, name), async_save=False)
            t0 = time.perf_counter()
            ckpt.save(1, o, include_params=True)
            ckpt.wait()
            result[f"save_s_{name}"] = time.perf_counter() - t0
            fresh, _ = make_optimizer(wl, mesh)
            if name == "zero1":
                fresh.set_state_sharding(zero1("data"))
            t0 = time.perf_counter()
            ckpt.restore(fresh, include_params=True)
            jax.block_until_ready([g.slots for g in fresh._groups_state])
            result[f"restore_s_{name}"] = time.perf_counter() - t0
            ckpt.close()
        size = 0
        for root, _, files in os.walk(directory):
            size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        result["checkpoint_bytes_both"] = size
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
