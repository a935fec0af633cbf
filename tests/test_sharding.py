"""8 CPU devices (XLA_FLAGS set in conftest): sharded state, same numbers as one device, ZeRO-1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import groupopt
import groupopt.compat as optim
from groupopt.sharding import state_bytes_per_device, zero1



def test_eight_devices_are_there():
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax starts"

STEPS = 50


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.block1 = nnx.Linear(16, 32, rngs=rngs, param_dtype=jnp.float32)
        self.block2 = nnx.Linear(32, 32, rngs=rngs, param_dtype=jnp.float32)
        self.head = nnx.Linear(32, 8, rngs=rngs, param_dtype=jnp.float32)

    def __call__(self, x):
        return self.head(jnp.tanh(self.block2(jnp.tanh(self.block1(x)))))


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


grad_fn = nnx.jit(nnx.grad(loss_fn))


def place(model, mesh, spec_for):
    state = nnx.state(model, nnx.Param)
    shardings = jax.tree.map(lambda v: NamedSharding(mesh, spec_for(v)), state)
    nnx.update(model, jax.device_put(state, shardings))


def model_spec(v):
    return P(None, "model") if v.ndim == 2 else P("model")


def make_opt(kind, model):
    kw = {"model": model}  # lets pure-dict gradients be matched by path
    groups = [{"params": model.block1, "lr": 3e-3}, {"params": model.block2}, {"params": model.head, "lr": 1e-2, "weight_decay": 0.0}]
    if kind == "adamw":
        return optim.AdamW(groups, lr=5e-3, weight_decay=0.05, **kw)
    return optim.SGD(groups, lr=5e-2, momentum=0.9, weight_decay=0.01, **kw)


def train(mesh=None, spec_for=model_spec, sharding_fn=None, kind="sgd", fixed_grads=None):
    """50 steps, 3 groups, StepLR. Grads from the (sharded) model, or the given per-step grads."""
    model = MLP(nnx.Rngs(0))
    if mesh is not None:
        place(model, mesh, spec_for)
    opt = make_opt(kind, model)
    if sharding_fn is not None:
        opt.set_state_sharding(sharding_fn)
    sched = optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    rng = np.random.default_rng(0)
    for k in range(STEPS):
        x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
        y = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
        if mesh is not None:
            x = jax.device_put(x, NamedSharding(mesh, P("data")))
            y = jax.device_put(y, NamedSharding(mesh, P("data")))
        if fixed_grads is None:
            opt.step(grad_fn(model, x, y))
        else:
            g = fixed_grads[k]
            if mesh is not None:
                g = jax.tree.map(lambda a, v: jax.device_put(a, v.sharding), g, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            opt.step(g)
        sched.step()
    return model, opt


def recorded_grads():
    """Per-step gradients of a single-device run (so optimizer arithmetic can be compared bit for bit)."""
    model = MLP(nnx.Rngs(0))
    rng = np.random.default_rng(1)
    out = []
    for _ in range(STEPS):
        x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
        out.append(nnx.to_pure_dict(grad_fn(model, x, jnp.tanh(x[:, :8]))))
    return out


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def params_of(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def single():
    model, _ = train()
    return params_of(model)


@pytest.mark.parametrize("shape", [(4, 2), (8, 1)])
def test_sharded_training_matches_single_device_and_state_follows_params(shape, single):
    """Forward, backward and update on the mesh: fp32 parameters within 1e-6 of the one-device run
    (the only differences come from the data-parallel reduction order of the gradients)."""
    mesh = jax.make_mesh(shape, ("data", "model"))
    model, opt = train(mesh)
    got = params_of(model)
    for k, ref in single.items():
        assert rel(got[k], ref) <= 1e-6, (k, rel(got[k], ref))
    assert opt.num_compiles == 1  # 50 steps + 50 scheduler steps, one compilation
    for group in opt.param_groups:
        for var in group["params"]:
            p = var.get_value()
            assert isinstance(p.sharding, NamedSharding) and p.sharding.mesh.shape == mesh.shape
            s = opt.state[var]["momentum_buffer"]
            assert s.sharding.is_equivalent_to(p.sharding, p.ndim), (s.sharding, p.sharding)


@pytest.mark.parametrize("shape", [(4, 2), (8, 1)])
def test_adamw_update_on_mesh_matches_one_device_given_the_same_grads(shape):
    """Same gradients: the only differences left are XLA's per-shape vectorization (a few ulps)."""
    grads = recorded_grads()
    ref, _ = train(kind="adamw", fixed_grads=grads)
    model, opt = train(jax.make_mesh(shape, ("data", "model")), kind="adamw", fixed_grads=grads)
    want, got = params_of(ref), params_of(model)
    for k in want:
        assert rel(got[k], want[k]) <= 1e-6, k
    assert opt.num_compiles == 1
    for group in opt.param_groups:
        for var in group["params"]:
            p = var.get_value()
            for name in ("exp_avg", "exp_avg_sq"):
                assert opt.state[var][name].sharding.is_equivalent_to(p.sharding, p.ndim)


