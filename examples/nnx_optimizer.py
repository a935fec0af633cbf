"""groupopt with flax's nnx.Optimizer: per-group rules and lrs, an lr edit per epoch by group name, logging.

The grouped transformation is an ordinary Optax transformation, so ``nnx.Optimizer`` takes it as it is
(also inside ``optax.chain``, ``optax.MultiSteps``, ``groupopt.accumulate``). Its hyperparameters live in
``opt.opt_state`` as ``nnx.Variable`` arrays: ``groupopt.set_hyperparams(opt, group, ...)`` writes into them
in place, so the ``nnx.jit``-ed train step is traced once for the whole run.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import groupopt


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(4, 16, rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.gelu(self.encoder(x)))


model = nnx.jit(lambda: MLP(nnx.Rngs(0)))()  # initialized in one compiled call
tx = groupopt.grouped(model, [
    groupopt.group(model.encoder, name="encoder", lr=3e-3, betas=(0.9, 0.99)),
    groupopt.group(model.head, name="head", rule=groupopt.SGDRule(), lr=2e-2, momentum=0.9),
], rule=groupopt.AdamWRule(), weight_decay=1e-2)
optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), tx), wrt=nnx.Param)

traces = 0


@nnx.jit
def train_step(model, optimizer, x, y):
    global traces
    traces += 1  # runs once per trace, not per call
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, groupopt.hyperparams_for_logging(optimizer)  # arrays: no host sync in the step


x = jnp.linspace(-2.0, 2.0, 256).reshape(64, 4)  # a small regression problem
y = jnp.sin(x @ jnp.array([[1.0], [-0.5], [0.25], [2.0]]))

for epoch in range(3):
    # one lr edit per epoch, by group name: written into the optimizer's Variables (no recompile)
    groupopt.set_hyperparams(optimizer, "head", lr=2e-2 * 0.5 ** epoch)
    for _ in range(5):
        loss, logs = train_step(model, optimizer, x, y)
    print(f"epoch {epoch}  loss {float(loss):.4f}  " + "  ".join(f"{k}={float(v):.4g}" for k, v in logs.items()))

print("head lr now:", float(groupopt.get_hyperparams(optimizer, "head")["lr"]))
print(f"train_step traced {traces} time(s)")
