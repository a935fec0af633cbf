"""Ported torch recipes: the torch loop and the groupopt loop side by side, same weights, same data.

Every recipe runs >= 200 optimizer steps in both frameworks, asserts that every
step's per-group lr is the same Python float, and that the parameters agree
(fp64: rel <= 1e-6, fp32: rel <= 1e-5; relative error = max|a-b| / max|torch|).
The largest errors seen are printed at the end of the module (``errlog``).
"""

from __future__ import annotations

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from sklearn.datasets import make_moons

import groupopt.compat as optim
from torch_port import (  # noqa: F401  (errlog is a fixture)
    TOL,
    compare_models,
    errlog,
    make_pair,
    nnx_params,
    param_pairs,
    rel_err,
    snapshot,
    torch_params_like,
    torch_view,
)

DTYPES = [np.float64, np.float32]


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


# one jitted gradient function per loss, shared by all tests (compiled once per model graph)
mse_grad = nnx.jit(nnx.grad(mse))


def regression_data(n_steps, batch, d_in, d_out, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_steps, batch, d_in)).astype(dtype)
    W = rng.normal(size=(d_in, d_out))
    Y = (np.tanh(X @ W) + 0.1 * rng.normal(size=(n_steps, batch, d_out))).astype(dtype)
    return X, Y


def lrs(opt):
    return [g["lr"] for g in opt.param_groups]


def dt_id(d):
    return np.dtype(d).name


