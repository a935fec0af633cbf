"""Three parameter groups on a Flax NNX MLP, with the torch-shaped API (``make demo``).

This is a torch training script ported to JAX: ``import groupopt.compat as
optim`` replaces ``torch.optim``; the model is Flax NNX; gradients come from
``nnx.grad`` and are passed to ``opt.step(grads)``. Everything else --
param_groups, LambdaLR, add_param_group, state_dict -- is torch's API.

Model: 64 -> 128 -> 128 -> 10 MLP on scikit-learn's 8x8 digits (no download).
Optimizer: AdamW (weight_decay 1e-2 unless a group says otherwise), groups:

  0  hidden  lr 3e-3, linear warmup over the first epoch, then cosine decay to 0
  1  head    lr 1e-2, constant, no weight decay
  2  first   frozen (in no group: AdamW never touches it) until epoch U, then
             added with ``add_param_group``: lr 1e-3, constant

The schedule is a ``LambdaLR`` with one lambda per group, stepped after every
optimizer step (torch's order); it only writes ``group["lr"]``, which the
jitted step reads as data, so it never recompiles.

Mid-run, the model, optimizer and scheduler are checkpointed to disk; a fresh
model, optimizer and scheduler are built and loaded from the file, and the run
continues from them. As a check, the uninterrupted run also trains the next
epoch, and the resumed run must give exactly the same parameters.

Usage: python examples/digits_groups.py [--epochs 20] [--out outputs]
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import groupopt.compat as optim

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HIDDEN_LR, HEAD_LR, FIRST_LR = 3e-3, 1e-2, 1e-3
BATCH = 64
GROUPS = ("hidden", "head", "first")  # param_groups order


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Linear(64, 128, rngs=rngs)
        self.hidden = nnx.Linear(128, 128, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.hidden(nnx.relu(self.first(x)))))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def loss_and_grads(model, x, y):
    return nnx.value_and_grad(loss_fn)(model, x, y)


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


# ----------------------------------------------------------------- optimizer, groups, schedule


def build_optimizer(model):
    """Groups 0 and 1. model.first is in no group: frozen, as in torch."""
    return optim.AdamW(
        [
            {"params": model.hidden, "lr": HIDDEN_LR},
            {"params": model.head, "lr": HEAD_LR, "weight_decay": 0.0},
        ],
        weight_decay=1e-2,
    )


def unfreeze_first_layer(opt, model):
    """Group 2. ``initial_lr`` lets a LambdaLR be rebuilt mid-run (torch requires it for last_epoch >= 0)."""
    opt.add_param_group({"params": model.first, "lr": FIRST_LR, "initial_lr": FIRST_LR})


def warmup_cosine(warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))

    return factor


def build_scheduler(opt, hidden_factor, last_epoch=-1):
    """One lambda per group: warmup+cosine for "hidden", constant for the others."""
    constant = lambda step: 1.0  # noqa: E731
    lambdas = [hidden_factor, constant, constant][: len(opt.param_groups)]
    return optim.lr_scheduler.LambdaLR(opt, lambdas, last_epoch=last_epoch)


# ----------------------------------------------------------------- training


def batches(x, y, epoch):
    order = np.random.default_rng(epoch).permutation(len(x))  # same batches for the same epoch
    for i in range(len(x) // BATCH):
        idx = order[i * BATCH : (i + 1) * BATCH]
        yield x[idx], y[idx]


def train_epoch(model, opt, sched, data, epoch, lr_trace=None):
    losses = []
    for xb, yb in batches(data["x_train"], data["y_train"], epoch):
        if lr_trace is not None:
            lr_trace.append([g["lr"] for g in opt.param_groups])  # the lrs this step uses
        loss, grads = loss_and_grads(model, xb, yb)
        opt.step(grads)  # updates the model's nnx.Params in place
        sched.step()
        losses.append(loss)
    return float(jnp.mean(jnp.stack(losses)))


def params_numpy(model):
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def save_checkpoint(path, epoch, model, opt, sched):
    ckpt = {
        "epoch": epoch,
        "model": params_numpy(model),
        "optimizer": opt.state_dict(),  # torch's format, numpy arrays inside
        "scheduler": sched.state_dict(),
    }
    with open(path, "wb") as f:
        pickle.dump(ckpt, f)


def resume(path, hidden_factor):
    """torch's resume order: build model, optimizer (same groups) and scheduler, then load."""
    with open(path, "rb") as f:
        ckpt = pickle.load(f)
    model = MLP(nnx.Rngs(1))  # other random weights: the checkpoint overwrites them
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, ckpt["model"])
    nnx.update(model, state)
    opt = build_optimizer(model)
    unfreeze_first_layer(opt, model)
    sched = build_scheduler(opt, hidden_factor)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return ckpt["epoch"], model, opt, sched


