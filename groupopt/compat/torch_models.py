"""Continue a torch run in an NNX model (weights, optimizer and scheduler state), and back.

:func:`torch_name_table` derives, from an NNX model, the torch name of every ``nnx.Param`` and
``nnx.BatchStat`` and the layout change between them. Standard layers map automatically
(``nnx.Sequential``'s ``layers`` level is torch's ``nn.Sequential`` index):

* ``nnx.Linear``: ``weight`` -> ``kernel`` transposed ((out, in) -> (in, out)), ``bias``.
* ``nnx.Conv`` (1d/2d/3d): ``weight`` (O, I, k...) -> ``kernel`` (k..., I, O), ``bias``.
* ``nnx.LayerNorm`` / ``RMSNorm`` / ``GroupNorm``: ``weight`` -> ``scale``, ``bias``.
* ``nnx.BatchNorm``: also ``running_mean`` -> ``mean``, ``running_var`` -> ``var``;
  ``num_batches_tracked`` has no NNX counterpart (dropped).
* ``nnx.Embed``: ``weight`` -> ``embedding``.
* ``nnx.MultiHeadAttention``: ``in_proj_weight`` / ``in_proj_bias`` split in three into
  ``query``/``key``/``value`` (kernels (in, heads, head_dim)), ``out_proj.*`` -> ``out``.
* any other ``nnx.Param``: its attribute name, same layout.

``mapping`` overrides it: ``{torch prefix: NNX module path}`` renames a module, ``{torch name: NNX
path}`` or ``{torch name: (NNX path, axes)}`` a Variable (``axes``: the ``np.transpose`` taking
torch's array to NNX's), ``{torch name: None}`` ignores a torch key.

Every layout change is a permutation (transpose, reshape, split) of the entries, so it maps an
elementwise optimizer state (Adam's moments, SGD's momentum) exactly like the weight; the step
counts are copied. :func:`continue_from_torch` builds a compat optimizer (and scheduler) that
continues a torch run where it stopped; :func:`to_torch_state_dicts` writes the way back.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ..groups import flatten_with_paths
from .torch_interop import import_torch, to_torch

__all__ = ["TorchName", "torch_name_table", "continue_from_torch", "Continued", "to_torch_state_dicts",
           "TorchStateDicts"]


@dataclasses.dataclass(frozen=True)
class TorchName:
    """One row of :func:`torch_name_table`: a torch state_dict key and the NNX Variable(s) it fills.

    Attributes:
      torch_name: torch's dotted key (``"encoder.0.weight"``).
      nnx_paths: the NNX paths it fills (one; three for ``MultiheadAttention.in_proj_*``; none
        for a key without NNX counterpart such as ``num_batches_tracked``).
      kind: ``"param"`` (an ``nnx.Param``, optimized), ``"buffer"`` (``nnx.BatchStat``) or
        ``"dropped"``.
      layout: how the arrays differ, in words (``"transposed (out, in) -> (in, out)"``, ``"same"``).
      torch_shape: the shape torch's array has.
      variables: the NNX Variables (same order as ``nnx_paths``).
      to_nnx: torch array -> tuple of NNX arrays (also applied to optimizer moments).
      to_torch: tuple of NNX arrays -> torch array.
    """

    torch_name: str
    nnx_paths: tuple
    kind: str
    layout: str
    torch_shape: tuple
    variables: tuple = dataclasses.field(repr=False, compare=False, default=())
    to_nnx: Callable = dataclasses.field(repr=False, compare=False, default=None)
    to_torch: Callable = dataclasses.field(repr=False, compare=False, default=None)


# ---------------------------------------------------------------------------------------------- table


def _perm_row(name, var, kind, perm, layout):
    """A 1:1 row whose NNX array is ``np.transpose(torch, perm)`` (``perm=None``: same layout)."""
    inv = None if perm is None else tuple(int(i) for i in np.argsort(perm))
    shape = tuple(var.get_value().shape)
    tshape = shape if inv is None else tuple(shape[i] for i in inv)
    return dict(name=name, variables=(var,), kind=kind, layout=layout, torch_shape=tshape,
                to_nnx=(lambda a: (np.asarray(a),)) if perm is None else (lambda a: (np.transpose(a, perm),)),
                to_torch=(lambda xs: np.asarray(xs[0])) if inv is None else (lambda xs: np.transpose(xs[0], inv)))


def _rows_linear(m):
    rows = [("weight", m.kernel, (1, 0), "transposed: torch (out, in) -> kernel (in, out)")]
    if getattr(m, "bias", None) is not None:
        rows.append(("bias", m.bias, None, "same"))
    return [_perm_row(n, v, "param", p, lay) for n, v, p, lay in rows]


def _rows_conv(m):
    n = m.kernel.get_value().ndim
    perm = tuple(range(2, n)) + (1, 0)  # (O, I, k...) -> (k..., I, O)
    rows = [_perm_row("weight", m.kernel, "param", perm, "torch (O, I, k...) -> kernel (k..., I, O)")]
    if getattr(m, "bias", None) is not None:
        rows.append(_perm_row("bias", m.bias, "param", None, "same"))
    return rows


def _rows_norm(m):
    rows = []
    if getattr(m, "scale", None) is not None:
        rows.append(_perm_row("weight", m.scale, "param", None, "weight -> scale"))
    if getattr(m, "bias", None) is not None:
        rows.append(_perm_row("bias", m.bias, "param", None, "same"))
    return rows


def _rows_batchnorm(m):
    rows = _rows_norm(m)
    rows.append(_perm_row("running_mean", m.mean, "buffer", None, "running_mean -> mean"))
    rows.append(_perm_row("running_var", m.var, "buffer", None, "running_var -> var"))
    rows.append(dict(name="num_batches_tracked", variables=(), kind="dropped", torch_shape=(),
                     layout="no NNX counterpart (used by torch only with momentum=None)",
                     to_nnx=lambda a: (), to_torch=None))
    return rows


def _rows_embed(m):
    return [_perm_row("weight", m.embedding, "param", None, "weight -> embedding")]


def _rows_mha(m, where):
    """torch's nn.MultiheadAttention over nnx.MultiHeadAttention's LinearGeneral projections."""
    if getattr(m, "normalize_qk", False) or getattr(m, "query_ln", None) is not None:
        raise ValueError(f"{where}: nnx.MultiHeadAttention(normalize_qk=True) has no torch nn.MultiheadAttention "
                         "counterpart; map its Variables with mapping=")
    q, k, v, o = m.query, m.key, m.value, m.out
    e_in, heads, hd = q.kernel.get_value().shape
    e_kv = k.kernel.get_value().shape[0]
    e_out = o.kernel.get_value().shape[-1]
    if heads * hd != e_in or e_out != e_in:
        raise ValueError(
            f"{where}: torch's nn.MultiheadAttention has qkv_features == out_features == in_features "
            f"(embed_dim); this nnx.MultiHeadAttention has in {e_in}, qkv {heads * hd}, out {e_out}: "
            "map its Variables with mapping="
        )
    hd_all = heads * hd

    def kernel_row(name, mods, e):
        vs = tuple(mm.kernel for mm in mods)
        return dict(name=name, variables=vs, kind="param", torch_shape=(hd_all * len(mods), e),
                    layout=f"rows split in {len(mods)}, each (heads*head_dim, in).T -> kernel (in, heads, head_dim)"
                    if len(mods) > 1 else "(heads*head_dim, in).T -> kernel (in, heads, head_dim)",
                    to_nnx=lambda a, e=e, n=len(mods): tuple(
                        np.asarray(a)[i * hd_all:(i + 1) * hd_all].T.reshape(e, heads, hd) for i in range(n)),
                    to_torch=lambda xs, e=e: np.concatenate([np.asarray(x).reshape(e, hd_all).T for x in xs], 0))

    rows = []
    if e_kv == e_in:
        rows.append(kernel_row("in_proj_weight", (q, k, v), e_in))
    else:
        rows += [kernel_row("q_proj_weight", (q,), e_in), kernel_row("k_proj_weight", (k,), e_kv),
                 kernel_row("v_proj_weight", (v,), e_kv)]
    if q.bias is not None:
        rows.append(dict(name="in_proj_bias", variables=(q.bias, k.bias, v.bias), kind="param",
                         torch_shape=(3 * hd_all,), layout="split in 3, each -> bias (heads, head_dim)",
                         to_nnx=lambda a: tuple(np.asarray(a)[i * hd_all:(i + 1) * hd_all].reshape(heads, hd)
                                                for i in range(3)),
                         to_torch=lambda xs: np.concatenate([np.asarray(x).reshape(hd_all) for x in xs], 0)))
    rows.append(dict(name="out_proj.weight", variables=(o.kernel,), kind="param", torch_shape=(e_out, hd_all),
                     layout="(out, heads*head_dim).T -> kernel (heads, head_dim, out)",
                     to_nnx=lambda a: (np.asarray(a).T.reshape(heads, hd, e_out),),
                     to_torch=lambda xs: np.asarray(xs[0]).reshape(hd_all, e_out).T))
    if o.bias is not None:
        rows.append(_perm_row("out_proj.bias", o.bias, "param", None, "same"))
    return rows


def _rules():
    from flax import nnx

    out = [(nnx.MultiHeadAttention, _rows_mha), (nnx.Linear, _rows_linear), (nnx.Embed, _rows_embed),
           (nnx.BatchNorm, _rows_batchnorm), ((nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm), _rows_norm)]
    # ConvTranspose's kernel is not torch's ConvTranspose layout (and is not a Conv subclass): no row
    out.append((nnx.Conv, _rows_conv))
    return out


def _unsupported():
    from flax import nnx

    return (nnx.ConvTranspose, nnx.LinearGeneral, nnx.Einsum)


def _walk(node, pairs, rows, seen, unsupported):
    """Rows in torch's registration order: a module's own Variables, then its submodules in
    attribute order (NNX modules keep their ``__init__`` assignment order, as torch does).

    ``pairs``: the path so far as ``(NNX segment, torch segment or None)`` (``nnx.Sequential``'s
    ``layers`` has no torch segment)."""
    from flax import nnx

    where = "/".join(n for n, _ in pairs) or "<root>"
    if isinstance(node, nnx.Variable):
        if id(node) in seen:
            return
        seen.add(id(node))
        kind = "param" if isinstance(node, nnx.Param) else "buffer" if isinstance(node, nnx.BatchStat) else None
        if kind is not None:
            rows.append((tuple(pairs[:-1]), _perm_row(pairs[-1][1], node, kind, None, "same")))
        return
    if isinstance(node, nnx.Sequential):
        for i, layer in enumerate(node.layers):
            _walk(layer, pairs + [("layers", None), (str(i), str(i))], rows, seen, unsupported)
        return
    if isinstance(node, (nnx.List, list, tuple)):
        for i, x in enumerate(node):
            _walk(x, pairs + [(str(i), str(i))], rows, seen, unsupported)
        return
    if isinstance(node, (nnx.Dict, dict)):
        items = node.items() if isinstance(node, dict) else [(k, v) for k, v in vars(node).items()
                                                              if not k.startswith("_pytree__")]
        for k, x in items:
            _walk(x, pairs + [(str(k), str(k))], rows, seen, unsupported)
        return
    if not isinstance(node, nnx.Module):
        return
    for types, fn in _rules():
        if isinstance(node, types):
            for r in (fn(node, where) if fn is _rows_mha else fn(node)):
                if all(id(v) not in seen for v in r["variables"]):
                    seen.update(id(v) for v in r["variables"])
                    rows.append((tuple(pairs), r))
            return
    if isinstance(node, _unsupported()):
        unsupported.append((where, type(node).__name__))
        # its Variables still get same-layout rows: mapping= must name each of them with its layout
    items = [(k, v) for k, v in vars(node).items() if not k.startswith("_pytree__")]
    for k, x in items:  # own Variables first (torch: _parameters, _buffers, then children)
        if isinstance(x, nnx.Variable):
            _walk(x, pairs + [(k, k)], rows, seen, unsupported)
    for k, x in items:
        if not isinstance(x, nnx.Variable):
            _walk(x, pairs + [(k, k)], rows, seen, unsupported)


def torch_name_table(model, mapping: dict | None = None) -> list[TorchName]:
    """Every ``nnx.Param`` / ``nnx.BatchStat`` of ``model`` with its torch ``state_dict`` key and the
    layout change, in torch's registration order (see the module docstring for the table).

    Args:
      model: the NNX module; torch names follow its attribute names (``self.fc1`` -> ``fc1.weight``),
        ``nnx.List`` / ``nnx.Sequential`` indices become torch's ``ModuleList`` / ``Sequential`` ones.
      mapping: overrides, keyed by torch names: ``{"torch.prefix": "nnx/module/path"}`` renames a
        module (the longest matching NNX path wins), ``{"torch.name": "nnx/var/path"}`` names one
        Variable (layout as its module's), ``{"torch.name": ("nnx/var/path", axes)}`` also gives its
        layout (``np.transpose(torch_array, axes)`` is the NNX array; ``None``: same layout), and
        ``{"torch.name": None}`` says a torch key has no NNX counterpart (ignored).

    Raises ``ValueError`` for a module without automatic mapping (``nnx.ConvTranspose``,
    ``nnx.LinearGeneral``, ``nnx.Einsum`` outside a MultiHeadAttention) whose Variables the
    mapping does not give with their layout, for mapping entries that match nothing, and for
    two Variables with one torch name.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"torch_name_table() takes an NNX Module, got {type(model).__name__}")
    mapping = dict(mapping or {})
    paths, leaves, _ = flatten_with_paths(nnx.state(model))
    path_of = {id(v): p for p, v in zip(paths, leaves)}
    raw, unsupported = [], []
    _walk(model, [], raw, set(), unsupported)

    renames, by_var_path = {}, {}
    for k, v in mapping.items():
        if isinstance(v, tuple):
            if len(v) != 2 or not isinstance(v[0], str):
                raise TypeError(f"mapping[{k!r}]: expected an NNX path or (NNX path, axes), got {v!r}")
            by_var_path[v[0].strip("/")] = (k, v[1])
        elif isinstance(v, str):
            if v.strip("/") in path_of.values():
                by_var_path[v.strip("/")] = (k, "auto")
            else:
                renames[k] = v.strip("/").split("/")
        elif v is not None:
            raise TypeError(f"mapping[{k!r}]: expected an NNX path, (NNX path, axes) or None, got {v!r}")

    rows, used, confirmed = [], set(), set()
    for mpairs, r in raw:
        nnx_paths = tuple(path_of[id(v)] for v in r["variables"])
        nsegs = [n for n, _ in mpairs]
        tsegs = [t for _, t in mpairs if t is not None]
        best = None
        for tkey, segs in renames.items():
            if nsegs[:len(segs)] == segs and (best is None or len(segs) > len(best[1])):
                best = (tkey, segs)
        if best is not None:
            depth = sum(1 for _, t in mpairs[:len(best[1])] if t is not None)
            tsegs = [best[0]] + tsegs[depth:]
            used.add(best[0])
        name = ".".join(tsegs + [r["name"]])
        if len(nnx_paths) == 1 and nnx_paths[0] in by_var_path:
            tkey, axes = by_var_path[nnx_paths[0]]
            used.add(tkey)
            name = tkey
            if axes != "auto":
                r = _perm_row(r["name"], r["variables"][0], r["kind"], None if axes is None else tuple(axes),
                              "same (mapping)" if axes is None else f"np.transpose(torch, {tuple(axes)}) (mapping)")
                confirmed.add(nnx_paths[0])
        rows.append(TorchName(torch_name=name, nnx_paths=nnx_paths, kind=r["kind"], layout=r["layout"],
                              torch_shape=tuple(r["torch_shape"]), variables=tuple(r["variables"]),
                              to_nnx=r["to_nnx"], to_torch=r["to_torch"]))
    unused = [k for k, v in mapping.items() if v is not None and k not in used]
    if unused:
        raise ValueError(f"mapping entries match no NNX Variable or module: {unused} "
                         f"(values are NNX paths such as {paths[:3]})")
    for where, kind in unsupported:
        prefix = "" if where == "<root>" else where + "/"
        todo = [p for r in rows for p in r.nnx_paths if p.startswith(prefix) and p not in confirmed]
        if todo:
            raise ValueError(
                f"{where!r} is an nnx.{kind}, which has no automatic torch mapping: give each of its Variables "
                f"{todo} in mapping= as {{'torch.name': ('nnx/path', axes)}} (axes: the np.transpose from "
                "torch's layout to NNX's; None: same layout)"
            )
    names = [r.torch_name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"several NNX Variables map to the torch names {dup}: fix them with mapping=")
    return rows


