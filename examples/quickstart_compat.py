"""Quick start, torch-shaped API: torch.optim's lines, with an NNX model and nnx.grad's gradients."""
import jax.numpy as jnp
from flax import nnx

import groupopt.compat as optim

class Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(3, 16, rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.body(x)))

def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

model = Net(nnx.Rngs(0))
opt = optim.SGD([{"params": model.body}, {"params": model.head, "lr": 0.05}], lr=0.1, momentum=0.9)
sched = optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

x, y = jnp.ones((8, 3)), jnp.ones((8, 1))
for _ in range(20):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.step(grads)  # updates model.body and model.head in place
    sched.step()
print("lr per group:", [g["lr"] for g in opt.param_groups], "loss:", f"{float(loss):.4f}", "compiles:", opt.num_compiles)
