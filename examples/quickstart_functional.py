"""Quick start, functional core: one Optax transformation, a rule and hyperparameters per group."""
import jax
import jax.numpy as jnp

import groupopt

k1, k2 = jax.random.split(jax.random.key(0))
params = {"encoder": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.zeros(4)},
          "head": {"kernel": jax.random.normal(k2, (4, 1)), "bias": jnp.zeros(1)}}

def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["encoder"]["kernel"] + p["encoder"]["bias"])
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"] - y) ** 2)

tx = groupopt.grouped(params, [
    groupopt.group("encoder", lr=groupopt.schedules.warmup_linear(1e-3, 10, 100)),  # a schedule
    groupopt.group("head/kernel", rule=groupopt.SGDRule(), lr=1e-2, momentum=0.9, name="head"),
    groupopt.group(groupopt.rest(), weight_decay=0.0),  # everything else: head/bias
], rule=groupopt.AdamWRule(), lr=1e-3, weight_decay=1e-2)  # defaults for every group
state = tx.init(params)

@jax.jit
def train_step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    return tx.apply(params, grads, state)  # or Optax's: updates, state = tx.update(grads, state, params)

x, y = jnp.ones((8, 3)), jnp.ones((8, 1))
for _ in range(5):
    params, state = train_step(params, state, x, y)
state = tx.set_hyperparams(state, "head", lr=5e-3)  # hyperparameters are state: no recompile
params, state = train_step(params, state, x, y)
print("lr per group:", [f"{hp['lr']:.2g}" for hp in tx.hyperparams(state)])
