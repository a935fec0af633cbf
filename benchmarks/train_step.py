"""The ``train_step_nnx`` workload: one full training step (forward + backward + AdamW) of a real model.

The model is a stack of pre-LayerNorm transformer blocks (fused ``qkv``
projection, softmax attention, GELU MLP) and a linear head, on random
``(batch, seq, d_model)`` inputs with an MSE loss -- written once in Flax NNX
and once in torch, with the torch weights copied from the NNX initialisation,
so every implementation runs the same numbers (``update_norm`` agrees).

Groups (AdamW): ``decay`` (kernels), ``no_decay`` (biases and LayerNorm scales,
``weight_decay=0``), ``head`` (the head's kernel and bias, ``lr=3e-3``).

* ``groupopt``: ``nnx.split`` once; a ``jax.jit`` step ``value_and_grad`` of
  ``nnx.merge(graphdef, params)`` then ``tx.apply`` (donating params and state).
* ``optax``: the same step with ``multi_transform`` of ``inject_hyperparams(adamw)``.
* ``groupopt_compat``: torch style: ``optim.AdamW(groups, model=model)``; an
  ``nnx.jit``-ed ``nnx.value_and_grad`` gives the grads, then ``opt.step(grads)``
  (two dispatches a step, NNX graph handling on the host).
* ``torch_fused`` / ``torch_foreach``: ``zero_grad``, forward, ``backward``,
  ``AdamW(fused|foreach).step()``.
"""

from __future__ import annotations

import numpy as np

from .impls import Config, Measured, path_selector, update_norm
from .timing import compile_jit, device_kind, memory_stats, time_steps, tree_nbytes
from .workloads import BETAS, EPS, HEAD_LR, LR, WD, Workload

__all__ = ["run_train_impl"]

LN_EPS = 1e-5


def _nnx_model(cfg: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    d, h, f = cfg["d_model"], cfg["n_heads"], cfg["d_ff"]

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
            self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
            self.out = nnx.Linear(d, d, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
            self.fc1 = nnx.Linear(d, f, rngs=rngs)
            self.fc2 = nnx.Linear(f, d, rngs=rngs)

        def __call__(self, x):
            b, t, _ = x.shape
            q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h), 3, axis=2)
            q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
            att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h), axis=-1)
            x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=False))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg["n_blocks"])])
            self.head = nnx.Linear(d, cfg["d_out"], rngs=rngs)

        def __call__(self, x):
            for blk in self.blocks:
                x = blk(x)
            return self.head(x)

    return Model(nnx.Rngs(0))


def _torch_model(cfg: dict):
    import torch

    d, h, f = cfg["d_model"], cfg["n_heads"], cfg["d_ff"]

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(d, eps=LN_EPS)
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.out = torch.nn.Linear(d, d)
            self.ln2 = torch.nn.LayerNorm(d, eps=LN_EPS)
            self.fc1 = torch.nn.Linear(d, f)
            self.fc2 = torch.nn.Linear(f, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h).unbind(2)
            att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h), dim=-1)
            x = x + self.out(torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(cfg["n_blocks"])])
            self.head = torch.nn.Linear(d, cfg["d_out"])

        def forward(self, x):
            for blk in self.blocks:
                x = blk(x)
            return self.head(x)

    return Model()


def _torch_name_to_path(name: str) -> tuple[str, bool]:
    """torch parameter name -> (NNX path, transpose?): ``blocks.0.qkv.weight`` -> ``blocks/0/qkv/kernel``."""
    parts = name.split(".")
    last = parts[-1]
    is_ln = parts[-2].startswith("ln")
    if last == "weight":
        last = "scale" if is_ln else "kernel"
    return "/".join(parts[:-1] + [last]), last == "kernel"


def _group_paths(paths) -> dict:
    """``{group name: paths}``: decay / no_decay / head."""
    head = [p for p in paths if p.startswith("head/")]
    body = [p for p in paths if not p.startswith("head/")]
    return {
        "decay": [p for p in body if p.endswith("kernel")],
        "no_decay": [p for p in body if not p.endswith("kernel")],
        "head": head,
    }


GROUP_HP = {
    "decay": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD},
    "no_decay": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": 0.0},
    "head": {"lr": HEAD_LR, "betas": BETAS, "eps": EPS, "weight_decay": WD},
}


