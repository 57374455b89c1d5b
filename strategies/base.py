"""The shared shape of our thin strategies: ``SupervisedTemplate`` with the method's plugin first."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

__all__ = ["MethodStrategy"]


class MethodStrategy(SupervisedTemplate):
    """``SupervisedTemplate`` whose plugin list starts with ``method_plugin`` (kept as ``self.method_plugin``).

    Subclasses build their plugin from their own keyword-only options and pass the template's arguments through.
    ``eval_mb_size=None`` means ``train_mb_size``, as in Avalanche's ``Naive``.
    """

    def __init__(
        self,
        *,
        method_plugin: SupervisedPlugin,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device="cpu",
        plugins: Optional[Sequence[SupervisedPlugin]] = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        **base_kwargs,
    ):
        self.method_plugin = method_plugin
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=train_mb_size if eval_mb_size is None else eval_mb_size,
            device=device,
            plugins=[method_plugin] + list(plugins or []),
            evaluator=evaluator,
            eval_every=eval_every,
            **base_kwargs,
        )
