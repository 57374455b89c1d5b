"""LoRA layers, injection by name, merge/unmerge, adapter state dicts, parameter accounting, backbones."""

from .backbones import *  # noqa: F401,F403
from .backbones import __all__ as _backbones_all
from .gate_lora import *  # noqa: F401,F403
from .gate_lora import __all__ as _gate_all
from .heads import *  # noqa: F401,F403
from .heads import __all__ as _heads_all
from .inject import *  # noqa: F401,F403
from .inject import __all__ as _inject_all
from .lora import *  # noqa: F401,F403
from .lora import __all__ as _lora_all
from .stiefel_lora import *  # noqa: F401,F403
from .stiefel_lora import __all__ as _stiefel_all
from .sum_lora import *  # noqa: F401,F403
from .sum_lora import __all__ as _sum_all
from .task_lora import *  # noqa: F401,F403
from .task_lora import __all__ as _task_all

__all__ = [*_lora_all, *_inject_all, *_backbones_all, *_heads_all, *_task_all, *_gate_all, *_stiefel_all,
           *_sum_all]
