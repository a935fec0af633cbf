"""Where optimizer state lives on a device mesh.

By default every per-leaf state array is created with ``zeros_like(param)``,
which gives it exactly its parameter's sharding (no single-device
materialization), and the per-group scalars (step counts, hyperparameters) are
replicated over the parameters' mesh. A *state-sharding function*
``(path, param) -> Sharding | None`` overrides the per-leaf placement; the
jitted update then constrains the new state to it, so it stays there.

:func:`zero1` is the ZeRO-1 layout: parameters replicated (or model-sharded)
along the data axis, optimizer state additionally sharded along it, which
divides per-device state memory by the data-axis size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["zero1", "replicated", "constrain", "explicit", "fit", "leaf_shardings", "state_bytes_per_device", "state_bytes_per_process"]

StateSharding = Callable[[str, jax.Array], "jax.sharding.Sharding | None"]


def replicated(leaves: Sequence) -> NamedSharding | None:
    """A fully replicated sharding on the mesh of the first NamedSharding-placed leaf, if any."""
    for leaf in leaves:
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding):
            return NamedSharding(s.mesh, PartitionSpec())
    return None


def zero1(axis: str = "data") -> StateSharding:
    """ZeRO-1: shard each state array along mesh axis ``axis`` on its first dimension that is not
    already sharded and whose size the axis divides; leaves that cannot be split keep their
    parameter's sharding."""

    def fn(path: str, param) -> NamedSharding | None:
        s = getattr(param, "sharding", None)
        if not isinstance(s, NamedSharding):
            return None
        size = s.mesh.shape[axis]
        spec = list(s.spec) + [None] * (param.ndim - len(s.spec))
        used = {a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))}
        if axis in used:
            return s
        for d, entry in enumerate(spec):
            if entry is None and param.shape[d] % size == 0:
                spec[d] = axis
                return NamedSharding(s.mesh, PartitionSpec(*spec))
        return s

    return fn


def fit(sharding, shape):
    """``sharding`` (a parameter's, or its state's) adapted to an array of ``shape`` derived from it.

    State that is not shaped like its parameter (Adafactor's row/column factors ``(..., m, 1)`` /
    ``(..., 1, n)``, an empty placeholder) keeps the parameter's mesh axes on every dimension
    that still divides by them and is replicated along the others; an array of another rank is
    replicated on the mesh. A sharding that already fits (state shaped like its parameter) is
    returned as it is; ``None`` and non-named shardings are returned unchanged.
    """
    if not isinstance(sharding, NamedSharding):
        return sharding
    mesh, spec = sharding.mesh, tuple(sharding.spec)
    if len(spec) > len(shape):
        if any(e is not None for e in spec[len(shape):]):
            return NamedSharding(mesh, PartitionSpec())
        spec = spec[: len(shape)]

    def size(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        n = 1
        for a in names:
            n *= mesh.shape[a]
        return n

    new = tuple(e if e is None or (shape[d] % size(e) == 0 and shape[d] > 0) else None for d, e in enumerate(spec))
    if new == tuple(sharding.spec):
        return sharding
    return NamedSharding(mesh, PartitionSpec(*new))


def constrain(x, sharding):
    """Pin ``x`` (inside jit) to ``sharding``: ``reshard`` on meshes with Explicit axes, else a constraint.

    ``sharding`` is first :func:`fit` to ``x``'s shape (state not shaped like its parameter)."""
    sharding = fit(sharding, x.shape)
    if explicit(sharding):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def explicit(sharding) -> bool:
    """Whether ``sharding`` lies on a mesh with Explicit axes (shardings part of the types: ``reshard``,
    and operands of one select sharded alike) rather than Auto ones (constraints, XLA decides)."""
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    return any(t == jax.sharding.AxisType.Explicit for t in types)


def leaf_shardings(fn: StateSharding | None, paths: Sequence[str], leaves: Sequence) -> list | None:
    """Per leaf ``(state_sharding, param_sharding)`` from a state-sharding function, or None.

    The parameter's own sharding is recorded too, so the update can keep the new
    parameter where it was while its state lives elsewhere (ZeRO-1)."""
    if fn is None:
        return None
    return [(fn(p, leaf), getattr(leaf, "sharding", None)) for p, leaf in zip(paths, leaves)]


def state_bytes_per_device(tree) -> dict:
    """Bytes of ``tree``'s arrays held by each device: ``{device: bytes}``."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", []):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def state_bytes_per_process(tree) -> int:
    """Bytes of ``tree``'s arrays held by this process (its devices' shards; with several processes each
    holds only the shards of its own devices)."""
    local = set(jax.local_devices())
    return sum(b for d, b in state_bytes_per_device(tree).items() if d in local)
