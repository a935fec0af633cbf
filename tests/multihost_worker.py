"""One process of a multi-process run (launched by tests/test_multihost.py through multihost_launch).

Every process runs the same scenarios in the same order on one global mesh (data 4 x model 2 over all
processes' devices) and prints its results as tagged stdout lines, ``TAG <json>``: ``RESULT`` lines
from process 0 only (global arrays gathered from every process), ``BYTES`` / ``TIMING`` lines from
every process (per-process numbers). Arguments are scenarios, ``name`` or ``name=directory``, run in
order in this one launch (one jax.distributed start-up and one set of compilations for all)::

    train             30 steps of the compat optimizer and of two core variants; their parameters and lrs
    zero1             compat AdamW with and without ZeRO-1, parameters replicated: per-process state bytes
    ckpt_full=DIR     30 steps of compat and core, checkpoints of step 15 in DIR/compat and DIR/core
    ckpt_resume=DIR   fresh objects restored from DIR's step 15, trained to step 30
    killsave=DIR      checkpoint step 1 (committed), then a large step 2 (the test kills a process meanwhile)
    killcheck=DIR     the steps in DIR, and step 1 restored into fresh objects
    timing=DIR        save and restore wall times of a 24 MiB compat Adam checkpoint (``timing48x``: adamw_48x,
                      340 MB, for a manual run)

Arrays are printed as ``[dtype, shape, hex of the bytes]`` so the test can compare them bit for bit.
"""

from multihost_launch import init

PID, N = init()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import groupopt  # noqa: E402
import groupopt.compat as optim  # noqa: E402
from groupopt.checkpoint import Checkpointer  # noqa: E402
from groupopt.sharding import state_bytes_per_process, zero1  # noqa: E402

STEPS = 30
SAVE_AT = 15
MESH = jax.make_mesh((4, 2), ("data", "model"))
DATA = MESH.shape["data"]


# ------------------------------------------------------------------ output


def emit(tag: str, value, everyone: bool = False) -> None:
    """One ``TAG <json>`` line, from process 0 only unless ``everyone``."""
    if everyone or PID == 0:
        print(tag, json.dumps(value, sort_keys=True), flush=True)


def gather(x) -> np.ndarray:
    """The global value of ``x`` on the host of every process (a collective for arrays spanning processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def encode(tree) -> dict:
    """``{path: [dtype, shape, hex]}`` of every leaf of ``tree``, gathered (every process must call it)."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = gather(leaf)
        out[jax.tree_util.keystr(kp)] = [str(a.dtype), list(a.shape), a.tobytes().hex()]
    return out


# ------------------------------------------------------------------ model, data, optimizers


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.block1 = nnx.Linear(16, 32, rngs=rngs)
        self.block2 = nnx.Linear(32, 32, rngs=rngs)
        self.head = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.block2(jnp.tanh(self.block1(x)))))


def model_spec(v):
    """Tensor parallelism: kernels split by output column, biases along ``model``."""
    return P(None, "model") if v.ndim == 2 else P("model")


def replicate(v):
    """Pure data parallelism: every device holds the whole parameter."""
    return P()