def load_data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def plot_lrs(lr_trace, steps_per_epoch, unfreeze_epoch, ckpt_epoch, path):
    lrs = np.array([row + [np.nan] * (len(GROUPS) - len(row)) for row in lr_trace], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for g, name in enumerate(GROUPS):
        ax.plot(np.arange(len(lrs)), lrs[:, g], label=f"group {g}: {name}")
    ax.axvline((unfreeze_epoch - 1) * steps_per_epoch, color="gray", ls=":", label="add_param_group (first)")
    ax.axvline(ckpt_epoch * steps_per_epoch, color="gray", ls="--", label="checkpoint / resume")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lr")
    ax.set_title("AdamW learning rate per parameter group")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="number of epochs (>= 3; default 20)")
    parser.add_argument("--out", default="outputs", help="folder for the plot and the checkpoint (default outputs)")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (unfreeze, checkpoint and resume need room)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    data = load_data()
    steps_per_epoch = len(data["x_train"]) // BATCH
    total_steps = args.epochs * steps_per_epoch
    hidden_factor = warmup_cosine(steps_per_epoch, total_steps)
    unfreeze_epoch = max(2, args.epochs // 4 + 1)  # first layer joins at the start of this epoch
    ckpt_epoch = max(unfreeze_epoch, args.epochs // 2)  # checkpoint at the end of this epoch
    ckpt_path = out / "checkpoint.pkl"

    model = MLP(nnx.Rngs(0))
    opt = build_optimizer(model)
    sched = build_scheduler(opt, hidden_factor)
    lr_trace = []

    def report(epoch, loss, model, opt):
        lrs = [f"{g['lr']:9.2e}" for g in opt.param_groups] + ["   frozen"] * (len(GROUPS) - len(opt.param_groups))
        acc = float(accuracy(model, data["x_test"], data["y_test"]))
        print(f"{epoch:5d}  {'  '.join(lrs)}  {loss:10.4f}  {acc:8.4f}")
        return acc

    print(f"digits: {len(data['x_train'])} train / {len(data['x_test'])} test, {steps_per_epoch} steps an epoch")
    print("lr columns: each group's lr at the end of the epoch (LambdaLR, stepped every optimizer step)")
    print(f"{'epoch':>5}  {'lr hidden':>9}  {'lr head':>9}  {'lr first':>9}  {'train loss':>10}  {'test acc':>8}")
    for epoch in range(1, ckpt_epoch + 1):
        if epoch == unfreeze_epoch:
            unfreeze_first_layer(opt, model)
            # LambdaLR has one lambda per group and cannot follow a new group (torch raises a zip
            # error): rebuild it at the current step. Its construction step advances last_epoch by
            # one, so pass last_epoch - 1.
            sched = build_scheduler(opt, hidden_factor, last_epoch=sched.last_epoch - 1)
            print(f"      -- add_param_group: layer 'first' unfrozen (group 2, lr {FIRST_LR:g}) --")
        loss = train_epoch(model, opt, sched, data, epoch, lr_trace)
        report(epoch, loss, model, opt)

    steps = ckpt_epoch * steps_per_epoch
    print(f"      -- {steps} optimizer steps and scheduler steps so far, {opt.num_compiles} compilations of the optimizer step --")
    save_checkpoint(ckpt_path, ckpt_epoch, model, opt, sched)
    print(f"      -- checkpoint after epoch {ckpt_epoch}: model + optimizer + scheduler -> {ckpt_path} --")

    # Reference for the check: the uninterrupted run trains the next epoch (its row is not printed).
    train_epoch(model, opt, sched, data, ckpt_epoch + 1)
    reference = params_numpy(model)
    del model, opt, sched

    epoch0, model, opt, sched = resume(ckpt_path, hidden_factor)
    step = int(opt.state[model.hidden.kernel]["step"])  # torch's per-parameter state
    print(
        f"      -- resumed from {ckpt_path}: fresh model, AdamW ({len(opt.param_groups)} groups) and LambdaLR "
        f"loaded (optimizer step {step}, scheduler last_epoch {sched.last_epoch}) --"
    )
    for epoch in range(epoch0 + 1, args.epochs + 1):
        loss = train_epoch(model, opt, sched, data, epoch, lr_trace)
        acc = report(epoch, loss, model, opt)
        if epoch == epoch0 + 1:
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params_numpy(model)), jax.tree.leaves(reference)))
            same = "identical to" if diff == 0.0 else "DIFFERENT from"
            print(f"      -- resume check: parameters after epoch {epoch} are {same} the uninterrupted run's (max |diff| {diff:g}) --")

    png = out / "lr_per_group.png"
    plot_lrs(lr_trace, steps_per_epoch, unfreeze_epoch, ckpt_epoch, png)
    print(f"lr plot: {png}")
    print(f"final test accuracy: {acc:.4f}")
    print(f"time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