# ---------------------------------------------------------------------------------------------- helpers


def _np(x):
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        return x.detach().cpu().numpy().copy()
    return x


def _shape_error(where, got, want):
    msg = f"{where} has shape {tuple(got)}, expected torch's {tuple(want)}"
    if len(got) >= 2 and tuple(got) != tuple(want) and sorted(got) == sorted(want):
        msg += " (it looks transposed: is it already in the NNX layout? torch's state_dict is expected)"
    return ValueError(msg)


def _map_state_entry(row: TorchName, entry: dict, where: str) -> list[dict]:
    """One torch optimizer state entry -> one entry per NNX Variable of ``row``."""
    outs = [{} for _ in row.nnx_paths]
    for k, v in entry.items():
        a = _np(v)
        if isinstance(a, np.ndarray) and a.ndim > 0:
            if tuple(a.shape) != row.torch_shape:
                raise _shape_error(f"{where}: state {k!r} of {row.torch_name!r}", a.shape, row.torch_shape)
            for o, x in zip(outs, row.to_nnx(a)):
                o[k] = np.ascontiguousarray(x)
        elif isinstance(a, (np.ndarray, int, float, np.number)) or a is None:
            for o in outs:
                o[k] = copy.deepcopy(a)
        else:
            raise ValueError(f"{where}: state {k!r} of {row.torch_name!r} is a {type(a).__name__}, which cannot be "
                             "mapped to the NNX layout")
    return outs


