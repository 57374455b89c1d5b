"""Linear probe: the backbone frozen, only the classifier head(s) trained; a baseline for the LoRA methods."""

from __future__ import annotations

from torch import nn

from models import TaskIncrementalClassifier, find_head

from .base import MethodStrategy
from .recipe import TrainingRecipe

__all__ = ["LinearProbe", "freeze_backbone"]


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Every parameter of ``model`` frozen except its classifier: the per-task heads of a
    :class:`~models.TaskIncrementalClassifier` (and the heads Avalanche adds later), else the head found by
    :func:`~models.inject.find_head`. Raises ``ValueError`` when the model has no head."""
    if isinstance(model, TaskIncrementalClassifier):
        model.backbone.requires_grad_(False)
        return model
    found = find_head(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head to train; a linear probe needs one.")
    model.requires_grad_(False)
    found[1].requires_grad_(True)
    return model


class LinearProbe(MethodStrategy):
    """The pretrained features frozen (BatchNorm in eval mode with weights: ``--bn auto``), the classifier trained
    with cross-entropy on each experience in turn: what the frozen features alone give. Default recipe: SGD 0.01,
    momentum 0.9 (the fine-tuning baseline's)."""

    name = "linear_probe"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="the fine-tuning recipe")
    plugin_class = None

    def __init__(self, *, model: nn.Module, **base_kwargs):
        super().__init__(method_plugin=None, model=freeze_backbone(model), **base_kwargs)
