"""Shared helpers for the differential tests: the same model in Flax NNX and in torch.

* :class:`Block` / :class:`Net` (NNX) and :class:`TBlock` / :class:`TNet` (torch)
  have the same structure: ``block1`` and ``block2`` are both a ``Block`` (``l0``,
  optional ``norm``, ``l1``), so their inner paths coincide, and ``fc`` is a Linear.
* :func:`make_pair` builds both from the same initial weights (NNX's init, copied
  into torch; ``nnx.Linear.kernel`` is ``(in, out)``, ``torch.nn.Linear.weight``
  is ``(out, in)``).
* :func:`param_pairs` lists ``(path, nnx Variable, torch Parameter)`` in NNX's
  order (the order a groupopt group lists a module's Variables); :func:`torch_view`
  gives a torch tensor in NNX layout.
* :func:`rel_err` / :class:`ErrorLog`: the relative error ``max|a-b| / max(max|b|, tiny)``
  and a record of the largest one seen per (case, dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

# tiny tensors: one intra-op thread avoids thread-pool contention with XLA on a small machine
torch.set_num_threads(1)

TOL = {np.dtype(np.float64): 1e-6, np.dtype(np.float32): 1e-5}
TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


# --------------------------------------------------------------------------- models


class Block(nnx.Module):
    """Linear -> [LayerNorm] -> tanh -> Linear."""

    def __init__(self, d_in: int, d_out: int, *, norm: bool, dtype, rngs: nnx.Rngs):
        self.l0 = nnx.Linear(d_in, d_out, param_dtype=dtype, dtype=dtype, rngs=rngs)
        if norm:
            self.norm = nnx.LayerNorm(d_out, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, dtype=dtype, rngs=rngs)
        else:
            self.norm = None
        self.l1 = nnx.Linear(d_out, d_out, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.l0(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.l1(jnp.tanh(h))


class Net(nnx.Module):
    """``fc(tanh(block2(tanh(block1(x)))))``."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, norm: bool = False, dtype=jnp.float64, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.block1 = Block(d_in, d_hidden, norm=norm, dtype=dtype, rngs=rngs)
        self.block2 = Block(d_hidden, d_hidden, norm=norm, dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(d_hidden, d_out, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc(jnp.tanh(self.block2(jnp.tanh(self.block1(x)))))


class TBlock(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int, *, norm: bool):
        super().__init__()
        self.l0 = torch.nn.Linear(d_in, d_out)
        self.norm = torch.nn.LayerNorm(d_out, eps=1e-5) if norm else None
        self.l1 = torch.nn.Linear(d_out, d_out)

    def forward(self, x):
        h = self.l0(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.l1(torch.tanh(h))


class TNet(torch.nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, norm: bool = False):
        super().__init__()
        self.block1 = TBlock(d_in, d_hidden, norm=norm)
        self.block2 = TBlock(d_hidden, d_hidden, norm=norm)
        self.fc = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc(torch.tanh(self.block2(torch.tanh(self.block1(x)))))


class MLP(nnx.Module):
    """A 2-layer net: ``l1(tanh(l0(x)))``."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, dtype=jnp.float64, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.l0 = nnx.Linear(d_in, d_hidden, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.l1 = nnx.Linear(d_hidden, d_out, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.l1(jnp.tanh(self.l0(x)))


class TMLP(torch.nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.l0 = torch.nn.Linear(d_in, d_hidden)
        self.l1 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.l1(torch.tanh(self.l0(x)))


# --------------------------------------------------------------------------- weights


def _torch_name(path: str) -> tuple[str, bool]:
    """NNX path -> (torch parameter name, transpose?)."""
    parts = path.split("/")
    leaf = parts[-1]
    if leaf == "kernel":
        return ".".join(parts[:-1] + ["weight"]), True
    if leaf == "scale":
        return ".".join(parts[:-1] + ["weight"]), False
    return ".".join(parts), False


def nnx_params(module) -> list[tuple[str, nnx.Variable]]:
    """``(path, Variable)`` for every ``nnx.Param`` of ``module``, in the order groupopt lists them."""
    state = nnx.state(module, nnx.Param)
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    out = []
    for kp, var in flat:
        out.append(("/".join(str(k.key) for k in kp), var))
    return out


def param_pairs(module, tmodule) -> list[tuple[str, nnx.Variable, torch.nn.Parameter, bool]]:
    """``(path, Variable, torch Parameter, transpose)`` for each parameter, in NNX order."""
    tparams = dict(tmodule.named_parameters())
    out = []
    for path, var in nnx_params(module):
        name, tr = _torch_name(path)
        out.append((path, var, tparams[name], tr))
    assert len(out) == len(tparams), (sorted(tparams), [p for p, *_ in out])
    return out


def torch_params_like(module, tmodule) -> list[torch.nn.Parameter]:
    """The torch parameters of ``tmodule`` in the order groupopt lists ``module``'s Variables."""
    return [t for _, _, t, _ in param_pairs(module, tmodule)]


def torch_view(t: torch.Tensor, transpose: bool) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.T.copy() if transpose else a.copy()


def copy_to_torch(module, tmodule) -> None:
    """Give ``tmodule`` ``module``'s weights (same dtype)."""
    dtype = None
    with torch.no_grad():
        for _, var, t, tr in param_pairs(module, tmodule):
            a = np.asarray(var.get_value())
            dtype = TORCH_DTYPE[a.dtype]
            t.data = torch.from_numpy(np.ascontiguousarray(a.T if tr else a).copy()).to(dtype)
    assert dtype is not None


def _init_values(module, seed: int) -> None:
    """Fill ``module``'s Params from numpy (torch's Linear init ranges; nonzero biases and norm params).

    Building the NNX model under ``nnx.eval_shape`` and filling it from numpy with
    ``jax.device_put`` avoids compiling JAX's initializers for every shape.
    """
    rng = np.random.default_rng(seed)
    for path, var in nnx_params(module):
        shape, dtype = var.get_value().shape, np.dtype(var.get_value().dtype)
        leaf = path.split("/")[-1]
        if leaf == "kernel":
            bound = 1.0 / np.sqrt(shape[0])
            a = rng.uniform(-bound, bound, size=shape)
        elif leaf == "scale":
            a = 1.0 + 0.1 * rng.normal(size=shape)
        else:
            a = 0.1 * rng.normal(size=shape)
        var.set_value(jax.device_put(a.astype(dtype)))


def make_pair(kind: str = "net", *, dtype=np.float64, seed: int = 0, **kw):
    """The NNX model and the torch model with identical weights (``kind``: 'net' or 'mlp')."""
    dtype = np.dtype(dtype)
    if kind == "net":
        d_in, d_hidden, d_out = kw.pop("d_in", 5), kw.pop("d_hidden", 8), kw.pop("d_out", 3)
        norm = kw.pop("norm", False)
        m = nnx.eval_shape(lambda: Net(d_in, d_hidden, d_out, norm=norm, dtype=dtype, seed=seed))
        t = TNet(d_in, d_hidden, d_out, norm=norm)
    elif kind == "mlp":
        d_in, d_hidden, d_out = kw.pop("d_in", 2), kw.pop("d_hidden", 16), kw.pop("d_out", 2)
        m = nnx.eval_shape(lambda: MLP(d_in, d_hidden, d_out, dtype=dtype, seed=seed))
        t = TMLP(d_in, d_hidden, d_out)
    else:
        raise ValueError(kind)
    assert not kw, kw
    _init_values(m, seed)
    t = t.to(TORCH_DTYPE[dtype])
    copy_to_torch(m, t)
    return m, t


def snapshot(module) -> dict[str, np.ndarray]:
    """numpy copies of the NNX parameters (the compat step donates their buffers)."""
    return {p: np.array(v.get_value()) for p, v in nnx_params(module)}


# --------------------------------------------------------------------------- errors


def rel_err(a, b) -> float:
    """``max|a-b| / max(max|b|, tiny)`` (``b`` is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = max(float(np.max(np.abs(b))) if b.size else 0.0, np.finfo(np.float64).tiny)
    return float(np.max(np.abs(a - b))) / denom if a.size else 0.0


class ErrorLog:
    """Largest relative error observed per (case, dtype); printed by the tests' module fixture."""

    def __init__(self):
        self.max: dict[tuple[str, str], float] = {}

    def record(self, case: str, dtype, err: float) -> float:
        key = (case, np.dtype(dtype).name)
        self.max[key] = max(self.max.get(key, 0.0), err)
        return err

    def report(self) -> str:
        lines = [f"  {case:<48s} {dt:<8s} max rel err {e:.3e}" for (case, dt), e in sorted(self.max.items())]
        return "\n".join(lines)


def compare_models(module, tmodule, log: ErrorLog, case: str, *, what: str = "params") -> float:
    """Assert every NNX parameter equals its torch twin to the dtype's tolerance; return the max rel error."""
    worst = 0.0
    for path, var, t, tr in param_pairs(module, tmodule):
        a = np.asarray(var.get_value())
        b = torch_view(t, tr)
        assert a.dtype == b.dtype, (path, a.dtype, b.dtype)
        e = rel_err(a, b)
        assert e <= TOL[a.dtype], f"{case}: {what} {path}: rel err {e:.3e} > {TOL[a.dtype]:.0e}"
        worst = max(worst, e)
        log.record(case, a.dtype, e)
    return worst


def grads_like(grads, module, tmodule):
    """``grads`` (an ``nnx.State`` from ``nnx.grad(...)(module)``) with torch's ``.grad`` values."""
    tgrad = {path: torch_view(t.grad, tr) for path, _, t, tr in param_pairs(module, tmodule)}
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    from groupopt.groups import path_str

    leaves = [jax.device_put(tgrad[path_str(kp)]) for kp, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------- pytest


def _errlog_fixture(request):
    log = ErrorLog()
    yield log
    if log.max:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        text = f"\n[{request.module.__name__}] max relative error vs torch (fp64 tol 1e-6, fp32 tol 1e-5):\n{log.report()}"
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(text)
        else:
            print(text)


try:
    import pytest

    errlog = pytest.fixture(scope="module")(_errlog_fixture)
    """Module-scoped :class:`ErrorLog` that prints its maxima when the module's tests end."""
except ImportError:  # pragma: no cover
    pass