# ---------------------------------------------------------------------------------------------- forward


class Continued(NamedTuple):
    """What :func:`continue_from_torch` returns: ``opt, sched = continue_from_torch(...)``."""

    optimizer: Any
    scheduler: Any


def continue_from_torch(model, model_state_dict: dict, optimizer_state_dict: dict | None = None,
                        scheduler_state_dict: dict | None = None, *, optimizer=None, scheduler=None,
                        optimizer_kwargs: dict | None = None, mapping: dict | None = None,
                        param_names: Sequence[str] | None = None) -> Continued:
    """Continue a torch run in ``model``: its weights, a compat optimizer and scheduler, exactly.

    ``opt, sched = continue_from_torch(model, ckpt["model"], ckpt["optimizer"], ckpt["scheduler"],
    optimizer=optim.AdamW, scheduler=lambda o: optim.lr_scheduler.StepLR(o, step_size=10))``

    Names and layouts follow :func:`torch_name_table` (``mapping`` overrides it). The torch
    weights are written into ``model`` (cast to each Variable's dtype; build the model with the
    dtype you train in); the optimizer has one group per torch group, with the saved
    hyperparameters, and the saved state with its moments in the NNX layout, so its next ``step``
    is the one torch would take.

    Args:
      model: the NNX module, built like the torch model (same attribute names or ``mapping``).
      model_state_dict: torch's ``model.state_dict()`` (tensors or numpy arrays).
      optimizer_state_dict: torch's ``optimizer.state_dict()``; ``None``: weights only.
      scheduler_state_dict: torch's ``scheduler.state_dict()`` (needs ``scheduler``).
      optimizer: the compat optimizer class (``optim.AdamW``); required with an optimizer state.
      scheduler: ``optimizer -> scheduler`` (e.g. ``functools.partial(optim.lr_scheduler.StepLR,
        step_size=10)``): built as in torch's resume order, before the loads.
      optimizer_kwargs: constructor arguments (its ``defaults``); the groups' values are torch's.
      mapping: see :func:`torch_name_table`.
      param_names: the torch name of each optimizer index, in index order, when torch's
        optimizer had several groups and was built without names (torch's state_dict then only
        has indices). By default the names in the state_dict (a torch optimizer built from
        ``named_parameters()``) are used, else, for one group, ``model.parameters()`` order.

    Everything is checked before anything changes: on error ``model`` is as before. Errors name
    the torch key and the NNX path, and say when a shape looks transposed.
    """
    if scheduler_state_dict is not None and scheduler is None:
        raise TypeError("scheduler_state_dict needs scheduler=: a function optimizer -> scheduler "
                        "(torch does not save the schedule's arguments or functions)")
    if optimizer_state_dict is not None and optimizer is None:
        raise TypeError("optimizer_state_dict needs optimizer=: the compat optimizer class (e.g. optim.AdamW)")
    ignored = {k for k, v in (mapping or {}).items() if v is None}
    table = torch_name_table(model, mapping)
    by_name = {r.torch_name: r for r in table}
    msd = {k: _np(v) for k, v in model_state_dict.items()}
    unexpected = [k for k in msd if k not in by_name and k not in ignored]
    missing = [r.torch_name for r in table if r.kind != "dropped" and r.torch_name not in msd]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append("Missing key(s) in torch's state_dict: " + ", ".join(
                f"{r.torch_name!r} (for {', '.join(r.nnx_paths)})" for r in table if r.torch_name in missing) + ".")
        if unexpected:
            parts.append("Unexpected key(s) in torch's state_dict: " + ", ".join(map(repr, unexpected)) + ".")
        raise ValueError("Error(s) in continuing from torch's state_dict:\n\t" + "\n\t".join(parts)
                         + "\n\tRename with mapping={'torch.prefix': 'nnx/path'}, or {'torch.key': None} to ignore a key"
                           " (see groupopt.compat.torch_name_table(model) for the names the model expects).")
    new_values = []  # (Variable, array): written last
    for r in table:
        if r.kind == "dropped":
            continue
        a = np.asarray(msd[r.torch_name])
        if tuple(a.shape) != r.torch_shape:
            raise _shape_error(f"model_state_dict[{r.torch_name!r}] (for {', '.join(r.nnx_paths)})", a.shape,
                               r.torch_shape)
        for var, path, x in zip(r.variables, r.nnx_paths, r.to_nnx(a)):
            old = var.get_value()
            if not np.issubdtype(a.dtype, np.floating) and np.issubdtype(np.dtype(old.dtype), np.floating):
                raise ValueError(f"model_state_dict[{r.torch_name!r}] has dtype {a.dtype}, {path!r} is {old.dtype}")
            new_values.append((var, np.asarray(x, dtype=old.dtype)))

    opt = sched = None
    if optimizer_state_dict is not None:
        converted, groups = _convert_optimizer_state(table, by_name, msd, optimizer_state_dict, param_names)
        opt = optimizer(groups, model=model, **(optimizer_kwargs or {}))
        if scheduler is not None:
            sched = scheduler(opt)
        opt.load_state_dict(converted)
        if scheduler_state_dict is not None:
            sched.load_state_dict(copy.deepcopy({k: _np(v) for k, v in scheduler_state_dict.items()}))
    elif scheduler is not None:
        raise TypeError("scheduler= needs the optimizer_state_dict (a scheduler drives an optimizer)")
    import jax.numpy as jnp

    for var, x in new_values:
        var.set_value(jnp.asarray(x))
    return Continued(opt, sched)


