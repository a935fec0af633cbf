"""Schedules: pure, jit-able ``count -> value`` functions, one formula per family.

Each family's formula lives in exactly one place and is used both by the pure
schedule (inside ``jit``, per group) and by the torch-style scheduler in
:mod:`groupopt.compat.lr_scheduler` (on the host, in float64).
"""

from .basic import *  # noqa: F401,F403
from .basic import __all__ as _basic_all
from .cyclic import *  # noqa: F401,F403
from .cyclic import __all__ as _cyclic_all
from .compose import *  # noqa: F401,F403
from .compose import __all__ as _compose_all
from .warmup import *  # noqa: F401,F403
from .warmup import __all__ as _warmup_all

__all__ = list(_basic_all)
__all__ += list(_cyclic_all)
__all__ += list(_compose_all)
__all__ += list(_warmup_all)
