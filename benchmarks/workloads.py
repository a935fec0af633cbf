"""The benchmark workloads, framework-free: parameter shapes, groups, hyperparameters, fixed gradients.

A :class:`Workload` is plain numpy data plus a description of its parameter
groups; every implementation (:mod:`benchmarks.impls`) builds its own
optimizer from it, so all of them run the same update on the same numbers.
Parameters are named by ``/``-joined paths (``layers/0007/kernel``), the paths
groupopt and ``jax.tree_util`` give the nested dict :func:`nest` builds.

Sizes (full / ``quick``):

========================  =====================================  ==========================
workload                  full                                   quick
========================  =====================================  ==========================
``adamw_48x``             24 x (1152x1024 + 1024) = 28.3M, 48    24 x (32x32 + 32), 48
``adamw_2001``            1000 x (64x64 + 64) + 64x625 = 4.2M,   10 x (8x8 + 8) + 8x5, 21
                          2001 leaves
``sgd_2001``              as ``adamw_2001``                      as ``adamw_2001``
``mixed_2001``            as ``adamw_2001``                      as ``adamw_2001``
``scan48_llrd``           (48,256,256) + (48,256) = 3.2M         (48,8,8) + (48,8)
``train_step_nnx``        see :mod:`benchmarks.train_step`       a 1-block toy
========================  =====================================  ==========================
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

__all__ = ["GroupSpec", "Workload", "WORKLOADS", "build", "nest", "BETAS", "EPS"]

BETAS = (0.9, 0.999)
EPS = 1e-8
LR = 1e-3
HEAD_LR = 3e-3
WD = 0.1
OPT_IMPLS = ("torch_fused", "torch_foreach", "optax", "groupopt", "groupopt_compat")


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One parameter group: its rule (``"adamw"``, ``"sgd"`` or ``"frozen"``), torch hyperparameters and member paths."""

    name: str
    rule: str
    hparams: dict
    paths: tuple


@dataclasses.dataclass
class Workload:
    """What every implementation of one benchmark receives.

    Attributes:
      params / grads: ``{path: float32 array}`` (in path order); the gradients
        are fixed and reused at every step. Empty for ``train_step`` workloads.
      groups: the parameter groups (disjoint, covering every path).
      layer_lrs: for stacked parameters, one lr per slice along axis 0
        (``None`` otherwise): all groups share it.
      kind: ``"optimizer"`` (grads given) or ``"train_step"`` (forward+backward+update).
      impls: the implementations that apply, in report order.
      model: the model configuration of a ``train_step`` workload.
    """

    name: str
    description: str
    kind: str
    params: dict
    grads: dict
    groups: tuple
    impls: tuple
    layer_lrs: np.ndarray | None = None
    model: dict | None = None

    @property
    def n_params(self) -> int:
        return int(sum(x.size for x in self.params.values()))

    @property
    def n_leaves(self) -> int:
        return len(self.params)

    def group_of(self) -> dict:
        """``{path: group index}``."""
        return {p: i for i, g in enumerate(self.groups) for p in g.paths}


def nest(flat: dict) -> dict:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    out: dict = {}
    for path, x in flat.items():
        node = out
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = x
    return out


def _arrays(shapes: dict, seed: int, scale: float) -> dict:
    rng = np.random.default_rng(seed)
    return {p: (scale * rng.standard_normal(s, dtype=np.float32)).astype(np.float32) for p, s in sorted(shapes.items())}


def _layers(n_layers: int, kernel: tuple, bias: tuple, head: dict) -> dict:
    width = len(str(n_layers - 1))
    shapes = {}
    for i in range(n_layers):
        shapes[f"layers/{i:0{width}d}/kernel"] = kernel
        shapes[f"layers/{i:0{width}d}/bias"] = bias
    shapes.update({f"head/{k}": v for k, v in head.items()})
    return shapes


def _adamw_hp(lr=LR, wd=WD):
    return {"lr": lr, "betas": BETAS, "eps": EPS, "weight_decay": wd}


def _three_adamw_groups(paths) -> tuple:
    """decay (kernels) / no-decay (biases, weight_decay=0) / head (own lr)."""
    head = tuple(p for p in paths if p.startswith("head/"))
    body = [p for p in paths if not p.startswith("head/")]
    return (
        GroupSpec("decay", "adamw", _adamw_hp(), tuple(p for p in body if p.endswith("kernel"))),
        GroupSpec("no_decay", "adamw", _adamw_hp(wd=0.0), tuple(p for p in body if p.endswith("bias"))),
        GroupSpec("head", "adamw", _adamw_hp(lr=HEAD_LR), head),
    )


def _optimizer_workload(name, description, shapes, groups_fn, impls=OPT_IMPLS, **kw) -> Workload:
    params = _arrays(shapes, seed=0, scale=0.02)
    grads = _arrays(shapes, seed=1, scale=1e-3)
    return Workload(name, description, "optimizer", params, grads, groups_fn(tuple(params)), impls, **kw)


