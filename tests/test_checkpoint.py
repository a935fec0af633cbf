"""Orbax checkpoints: bit-exact resume in a fresh process, another mesh, interrupted writes, core state."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import groupopt
import groupopt.compat as optim
from groupopt.checkpoint import Checkpointer, restore_state, save_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A training script: k steps, optional save, optional restore, prints the final params' bytes.
TRAIN = textwrap.dedent(
    """
    import sys, numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    import groupopt.compat as optim
    from groupopt.checkpoint import Checkpointer

    mode, directory, k, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Linear(16, 4, rngs=rngs)
        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    model = Net(nnx.Rngs(0))
    opt = optim.AdamW([{"params": model.a}, {"params": model.b, "lr": 3e-3, "weight_decay": 0.0}], lr=1e-2, amsgrad=True)
    sched = optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
    grad = nnx.jit(nnx.grad(lambda m, x, y: jnp.mean((m(x) - y) ** 2)))
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)) for _ in range(k + n)]
    start = 0
    if mode == "resume":
        ckpt = Checkpointer(directory)
        start = ckpt.restore(opt, sched, include_params=True)
    for i in range(start, k + n if mode != "save" else k):
        x, y = batches[i]
        opt.step(grad(model, x, y))
        sched.step()
    if mode == "save":
        ckpt = Checkpointer(directory)
        ckpt.save(k, opt, sched, include_params=True)
        ckpt.wait()
    leaves = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    print("PARAMS", b"".join(l.tobytes() for l in leaves).hex())
    print("LR", repr(opt.param_groups[1]["lr"]))
    """
)


def run(*args, timeout=240):
    out = subprocess.run([sys.executable, "-c", TRAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("PARAMS", "LR")))
    return lines["PARAMS"], lines["LR"]


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    uninterrupted = run("full", tmp_path / "unused", 7, 6)
    run("save", tmp_path / "ckpt", 7, 6)
    resumed = run("resume", tmp_path / "ckpt", 7, 6)
    assert resumed == uninterrupted  # parameters bit for bit, and the scheduled lr


def sharded_opt(mesh, spec):
    params = {
        "w": jax.device_put(jnp.asarray(np.arange(64.0).reshape(8, 8)), NamedSharding(mesh, spec)),
        "b": jax.device_put(jnp.ones(8), NamedSharding(mesh, P())),
    }
    opt = optim.Adam([{"params": "w"}, {"params": "b", "lr": 0.01}], lr=0.1, model=params)
    return opt


def test_restore_onto_a_different_mesh(tmp_path):
    mesh8 = jax.make_mesh((8,), ("data",))
    mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    opt = sharded_opt(mesh8, P("data"))
    g = {"w": jnp.full((8, 8), 0.5), "b": jnp.ones(8)}
    for _ in range(3):
        opt.step(g)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(3, opt, include_params=True)
    ckpt.wait()
    opt4 = sharded_opt(mesh4, P("data"))
    assert ckpt.restore(opt4, include_params=True) == 3
    w = opt4.params["w"]
    assert w.sharding.mesh.devices.size == 4 and w.sharding.spec == P("data")
    m = opt4.state[opt4.param_groups[0]["params"][0]]["exp_avg"]
    assert m.sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(w, opt.params["w"])
    np.testing.assert_array_equal(m, opt.state[opt.param_groups[0]["params"][0]]["exp_avg"])
    # both continue identically (same host-side hyperparameters, same state)
    g4 = {"w": jax.device_put(g["w"], NamedSharding(mesh4, P("data"))), "b": g["b"]}
    opt.step(g)
    opt4.step(g4)
    np.testing.assert_allclose(opt4.params["w"], opt.params["w"], rtol=1e-12)


def test_restore_checks_structure_first_and_changes_nothing_on_error(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    opt = sharded_opt(mesh, P("data"))
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, opt)
    ckpt.wait()
    other = optim.SGD(opt.params, lr=0.1)
    before = other.state_dict()
    with pytest.raises(ValueError, match="holds a Adam optimizer, not a SGD"):
        ckpt.restore(other)
    assert other.state_dict()["param_groups"] == before["param_groups"]
    fewer = optim.Adam(opt.params, lr=0.1)
    with pytest.raises(ValueError, match=r"groups of sizes \[1, 1\]; this optimizer's are \[2\]"):
        ckpt.restore(fewer)


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np, jax.numpy as jnp
    import groupopt.compat as optim
    from groupopt.checkpoint import Checkpointer
    directory = sys.argv[1]
    small = {"w": jnp.ones(4)}
    opt = optim.Adam(small, lr=0.1)
    opt.step({"w": jnp.ones(4)})
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(1, opt)
    ckpt.wait()
    big = {"w%d" % i: jnp.ones((1024, 1024)) for i in range(64)}  # 256 MiB of state to write
    opt = optim.Adam(big, lr=0.1)
    print("WRITING", flush=True)
    ckpt.save(2, opt)
    ckpt.wait()
    print("DONE", flush=True)
    """
)


