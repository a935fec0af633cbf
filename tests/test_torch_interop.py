"""Optimizer state across the torch boundary: SGD (momentum, nesterov), Adam (amsgrad off/on), AdamW.

Two parameter groups (``[w, b]`` and ``[v]`` with their own lr / weight decay), fp64 and fp32:

* torch runs k steps -> ``torch.save({"optimizer": opt.state_dict()})`` ->
  :func:`groupopt.compat.load_torch_checkpoint` (``weights_only=True``) -> our
  ``load_state_dict`` -> both continue: ours equals torch uninterrupted;
* ours runs k steps -> :func:`groupopt.compat.to_torch` -> ``torch.save`` /
  ``torch.load(weights_only=True)`` -> ``torch.optim.X.load_state_dict`` -> both
  continue: torch equals ours;
* mismatched state dicts (another optimizer's, missing keys, wrong shape, non-float
  dtype, non-scalar step) are refused with errors naming the group and the parameter
  index, and the optimizer is left exactly as it was.

The gradients are computed in numpy from each side's current parameters (so both
sides get identical gradients for identical parameters). Run with ``-s`` to print
the largest relative error per case.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import groupopt.compat as optim
from groupopt.compat import load_torch_checkpoint, to_torch
from torch_port import rel_err

TOL = {np.dtype(np.float64): 1e-6, np.dtype(np.float32): 1e-5}
TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}
ERRORS: dict[tuple[str, str], float] = {}

NAMES = ("w", "b", "v")
SHAPES = {"w": (3, 4), "b": (4,), "v": (2,)}

# name -> (torch class, our class, constructor kwargs, group-1 overrides)
CONFIGS = {
    "SGD momentum": (torch.optim.SGD, optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1), dict(lr=0.05, weight_decay=0.01)),
    "SGD nesterov": (torch.optim.SGD, optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.05, weight_decay=0.01)),
    "Adam": (torch.optim.Adam, optim.Adam, dict(lr=0.05), dict(lr=0.01, weight_decay=0.1)),
    "Adam amsgrad": (torch.optim.Adam, optim.Adam, dict(lr=0.05, amsgrad=True), dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.99))),
    "AdamW": (torch.optim.AdamW, optim.AdamW, dict(lr=0.05), dict(lr=0.01, weight_decay=0.1)),
}


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    print("\ntorch interop max relative errors:")
    for (case, dt), e in sorted(ERRORS.items()):
        print(f"  {case:<40s} {dt:<8s} {e:.3e}")


def initial_values(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=SHAPES[n]).astype(dtype) for n in NAMES}


def grad_of(p: np.ndarray, k: int) -> np.ndarray:
    """The step-k gradient at parameter value ``p`` (numpy, in p's dtype).

    It shrinks 100x from the third step on, so Adam's second moment decreases and
    amsgrad's running max differs from it when the state changes hands.
    """
    scale = 1.0 if k < 2 else 0.01
    return (scale * (np.sin((k + 1) * p) + 0.1 * p)).astype(p.dtype)


class TorchSide:
    def __init__(self, config, values, *, kw=None, g1=None):
        tcls, _, ckw, cg1 = CONFIGS[config]
        self.ps = {n: torch.tensor(values[n], requires_grad=True) for n in NAMES}
        groups = [{"params": [self.ps["w"], self.ps["b"]]}, {"params": [self.ps["v"]], **(cg1 if g1 is None else g1)}]
        self.opt = tcls(groups, **(ckw if kw is None else kw))

    def step(self, k):
        for p in self.ps.values():
            p.grad = torch.from_numpy(grad_of(p.detach().numpy(), k))
        self.opt.step()

    def values(self):
        return {n: p.detach().numpy().copy() for n, p in self.ps.items()}


class OurSide:
    def __init__(self, config, values, *, kw=None, g1=None):
        _, ocls, ckw, cg1 = CONFIGS[config]
        tree = {n: jnp.asarray(values[n]) for n in NAMES}
        groups = [{"params": ["w", "b"]}, {"params": "v", **(cg1 if g1 is None else g1)}]
        self.opt = ocls(groups, model=tree, **(ckw if kw is None else kw))

    def step(self, k):
        self.opt.step({n: jnp.asarray(grad_of(np.asarray(self.opt.params[n]), k)) for n in NAMES})

    def values(self):
        return {n: np.array(self.opt.params[n]) for n in NAMES}


def compare(case, ours: dict, theirs: dict):
    for n in NAMES:
        assert ours[n].dtype == theirs[n].dtype, (n, ours[n].dtype, theirs[n].dtype)
        e = rel_err(ours[n], theirs[n])
        key = (case, ours[n].dtype.name)
        ERRORS[key] = max(ERRORS.get(key, 0.0), e)
        assert e <= TOL[ours[n].dtype], f"{case} {n}: rel err {e:.3e}"


def hyperparams(groups):
    return [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in groups]


K, N = 3, 4  # steps before the transfer, steps after


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_checkpoint_into_ours_then_continue(tmp_path, config, dtype):
    ref = TorchSide(config, initial_values(dtype))
    for k in range(K):
        ref.step(k)
    path = tmp_path / "ckpt.pt"
    torch.save({"optimizer": ref.opt.state_dict(), "epoch": 3}, path)
    sd = load_torch_checkpoint(path, "optimizer")
    # built with other hyperparameters: the loaded groups replace them, as in torch
    ours = OurSide(config, ref.values(), kw={}, g1={})
    ours.opt.load_state_dict(sd)
    assert hyperparams(ours.opt.param_groups) == hyperparams(ref.opt.param_groups)
    if "amsgrad" in config:  # the transferred running max is not the second moment itself
        entry = ours.opt.state_dict()["state"][0]
        assert np.any(entry["max_exp_avg_sq"] > entry["exp_avg_sq"])
    for k in range(K, K + N):
        ref.step(k)
        ours.step(k)
        compare(f"torch->ours {config}", ours.values(), ref.values())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_ours_into_torch_then_continue(tmp_path, config, dtype):
    ours = OurSide(config, initial_values(dtype))
    for k in range(K):
        ours.step(k)
    path = tmp_path / "ckpt.pt"
    torch.save({"optimizer": to_torch(ours.opt.state_dict())}, path)
    ref = TorchSide(config, ours.values(), kw={}, g1={})
    ref.opt.load_state_dict(torch.load(path, weights_only=True)["optimizer"])
    assert hyperparams(ref.opt.param_groups) == hyperparams(ours.opt.param_groups)
    for k in range(K, K + N):
        ours.step(k)
        ref.step(k)
        compare(f"ours->torch {config}", ref.values(), ours.values())


def test_fp32_checkpoint_into_fp64_optimizer_is_cast():
    """torch casts loaded float state to the parameter dtype; so do we."""
    ref = TorchSide("Adam", initial_values(np.float32))
    for k in range(K):
        ref.step(k)
    ours = OurSide("Adam", {n: v.astype(np.float64) for n, v in ref.values().items()})
    ours.opt.load_state_dict(ref.opt.state_dict())
    for entry in ours.opt.state_dict()["state"].values():
        assert entry["exp_avg"].dtype == np.float64
    twin = TorchSide("Adam", {n: v.astype(np.float64) for n, v in ref.values().items()})
    twin.opt.load_state_dict(ref.opt.state_dict())
    for k in range(K, K + N):
        ours.step(k)
        twin.step(k)
        compare("fp32 state -> fp64 Adam", ours.values(), twin.values())


# ----------------------------------------------------------------------------- mismatches


def assert_same_state_dict(a, b, path="state_dict"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same_state_dict(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state_dict(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, (path, a, b)


def copy_sd(sd):
    return {"state": {i: dict(e) for i, e in sd["state"].items()}, "param_groups": [dict(g) for g in sd["param_groups"]]}


def other_optimizer_state(tcls, **kw):
    ps = [torch.tensor(v, requires_grad=True) for v in initial_values(np.float64).values()]
    opt = tcls([{"params": ps[:2]}, {"params": ps[2:]}], **kw)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def _set(i, key, value):
    def mutate(sd):
        sd["state"][i][key] = value
        return sd

    return mutate


def _drop(i, key):
    def mutate(sd):
        del sd["state"][i][key]
        return sd

    return mutate


ADAM_MISMATCHES = {
    "SGD's state": (lambda sd: other_optimizer_state(torch.optim.SGD, lr=0.1, momentum=0.9),
                    r"param group 0 lacks \['betas', 'eps'\].*different optimizer than Adam"),
    "missing key": (_drop(2, "exp_avg_sq"), r"^param group 1: saved state of parameter 2 lacks \['exp_avg_sq'\]"),
    "wrong shape": (_set(1, "exp_avg", torch.zeros(5, dtype=torch.float64)),
                    r"^param group 0: state 'exp_avg' of parameter 1 has shape \(5,\), but the parameter has shape \(4,\)"),
    "int dtype": (_set(2, "exp_avg_sq", torch.zeros(2, dtype=torch.int64)),
                  r"^param group 1: state 'exp_avg_sq' of parameter 2 has dtype int64, expected floating"),
    "non-scalar step": (_set(0, "step", torch.zeros(2)), r"^param group 0: scalar state of parameter 0 is invalid"),
}
SGD_MISMATCHES = {
    "Adam's state": (lambda sd: other_optimizer_state(torch.optim.Adam, lr=0.1),
                     r"param group 0 lacks \['momentum', 'dampening'\].*different optimizer than SGD"),
    "wrong shape": (_set(2, "momentum_buffer", torch.zeros(3, 2, dtype=torch.float64)),
                    r"^param group 1: state 'momentum_buffer' of parameter 2 has shape \(3, 2\), but the parameter has shape \(2,\)"),
    "int dtype": (_set(0, "momentum_buffer", torch.zeros(3, 4, dtype=torch.int32)),
                  r"^param group 0: state 'momentum_buffer' of parameter 0 has dtype int32, expected floating"),
}


@pytest.mark.parametrize(
    "config,mismatch",
    [("Adam", m) for m in ADAM_MISMATCHES] + [("SGD momentum", m) for m in SGD_MISMATCHES],
)
def test_mismatched_torch_state_is_refused_and_changes_nothing(config, mismatch):
    mutate, pattern = (ADAM_MISMATCHES if config == "Adam" else SGD_MISMATCHES)[mismatch]
    values = initial_values(np.float64)
    ref = TorchSide(config, values)
    for k in range(2):
        ref.step(k)
    bad = mutate(copy_sd(ref.opt.state_dict()))
    ours, twin = OurSide(config, values), OurSide(config, values)
    for k in range(2):
        ours.step(k)
        twin.step(k)
    with pytest.raises(ValueError, match=pattern):
        ours.opt.load_state_dict(bad)
    assert_same_state_dict(ours.opt.state_dict(), twin.opt.state_dict())
    ours.step(2)
    twin.step(2)
    for n in NAMES:
        np.testing.assert_array_equal(ours.values()[n], twin.values()[n])
    # the unmutated torch state still loads
    ours.opt.load_state_dict(ref.opt.state_dict())


def test_load_torch_checkpoint_missing_key(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(KeyError, match="has no entry 'optimizer'"):
        load_torch_checkpoint(path, "optimizer")