# --------------------------------------------------------------------------- recipe 1


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_recipe_groups_epoch_lr_and_add_param_group(dtype, errlog):
    """Two groups (block1, block2: same inner paths), lr set per epoch by hand, fc added at epoch 3."""
    model, tmodel = make_pair("net", dtype=dtype, seed=1)
    epochs, steps = 8, 25
    X, Y = regression_data(epochs * steps, 16, 5, 3, dtype)

    toptimizer = torch.optim.SGD(
        [{"params": tmodel.block1.parameters()}, {"params": tmodel.block2.parameters(), "lr": 0.08}], lr=0.1, momentum=0.5
    )
    optimizer = optim.SGD([{"params": model.block1}, {"params": model.block2, "lr": 0.08}], lr=0.1, momentum=0.5)
    tstart_lr = [g["lr"] for g in toptimizer.param_groups]
    start_lr = [g["lr"] for g in optimizer.param_groups]
    fc0 = snapshot(model.fc)

    k = 0
    for epoch in range(epochs):
        if epoch == 3:
            # until now fc got gradients but was in no group: untouched in both
            assert all(np.array_equal(v, fc0[p]) for p, v in snapshot(model.fc).items())
            toptimizer.add_param_group({"params": tmodel.fc.parameters(), "lr": 0.09})
            optimizer.add_param_group({"params": model.fc, "lr": 0.09})
            tstart_lr.append(0.09)
            start_lr.append(0.09)
        for i, group in enumerate(toptimizer.param_groups):
            group["lr"] = tstart_lr[i] * 0.9**epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = start_lr[i] * 0.9**epoch
        for _ in range(steps):
            x, y = X[k], Y[k]
            k += 1
            # torch
            toptimizer.zero_grad()
            loss = F.mse_loss(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            toptimizer.step()
            # groupopt
            grads = mse_grad(model, jax.device_put(x), jax.device_put(y))
            optimizer.step(grads)
            assert lrs(optimizer) == lrs(toptimizer)
        compare_models(model, tmodel, errlog, "recipe1 SGD groups+epoch lr+add group")
    assert k == 200
    assert optimizer.num_compiles == 2  # first step + add_param_group


# --------------------------------------------------------------------------- recipe 2


def moons_batches(n_steps, batch, dtype, seed=0):
    X, y = make_moons(n_samples=512, noise=0.15, random_state=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(X), size=(n_steps, batch))
    return X[idx].astype(dtype), y[idx].astype(np.int64)


def xent(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


xent_grad = nnx.jit(nnx.grad(xent))


@pytest.mark.parametrize("dtype", [np.float64], ids=dt_id)
def test_recipe_moons_adam_manual_decay_vs_steplr(dtype, errlog):
    """Adam on make_moons: (A) lr *= 0.99 by hand every 50 steps, (B) StepLR(50, 0.99); lr read from state_dict()."""
    n = 300
    X, Y = moons_batches(n, 32, dtype)
    mA, tA = make_pair("mlp", dtype=dtype, seed=2)
    mB, tB = make_pair("mlp", dtype=dtype, seed=2)

    toptA = torch.optim.Adam(tA.parameters(), lr=0.01)
    toptB = torch.optim.Adam(tB.parameters(), lr=0.01)
    tsched = torch.optim.lr_scheduler.StepLR(toptB, step_size=50, gamma=0.99)
    optA = optim.Adam(mA, lr=0.01)
    optB = optim.Adam(mB, lr=0.01)
    sched = optim.lr_scheduler.StepLR(optB, step_size=50, gamma=0.99)

    for step in range(n):
        xt, yt = torch.from_numpy(X[step]), torch.from_numpy(Y[step])
        xj, yj = jax.device_put(X[step]), jax.device_put(Y[step])
        lr_read = []
        # run A, torch | groupopt
        toptA.zero_grad()
        F.cross_entropy(tA(xt), yt).backward()
        lr_read.append(toptA.state_dict()["param_groups"][0]["lr"])
        toptA.step()
        lr_read.append(optA.state_dict()["param_groups"][0]["lr"])
        optA.step(xent_grad(mA, xj, yj))
        if (step + 1) % 50 == 0:
            for g in toptA.param_groups:
                g["lr"] *= 0.99
            for g in optA.param_groups:
                g["lr"] *= 0.99
        # run B, torch | groupopt
        toptB.zero_grad()
        F.cross_entropy(tB(xt), yt).backward()
        lr_read.append(toptB.state_dict()["param_groups"][0]["lr"])
        toptB.step()
        tsched.step()
        lr_read.append(optB.state_dict()["param_groups"][0]["lr"])
        optB.step(xent_grad(mB, xj, yj))
        sched.step()
        assert lr_read == [lr_read[0]] * 4, (step, lr_read)
        assert lr_read[0] == 0.01 * 0.99 ** (step // 50) or abs(lr_read[0] / (0.01 * 0.99 ** (step // 50)) - 1) < 1e-14
    assert sched.get_last_lr() == tsched.get_last_lr()
    # B equals A exactly (same lrs, same program), and both equal torch
    for (p, a), (_, b) in zip(nnx_params(mA), nnx_params(mB)):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p
    compare_models(mA, tA, errlog, "recipe2 Adam moons manual decay")
    compare_models(mB, tB, errlog, "recipe2 Adam moons StepLR")
    assert optA.num_compiles == 1 and optB.num_compiles == 1


# --------------------------------------------------------------------------- recipe 3


def _groups(kind, m):
    """Group lists for the checkpoint recipe (m: an NNX Net or a list of torch param lists)."""
    b1, b2, fc = m
    if kind == "sgd":
        return [{"params": b1}, {"params": b2, "lr": 0.03}, {"params": fc, "lr": 0.02, "momentum": 0.8}]
    if kind == "adam_amsgrad":
        return [{"params": b1}, {"params": b2, "betas": (0.8, 0.99)}, {"params": fc, "lr": 3e-3}]
    return [{"params": b1}, {"params": b2, "weight_decay": 0.0}, {"params": fc, "lr": 3e-3}]


def _make_opt(lib, kind, parts):
    if kind == "sgd":
        return lib.SGD(_groups(kind, parts), lr=0.05, momentum=0.9, weight_decay=1e-3)
    if kind == "adam_amsgrad":
        return lib.Adam(_groups(kind, parts), lr=1e-2, amsgrad=True, weight_decay=1e-3)
    return lib.AdamW(_groups(kind, parts), lr=1e-2, weight_decay=0.05)


def save_npz_json(sd, directory):
    """A state_dict as ``state.npz`` (arrays) + ``meta.json`` (groups, state key order)."""
    arrays, keys = {}, {}
    for idx, entry in sd["state"].items():
        keys[str(idx)] = list(entry)
        for name, value in entry.items():
            arrays[f"{idx}.{name}"] = np.asarray(value)
    np.savez(directory / "state.npz", **arrays)
    with open(directory / "meta.json", "w") as f:
        json.dump({"state_keys": keys, "param_groups": sd["param_groups"]}, f)


def load_npz_json(directory):
    with open(directory / "meta.json") as f:
        meta = json.load(f)
    with np.load(directory / "state.npz") as z:
        state = {int(i): {n: z[f"{i}.{n}"] for n in names} for i, names in meta["state_keys"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def assert_sd_equal(a, b):
    assert list(a["state"]) == list(b["state"])
    for i in a["state"]:
        assert list(a["state"][i]) == list(b["state"][i])
        for k in a["state"][i]:
            x, y = np.asarray(a["state"][i][k]), np.asarray(b["state"][i][k])
            assert x.dtype == y.dtype and np.array_equal(x, y), (i, k)
    assert len(a["param_groups"]) == len(b["param_groups"])
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        assert list(ga) == list(gb)
        for k in ga:
            va, vb = ga[k], gb[k]
            if isinstance(va, (tuple, list)):
                va, vb = list(va), list(vb)  # JSON turns betas into a list
            assert va == vb, k


def assert_layout_like_torch(sd, tsd, pairs_by_index, errlog, case, dtype):
    """Same state indices, per-param keys (in order), group keys (in order) and values as torch."""
    assert list(sd["state"]) == list(tsd["state"])
    for idx, tentry in tsd["state"].items():
        entry = sd["state"][idx]
        assert list(entry) == list(tentry), (idx, list(entry), list(tentry))
        transpose = pairs_by_index[idx]
        for k, tv in tentry.items():
            if k == "step":
                assert float(entry[k]) == float(tv)
                assert np.asarray(entry[k]).dtype == np.float32 == tv.numpy().dtype
                continue
            e = rel_err(entry[k], torch_view(tv, transpose))
            assert e <= TOL[np.dtype(dtype)], (idx, k, e)
            errlog.record(case + " (state)", dtype, e)
    assert len(sd["param_groups"]) == len(tsd["param_groups"])
    for g, tg in zip(sd["param_groups"], tsd["param_groups"]):
        assert list(g) == list(tg)
        for k in tg:
            assert g[k] == tg[k], (k, g[k], tg[k])


@pytest.mark.parametrize(
    "kind,dtype", [("sgd", np.float64), ("adam_amsgrad", np.float64), ("adamw", np.float32)],
    ids=lambda v: dt_id(v) if isinstance(v, type) else v,
)
def test_recipe_checkpoint_resume_is_bit_exact(kind, dtype, errlog, tmp_path):
    """Stop at 70 (pickle) and at 140 (npz+JSON), load into a NEW optimizer: same bits as never stopping."""
    n, k_pickle, k_npz = 200, 70, 140
    X, Y = regression_data(n, 8, 5, 3, dtype, seed=3)
    mU, tmodel = make_pair("net", dtype=dtype, seed=4)  # uninterrupted (and torch)
    mI, _ = make_pair("net", dtype=dtype, seed=4)  # interrupted

    # torch groups list the parameters in the order groupopt lists a module's Variables,
    # so state_dict indices refer to the same parameters in both
    tparts = [torch_params_like(getattr(mU, b), getattr(tmodel, b)) for b in ("block1", "block2", "fc")]
    transpose = [tr for b in ("block1", "block2", "fc") for *_, tr in param_pairs(getattr(mU, b), getattr(tmodel, b))]
    toptimizer = _make_opt(torch.optim, kind, tparts)
    optU = _make_opt(optim, kind, (mU.block1, mU.block2, mU.fc))
    optI = _make_opt(optim, kind, (mI.block1, mI.block2, mI.fc))
    case = f"recipe3 checkpoint {kind}"

    for step in range(n):
        if step == k_pickle:
            sd = optI.state_dict()
            assert_layout_like_torch(sd, toptimizer.state_dict(), transpose, errlog, case, dtype)
            blob = pickle.dumps(sd)
            del optI
            optI = _make_opt(optim, kind, (mI.block1, mI.block2, mI.fc))  # a new optimizer, same model
            optI.load_state_dict(pickle.loads(blob))
            assert_sd_equal(optI.state_dict(), sd)
        if step == k_npz:
            sd = optI.state_dict()
            save_npz_json(sd, tmp_path)
            del optI
            optI = _make_opt(optim, kind, (mI.block1, mI.block2, mI.fc))
            optI.load_state_dict(load_npz_json(tmp_path))
            assert_sd_equal(optI.state_dict(), sd)
        x, y = X[step], Y[step]
        toptimizer.zero_grad()
        F.mse_loss(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        toptimizer.step()
        optU.step(mse_grad(mU, jax.device_put(x), jax.device_put(y)))
        optI.step(mse_grad(mI, jax.device_put(x), jax.device_put(y)))
        assert lrs(optU) == lrs(optI) == lrs(toptimizer)
        for (p, u), (_, i) in zip(nnx_params(mU), nnx_params(mI)):
            assert np.array_equal(np.asarray(u.get_value()), np.asarray(i.get_value())), (step, p)
    assert_sd_equal(optI.state_dict(), optU.state_dict())
    assert_layout_like_torch(optU.state_dict(), toptimizer.state_dict(), transpose, errlog, case, dtype)
    compare_models(mU, tmodel, errlog, case)


# --------------------------------------------------------------------------- recipe 4


@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
@pytest.mark.parametrize("how", ["lr0_group", "in_no_group"])
def test_recipe_freeze_first_block(how, opt_name, errlog):
    """block1 frozen by an lr=0 group, or by leaving it out of every group: bit-identical, like torch."""
    dtype = np.float64
    model, tmodel = make_pair("net", dtype=dtype, seed=5)
    X, Y = regression_data(200, 8, 5, 3, dtype, seed=5)
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2} if opt_name == "SGD" else {"lr": 1e-2, "weight_decay": 1e-2}

    if how == "lr0_group":
        toptimizer = getattr(torch.optim, opt_name)(
            [{"params": tmodel.block1.parameters(), "lr": 0.0}, {"params": tmodel.block2.parameters()}, {"params": tmodel.fc.parameters()}], **kw
        )
        optimizer = getattr(optim, opt_name)([{"params": model.block1, "lr": 0.0}, {"params": model.block2}, {"params": model.fc}], **kw)
    else:
        toptimizer = getattr(torch.optim, opt_name)([{"params": tmodel.block2.parameters()}, {"params": tmodel.fc.parameters()}], **kw)
        optimizer = getattr(optim, opt_name)([{"params": model.block2}, {"params": model.fc}], **kw)
    frozen0 = snapshot(model.block1)
    tfrozen0 = {n: p.detach().clone() for n, p in tmodel.block1.named_parameters()}

    for step in range(200):
        x, y = X[step], Y[step]
        toptimizer.zero_grad()
        F.mse_loss(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        toptimizer.step()
        grads = mse_grad(model, jax.device_put(x), jax.device_put(y))  # grads of the whole model, block1's included
        optimizer.step(grads)
        assert lrs(optimizer) == lrs(toptimizer)
    assert all(torch.equal(p, tfrozen0[n]) for n, p in tmodel.block1.named_parameters())
    now = snapshot(model.block1)
    for p, v in frozen0.items():
        assert np.array_equal(now[p], v), p
    assert all(np.linalg.norm(now[p]) > 0 for p in now if p.endswith("kernel"))
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["block1"]))  # block1 did get grads
    compare_models(model, tmodel, errlog, f"recipe4 freeze {how} {opt_name}")
    tsd, sd = toptimizer.state_dict(), optimizer.state_dict()
    assert list(sd["state"]) == list(tsd["state"])  # with lr=0 the frozen params still get state, as in torch
    assert [list(g) for g in sd["param_groups"]] == [list(g) for g in tsd["param_groups"]]


@pytest.mark.parametrize("dtype", [np.float64], ids=dt_id)
def test_recipe_adamw_no_decay_for_biases_and_norms(dtype, errlog):
    """AdamW with weight_decay 1e-2 on kernels and 0 on biases and LayerNorm scales."""
    model, tmodel = make_pair("net", dtype=dtype, seed=6, norm=True)
    X, Y = regression_data(200, 8, 5, 3, dtype, seed=6)

    tdecay, tno_decay = [], []
    for name, p in tmodel.named_parameters():
        (tno_decay if p.ndim == 1 else tdecay).append(p)
    toptimizer = torch.optim.AdamW([{"params": tdecay, "weight_decay": 1e-2}, {"params": tno_decay, "weight_decay": 0.0}], lr=3e-3)
    decay, no_decay = [], []
    for path, p in nnx_params(model):
        (no_decay if p.get_value().ndim == 1 else decay).append(p)
    optimizer = optim.AdamW([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    assert any("norm/scale" in p for p, v in nnx_params(model) if any(v is q for q in no_decay))

    for step in range(200):
        x, y = X[step], Y[step]
        toptimizer.zero_grad()
        F.mse_loss(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        toptimizer.step()
        optimizer.step(mse_grad(model, jax.device_put(x), jax.device_put(y)))
        assert lrs(optimizer) == lrs(toptimizer)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-2, 0.0]
    compare_models(model, tmodel, errlog, "recipe4 AdamW per-group weight_decay")


# --------------------------------------------------------------------------- recipe 5


def warmup_linear(W, N):
    return lambda s: s / max(1, W) if s < W else max(0.0, (N - s) / max(1, N - W))


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_recipe_lambdalr_warmup_with_grad_accumulation(dtype, errlog):
    """HF-style warmup + linear decay (LambdaLR), 2 micro-batches summed per optimizer step."""
    W, N, accum = 20, 200, 2
    model, tmodel = make_pair("net", dtype=dtype, seed=7)
    X, Y = regression_data(N * accum, 8, 5, 3, dtype, seed=7)

    def micro_loss(model, x, y):
        return mse(model, x, y) / accum

    micro_grad = nnx.jit(nnx.grad(micro_loss))

    toptimizer = torch.optim.AdamW(tmodel.parameters(), lr=5e-3, weight_decay=1e-2)
    tscheduler = torch.optim.lr_scheduler.LambdaLR(toptimizer, warmup_linear(W, N))
    optimizer = optim.AdamW(model, lr=5e-3, weight_decay=1e-2)
    scheduler = optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(W, N))
    assert lrs(optimizer) == lrs(toptimizer) == [0.0]  # the first step runs at lr 0

    used = []
    for step in range(N):
        used.append(lrs(toptimizer)[0])
        assert lrs(optimizer) == lrs(toptimizer)
        for micro in range(accum):
            x, y = X[step * accum + micro], Y[step * accum + micro]
            loss = F.mse_loss(tmodel(torch.from_numpy(x)), torch.from_numpy(y)) / accum
            loss.backward()
            optimizer.accumulate_grad(micro_grad(model, jax.device_put(x), jax.device_put(y)))
        toptimizer.step()
        optimizer.step()
        tscheduler.step()
        scheduler.step()
        toptimizer.zero_grad()
        optimizer.zero_grad()
        if step % 50 == 49:
            compare_models(model, tmodel, errlog, "recipe5 LambdaLR warmup + accumulation AdamW")
    assert used[0] == 0.0 and used[W] == 5e-3 and used[-1] > 0
    assert lrs(optimizer) == lrs(toptimizer) == [0.0]
    assert optimizer.step() is None  # no gradients gathered since zero_grad: nothing happens (torch skips)
    compare_models(model, tmodel, errlog, "recipe5 LambdaLR warmup + accumulation AdamW")
    assert optimizer.num_compiles == 1


# --------------------------------------------------------------------------- tree mode


def tree_apply(params, x):
    def linear(p, h):
        return h @ p["kernel"] + p["bias"]

    def block(p, h):
        return linear(p["l1"], jnp.tanh(linear(p["l0"], h)))

    return linear(params["fc"], jnp.tanh(block(params["block2"], jnp.tanh(block(params["block1"], x)))))


@jax.jit
def tree_grad(params, x, y):
    return jax.grad(lambda p: jnp.mean((tree_apply(p, x) - y) ** 2))(params)


def at_path(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def as_dict(module):
    out = {}
    for path, var in nnx_params(module):
        d = out
        *head, leaf = path.split("/")
        for h in head:
            d = d.setdefault(h, {})
        d[leaf] = jax.device_put(np.array(var.get_value()))
    return out


@pytest.mark.parametrize("dtype", [np.float64], ids=dt_id)
def test_recipe1_tree_mode(dtype, errlog):
    """Recipe 1 with a linen-style params dict: groups are sub-trees, ``opt.params`` is read back."""
    model, tmodel = make_pair("net", dtype=dtype, seed=1)
    params = as_dict(model)
    epochs, steps = 8, 25
    X, Y = regression_data(epochs * steps, 16, 5, 3, dtype)

    toptimizer = torch.optim.SGD(
        [{"params": tmodel.block1.parameters()}, {"params": tmodel.block2.parameters(), "lr": 0.08}], lr=0.1, momentum=0.5
    )
    optimizer = optim.SGD([{"params": params["block1"]}, {"params": params["block2"], "lr": 0.08}], lr=0.1, momentum=0.5, model=params)
    tstart_lr = [g["lr"] for g in toptimizer.param_groups]
    start_lr = [g["lr"] for g in optimizer.param_groups]

    k = 0
    for epoch in range(epochs):
        if epoch == 3:
            toptimizer.add_param_group({"params": tmodel.fc.parameters(), "lr": 0.09})
            optimizer.add_param_group({"params": optimizer.params["fc"], "lr": 0.09})
            tstart_lr.append(0.09)
            start_lr.append(0.09)
        for i, group in enumerate(toptimizer.param_groups):
            group["lr"] = tstart_lr[i] * 0.9**epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = start_lr[i] * 0.9**epoch
        for _ in range(steps):
            x, y = X[k], Y[k]
            k += 1
            toptimizer.zero_grad()
            F.mse_loss(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            toptimizer.step()
            optimizer.step(tree_grad(optimizer.params, jax.device_put(x), jax.device_put(y)))
            assert lrs(optimizer) == lrs(toptimizer)
    final = optimizer.params
    for path, _, t, tr in param_pairs(model, tmodel):
        a = np.asarray(at_path(final, path))
        e = rel_err(a, torch_view(t, tr))
        assert a.dtype == np.dtype(dtype) and e <= TOL[np.dtype(dtype)], (path, e)
        errlog.record("tree mode recipe1 SGD", dtype, e)
    assert optimizer.num_compiles == 2


def test_tree_mode_whole_dict_adam_steplr(errlog):
    """``optim.Adam(params_dict, lr=...)``: one group with every leaf, StepLR, against torch on make_moons."""
    dtype = np.float64
    model, tmodel = make_pair("mlp", dtype=dtype, seed=8)
    X, Y = moons_batches(200, 32, dtype, seed=1)
    params = as_dict(model)

    @jax.jit
    def grad_fn(p, x, y):
        def loss(p):
            logits = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"]) @ p["l1"]["kernel"] + p["l1"]["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.grad(loss)(p)

    toptimizer = torch.optim.Adam(tmodel.parameters(), lr=0.02)
    tscheduler = torch.optim.lr_scheduler.StepLR(toptimizer, step_size=30, gamma=0.5)
    optimizer = optim.Adam(params, lr=0.02)
    scheduler = optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)
    for step in range(200):
        toptimizer.zero_grad()
        F.cross_entropy(tmodel(torch.from_numpy(X[step])), torch.from_numpy(Y[step])).backward()
        toptimizer.step()
        tscheduler.step()
        optimizer.step(grad_fn(optimizer.params, jax.device_put(X[step]), jax.device_put(Y[step])))
        scheduler.step()
        assert lrs(optimizer) == lrs(toptimizer)
    for path, _, t, tr in param_pairs(model, tmodel):
        e = rel_err(at_path(optimizer.params, path), torch_view(t, tr))
        assert e <= TOL[np.dtype(dtype)], (path, e)
        errlog.record("tree mode Adam whole dict + StepLR", dtype, e)


# --------------------------------------------------------------------------- coinciding inner paths


def test_groups_with_coinciding_inner_paths_get_their_own_grads(errlog):
    """block1 and block2 share inner paths (l0/kernel, ...): each group must get its own Variables' grads.

    Plain SGD with lr 1 and 0.5 and distinct gradient values per parameter: any mix-up of block1's
    and block2's gradients (or of their lrs) changes the result. Checked exactly and against torch.
    """
    dtype = np.float64
    model, tmodel = make_pair("net", dtype=dtype, seed=9)
    # block2 first, so group order differs from path order
    optimizer = optim.SGD([{"params": model.block2, "lr": 1.0}, {"params": model.block1, "lr": 0.5}], lr=0.1)
    toptimizer = torch.optim.SGD([{"params": tmodel.block2.parameters(), "lr": 1.0}, {"params": tmodel.block1.parameters(), "lr": 0.5}], lr=0.1)
    x = jnp.ones((2, 5), dtype)
    grads = mse_grad(model, x, jnp.zeros((2, 3), dtype))
    # distinct, path-dependent values: block1's grads are (i+1), block2's are -(i+1)*10, fc's 1000
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    from groupopt.groups import path_str

    vals = {}
    leaves = []
    for i, (kp, leaf) in enumerate(flat):
        p = path_str(kp)
        scale = 1.0 if p.startswith("block1") else (-10.0 if p.startswith("block2") else 1000.0)
        v = np.full(leaf.shape, scale * (i + 1), dtype)
        vals[p] = v
        leaves.append(jax.device_put(v))
    grads = jax.tree_util.tree_unflatten(treedef, leaves)
    for path, _, t, tr in param_pairs(model, tmodel):
        t.grad = torch.from_numpy(np.ascontiguousarray(vals[path].T if tr else vals[path]))
    before = snapshot(model)
    optimizer.step(grads)
    toptimizer.step()
    after = snapshot(model)
    for p in before:
        lr = 1.0 if p.startswith("block2") else 0.5 if p.startswith("block1") else 0.0
        assert np.array_equal(after[p], before[p] - lr * vals[p]), p
    compare_models(model, tmodel, errlog, "coinciding inner paths SGD")

    # gradients of a submodule alone carry the same ids: an optimizer of block2 takes block2's grads
    opt2 = optim.SGD(model.block2, lr=0.25)
    g2 = nnx.grad(lambda b, h: jnp.sum(b(h) ** 2))(model.block2, jnp.ones((2, 8), dtype))
    before = snapshot(model)
    g2_np = {p: np.asarray(v) for p, v in zip([path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(g2)[0]], jax.tree.leaves(g2))}
    opt2.step(g2)
    after = snapshot(model)
    for p in before:
        if p.startswith("block2/"):
            assert np.array_equal(after[p], before[p] - 0.25 * g2_np[p[len("block2/"):]]), p
        else:
            assert np.array_equal(after[p], before[p]), p
    # ... and block2's grads never reach block1, although their inner paths coincide: fed to the
    # two-group optimizer they move block2 only (block1 has no gradient: skipped, as torch skips
    # p.grad is None); an optimizer over block1 alone has no gradient at all and refuses them
    opt1 = optim.SGD(model.block1, lr=0.25)
    with pytest.raises(ValueError, match="no gradient"):
        opt1.step(g2)
    assert all(np.array_equal(v, after[p]) for p, v in snapshot(model).items())
    optimizer.step(g2)
    moved = snapshot(model)
    for p in before:
        if p.startswith("block1/") or not p.startswith("block2/"):
            assert np.array_equal(moved[p], after[p]), p
    assert any(not np.array_equal(moved[p], after[p]) for p in before if p.startswith("block2/"))