def _convert_optimizer_state(table, by_name, msd, optimizer_state_dict, param_names):
    """torch's optimizer state_dict -> ours (NNX names and layouts) and the groups to build."""
    osd = optimizer_state_dict
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        raise ValueError("optimizer_state_dict must be torch's optimizer.state_dict(): a dict with 'state' and "
                         "'param_groups'")
    indices = [i for g in osd["param_groups"] for i in g["params"]]
    saved_names = {}
    for g in osd["param_groups"]:
        if "param_names" in g:
            saved_names.update(zip(g["params"], g["param_names"]))
    if param_names is not None:
        if len(param_names) != len(indices):
            raise ValueError(f"param_names has {len(param_names)} names for the {len(indices)} parameters of "
                             "the optimizer state_dict")
        name_of = dict(zip(sorted(indices), param_names))
    elif saved_names:
        name_of = saved_names
    else:
        order = [k for k in msd if k in by_name and by_name[k].kind == "param"]
        if len(osd["param_groups"]) > 1:
            raise ValueError(
                f"torch's optimizer has {len(osd['param_groups'])} groups and no param_names: which index is which "
                "parameter depends on how the groups were built; pass param_names=[torch name of index 0, 1, ...] "
                "(or build the torch optimizer from model.named_parameters())"
            )
        if len(order) != len(indices):
            raise ValueError(
                f"torch's optimizer has {len(indices)} parameters, the model_state_dict {len(order)} "
                f"({order[:6]}...): pass param_names=[torch name of each optimizer index] (frozen or tied parameters)"
            )
        name_of = dict(zip(sorted(indices), order))
    bad = [n for n in name_of.values() if n not in by_name or by_name[n].kind != "param"]
    if bad:
        raise ValueError(f"optimizer parameters {bad} are not parameters of the model's torch name table")
    state = osd["state"]
    new_state, new_groups, new_names, groups = {}, [], {}, []
    nxt = 0
    for gi, g in enumerate(osd["param_groups"]):
        members, ids = [], []
        for idx in g["params"]:
            row = by_name[name_of[idx]]
            entry = state.get(idx, state.get(str(idx)))
            outs = _map_state_entry(row, entry, f"optimizer state of parameter {idx}") if entry else [None] * len(row.nnx_paths)
            for var, path, out in zip(row.variables, row.nnx_paths, outs):
                if out is not None:
                    new_state[nxt] = out
                new_names[nxt] = path
                ids.append(nxt)
                members.append(var)
                nxt += 1
        ng = {k: copy.deepcopy(_np(v)) for k, v in g.items() if k not in ("params", "param_names")}
        ng["params"] = ids
        new_groups.append(ng)
        groups.append({"params": members})
    return {"state": new_state, "param_groups": new_groups, "param_names": new_names}, groups


