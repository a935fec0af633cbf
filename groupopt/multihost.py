"""Host-side agreement across JAX processes (``jax.distributed``): the same optimizer everywhere, or an error.

With several processes (one per host), every process runs the same Python program and must take
the same host-side decisions: the optimizer's groups and options, hyperparameter values,
scheduler steps, what is checkpointed. JAX checks few of them (``jax.device_put`` of a host value
onto a multi-process sharding compares it, in a collective a process on another path never joins).
A hyperparameter that reaches a jitted step from the host as an argument becomes a "replicated"
array whose copies silently differ between processes (a scheduler stepped on process 0 only, a ``ReduceLROnPlateau`` fed a per-process
metric); a host branch taken by one process only leaves the others waiting forever in the next
collective.

groupopt therefore compares a fingerprint of its host-side configuration across processes at
fixed points of the program -- when a compat step compiles and every ``check_every`` steps
(hyperparameter values, step count), when a core transformation's update is traced (groups,
members, shapes), at each compat ``ReduceLROnPlateau`` step (the metric), at
:meth:`~groupopt.checkpoint.Checkpointer.save` / ``restore`` and at
:func:`~groupopt.set_hyperparams` -- through the ``jax.distributed`` coordination service (host
only: no device work, no wait for the devices). When they differ, every process raises
:class:`ProcessDisagreement` naming what differs, before anything changes. A process that never
reaches a check point (it took another path) makes the others raise after ``timeout_s`` seconds
instead of hanging.

With one process every check returns at once. ``configure(check_every=0)`` keeps only the
checks at compilation, checkpoints and explicit calls; ``configure(enabled=False)`` turns all off.
:func:`agree` is public: call it on your own host-side decisions (a data-loader seed, an epoch
count) to get the same guarantee.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
from typing import Any

import jax

__all__ = ["ProcessDisagreement", "agree", "configure", "configured", "settings", "fingerprint", "active", "canonical",
           "checks_made"]


class ProcessDisagreement(RuntimeError):
    """The processes of a multi-process run disagree on host-side state (or took different paths)."""


@dataclasses.dataclass
class Settings:
    enabled: bool = True
    timeout_s: float = float(os.environ.get("GROUPOPT_AGREE_TIMEOUT", "300"))  # as Orbax's own barriers
    check_every: int = 1  # compat: hyperparameters compared every n steps (0: only when a step compiles)


_settings = Settings()
_seq = 0  # checks made by this process: the same sequence on every process of a well-formed run


def settings() -> Settings:
    """The current settings (a copy)."""
    return dataclasses.replace(_settings)


def configure(*, enabled: bool | None = None, timeout_s: float | None = None, check_every: int | None = None) -> Settings:
    """Change the checks' settings on this process (set them identically on every process); returns the previous ones.

    ``timeout_s``: how long a check waits for the other processes (default 300 s, or the
    ``GROUPOPT_AGREE_TIMEOUT`` environment variable); ``check_every``: a compat optimizer compares
    hyperparameter values every ``n`` steps (default 1; 0: only when its step compiles).
    """
    global _settings
    before = settings()
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 0):
        raise ValueError(f"check_every must be a non-negative int, got {check_every!r}")
    _settings = dataclasses.replace(
        _settings, **{k: v for k, v in dict(enabled=enabled, timeout_s=timeout_s, check_every=check_every).items()
                      if v is not None})
    return before


@contextlib.contextmanager
def configured(**kwargs):
    """:func:`configure` for a ``with`` block."""
    before = configure(**kwargs)
    try:
        yield
    finally:
        configure(enabled=before.enabled, timeout_s=before.timeout_s, check_every=before.check_every)


def checks_made() -> int:
    """How many checks this process has made (the same number on every process of a well-formed run)."""
    return _seq


def active() -> bool:
    """Whether checks run: several processes and checks enabled."""
    return _settings.enabled and jax.process_count() > 1


def _client():
    """The ``jax.distributed`` coordination-service client (Orbax uses the same one), or None."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - a JAX without it: nothing to check with
        return None
    return distributed.global_state.client


@functools.lru_cache(maxsize=1)
def _warn_unchecked() -> None:
    warnings.warn("groupopt.multihost: several JAX processes but no jax.distributed coordination client: "
                  "host-side state is not compared across processes", RuntimeWarning, stacklevel=3)


