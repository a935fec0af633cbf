"""A launched process (see multihost_launch.py) for the host-side agreement checks: ``python multihost_agree_worker.py SCENARIO``.

Each scenario trains a small NNX model data-parallel over every process's devices and makes one
process do something different. Every process prints ``RAISED <message>`` (one line) when
groupopt raised :class:`groupopt.multihost.ProcessDisagreement`, ``UNCHANGED <bool>`` (whether
the parameters and optimizer state are exactly as before the failed call), or ``DONE`` when no
error came.
"""

import sys
import time

from multihost_launch import init

pid, n = init()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import groupopt  # noqa: E402
import groupopt.compat as optim  # noqa: E402
from groupopt import multihost  # noqa: E402
from groupopt.checkpoint import Checkpointer  # noqa: E402

multihost.configure(timeout_s=float(sys.argv[2]))
mesh = jax.make_mesh((jax.device_count(),), ("data",))


def glob(x, spec):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.block1 = nnx.Linear(4, 8, rngs=rngs)
        self.block2 = nnx.Linear(8, 8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.block2(jnp.tanh(self.block1(x)))))


model = None  # each scenario starts from a fresh one (fresh_model)
loss_grad = nnx.jit(nnx.value_and_grad(lambda m, x, y: jnp.mean((m(x) - y) ** 2)))
rng = np.random.default_rng(0)


def batch():
    x = rng.standard_normal((16, 4)).astype(np.float32)
    return glob(x, P("data")), glob(np.tanh(x[:, :2]), P("data"))


def host(tree):
    return [np.asarray(s.data) for leaf in jax.tree.leaves(tree)
            for s in getattr(leaf, "addressable_shards", [type("Host", (), {"data": leaf})])]


def snapshot(opt):
    return host(nnx.state(model, nnx.Param)) + host(opt.state_dict()["state"])


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def compat(groups=3):
    gs = [{"params": model.block1, "lr": 3e-3}, {"params": model.block2}, {"params": model.head, "lr": 1e-2}][:groups]
    return optim.AdamW(gs, lr=5e-3, model=model)


def attempt(fn, opt=None):
    before = snapshot(opt) if opt is not None else None
    try:
        fn()
    except multihost.ProcessDisagreement as e:
        print("RAISED", str(e).replace("\n", " | "), flush=True)
        if opt is not None:
            print("UNCHANGED", same(before, snapshot(opt)), flush=True)
        return True
    return False


def train(opt, steps, sched=None):
    for _ in range(steps):
        loss, grads = loss_grad(model, *batch())
        opt.step(grads)
        if sched is not None:
            sched.step()
    return loss


SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def fresh_model():
    global model
    model = MLP(nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda v: glob(v, P()), nnx.state(model, nnx.Param)))


@scenario
def lr_on_one_process():
    """A hand edit of one process's lr: caught at the next step, before it."""
    opt = compat()
    train(opt, 2)
    if pid == 1:
        opt.param_groups[2]["lr"] = 0.5
    x, y = batch()
    if not attempt(lambda: opt.step(loss_grad(model, x, y)[1]), opt):
        print("DONE", flush=True)


@scenario
def scheduler_on_process_0():
    """The scheduler stepped by process 0 only."""
    opt = compat()
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(opt, 2, sched)
    if pid == 0:
        sched.step()
    if not attempt(lambda: train(opt, 1), opt):
        print("DONE", flush=True)


@scenario
def plateau_local_metric():
    """ReduceLROnPlateau fed a per-process number."""
    opt = compat()
    plateau = optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    loss = train(opt, 2)
    if not attempt(lambda: plateau.step(float(loss) + pid)):
        print("DONE", flush=True)
    print("EPOCH", plateau.last_epoch, flush=True)


@scenario
def add_group_on_process_1():
    """The optimizer's structure differs (a group added on one process): caught before any device work."""
    opt = compat(groups=2)
    train(opt, 1)
    loss, grads = loss_grad(model, *batch())
    if pid == 1:
        attempt(lambda: opt.add_param_group({"params": model.head, "lr": 1e-2}), opt)
    elif not attempt(lambda: opt.step(grads), opt):
        print("DONE", flush=True)


@scenario
def core_groups_differ():
    """grouped() built differently (a process-dependent default lr): caught at init, before placing the state."""
    tx = groupopt.grouped(model, [groupopt.group(model.block1, name="b1"), groupopt.group(model.head, lr=1e-2, name="head")],
                          rule=groupopt.AdamWRule(), lr=1e-3 * (1 + pid))

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    if not attempt(lambda: step(model, nnx.Optimizer(model, tx, wrt=nnx.Param), *batch())):
        print("DONE", flush=True)


@scenario
def core_set_hyperparams():
    """set_hyperparams with a per-process value."""
    tx = groupopt.grouped(model, [groupopt.group(model.block1, name="b1"), groupopt.group(model.head, lr=1e-2, name="head")],
                          rule=groupopt.AdamWRule(), lr=1e-3)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = host(nnx.state(opt))
    if attempt(lambda: groupopt.set_hyperparams(opt, "head", lr=0.1 * (pid + 1))):
        print("UNCHANGED", same(before, host(nnx.state(opt))), flush=True)
    else:
        print("DONE", flush=True)


@scenario
def checkpoint_other_step():
    """Processes save under different step numbers."""
    opt = compat()
    train(opt, 1)
    ckpt = Checkpointer(sys.argv[3], async_save=False)
    if not attempt(lambda: ckpt.save(1 + pid, opt)):
        print("DONE", flush=True)
    print("STEPS", ckpt.all_steps(), flush=True)


@scenario
def one_process_elsewhere():
    """Process 1 never reaches the step: process 0 does not hang (last in a launch)."""
    opt = compat()
    train(opt, 1)
    loss, grads = loss_grad(model, *batch())
    if pid == 1:
        time.sleep(float(sys.argv[2]) * 2)
        print("DONE", flush=True)
    elif not attempt(lambda: opt.step(grads), opt):
        print("DONE", flush=True)


@scenario
def load_state_dict_differs():
    """A state_dict that is not the same on every process."""
    opt = compat()
    train(opt, 1)
    sd = opt.state_dict()
    sd["param_groups"][1]["lr"] = 1e-3 * (pid + 1)
    if not attempt(lambda: opt.load_state_dict(sd), opt):
        print("DONE", flush=True)


@scenario
def agreeing():
    """The same calls everywhere: no error, and the checks ran."""
    first = multihost.checks_made()
    opt = compat()
    sched = optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    plateau = optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    for _ in range(4):
        loss, grads = loss_grad(model, *batch())
        opt.step(grads)
        sched.step()
        plateau.step(float(loss))
    groupopt.set_hyperparams(groupopt.grouped(model, [groupopt.group(model.head, name="head")], rule=groupopt.SGDRule(), lr=0.1)
                             .init(nnx.state(model, nnx.Param)), "head", lr=0.2)
    print("CHECKS", multihost.checks_made() - first, flush=True)
    print("DONE", flush=True)


for name in sys.argv[1].split(","):  # several scenarios in one launch: each starts from a fresh model
    fresh_model()
    print("SCENARIO", name, flush=True)
    SCENARIOS[name]()
    jax.block_until_ready(nnx.state(model))  # nothing left in flight (see multihost_worker.settle)