def test_zero1_divides_per_device_state_bytes_by_data_axis_and_keeps_numbers():
    grads = recorded_grads()
    mesh = jax.make_mesh((8, 1), ("data", "model"))
    replicate = lambda v: P()  # noqa: E731  (params replicated: pure data parallelism)
    plain_model, plain = train(mesh, spec_for=replicate, kind="adamw", fixed_grads=grads)
    model, opt = train(mesh, spec_for=replicate, sharding_fn=zero1("data"), kind="adamw", fixed_grads=grads)

    def per_device(o):
        slots = [{k: v for k, v in o.state[var].items() if k != "step"} for g in o.param_groups for var in g["params"]]
        return state_bytes_per_device(slots)[jax.devices()[0]]

    plain_bytes, zero_bytes = per_device(plain), per_device(opt)
    assert plain_bytes == 8 * zero_bytes, (plain_bytes, zero_bytes)
    for var in model.head.kernel, model.block1.bias:
        assert opt.state[var]["exp_avg"].sharding.spec[0] == "data"
    want, got = params_of(plain_model), params_of(model)
    for k in want:
        assert rel(got[k], want[k]) <= 1e-6, k
    assert opt.num_compiles == 1


def test_core_zero1_and_replicated_scalars():
    mesh = jax.make_mesh((8, 1), ("data", "model"))
    rep = NamedSharding(mesh, P())
    params = {"w": jax.device_put(jnp.ones((16, 4)), rep), "b": jax.device_put(jnp.ones((8,)), rep)}
    tx = groupopt.adamw(lr=1e-3, params=params, groups=[groupopt.group("w"), groupopt.group("b", lr=1e-2)])
    tx_z = groupopt.grouped(params, [groupopt.group("w"), groupopt.group("b", lr=1e-2)], rule=groupopt.AdamWRule, lr=1e-3,
                            state_sharding=zero1("data"))
    st, st_z = tx.init(params), tx_z.init(params)
    assert st_z.groups[0].slots["exp_avg"][0].sharding.spec == P("data", None)
    assert st.groups[0].slots["exp_avg"][0].sharding.is_equivalent_to(rep, 2)
    for leaf in jax.tree.leaves((st_z.count, st_z.hyperparams, [g.step for g in st_z.groups])):
        assert leaf.sharding.is_equivalent_to(rep, leaf.ndim)
    step = jax.jit(tx_z.apply)
    p, s = params, st_z
    for _ in range(3):
        p, s = step(p, params, s)
    assert s.groups[0].slots["exp_avg_sq"][0].sharding.spec == P("data", None)
    p2, s2 = params, st
    for _ in range(3):
        p2, s2 = jax.jit(tx.apply)(p2, params, s2)
    assert rel(p["w"], p2["w"]) <= 1e-6