def adamw_48x(quick: bool) -> Workload:
    # 24 * (1152*1024 + 1024) = 28,336,128 parameters in 48 tensors
    rows, cols = (32, 32) if quick else (1152, 1024)
    shapes = _layers(23, (rows, cols), (cols,), {"kernel": (rows, cols), "bias": (cols,)})
    return _optimizer_workload("adamw_48x", "AdamW, 3 groups, 28.3M params in 48 large tensors", shapes, _three_adamw_groups,
                               impls=OPT_IMPLS + ("optax_plain",))


def _shapes_2001(quick: bool) -> dict:
    # 1000 * (64*64 + 64) + 64*625 = 4,200,000 parameters in 2001 tensors
    n, d, h = (10, 8, 5) if quick else (1000, 64, 625)
    return _layers(n, (d, d), (d,), {"kernel": (d, h)})


def adamw_2001(quick: bool) -> Workload:
    return _optimizer_workload("adamw_2001", "AdamW, 3 groups, 4.2M params in 2001 small tensors", _shapes_2001(quick),
                               _three_adamw_groups, impls=OPT_IMPLS + ("optax_plain",))


def _sgd_groups(paths) -> tuple:
    adamw = _three_adamw_groups(paths)
    hp = [
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4},
    ]
    return tuple(GroupSpec(g.name, "sgd", h, g.paths) for g, h in zip(adamw, hp))


def sgd_2001(quick: bool) -> Workload:
    return _optimizer_workload("sgd_2001", "SGD momentum=0.9, 3 groups, 4.2M params in 2001 tensors", _shapes_2001(quick), _sgd_groups)


def _mixed_groups(paths) -> tuple:
    """The first quarter of the layers frozen; other kernels + head: AdamW; other biases: SGD momentum."""
    layers = sorted({p.rsplit("/", 1)[0] for p in paths if p.startswith("layers/")})
    frozen_layers = set(layers[: len(layers) // 4])
    frozen = tuple(p for p in paths if p.rsplit("/", 1)[0] in frozen_layers)
    live = [p for p in paths if p not in set(frozen)]
    return (
        GroupSpec("adamw", "adamw", _adamw_hp(), tuple(p for p in live if p.endswith("kernel"))),
        GroupSpec("sgd", "sgd", {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}, tuple(p for p in live if p.endswith("bias"))),
        GroupSpec("frozen", "frozen", {}, frozen),
    )


def mixed_2001(quick: bool) -> Workload:
    return _optimizer_workload(
        "mixed_2001", "AdamW group + SGD group + frozen group (1/4 of the layers), 2001 tensors", _shapes_2001(quick), _mixed_groups
    )


SCAN_LAYERS = 48
LLRD = 0.9


def layer_lrs(n_layers: int = SCAN_LAYERS, lr: float = LR, decay: float = LLRD) -> np.ndarray:
    """Layer-wise lr decay: ``lr_i = lr * decay ** (L - i)`` for layers ``i = 1..L`` (the top layer gets ``lr``)."""
    i = np.arange(1, n_layers + 1)
    return (lr * decay ** (n_layers - i)).astype(np.float32)


def scan48_llrd(quick: bool) -> Workload:
    d = 8 if quick else 256
    shapes = {"stack/kernel": (SCAN_LAYERS, d, d), "stack/bias": (SCAN_LAYERS, d)}
    params = _arrays(shapes, seed=0, scale=0.02)
    grads = _arrays(shapes, seed=1, scale=1e-3)
    groups = (GroupSpec("stack", "adamw", _adamw_hp(wd=0.01), tuple(params)),)
    return Workload(
        "scan48_llrd",
        f"AdamW on a {SCAN_LAYERS}-layer stacked MLP, layer-wise lr decay {LLRD} (one lr per slice of axis 0)",
        "optimizer",
        params,
        grads,
        groups,
        ("torch_fused", "torch_foreach", "optax", "groupopt", "groupopt_scalar_lr"),
        layer_lrs=layer_lrs(),
    )


def train_step_nnx(quick: bool) -> Workload:
    model = (
        {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_blocks": 1, "batch": 2, "seq": 8, "d_out": 8}
        if quick
        else {"d_model": 256, "n_heads": 4, "d_ff": 1024, "n_blocks": 8, "batch": 4, "seq": 32, "d_out": 256}
    )
    return Workload(
        "train_step_nnx",
        "forward+backward+AdamW (3 groups) of a transformer-block stack (Flax NNX / torch)",
        "train_step",
        {},
        {},
        (),
        ("torch_fused", "torch_foreach", "optax", "groupopt", "groupopt_compat"),
        model=model,
    )


WORKLOADS: dict[str, Callable[[bool], Workload]] = {
    "adamw_48x": adamw_48x,
    "adamw_2001": adamw_2001,
    "sgd_2001": sgd_2001,
    "mixed_2001": mixed_2001,
    "scan48_llrd": scan48_llrd,
    "train_step_nnx": train_step_nnx,
}


def build(name: str, quick: bool) -> Workload:
    """The workload ``name`` at full or quick size."""
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; known: {list(WORKLOADS)}")
    return WORKLOADS[name](quick)