class _Setup:
    """The NNX model, its initial parameters by path, the data, and the groups."""

    def __init__(self, w: Workload):
        import jax
        from flax import nnx

        from groupopt.groups import path_str

        self.cfg = w.model
        self.model = _nnx_model(self.cfg)
        state = nnx.state(self.model, nnx.Param)
        self.initial = {path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        self.groups = _group_paths(list(self.initial))
        rng = np.random.default_rng(2)
        c = self.cfg
        self.x = rng.standard_normal((c["batch"], c["seq"], c["d_model"]), dtype=np.float32)
        self.y = rng.standard_normal((c["batch"], c["seq"], c["d_out"]), dtype=np.float32)

    @property
    def n_params(self) -> int:
        return int(sum(x.size for x in self.initial.values()))

    def label(self, path: str) -> str:
        return next(g for g, ps in self.groups.items() if path in ps)


def _loss(model, x, y):
    import jax.numpy as jnp

    return jnp.mean((model(x) - y) ** 2)


def _functional(s: _Setup, cfg: Config, tx, apply) -> Measured:
    """A ``jax.jit`` train step over ``nnx.split`` params: value_and_grad, then ``apply(params, grads, state)``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from groupopt.groups import path_str

    graphdef, params = nnx.split(s.model, nnx.Param)
    opt_state = tx.init(params)
    x, y = jnp.asarray(s.x), jnp.asarray(s.y)

    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), x, y))(params)
        params, opt_state = apply(params, grads, opt_state)
        return params, opt_state, loss

    compiled, ct = compile_jit(train_step, (params, opt_state, x, y), donate_argnums=(0, 1))
    memory = memory_stats(compiled, tree_nbytes(params))
    carry = [params, opt_state]

    def step():
        carry[0], carry[1], loss = compiled(carry[0], carry[1], x, y)
        return carry, loss

    timing = time_steps(step, warmup=cfg.warmup, steps=cfg.steps)
    final = {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(carry[0])[0]}
    return Measured(
        timing, ct.total_s, tree_nbytes(carry[1]), len(s.initial), 3, device_kind(),
        update_norm(final, s.initial), memory, "jax.jit(value_and_grad + update), donating params and state",
        lower_s=ct.lower_s,
    )


def _groupopt(s: _Setup, cfg: Config) -> Measured:
    from flax import nnx

    import groupopt

    params = nnx.state(s.model, nnx.Param)
    tx = groupopt.grouped(
        params,
        [groupopt.group(path_selector(ps), name=g, **GROUP_HP[g]) for g, ps in s.groups.items()],
        rule=groupopt.AdamWRule(),
    )
    return _functional(s, cfg, tx, tx.apply)


def _optax(s: _Setup, cfg: Config) -> Measured:
    import jax
    import optax
    from flax import nnx

    from groupopt.groups import path_str

    params = nnx.state(s.model, nnx.Param)
    labels = jax.tree_util.tree_map_with_path(lambda kp, _: s.label(path_str(kp)), params)
    tx = optax.multi_transform(
        {
            g: optax.inject_hyperparams(optax.adamw)(
                learning_rate=hp["lr"], b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"], weight_decay=hp["weight_decay"]
            )
            for g, hp in GROUP_HP.items()
        },
        labels,
    )

    def apply(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return _functional(s, cfg, tx, apply)


def _compat(s: _Setup, cfg: Config) -> Measured:
    import jax
    from flax import nnx

    import groupopt.compat as optim
    from groupopt.groups import path_str

    model = s.model
    opt = optim.AdamW([{"params": path_selector(ps), **GROUP_HP[g]} for g, ps in s.groups.items()], model=model)
    variables = [v for g in opt.param_groups for v in g["params"]]
    x, y = jax.numpy.asarray(s.x), jax.numpy.asarray(s.y)

    @nnx.jit
    def grad_fn(model, x, y):
        return nnx.value_and_grad(_loss)(model, x, y)

    def step():
        loss, grads = grad_fn(model, x, y)
        opt.step(grads)
        return loss, [v.get_value() for v in variables]

    timing = time_steps(step, warmup=cfg.warmup, steps=cfg.steps)
    state = nnx.state(model, nnx.Param)
    final = {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    state_bytes = sum(tree_nbytes(list(st.values())) for st in opt.state.values())
    return Measured(
        timing, timing.first_call_overhead_s(), state_bytes, len(s.initial), len(opt.param_groups), device_kind(),
        update_norm(final, s.initial), None, "nnx.jit(nnx.value_and_grad) + opt.step(grads); compile_s = first step - median",
    )


def _torch(s: _Setup, cfg: Config, *, fused: bool) -> Measured:
    import torch

    model = _torch_model(s.cfg)
    paths = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            path, transpose = _torch_name_to_path(name)
            src = s.initial[path]
            p.copy_(torch.tensor(np.ascontiguousarray(src.T if transpose else src)))
            paths[name] = (path, transpose)
    by_group = {g: [] for g in s.groups}
    for name, p in model.named_parameters():
        by_group[s.label(paths[name][0])].append(p)
    flags = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW([{"params": ps, **GROUP_HP[g]} for g, ps in by_group.items()], **flags)
    x, y = torch.from_numpy(s.x), torch.from_numpy(s.y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
        return loss

    timing = time_steps(step, warmup=cfg.warmup, steps=cfg.steps, sync=lambda _: None)
    final = {}
    for name, p in model.named_parameters():
        path, transpose = paths[name]
        a = p.detach().numpy()
        final[path] = a.T if transpose else a
    state_bytes = sum(int(v.nbytes) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return Measured(
        timing, None, state_bytes, len(final), len(opt.param_groups), "cpu",
        update_norm(final, s.initial), None, f"torch threads={torch.get_num_threads()}",
    )


_IMPLS = {
    "groupopt": _groupopt,
    "optax": _optax,
    "groupopt_compat": _compat,
    "torch_fused": lambda s, cfg: _torch(s, cfg, fused=True),
    "torch_foreach": lambda s, cfg: _torch(s, cfg, fused=False),
}


def run_train_impl(impl: str, w: Workload, cfg: Config) -> tuple[Measured, int]:
    """Measure ``impl`` on the train-step workload ``w``: ``(measured, n_params)``.

    Each implementation gets a freshly initialised model (same seed, same numbers).
    """
    s = _Setup(w)
    return _IMPLS[impl](s, cfg), s.n_params
