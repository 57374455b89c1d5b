"""Learning without Forgetting: Avalanche's ``LwFPlugin`` as a ``--method``, a baseline for the LoRA methods."""

from __future__ import annotations

from avalanche.training.plugins import LwFPlugin
from torch import nn

from .base import MethodStrategy
from .recipe import TrainingRecipe

__all__ = ["LwF", "CountedLwFPlugin"]


class CountedLwFPlugin(LwFPlugin):
    """Avalanche's ``LwFPlugin`` that also reports what it stores: a frozen copy of the model after the last
    experience (the distillation teacher), on top of the model."""

    def parameter_report(self, model: nn.Module) -> dict:
        total = sum(p.numel() for p in model.parameters())
        teacher = getattr(self.lwf, "prev_model", None)
        kept = 0 if teacher is None else sum(p.numel() for p in teacher.parameters())
        return dict(stored=total + kept, inference=total)


class LwF(MethodStrategy):
    """Fine-tuning of every weight with a distillation loss towards the model of the previous experience on the
    current data (Avalanche's ``LwFPlugin``; Li & Hoiem, "Learning without Forgetting", TPAMI 2017). Default
    recipe: the fine-tuning baseline's (SGD 0.01, momentum 0.9), a fresh optimizer per experience.

    :param lwf_alpha: weight of the distillation loss.
    :param temperature: softmax temperature of the distillation.
    """

    name = "lwf"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="Avalanche LwF; the fine-tuning recipe")
    plugin_class = CountedLwFPlugin

    def __init__(self, *, model: nn.Module, lwf_alpha: float = 1.0, temperature: float = 2.0, **base_kwargs):
        if lwf_alpha < 0 or temperature <= 0:
            raise ValueError(f"lwf_alpha must be >= 0 and temperature > 0, got {lwf_alpha} and {temperature}.")
        super().__init__(method_plugin=CountedLwFPlugin(alpha=lwf_alpha, temperature=temperature), model=model,
                         **base_kwargs)
