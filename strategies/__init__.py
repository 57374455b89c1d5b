"""Continual-learning methods as Avalanche plugins (``XPlugin``) with thin ``SupervisedTemplate`` strategies.

Every module of this package is imported and its ``__all__`` re-exported, so a new method is one new file here
(it then appears in :func:`~strategies.registry.method_registry` and in ``experiments.run --method``).
"""

import importlib as _importlib
import pkgutil as _pkgutil

__all__: list = []
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
del _info, _module, _name