# ---------------------------------------------------------------------------------------------- back


class TorchStateDicts(NamedTuple):
    """What :func:`to_torch_state_dicts` returns: torch's three state dicts (torch tensors)."""

    model: dict
    optimizer: dict | None
    scheduler: dict | None


def to_torch_state_dicts(model, optimizer=None, scheduler=None, *, mapping: dict | None = None,
                         like: dict | Sequence[str] | None = None) -> TorchStateDicts:
    """A JAX run (NNX model, compat optimizer, scheduler) as torch's ``state_dict``s, to continue in torch.

    ``model``: torch names and layouts (:func:`torch_name_table`), tensors; ``torch_model.load_state_dict``
    takes it (``num_batches_tracked`` is not written: torch's load keeps the module's own).
    ``optimizer``: torch's format with the moments in torch's layout and, in each group, the
    parameters in torch's registration order (torch loads by position: build the torch optimizer
    with the same groups, each listing its parameters in ``model.parameters()`` order). Without
    ``like``, the order is the NNX modules' attribute order, which NNX transforms may re-sort.
    ``scheduler``: its ``state_dict()`` (the compat schedulers keep torch's attributes).

    Args:
      like: torch's ``model.state_dict()`` (or its keys): the names are checked against it
        (missing/unexpected/shape) and its order is used. Recommended.
      mapping: see :func:`torch_name_table`.
    """
    torch = import_torch("to_torch_state_dicts")

    table = torch_name_table(model, mapping)
    rows = [r for r in table if r.kind != "dropped"]
    if like is not None:
        like_keys = list(like.keys()) if isinstance(like, dict) else list(like)
        have = {r.torch_name for r in table}
        missing = [k for k in like_keys if k not in have and not k.endswith("num_batches_tracked")]
        unexpected = [r.torch_name for r in rows if r.torch_name not in set(like_keys)]
        if missing or unexpected:
            raise ValueError(f"the NNX model's torch names differ from like=: missing {missing}, unexpected {unexpected} "
                             "(rename with mapping=)")
        if isinstance(like, dict):
            for r in rows:
                s = tuple(np.shape(_np(like[r.torch_name])))
                if s != r.torch_shape:
                    raise _shape_error(f"{r.torch_name!r} (from {', '.join(r.nnx_paths)})", r.torch_shape, s)
        pos = {k: i for i, k in enumerate(like_keys)}
        rows.sort(key=lambda r: pos[r.torch_name])
    msd = {}
    for r in rows:
        msd[r.torch_name] = torch.from_numpy(np.array(r.to_torch(tuple(np.asarray(v.get_value())
                                                                                   for v in r.variables))))
    osd = None
    if optimizer is not None:
        osd = to_torch(_export_optimizer(rows, optimizer))
    ssd = None if scheduler is None else copy.deepcopy(scheduler.state_dict())
    return TorchStateDicts(msd, osd, ssd)


