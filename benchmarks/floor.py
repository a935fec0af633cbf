"""The "floor": a hand-written, library-free, per-leaf AdamW in plain ``jax.numpy``.

What the lean minimum of a grouped AdamW step costs with XLA on this backend,
so that groupopt's core step (and Optax) can be measured against it:

* one jitted function over *flat lists* of leaves (no pytree of dicts, no
  optimizer library);
* each leaf is updated with its own group's numbers; ``lr``, ``betas``,
  ``eps`` and ``weight_decay`` are Python floats baked into the program
  (``hparams="const"``, the default) or per-group float32 scalar arrays passed
  in the state (``hparams="array"``, what groupopt does so that they can be
  edited without a recompile);
* the bias corrections are computed once per group, on scalars, from one
  int32 step count in the state;
* torch AdamW's math, per leaf::

      p *= 1 - lr * wd
      m  = m + (1 - b1) * (g - m)          # torch.lerp, weight < 0.5
      v  = b2 * v + (1 - b2) * g * g
      p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

* params and state donated (``donate_argnums=(0, 2)``).

``tree=True`` takes and returns params and grads as the workload's nested dicts (what
groupopt and Optax receive) instead of flat lists: the same program, plus the host-side
pytree flattening of 2 x 2001 dict leaves at every call (~3-4 ms on ``adamw_2001``).

Only AdamW workloads (every group ``rule == "adamw"``) are supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .workloads import Workload, nest

__all__ = ["FloorAdamW", "floor_adamw"]


class FloorAdamW:
    """``step(params, grads, state) -> (params, state)`` over flat lists of leaves (the workload's path order).

    ``state = (count, hparams, exp_avg, exp_avg_sq)``: ``count`` an int32
    scalar, ``hparams`` a tuple with per group ``(lr, b1, b2, eps, wd)`` float32
    scalars (empty with ``hparams="const"``), the slots tuples of arrays.
    """

    def __init__(self, w: Workload, hparams: str = "const", tree: bool = False):
        if any(g.rule != "adamw" for g in w.groups) or w.layer_lrs is not None:
            raise ValueError(f"the floor implements plain per-leaf AdamW only; {w.name} is not that")
        if hparams not in ("const", "array"):
            raise ValueError(f"hparams must be 'const' or 'array', got {hparams!r}")
        self.mode = hparams
        self.tree = tree
        self.paths = list(w.params)
        index = {p: i for i, p in enumerate(self.paths)}
        self.groups = []  # (lr, b1, b2, eps, wd) as Python floats, leaf indices
        for g in w.groups:
            hp = g.hparams
            b1, b2 = hp["betas"]
            self.groups.append(((float(hp["lr"]), float(b1), float(b2), float(hp["eps"]), float(hp["weight_decay"])),
                                [index[p] for p in g.paths]))

    def leaves(self, flat: dict):
        """``{path: array}`` -> the list of leaves in this step's order (``tree``: the nested dict)."""
        if self.tree:
            return nest({p: jnp.asarray(flat[p]) for p in self.paths})
        return [jnp.asarray(flat[p]) for p in self.paths]

    def _flat(self, tree) -> list:
        return [_get(tree, p) for p in self.paths] if self.tree else tree

    def init(self, params):
        params = self._flat(params)
        hps = () if self.mode == "const" else tuple(tuple(jnp.asarray(x, jnp.float32) for x in hp) for hp, _ in self.groups)
        return (jnp.zeros((), jnp.int32), hps, tuple(jnp.zeros_like(p) for p in params), tuple(jnp.zeros_like(p) for p in params))

    def step(self, params, grads, state):
        params, grads = self._flat(params), self._flat(grads)
        count, hps, ms, vs = state
        count = count + 1
        t = count.astype(jnp.float32)
        new_p, new_m, new_v = list(params), list(ms), list(vs)
        for gi, (consts, idx) in enumerate(self.groups):
            lr, b1, b2, eps, wd = consts if self.mode == "const" else hps[gi]
            # once per group, on scalars
            step_size = lr / (1 - b1**t)
            bc2_sqrt = jnp.sqrt(1 - b2**t)
            decay = 1 - lr * wd
            one_minus_b1, one_minus_b2 = 1 - b1, 1 - b2
            for i in idx:
                g, m, v = grads[i], ms[i], vs[i]
                p = params[i] * decay
                m = m + one_minus_b1 * (g - m)
                v = b2 * v + one_minus_b2 * g * g
                new_p[i] = p - step_size * m / (jnp.sqrt(v) / bc2_sqrt + eps)
                new_m[i], new_v[i] = m, v
        if self.tree:
            new_p = nest(dict(zip(self.paths, new_p)))
        return new_p, (count, hps, tuple(new_m), tuple(new_v))

    def jitted(self):
        return jax.jit(self.step, donate_argnums=(0, 2))


def _get(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def floor_adamw(w: Workload, hparams: str = "const", tree: bool = False) -> FloorAdamW:
    return FloorAdamW(w, hparams, tree)
