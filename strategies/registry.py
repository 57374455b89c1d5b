"""The methods by name, and their options read from the strategies themselves.

Every :class:`~strategies.base.MethodStrategy` subclass with a ``name`` is a method. Its options are the keyword-only
parameters of its constructor beyond the template's (``model``, ``optimizer``, ...), with their defaults, types
(``Literal`` gives choices) and the ``:param:`` lines of its plugin's and its own docstring as help. So
``experiments.run`` builds one option group per method and applies each method's own defaults: a new method is one
file in ``strategies/`` (a strategy with ``name``, ``recipe`` and ``plugin_class``) plus a config.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from .base import MethodStrategy

__all__ = ["MethodOption", "method_registry", "method_options", "param_docs", "LORA_OPTIONS", "TEMPLATE_OPTIONS"]

# options every LoRA method may take; the CLI has one flag for each, their defaults still the method's own
LORA_OPTIONS = ("r", "alpha", "dropout", "conv_mode", "rslora", "target_modules", "exclude_modules",
                "trainable_modules")
TEMPLATE_OPTIONS = tuple(inspect.signature(MethodStrategy.__init__).parameters) + (
    "self", "base_kwargs", "plugins", "evaluator")


@dataclass(frozen=True)
class MethodOption:
    """One keyword of a method's strategy: ``type`` is ``bool``, ``int``, ``float`` or ``str`` (``None`` for
    values the CLI cannot express), ``choices`` from a ``Literal`` annotation."""

    name: str
    default: Any
    type: Optional[type]
    choices: Optional[tuple]
    help: str


def method_registry() -> dict[str, type]:
    """``{name: strategy class}`` of every method (subclasses of :class:`MethodStrategy` with a ``name``)."""
    out: dict[str, type] = {}
    stack = list(MethodStrategy.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name:
            if cls.name in out and out[cls.name] is not cls:
                raise RuntimeError(f"Two strategies are named {cls.name!r}: {out[cls.name]} and {cls}.")
            out[cls.name] = cls
    return dict(sorted(out.items()))


def param_docs(*docs: Optional[str]) -> dict[str, str]:
    """``{parameter: text}`` from reST ``:param a, b: text`` lines (the first docstring that documents a name
    wins)."""
    out: dict[str, str] = {}
    for doc in docs:
        for names, text in re.findall(r":param ([\w, ]+):(.*?)(?=\n\s*:\w|\n\s*\n|\Z)", doc or "", re.S):
            text = " ".join(text.split())
            for n in names.split(","):
                out.setdefault(n.strip(), text)
    return out


def _cli_type(hint) -> tuple[Optional[type], Optional[tuple]]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        rest = [a for a in args if a is not type(None)]
        return _cli_type(rest[0]) if len(rest) == 1 else (None, None)
    if origin is Literal:
        return type(args[0]), tuple(args)
    if hint in (bool, int, float, str):
        return hint, None
    return None, None


def method_options(cls: type) -> dict[str, MethodOption]:
    """The options of method strategy ``cls`` (shared LoRA options included, template arguments not)."""
    hints = typing.get_type_hints(cls.__init__)
    plugin = getattr(cls, "plugin_class", None)
    docs = param_docs(cls.__doc__, plugin.__doc__ if plugin else None)
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in TEMPLATE_OPTIONS or p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        typ, choices = _cli_type(hints.get(name))
        if typ is None and p.default is not None and type(p.default) in (bool, int, float, str):
            typ = type(p.default)
        out[name] = MethodOption(name, p.default, typ, choices, docs.get(name, ""))
    return out