def put(x, spec) -> jax.Array:
    """A global array on MESH from the same host value on every process (each process fills its own shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(MESH, spec), lambda idx: x[idx])


def build_model(spec=model_spec, seed: int = 0) -> MLP:
    model = MLP(nnx.Rngs(seed))
    nnx.update(model, jax.tree.map(lambda v: put(v, spec(v)), nnx.state(model, nnx.Param)))
    return model


def batch(k: int):
    """Batch ``k``: the same global batch on every process and for every process count, split along ``data``."""
    x = np.random.default_rng(k).standard_normal((32, 16)).astype(np.float32)
    return put(x, P("data")), put(np.tanh(1.5 * x[:, :8]), P("data"))


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


loss_and_grad = nnx.jit(nnx.value_and_grad(loss_fn))


class Schedulers:
    """StepLR then ReduceLROnPlateau on one compat optimizer, saved as one scheduler (state_dict of both).
    ``reductions`` counts the plateau's lr cuts in this process (not saved: the test reads it after training)."""

    def __init__(self, opt):
        self.opt = opt
        self.step_lr = optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
        self.plateau = optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2)
        self.reductions = 0

    def step(self, loss: float) -> None:
        self.step_lr.step()
        before = self.opt.param_groups[0]["lr"]
        self.plateau.step(loss)
        self.reductions += self.opt.param_groups[0]["lr"] < before

    def state_dict(self) -> dict:
        return {"step_lr": self.step_lr.state_dict(), "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_lr.load_state_dict(state["step_lr"])
        self.plateau.load_state_dict(state["plateau"])


def compat_opt(model, state_sharding=None):
    groups = [{"params": model.block1, "lr": 3e-3}, {"params": model.block2},
              {"params": model.head, "lr": 1e-2, "weight_decay": 0.0}]
    opt = optim.AdamW(groups, lr=5e-3, weight_decay=0.05, model=model)
    if state_sharding is not None:
        opt.set_state_sharding(state_sharding)
    return opt


class Compat:
    """The compat run: AdamW, 3 groups, StepLR + ReduceLROnPlateau fed the global (replicated) loss."""

    name = "compat"

    def __init__(self, model):
        self.model = model
        self.opt = compat_opt(model)
        self.sched = Schedulers(self.opt)

    def step(self, k: int) -> None:
        loss, grads = loss_and_grad(self.model, *batch(k))
        self.opt.step(grads)
        self.sched.step(float(loss))
        settle(self.model)

    def save(self, ckpt: Checkpointer, step: int) -> None:
        ckpt.save(step, self.opt, self.sched, model=self.model)

    def restore(self, ckpt: Checkpointer, step: int) -> None:
        ckpt.restore(self.opt, self.sched, model=self.model, step=step)

    def lrs(self) -> list:
        return [g["lr"] for g in self.opt.param_groups]

    def snapshot(self) -> dict:
        """Parameters, optimizer arrays and host-side state (hyperparameters, schedulers), gathered."""
        arrays, meta = self.opt.export_state()
        return {"params": encode(nnx.state(self.model, nnx.Param)), "state": encode(arrays),
                "host": {"param_groups": repr(meta["param_groups"]), "sched": repr(self.sched.state_dict())},
                "lrs": self.lrs(), "num_compiles": self.opt.num_compiles}


def core_tx(model, plateau: bool):
    """The core's grouped AdamW. ``plateau``: reduce_on_plateau over numeric lrs (it refuses lr schedules), with a
    weight_decay schedule in block2 and ZeRO-1 state; else an lr schedule in block1 and state sharded like the
    parameters."""
    if plateau:
        groups = [groupopt.group(model.block1, lr=3e-3, name="b1"),
                  groupopt.group(model.block2, weight_decay=groupopt.schedules.cosine(0.05, T_max=STEPS), name="b2"),
                  groupopt.group(model.head, lr=1e-2, weight_decay=0.0, name="head")]
        tx = groupopt.grouped(model, groups, rule=groupopt.AdamWRule(), lr=5e-3, weight_decay=0.05,
                              state_sharding=zero1("data"))
        return groupopt.reduce_on_plateau(tx, patience=1)
    groups = [groupopt.group(model.block1, lr=groupopt.schedules.step(3e-3, step_size=10, gamma=0.5), name="b1"),
              groupopt.group(model.block2, name="b2"),
              groupopt.group(model.head, lr=1e-2, weight_decay=0.0, name="head")]
    return groupopt.grouped(model, groups, rule=groupopt.AdamWRule(), lr=5e-3, weight_decay=0.05)


@nnx.jit
def plateau_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads, value=loss)
    return loss


@nnx.jit
def plain_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss


