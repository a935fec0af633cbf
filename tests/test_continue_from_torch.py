"""Continuing a torch run in an NNX model (weights + optimizer + scheduler) and back, against torch.

Two models, each written twice (torch, NNX) with the same attribute names:

* a transformer block: ``nn.Embedding``, ``nn.MultiheadAttention`` (-> ``nnx.MultiHeadAttention``),
  ``nn.LayerNorm``, ``nn.Linear``; AdamW over ``model.parameters()`` + LambdaLR (warm-up);
* a conv net: ``nn.Conv2d`` + ``nn.BatchNorm2d`` + ``nn.Conv1d`` + ``nn.Linear``; Adam(amsgrad) over two
  groups built from ``named_parameters()`` (decay / no decay) + CosineAnnealingLR.

torch runs K steps and saves; (a) torch continues, (b) ``continue_from_torch`` into a freshly
initialised NNX model continues: the weights and moments agree (fp64: 1e-9). Then the JAX run goes
back with ``to_torch_state_dicts`` into a fresh torch model/optimizer/scheduler, which continues
and agrees with the uninterrupted torch run. Run with ``-s`` for the measured errors.
"""

from __future__ import annotations

import copy
import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights
from torch import nn

import groupopt.compat as optim
from torch_port import rel_err

K, MORE, BACK = 3, 2, 2
TOL = {np.float64: 1e-9, np.float32: 2e-5}
ERRORS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    print("\ncontinue_from_torch max relative errors:")
    for k, e in sorted(ERRORS.items()):
        print(f"  {k:<55s} {e:.3e}")


# ------------------------------------------------------------------ models


class TBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln1 = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.ln2 = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tok):
        x = self.embed(tok)
        a, _ = self.attn(x, x, x)
        x = self.ln1(x + a)
        x = self.ln2(x + self.fc2(torch.tanh(self.fc1(x))))
        return self.head(x.mean(1))


def exact_attention(q, k, v, **_):
    """Attention in the inputs' dtype. nnx.MultiHeadAttention's default goes through
    jax.nn.dot_product_attention, whose softmax runs in float32 even for float64 inputs."""
    return jnp.einsum("...hqk,...khd->...qhd", dot_product_attention_weights(q, k), v)


class JBlock(nnx.Module):
    def __init__(self, dtype, seed=1):
        r = nnx.Rngs(seed)
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=r)
        z = nnx.initializers.zeros  # overwritten by the torch weights (and cheap to compile)
        ln = dict(epsilon=1e-5, use_fast_variance=False, **kw)
        self.embed = nnx.Embed(11, 8, embedding_init=z, **kw)
        self.attn = nnx.MultiHeadAttention(2, 8, decode=False, attention_fn=exact_attention, kernel_init=z, **kw)
        self.ln1 = nnx.LayerNorm(8, **ln)
        self.fc1 = nnx.Linear(8, 16, kernel_init=z, **kw)
        self.fc2 = nnx.Linear(16, 8, kernel_init=z, **kw)
        self.ln2 = nnx.LayerNorm(8, **ln)
        self.head = nnx.Linear(8, 3, kernel_init=z, **kw)

    def __call__(self, tok):
        x = self.embed(tok)
        x = self.ln1(x + self.attn(x))
        x = self.ln2(x + self.fc2(jnp.tanh(self.fc1(x))))
        return self.head(x.mean(1))


class TConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):  # x: (N, H, W, C), as the NNX side takes it
        y = torch.relu(self.bn(self.conv(x.permute(0, 3, 1, 2))))  # (N, 4, H, W)
        y = torch.tanh(self.conv1d(y.flatten(2)))  # (N, 5, H*W)
        return self.fc(y.mean(2))