def _export_optimizer(rows, optimizer) -> dict:
    sd = optimizer.state_dict()
    names = sd.get("param_names")
    if not names:
        raise ValueError("the optimizer does not know its parameters' paths: build it with model=<the NNX model> "
                         "(or the model itself as params)")
    row_of = {}
    for k, r in enumerate(rows):
        for j, p in enumerate(r.nnx_paths):
            row_of[p] = (k, j)
    state, groups, nxt = {}, [], 0
    for gi, g in enumerate(sd["param_groups"]):
        got: dict[int, dict] = {}
        for idx in g["params"]:
            path = names.get(idx)
            if path not in row_of:
                raise ValueError(f"optimizer parameter {path!r} has no torch name (not an nnx.Param of the model)")
            k, j = row_of[path]
            got.setdefault(k, {})[j] = sd["state"].get(idx)
        ids = []
        for k in sorted(got):
            r = rows[k]
            parts = got[k]
            if len(parts) != len(r.nnx_paths):
                absent = [p for j, p in enumerate(r.nnx_paths) if j not in parts]
                raise ValueError(f"{r.torch_name!r} is one torch parameter made of {list(r.nnx_paths)}: they must be "
                                 f"in one optimizer group (group {gi} lacks {absent})")
            entries = [parts[j] for j in range(len(r.nnx_paths))]
            if any(e for e in entries):
                if not all(e for e in entries) or len({tuple(sorted(e)) for e in entries}) != 1:
                    raise ValueError(f"{r.torch_name!r}: its parts {list(r.nnx_paths)} have different optimizer state "
                                     "(some have none, or other keys)")
                out = {}
                for key in entries[0]:
                    vals = [e[key] for e in entries]
                    if isinstance(vals[0], np.ndarray) and vals[0].ndim > 0:
                        out[key] = np.ascontiguousarray(r.to_torch(tuple(vals)))
                    else:
                        if any(not np.array_equal(np.asarray(v), np.asarray(vals[0])) for v in vals[1:]):
                            raise ValueError(f"{r.torch_name!r}: its parts {list(r.nnx_paths)} have different {key!r} "
                                             f"({[np.asarray(v).tolist() for v in vals]}); torch keeps one")
                        out[key] = vals[0]
                state[nxt] = out
            ids.append(nxt)
            nxt += 1
        ng = {key: copy.deepcopy(v) for key, v in g.items() if key not in ("params", "param_names")}
        ng["params"] = ids
        groups.append(ng)
    return {"state": state, "param_groups": groups}
