"""Continual-learning methods as Avalanche plugins (``XPlugin``) with thin ``SupervisedTemplate`` strategies."""

from .base import *  # noqa: F401,F403
from .base import __all__ as _base_all
from .batchnorm import *  # noqa: F401,F403
from .batchnorm import __all__ as _bn_all
from .codyra import *  # noqa: F401,F403
from .codyra import __all__ as _codyra_all
from .eblora import *  # noqa: F401,F403
from .eblora import __all__ as _eblora_all
from .guards import *  # noqa: F401,F403
from .guards import __all__ as _guards_all
from .merge_lora import *  # noqa: F401,F403
from .merge_lora import __all__ as _merge_all
from .per_task_lora import *  # noqa: F401,F403
from .per_task_lora import __all__ as _per_task_all
from .hide_lora import *  # noqa: F401,F403
from .hide_lora import __all__ as _hide_all
from .inflora import *  # noqa: F401,F403
from .inflora import __all__ as _inflora_all
from .o_lora import *  # noqa: F401,F403
from .o_lora import __all__ as _olora_all
from .sd_lora import *  # noqa: F401,F403
from .sd_lora import __all__ as _sdlora_all
from .metrics import *  # noqa: F401,F403
from .metrics import __all__ as _metrics_all

__all__ = [*_base_all, *_bn_all, *_guards_all, *_merge_all, *_metrics_all, *_per_task_all, *_codyra_all, *_eblora_all,
           *_hide_all, *_inflora_all, *_olora_all, *_sdlora_all]