def test_a_killed_writer_leaves_the_previous_checkpoint_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    assert line.strip() == "WRITING", line
    deadline = time.time() + 60
    seen = []
    while time.time() < deadline and not seen and proc.poll() is None:
        seen = [n for n in os.listdir(tmp_path) if n.startswith("2") and "tmp" in n]
        time.sleep(0.005)
    assert seen, f"never saw step 2 being written: {os.listdir(tmp_path)}"
    proc.send_signal(signal.SIGKILL)  # mid-write: the temporary directory exists, the commit has not happened
    proc.wait(timeout=60)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1]  # the interrupted step 2 was never committed
    opt = optim.Adam({"w": jnp.zeros(4)}, lr=0.5)
    assert ckpt.restore(opt) == 1
    assert opt.param_groups[0]["lr"] == 0.1
    assert float(opt.state_dict()["state"][0]["step"]) == 1.0


def test_core_state_save_restore_onto_new_shardings(tmp_path):
    mesh8 = jax.make_mesh((8,), ("data",))
    mesh2 = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    params = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh8, P("data")))}
    tx = groupopt.adamw(lr=1e-2)
    st = tx.init(params)
    params, st = jax.jit(tx.apply)(params, {"w": jnp.ones((8, 4))}, st)
    save_state(tmp_path / "state", st)
    params2 = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh2, P("data")))}
    restored = restore_state(tmp_path / "state", tx.init(params2))
    assert restored.groups[0].slots["exp_avg"][0].sharding.mesh.devices.size == 2
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(st)):
        np.testing.assert_array_equal(a, b)


def test_prepare_import_copies_the_callers_arrays_unless_they_are_handed_over():
    """The next step donates the optimizer's buffers: imported arrays are copied (the caller's stay valid),
    unless ``owned=True`` (a checkpoint's freshly read arrays: no second copy, one per device on a mesh)."""
    src = optim.Adam({"w": jnp.arange(4.0)}, lr=0.1)
    src.step({"w": jnp.ones(4)})
    for owned in (False, True):
        arrays, meta = src.export_state()
        arrays = jax.tree.map(jnp.copy, arrays)
        fresh = optim.Adam({"w": jnp.zeros(4)}, lr=0.5)
        fresh.prepare_import(arrays, meta, owned=owned)()
        held = arrays["groups"][0]["slots"]["exp_avg"][0]
        assert (fresh.export_state()[0]["groups"][0]["slots"]["exp_avg"][0] is held) == owned
        fresh.step({"w": jnp.ones(4)})  # donates the optimizer's buffers
        assert held.is_deleted() == owned
        assert fresh.param_groups[0]["lr"] == 0.1 and float(fresh.state_dict()["state"][0]["step"]) == 2.0