def canonical(x: Any) -> Any:
    """``x`` as JSON-able data that is the same on every process: no object addresses, exact floats.

    Numbers stay numbers (floats exact, non-finite ones as strings), arrays become lists,
    tuples lists, dict keys strings, dataclasses dicts of their fields, functions and classes
    their qualified names; anything else is its type's qualified name.
    """
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, dict):
        return {str(k): canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [canonical(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"__class__": type(x).__qualname__, **{f.name: canonical(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, jax.core.Tracer):
        try:
            import numpy as np

            return {"dtype": str(x.dtype), "value": canonical(np.asarray(x).tolist())}
        except Exception:  # a global array not fully addressable here: its shape and dtype
            return {"dtype": str(x.dtype), "shape": list(x.shape)}
    if isinstance(x, jax.core.Tracer):
        return {"traced": str(x.dtype), "shape": list(x.shape)}
    if callable(x) and hasattr(x, "__qualname__"):  # a function (a schedule) or a class: its name, not its address
        return f"{getattr(x, '__module__', '')}.{x.__qualname__}"
    return type(x).__qualname__


def fingerprint(config: Any) -> str:
    """A digest of :func:`canonical` ``config``."""
    return hashlib.sha256(json.dumps(canonical(config), sort_keys=True).encode()).hexdigest()


def _flat(x, prefix: str = "") -> dict:
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: x}


def _differences(ours: dict, theirs: dict, us: int, them: int, limit: int = 6) -> str:
    a, b = _flat(ours), _flat(theirs)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    lines = [f"  {k}: {b.get(k, '<absent>')!r} on process {them}, {a.get(k, '<absent>')!r} on process {us}"
             for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"  ... and {len(keys) - limit} more")
    return "\n".join(lines)


_HINT = ("Every process must make the same host-side calls with the same values: look for a scheduler "
         "stepped on some processes only, a ReduceLROnPlateau fed a per-process metric (pass the global loss "
         "the jitted step returns), a branch on jax.process_index() around optimizer calls, or a file read "
         "that differs between hosts.")


def agree(label: str, config: Any = None) -> None:
    """Check that every process reaches this point with the same ``label`` and ``config``.

    ``config`` is any data (see :func:`canonical`). Every process must call :func:`agree` the
    same number of times in the same order; with one process (or checks disabled) it returns at
    once. Raises :class:`ProcessDisagreement` on every process when the configs or labels
    differ, naming the differences, and when some process does not arrive within ``timeout_s``.
    """
    global _seq
    if not active():
        return
    client = _client()
    if client is None:  # several processes without jax.distributed's client (e.g. a Pathways proxy)
        _warn_unchecked()
        return
    _seq += 1
    seq, pid, n = _seq, jax.process_index(), jax.process_count()
    ns = f"groupopt/agree/{seq}"
    timeout_ms = int(_settings.timeout_s * 1000)
    payload = json.dumps({"label": label, "config": canonical(config)}, sort_keys=True)
    mine = json.loads(payload)["config"]  # as the others read it
    where = f"check #{seq} ({label!r})"
    client.key_value_set(f"{ns}/{pid}", payload)
    if pid != 0:
        try:
            ref = json.loads(client.blocking_key_value_get(f"{ns}/0", timeout_ms))
        except Exception as e:
            raise ProcessDisagreement(
                f"groupopt: process 0 did not reach {where} within {_settings.timeout_s:g} s (this is process {pid}): "
                f"the processes took different paths, or process 0 is stuck or gone. {_HINT}") from e
        if ref["label"] != label:
            client.key_value_set(f"{ns}/bad/{pid}", f"process 0 is at {ref['label']!r}, process {pid} at {label!r}")
        elif ref["config"] != mine:
            client.key_value_set(f"{ns}/bad/{pid}", f"process {pid} differs from process 0:\n"
                                 + _differences(mine, ref["config"], pid, 0))
    try:
        client.wait_at_barrier(f"{ns}/done", timeout_ms)
    except Exception as e:
        arrived = _arrived(client, ns, n)
        missing = [p for p in range(n) if p not in arrived]
        raise ProcessDisagreement(
            f"groupopt: processes {missing or '(unknown)'} did not reach {where} within {_settings.timeout_s:g} s "
            f"(this is process {pid}): the processes took different paths, or those are stuck or gone. {_HINT}"
        ) from e
    bad = sorted(_dir_get(client, f"{ns}/bad/"))
    if pid == 0 and seq > 1:  # everyone has passed the previous check: its keys go (one call, a directory)
        with contextlib.suppress(Exception):
            client.key_value_delete(f"groupopt/agree/{seq - 1}")
    if bad:
        details = "\n".join(v for _, v in bad)
        raise ProcessDisagreement(f"groupopt: the processes disagree at {where}:\n{details}\n{_HINT} Nothing was changed.")


def _dir_get(client, prefix: str) -> list:
    try:
        return list(client.key_value_dir_get(prefix))
    except Exception:
        return []


def _arrived(client, ns: str, n: int) -> set:
    out = set()
    for key, _ in _dir_get(client, f"{ns}/"):
        tail = key.rsplit("/", 1)[-1]
        if tail.isdigit() and "/bad/" not in key:
            out.add(int(tail))
    return out
