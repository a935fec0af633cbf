"""groupopt with a linen model and flax.training.train_state.TrainState.

``TrainState.create(..., tx=groupopt.grouped(...))`` works as with any Optax transformation; groups select
linen's parameter paths (``"Dense_0/**"``). ``groupopt.set_hyperparams(state, group, ...)`` returns a new
TrainState with that group's hyperparameters replaced: the jitted train step does not recompile.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

import groupopt


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(16)(x))  # Dense_0
        return nn.Dense(1)(x)  # Dense_1


model = MLP()
x = jnp.linspace(-2.0, 2.0, 256).reshape(64, 4)  # a small regression problem
y = jnp.sin(x @ jnp.array([[1.0], [-0.5], [0.25], [2.0]]))
params = jax.jit(model.init)(jax.random.key(2), x)["params"]  # one compiled init

tx = groupopt.grouped(params, [
    groupopt.group("Dense_0/**", name="body", lr=3e-3),
    groupopt.group("Dense_1/kernel", name="head", lr=1e-2),
    groupopt.group(groupopt.rest(), name="head_bias", lr=1e-2, weight_decay=0.0),
], rule=groupopt.AdamWRule(), weight_decay=1e-2)
state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

traces = 0


@jax.jit
def train_step(state, x, y):
    global traces
    traces += 1  # runs once per trace, not per call

    def loss_fn(p):
        return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads)
    return state, loss, groupopt.hyperparams_for_logging(state)


for epoch in range(3):
    state = groupopt.set_hyperparams(state, "head", lr=1e-2 * 0.5 ** epoch)  # a new TrainState; no recompile
    for _ in range(5):
        state, loss, logs = train_step(state, x, y)
    print(f"epoch {epoch}  loss {float(loss):.4f}  " + "  ".join(f"{k}={float(v):.4g}" for k, v in logs.items()))

print("head lr now:", float(groupopt.get_hyperparams(state, "head")["lr"]))
print(f"train_step traced {traces} time(s)")
