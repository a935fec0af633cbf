"""Moving optimizer state between groupopt and real ``torch.optim``.

torch is optional at runtime: it is imported here only, inside the functions.

* ``Optimizer.load_state_dict`` accepts a dict from ``torch.optim.X.state_dict()``
  directly (tensors inside are converted).
* :func:`to_torch` turns our ``state_dict()`` into one that
  ``torch.optim.X.load_state_dict`` accepts (tensors; ``step`` a 0-d float32
  tensor, as torch keeps it).
* :func:`load_torch_checkpoint` reads a ``torch.save``d file with
  ``weights_only=True`` and returns numpy arrays.

Without torch, each of them raises an ``ImportError`` that says how to install it
(:func:`import_torch`).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

__all__ = ["to_torch", "to_numpy", "load_torch_checkpoint", "import_torch", "tensor_to_numpy", "TORCH_REQUIREMENT"]

TORCH_REQUIREMENT = "torch==2.13.0"
"""The torch these functions are tested with (the pin of the ``test`` extra; the CPU wheel is enough)."""


def import_torch(what: str):
    """``import torch`` for ``what`` (a function's name); without torch, an ``ImportError`` that says
    what needs it and how to install it (instead of a bare ``ModuleNotFoundError``)."""
    try:
        import torch
    except ImportError as e:  # not installed (or sys.modules["torch"] = None)
        raise ImportError(
            f"{what} needs PyTorch, which is not installed: pip install {TORCH_REQUIREMENT} "
            f"(or pip install 'groupopt[test]', which pins it)"
        ) from e
    return torch


def tensor_to_numpy(v):
    """A torch tensor as a numpy copy (never aliasing the tensor's memory); anything else unchanged."""
    if hasattr(v, "detach") and hasattr(v, "numpy"):
        return v.detach().cpu().numpy().copy()
    return v


def _map_arrays(obj, fn):
    if isinstance(obj, dict):
        return {k: _map_arrays(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_arrays(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_arrays(v, fn) for v in obj)
    return fn(obj)


def to_torch(state_dict: dict) -> dict:
    """Our ``state_dict()`` with every array in ``state`` as a torch tensor (``step``: a 0-d tensor of
    torch's scalar dtype, its default dtype, as torch's own optimizers create it).

    Arrays inside lists (LBFGS's ``old_dirs``, ``ro``, ...) are converted too;
    Python numbers and ``None`` stay as they are, as torch keeps them.
    """
    torch = import_torch("to_torch")

    def conv(v):
        if isinstance(v, np.ndarray) or hasattr(v, "__array__") and not isinstance(v, (int, float, bool, str)):
            return torch.from_numpy(np.array(v, copy=True))
        return v

    state = {}
    for idx, entry in state_dict["state"].items():
        out = {}
        for k, v in entry.items():
            t = _map_arrays(v, conv)  # lists too (LBFGS's history), None kept
            if k == "step" and isinstance(t, torch.Tensor):
                t = t.to(torch.get_default_dtype())
            out[k] = t
        state[idx] = out
    return {"state": state, "param_groups": copy.deepcopy(state_dict["param_groups"])}


def to_numpy(state_dict: dict) -> dict:
    """A torch optimizer ``state_dict`` with its tensors turned into numpy arrays (a copy)."""
    return {"state": _map_arrays(state_dict["state"], tensor_to_numpy),
            "param_groups": _map_arrays(state_dict["param_groups"], tensor_to_numpy)}


def load_torch_checkpoint(path: str | os.PathLike, key: str | None = None) -> Any:
    """Read a ``torch.save``d checkpoint safely (``weights_only=True``), tensors as numpy arrays.

    ``key`` picks one entry of a dict checkpoint (e.g. ``"optimizer"``).
    """
    torch = import_torch("load_torch_checkpoint")

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise KeyError(f"checkpoint {os.fspath(path)!r} has no entry {key!r} (it has {have})")
        obj = obj[key]
    return _map_arrays(obj, tensor_to_numpy)
