"""Elastic weight consolidation: Avalanche's ``EWCPlugin`` as a ``--method``, a baseline for the LoRA methods."""

from __future__ import annotations

from typing import Literal

from avalanche.training.plugins import EWCPlugin
from torch import nn

from .base import MethodStrategy
from .recipe import TrainingRecipe

__all__ = ["EWC", "CountedEWCPlugin"]


class CountedEWCPlugin(EWCPlugin):
    """Avalanche's ``EWCPlugin`` (Kirkpatrick et al., PNAS 2017) that also reports what it stores: the saved
    parameters and their Fisher importances, one pair per experience (``separate``) or one running pair
    (``online``), on top of the model."""

    def parameter_report(self, model: nn.Module) -> dict:
        total = sum(p.numel() for p in model.parameters())
        kept = sum(v.data.numel() for d in (self.saved_params, self.importances) for ps in d.values()
                   for v in ps.values())
        return dict(stored=total + kept, inference=total)


class EWC(MethodStrategy):
    """Fine-tuning of every weight with the EWC penalty ``λ/2 Σ F (θ − θ*)²`` (Avalanche's ``EWCPlugin``; Kirkpatrick et
    al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017). Default recipe: the fine-tuning
    baseline's (SGD 0.01, momentum 0.9), a fresh optimizer per experience.

    :param ewc_lambda: weight of the penalty (Avalanche's ``ewc_lambda``; its Fisher is the mean squared mini-batch
        gradient).
    :param ewc_mode: ``separate`` keeps one penalty per earlier experience, ``online`` one running penalty.
    :param decay_factor: ``online`` only: how much of the earlier importance is kept at each experience.
    """

    name = "ewc"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="Avalanche EWC; the fine-tuning recipe")
    plugin_class = CountedEWCPlugin

    def __init__(self, *, model: nn.Module, ewc_lambda: float = 100.0,
                 ewc_mode: Literal["separate", "online"] = "separate", decay_factor: float = 0.9, **base_kwargs):
        if ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}.")
        if ewc_mode == "online" and not 0 <= decay_factor <= 1:
            raise ValueError(f"decay_factor must be in [0, 1] with ewc_mode='online', got {decay_factor}.")
        plugin = CountedEWCPlugin(ewc_lambda, mode=ewc_mode, decay_factor=decay_factor if ewc_mode == "online" else None)
        super().__init__(method_plugin=plugin, model=model, **base_kwargs)