class Core:
    """The core run: ``nnx.Optimizer`` over a grouped transformation, stepped inside ``nnx.jit``."""

    def __init__(self, model, plateau: bool = True):
        self.name = "core_plateau" if plateau else "core_schedule"
        self.model = model
        self.opt = nnx.Optimizer(model, core_tx(model, plateau), wrt=nnx.Param)
        self.train_step = plateau_step if plateau else plain_step

    def step(self, k: int) -> None:
        # waited for: see settle()
        jax.block_until_ready(self.train_step(self.model, self.opt, *batch(k)))

    def save(self, ckpt: Checkpointer, step: int) -> None:
        ckpt.save(step, self.opt, model=self.model)

    def restore(self, ckpt: Checkpointer, step: int) -> None:
        ckpt.restore(self.opt, model=self.model, step=step)

    def lrs(self) -> dict:
        """Each group's lr and weight_decay (b2's weight_decay follows a schedule in the plateau variant)."""
        return {name: {k: float(v) for k, v in hp.items() if k in ("lr", "weight_decay")}
                for name, hp in groupopt.get_hyperparams(self.opt).items()}

    def snapshot(self) -> dict:
        """Parameters and the whole ``nnx.Optimizer`` state (step, plateau state, grouped state), gathered."""
        state = nnx.to_pure_dict(nnx.state(self.opt))
        params = encode(nnx.state(self.model, nnx.Param))
        return {"params": params, "state": encode(state), "host": {}, "lrs": self.lrs()}


# ------------------------------------------------------------------ scenarios


def train(_):
    """Training equivalence: each run's parameters and lrs after STEPS steps (the test compares process counts)."""
    out = {}
    for run in (Compat(build_model()), Core(build_model(), plateau=True), Core(build_model(), plateau=False)):
        initial = run.lrs()
        for k in range(STEPS):
            run.step(k)
        snap = run.snapshot()
        out[run.name] = {"params": snap["params"], "initial_lrs": initial, "lrs": snap["lrs"],
                         "num_compiles": snap.get("num_compiles"),
                         "reductions": run.sched.reductions if isinstance(run, Compat) else None}
    emit("RESULT", {"train": out})


def settle(model) -> None:
    """Wait for ``model``'s pending updates. On CPU (Gloo), more than ~36 multi-process computations in flight
    deadlock every process (docs/multi_host.md, "Pitfalls"), so each step is waited for."""
    jax.block_until_ready(nnx.state(model))


def slot_arrays(opt) -> list:
    """The per-parameter state arrays of a compat optimizer (the step counts left out)."""
    return [v for g in opt.param_groups for var in g["params"] for k, v in opt.state[var].items() if k != "step"]


