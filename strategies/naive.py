"""Fine-tuning: Avalanche's ``Naive`` strategy (every weight trains, nothing protects earlier tasks), the lower
reference for every method."""

from __future__ import annotations

from torch import nn

from .base import MethodStrategy
from .recipe import TrainingRecipe

__all__ = ["FineTuning"]


class FineTuning(MethodStrategy):
    """Naive fine-tuning of the whole model (Avalanche's ``Naive``), with a fresh optimizer per experience like the
    methods. Default recipe: SGD, lr 0.01, momentum 0.9, constant (no method to follow; the usual CIFAR choice).
    The remaining parameters are those of :class:`~strategies.base.MethodStrategy`.
    """

    name = "naive"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="Avalanche Naive; SGD defaults")
    plugin_class = None

    def __init__(self, *, model: nn.Module, **base_kwargs):
        super().__init__(method_plugin=None, model=model, **base_kwargs)
