"""torch.optim's optimizer hooks: step pre/post hooks (per optimizer and global), state_dict and
load_state_dict pre/post hooks, each returning a handle with ``.remove()``.

Order, as in torch: global step pre-hooks, the optimizer's pre-hooks, ``step``, the optimizer's
post-hooks, global post-hooks. A step pre-hook may return ``(new_args, new_kwargs)`` (``args``
starts with the optimizer itself, as torch passes it); anything else but ``None`` is a
``RuntimeError``. Hooks run once per call, also when a subclass's method calls its parent's.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections import OrderedDict
from itertools import chain
from typing import Callable

__all__ = ["RemovableHandle", "register_optimizer_step_pre_hook", "register_optimizer_step_post_hook"]

_global_optimizer_pre_hooks: OrderedDict = OrderedDict()
_global_optimizer_post_hooks: OrderedDict = OrderedDict()


class RemovableHandle:
    """Removes the hook it was returned for (torch's ``RemovableHandle``)."""

    _ids = itertools.count()

    def __init__(self, hooks: OrderedDict):
        self._hooks = weakref.ref(hooks)
        self.id = next(RemovableHandle._ids)

    def remove(self) -> None:
        hooks = self._hooks()
        if hooks is not None and self.id in hooks:
            del hooks[self.id]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def add_hook(hooks: OrderedDict, hook: Callable, prepend: bool = False) -> RemovableHandle:
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


def register_optimizer_step_pre_hook(hook: Callable) -> RemovableHandle:
    """A step pre-hook for every optimizer: ``hook(optimizer, args, kwargs) -> None | (args, kwargs)``."""
    return add_hook(_global_optimizer_pre_hooks, hook)


def register_optimizer_step_post_hook(hook: Callable) -> RemovableHandle:
    """A step post-hook for every optimizer: ``hook(optimizer, args, kwargs)``."""
    return add_hook(_global_optimizer_post_hooks, hook)


def _outermost(kind: str):
    """Run the wrapped hooks only for the outermost call of ``kind`` on an instance."""

    def deco(wrapper_body):
        def make(func):
            @functools.wraps(func)
            def wrapper(self, *args, **kwargs):
                depth = self.__dict__.setdefault("_hook_depth", {})
                if depth.get(kind):
                    return func(self, *args, **kwargs)
                depth[kind] = True
                try:
                    return wrapper_body(func, self, args, kwargs)
                finally:
                    depth[kind] = False

            wrapper._groupopt_hooked = True
            return wrapper

        return make

    return deco


@_outermost("step")
def _step_with_hooks(func, self, args, kwargs):
    args = (self, *args)
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = func(*args, **kwargs)
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


@_outermost("state_dict")
def _state_dict_with_hooks(func, self, args, kwargs):
    for pre_hook in self._optimizer_state_dict_pre_hooks.values():
        pre_hook(self)
    state_dict = func(self, *args, **kwargs)
    for post_hook in self._optimizer_state_dict_post_hooks.values():
        result = post_hook(self, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


@_outermost("load_state_dict")
def _load_state_dict_with_hooks(func, self, args, kwargs):
    state_dict, *rest = args
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()
    for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(self, state_dict)
        if result is not None:
            state_dict = result
    out = func(self, state_dict, *rest, **kwargs)
    for post_hook in self._optimizer_load_state_dict_post_hooks.values():
        post_hook(self)
    return out


HOOKED = {"step": _step_with_hooks, "state_dict": _state_dict_with_hooks, "load_state_dict": _load_state_dict_with_hooks}


def wrap_class(cls) -> None:
    """Give ``cls``'s own ``step`` / ``state_dict`` / ``load_state_dict`` torch's hook calls."""
    for name, wrap in HOOKED.items():
        fn = cls.__dict__.get(name)
        if fn is not None and not getattr(fn, "_groupopt_hooked", False):
            setattr(cls, name, wrap(fn))