class JConv(nnx.Module):
    def __init__(self, dtype, seed=1):
        r = nnx.Rngs(seed)
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=r)
        self.conv = nnx.Conv(3, 4, (3, 3), padding=1, kernel_init=nnx.initializers.zeros, **kw)
        self.bn = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-5, use_fast_variance=False, use_running_average=False, **kw)
        for stat in (self.bn.mean, self.bn.var):  # flax keeps batch statistics in float32 whatever param_dtype
            stat.set_value(stat.get_value().astype(dtype))
        kw["kernel_init"] = nnx.initializers.zeros
        self.conv1d = nnx.Conv(4, 5, (3,), padding=1, **kw)
        self.fc = nnx.Linear(5, 2, **kw)

    def __call__(self, x):
        y = nnx.relu(self.bn(self.conv(x)))  # (N, H, W, 4)
        y = jnp.tanh(self.conv1d(y.reshape(y.shape[0], -1, 4)))  # (N, H*W, 5)
        return self.fc(y.mean(1))


def tblock_data(dtype):
    rng = np.random.default_rng(0)
    return rng.integers(0, 11, size=(4, 5)), rng.normal(size=(4, 3)).astype(dtype)


def conv_data(dtype):
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 5, 5, 3)).astype(dtype), rng.normal(size=(4, 2)).astype(dtype)


def warmup(epoch):
    return min(1.0, (epoch + 1) / 4)


def transformer_setup(t_model):
    opt = torch.optim.AdamW(t_model.parameters(), lr=0.02, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)


def conv_setup(t_model):
    named = list(t_model.named_parameters())
    decay = [(n, p) for n, p in named if p.ndim > 1]
    no_decay = [(n, p) for n, p in named if p.ndim <= 1]
    opt = torch.optim.Adam([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "lr": 0.05}],
                           lr=0.02, amsgrad=True)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)


CASES = {
    "transformer": (TBlock, JBlock, tblock_data, transformer_setup, optim.AdamW,
                    lambda o: optim.lr_scheduler.LambdaLR(o, warmup)),
    "convnet": (TConv, JConv, conv_data, conv_setup, optim.Adam,
                functools.partial(optim.lr_scheduler.CosineAnnealingLR, T_max=6)),
}