def zero1_scenario(_):
    """Compat AdamW, parameters replicated (pure data parallelism), with and without ZeRO-1 over ``data``."""
    runs = {}
    for name, fn in (("plain", None), ("zero1", zero1("data"))):
        model = build_model(replicate)
        opt = compat_opt(model, fn)
        for k in range(10):
            opt.step(loss_and_grad(model, *batch(k))[1])
            settle(model)
        runs[name] = (model, opt)
    plain, zero = slot_arrays(runs["plain"][1]), slot_arrays(runs["zero1"][1])
    # the data-axis rows of the mesh this process's devices sit on, and the row blocks of each ZeRO-1 array it holds
    rows = sorted({int(idx[0]) for idx, dev in np.ndenumerate(MESH.devices) if dev.process_index == PID})
    held = []
    for a in zero:
        dim = a.sharding.spec.index("data")
        block = a.shape[dim] // DATA
        held.append(sorted({s.index[dim].start // block for s in a.addressable_shards}))
    emit("BYTES", {"process": PID, "local_devices": jax.local_device_count(), "plain": state_bytes_per_process(plain),
                   "zero1": state_bytes_per_process(zero), "rows": rows, "held": held, "shapes": [list(a.shape) for a in plain]},
         everyone=True)
    emit("RESULT", {"zero1": {name: {"params": encode(nnx.state(m, nnx.Param)), "num_compiles": o.num_compiles}
                              for name, (m, o) in runs.items()}})


def ckpt_runs(seed: int):
    return [Compat(build_model(seed=seed)), Core(build_model(seed=seed), plateau=True)]


def ckpt_full(directory):
    """STEPS steps saving step SAVE_AT; prints the state at SAVE_AT and at the end (the uninterrupted run)."""
    out = {}
    for run in ckpt_runs(0):
        ckpt = Checkpointer(os.path.join(directory, run.name), async_save=False)
        for k in range(STEPS):
            run.step(k)
            if k + 1 == SAVE_AT:
                run.save(ckpt, SAVE_AT)
                ckpt.wait()
                saved = run.snapshot()
        ckpt.close()
        out[run.name] = {"saved": saved, "final": run.snapshot()}
    emit("RESULT", {"ckpt_full": out})


def ckpt_resume(directory):
    """Fresh objects (another initialization) restored from step SAVE_AT, then trained to STEPS."""
    out = {}
    for run in ckpt_runs(1):
        ckpt = Checkpointer(os.path.join(directory, run.name), async_save=False)
        run.restore(ckpt, SAVE_AT)
        ckpt.close()
        restored = run.snapshot()
        for k in range(SAVE_AT, STEPS):
            run.step(k)
        out[run.name] = {"restored": restored, "final": run.snapshot()}
    emit("RESULT", {"ckpt_resume": {"directory": directory, **out}})


def big_opt(n_tensors: int, shape) -> optim.Adam:
    """Adam over ``n_tensors`` float32 tensors of ``shape`` of random values (incompressible: a checkpoint of them
    takes a while to write), split along ``data`` like their state."""
    base = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return optim.Adam({f"w{i}": put(base + i, P("data")) for i in range(n_tensors)}, lr=0.1)


def killsave(directory):
    """Step 1 saved and committed, then a large step 2 saved: ``WRITING 2`` before, ``DONE 2`` once committed."""
    run = Compat(build_model())
    run.step(0)
    ckpt = Checkpointer(directory, async_save=False)
    run.save(ckpt, 1)
    ckpt.wait()
    emit("RESULT", {"killsave": run.snapshot()})
    opt = big_opt(64, (1024, 1024))  # 256 MiB of parameters (half of it per process with two)
    print("WRITING 2", flush=True)
    ckpt.save(2, opt, include_params=True)
    ckpt.wait()
    print("DONE 2", flush=True)


def killcheck(directory):
    """What a fresh launch finds after ``killsave`` was interrupted: the committed steps, and step 1 restored."""
    ckpt = Checkpointer(directory)
    steps = ckpt.all_steps()
    run = Compat(build_model(seed=1))
    run.restore(ckpt, 1)
    emit("RESULT", {"killcheck": {"steps": steps, "restored": run.snapshot(), "tmp": sorted(os.listdir(directory))}})


def timing(directory, big: bool = False):
    """Wall times of a save (async_save=False: until committed) and a restore into a fresh optimizer, parameters
    included, by every process of this launch; ``array_bytes``: the arrays' global size."""
    if big:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benchmarks.workloads import build, nest

        wl = build("adamw_48x", quick=False)

        def make():
            params = nest({k: put(v, replicate(v)) for k, v in wl.params.items()})
            groups = [{"params": list(g.paths), **g.hparams} for g in wl.groups]
            opt = optim.AdamW(groups, model=params)
            opt.set_state_sharding(zero1("data"))
            return opt

        grads = nest({k: put(v, replicate(v)) for k, v in wl.grads.items()})
    else:
        def make():
            return big_opt(8, (512, 512))

        grads = {f"w{i}": put(np.full((512, 512), 0.5, np.float32), P("data")) for i in range(8)}
    opt = make()
    opt.step(grads)
    arrays = jax.tree.leaves(opt.export_state(True)[0])
    ckpt = Checkpointer(directory, async_save=False)
    t0 = time.perf_counter()
    ckpt.save(1, opt, include_params=True)
    ckpt.wait()
    save_s = time.perf_counter() - t0
    fresh = make()
    t0 = time.perf_counter()
    ckpt.restore(fresh, include_params=True)
    restored = jax.tree.leaves(fresh.export_state(True)[0])
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t0
    ckpt.close()
    same = all(np.array_equal(s.data, r.data) for a, b in zip(arrays, restored)
               for s, r in zip(a.addressable_shards, b.addressable_shards))
    whole = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)
    emit("TIMING", {"process": PID, "processes": N, "array_bytes": whole, "process_bytes": state_bytes_per_process(arrays),
                    "save_s": save_s, "restore_s": restore_s, "bit_exact": same,
                    "workload": "adamw_48x" if big else "8x(512x512) Adam"}, everyone=True)


SCENARIOS = {"train": train, "zero1": zero1_scenario, "ckpt_full": ckpt_full, "ckpt_resume": ckpt_resume,
             "killsave": killsave, "killcheck": killcheck, "timing": timing,
             "timing48x": lambda d: timing(d, big=True)}

if __name__ == "__main__":
    for item in sys.argv[1:]:
        name, _, arg = item.partition("=")
        SCENARIOS[name](arg)