def torch_steps(model, opt, sched, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        ((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
        opt.step()
        sched.step()


@nnx.jit
@nnx.grad
def grad(model, x, y):
    return ((model(x) - y) ** 2).mean()


def jax_steps(model, opt, sched, x, y, n):
    for _ in range(n):
        opt.step(grad(model, jnp.asarray(x), jnp.asarray(y)))
        sched.step()


def fed_steps(t_model, t_opt, t_sched, model, opt, sched, x, y, n):
    """float32: both optimizers get torch's gradients (mapped to the NNX layout), so the comparison
    is of the continued optimizer and scheduler alone (XLA's and torch's float32 forward passes
    differ in their last bits, and Adam turns the noise of a zero gradient, such as a key
    projection's bias, into full-size steps)."""
    rows = optim.torch_name_table(model)
    params = dict(t_model.named_parameters())
    for _ in range(n):
        t_opt.zero_grad()
        ((t_model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
        grads: dict = {}
        for r in rows:
            if r.kind == "param":
                for path, g in zip(r.nnx_paths, r.to_nnx(params[r.torch_name].grad.numpy())):
                    node = grads
                    *head, last = path.split("/")
                    for k in head:
                        node = node.setdefault(k, {})
                    node[last] = jnp.asarray(g)
        t_opt.step()
        t_sched.step()
        opt.step(grads)
        sched.step()


def compare(case, what, ours: dict, ref: dict, dtype, skip=(), scale=None):
    """Largest relative error per entry (relative to ``scale[k]`` where given and larger)."""
    worst = 0.0
    for k, v in ref.items():
        if k in skip or k.endswith("num_batches_tracked"):
            continue
        b = v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)
        e = rel_err(np.asarray(ours[k]), b) * np.max(np.abs(b), initial=1e-300) / max(
            np.max(np.abs(b), initial=1e-300), (scale or {}).get(k, 0.0))
        worst = max(worst, e)
        assert e <= TOL[dtype], f"{case} {what} {k}: {e:.2e}"
    key = f"{case} {what} {np.dtype(dtype).name}"
    ERRORS[key] = max(ERRORS.get(key, 0.0), worst)


def compare_opt(case, what, ours: dict, ref: dict, dtype):
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in ref["param_groups"]]
    for go, gr in zip(ours["param_groups"], ref["param_groups"]):
        assert go["lr"] == pytest.approx(gr["lr"], rel=1e-15)
    assert sorted(ours["state"]) == sorted(ref["state"])
    # a moment of a parameter whose gradient is 0 in exact arithmetic (a conv bias before BatchNorm, a
    # key projection's bias) is rounding noise (1e-18): compared relative to that moment's largest value
    scale = {}
    for entry in ref["state"].values():
        for k, v in entry.items():
            scale[k] = max(scale.get(k, 0.0), float(v.abs().max()))
    for i, entry in ref["state"].items():
        assert sorted(ours["state"][i]) == sorted(entry)
        assert float(ours["state"][i]["step"]) == float(entry["step"])
        compare(case, what, {k: v for k, v in ours["state"][i].items() if k != "step"},
                {k: v for k, v in entry.items() if k != "step"}, dtype, scale=scale)


# float32 on the transformer only (keeps the file lean; the conv net's layouts are covered in float64)
@pytest.mark.parametrize("case,dtype", [("transformer", np.float64), ("convnet", np.float64),
                                        ("transformer", np.float32)], ids=["transformer-f64", "convnet-f64", "transformer-f32"])
def test_continue_in_jax_and_back_to_torch(case, dtype):
    t_cls, j_cls, data, setup, opt_cls, sched_fn = CASES[case]
    tdt = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
    x, y = data(dtype)
    torch.manual_seed(0)
    t_model = t_cls().to(tdt)
    t_opt, t_sched = setup(t_model)
    torch_steps(t_model, t_opt, t_sched, x, y, K)
    saved = copy.deepcopy((t_model.state_dict(), t_opt.state_dict(), t_sched.state_dict()))

    # JAX continues the torch run: <= 5 user lines
    model = j_cls(dtype)
    opt, sched = optim.continue_from_torch(model, *saved, optimizer=opt_cls, scheduler=sched_fn)
    out = optim.to_torch_state_dicts(model, opt, sched, like=t_model.state_dict())
    compare(case, "loaded weights", out.model, saved[0], dtype)  # written exactly
    compare_opt(case, "loaded moments", out.optimizer, saved[1], dtype)

    if dtype == np.float64:  # each side its own forward and backward
        torch_steps(t_model, t_opt, t_sched, x, y, MORE)
        jax_steps(model, opt, sched, x, y, MORE)
    else:
        fed_steps(t_model, t_opt, t_sched, model, opt, sched, x, y, MORE)
    out = optim.to_torch_state_dicts(model, opt, sched, like=t_model.state_dict())
    # NNX's BatchNorm updates var with the biased batch variance, torch with the unbiased one
    compare(case, "continued weights", out.model, t_model.state_dict(), dtype, skip=("bn.running_var",))
    compare_opt(case, "continued moments", out.optimizer, t_opt.state_dict(), dtype)
    assert sched.last_epoch == t_sched.last_epoch and sched.get_last_lr() == pytest.approx(t_sched.get_last_lr(), rel=1e-15)

    # ... and back: a fresh torch model / optimizer / scheduler loads the JAX run and continues
    torch.manual_seed(1)
    b_model = t_cls().to(tdt)
    b_opt, b_sched = setup(b_model)
    b_model.load_state_dict(out.model)
    b_opt.load_state_dict(out.optimizer)
    b_sched.load_state_dict(out.scheduler)
    ref_model = copy.deepcopy(t_model)
    ref_model.load_state_dict(out.model)  # same running_var start: only the optimizer path is compared
    ref_opt, ref_sched = setup(ref_model)
    ref_opt.load_state_dict(t_opt.state_dict())
    ref_sched.load_state_dict(t_sched.state_dict())
    if dtype == np.float64:
        torch_steps(b_model, b_opt, b_sched, x, y, BACK)
        torch_steps(ref_model, ref_opt, ref_sched, x, y, BACK)
    else:  # the same gradients for both (see fed_steps)
        ref_params, b_params = dict(ref_model.named_parameters()), dict(b_model.named_parameters())
        for _ in range(BACK):
            ref_opt.zero_grad()
            ((ref_model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
            for n, p in b_params.items():
                p.grad = ref_params[n].grad.clone()
            for o, sc in ((ref_opt, ref_sched), (b_opt, b_sched)):
                o.step()
                sc.step()
    compare(case, "back in torch weights", b_model.state_dict(), ref_model.state_dict(), dtype)
    compare_opt(case, "back in torch moments", b_opt.state_dict(), ref_opt.state_dict(), dtype)


# ------------------------------------------------------------------ names, errors, nothing half-applied


def _saved_transformer():
    torch.manual_seed(0)
    t_model = TBlock().double()
    t_opt, t_sched = transformer_setup(t_model)
    x, y = tblock_data(np.float64)
    torch_steps(t_model, t_opt, t_sched, x, y, 1)
    return t_model.state_dict(), t_opt.state_dict(), t_sched.state_dict()


def _values(model):
    return {p: np.asarray(v.get_value()).copy() for p, v in nnx.to_flat_state(nnx.state(model))}


def test_name_table_of_the_transformer():
    rows = {r.torch_name: r for r in optim.torch_name_table(JBlock(np.float64))}
    assert list(rows) == list(TBlock().state_dict())  # torch's names, in torch's order
    assert rows["attn.in_proj_weight"].nnx_paths == ("attn/query/kernel", "attn/key/kernel", "attn/value/kernel")
    assert rows["ln1.weight"].nnx_paths == ("ln1/scale",) and rows["embed.weight"].nnx_paths == ("embed/embedding",)
    assert rows["fc1.weight"].torch_shape == (16, 8) and "transposed" in rows["fc1.weight"].layout
    conv = {r.torch_name: r for r in optim.torch_name_table(JConv(np.float64))}
    assert list(conv) == list(TConv().state_dict())
    assert conv["bn.running_var"].nnx_paths == ("bn/var",) and conv["bn.running_var"].kind == "buffer"
    assert conv["bn.num_batches_tracked"].kind == "dropped"
    assert conv["conv.weight"].torch_shape == (4, 3, 3, 3) and conv["conv1d.weight"].torch_shape == (5, 4, 3)


def test_errors_name_the_key_and_change_nothing():
    msd, osd, ssd = _saved_transformer()
    model = JBlock(np.float64)
    before = _values(model)

    bad = dict(msd, **{"fc1.weight": msd["fc1.weight"].T.contiguous()})
    with pytest.raises(ValueError, match=r"fc1\.weight.*fc1/kernel.*\(8, 16\).*\(16, 8\).*looks transposed"):
        optim.continue_from_torch(model, bad, osd, optimizer=optim.AdamW)

    renamed = {("mlp.in" + k[3:] if k.startswith("fc1.") else k): v for k, v in msd.items()}
    with pytest.raises(ValueError, match=r"(?s)Missing key.*'fc1\.weight' \(for fc1/kernel\).*Unexpected key.*'mlp\.in\.weight'"):
        optim.continue_from_torch(model, renamed, osd, optimizer=optim.AdamW)

    bad_state = copy.deepcopy(osd)
    bad_state["state"][0]["exp_avg"] = bad_state["state"][0]["exp_avg"][:5]
    with pytest.raises(ValueError, match=r"state 'exp_avg' of 'embed\.weight' has shape \(5, 8\)"):
        optim.continue_from_torch(model, msd, bad_state, optimizer=optim.AdamW)

    with pytest.raises(TypeError, match="scheduler_state_dict needs scheduler="):
        optim.continue_from_torch(model, msd, osd, ssd, optimizer=optim.AdamW)
    assert all(np.array_equal(before[k], v) for k, v in _values(model).items())  # nothing written

    # the rename works through mapping=, and an unknown mapping entry is refused
    model2 = JBlock(np.float64)
    opt, _ = optim.continue_from_torch(model2, renamed, osd, optimizer=optim.AdamW, mapping={"mlp.in": "fc1"})
    np.testing.assert_array_equal(np.asarray(model2.fc1.kernel.get_value()), msd["fc1.weight"].numpy().T)
    np.testing.assert_array_equal(opt.state[model2.fc1.kernel]["exp_avg"], osd["state"][7]["exp_avg"].numpy().T)  # index 7: fc1.weight
    with pytest.raises(ValueError, match=r"mapping entries match no NNX Variable or module: \['x'\]"):
        optim.torch_name_table(model2, {"x": "nope"})


def test_ignored_keys_and_explicit_layouts():
    class TPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
            self.register_buffer("mask", torch.ones(2))

    class JPos(nnx.Module):
        def __init__(self):
            self.table = nnx.Param(jnp.zeros((4, 3)))

    t = TPos()
    t_opt = torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9)
    t.pos.grad = torch.ones(3, 4, dtype=torch.float64)
    t_opt.step()
    m = JPos()
    opt, sched = optim.continue_from_torch(m, t.state_dict(), t_opt.state_dict(), optimizer=optim.SGD,
                                           mapping={"pos": ("table", (1, 0)), "mask": None})
    assert sched is None
    np.testing.assert_array_equal(np.asarray(m.table.get_value()), t.pos.detach().numpy().T)
    np.testing.assert_array_equal(opt.state[m.table]["momentum_buffer"], t_opt.state[t.pos]["momentum_buffer"].numpy().T)
    back = optim.to_torch_state_dicts(m, opt, mapping={"pos": ("table", (1, 0))})
    np.testing.assert_array_equal(back.model["pos"].numpy(), t.pos.detach().numpy())

    class JUp(nnx.Module):
        def __init__(self):
            self.up = nnx.ConvTranspose(2, 3, (2, 2), rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match=r"'up' is an nnx\.ConvTranspose.*no automatic torch mapping"):
        optim.torch_name_table(JUp())


def test_several_unnamed_torch_groups_need_param_names():
    msd, _, _ = _saved_transformer()
    torch.manual_seed(0)
    t_model = TBlock().double()
    t_model.load_state_dict(msd)
    params = list(t_model.named_parameters())
    t_opt = torch.optim.AdamW([{"params": [p for n, p in params if p.ndim > 1]},
                               {"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0}])
    x, y = tblock_data(np.float64)
    t_opt.zero_grad()
    ((t_model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
    t_opt.step()
    with pytest.raises(ValueError, match="2 groups and no param_names"):
        optim.continue_from_torch(JBlock(np.float64), t_model.state_dict(), t_opt.state_dict(), optimizer=optim.AdamW)
    names = [n for n, p in params if p.ndim > 1] + [n for n, p in params if p.ndim <= 1]
    model = JBlock(np.float64)
    opt, _ = optim.continue_from_torch(model, t_model.state_dict(), t_opt.state_dict(), optimizer=optim.AdamW,
                                       param_names=names)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and len(opt.param_groups[1]["params"]) == 11
    np.testing.assert_array_equal(opt.state[model.ln1.scale]["exp_avg"],
                                  t_opt.state[t_model.ln1.weight]["exp_avg"].numpy())
