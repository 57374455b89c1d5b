"""Experience replay: Avalanche's ``ReplayPlugin`` as a ``--method`` (fine-tuning + a memory); ``experiments.run
--replay N`` adds the same memory to any other method."""

from __future__ import annotations

from avalanche.training.plugins import ReplayPlugin
from torch import nn

from .base import MethodStrategy
from .recipe import TrainingRecipe

__all__ = ["ExperienceReplay"]


class ExperienceReplay(MethodStrategy):
    """Fine-tuning of every weight on each experience's data concatenated with a memory of earlier samples
    (Avalanche's ``ReplayPlugin``: an experience-balanced buffer filled at random, mini-batches drawn half from
    the current data, half from the memory). Default recipe: the fine-tuning baseline's (SGD 0.01, momentum 0.9).

    :param mem_size: samples kept in the memory, over all experiences.
    """

    name = "replay"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="Avalanche Replay; the fine-tuning recipe")
    plugin_class = None

    def __init__(self, *, model: nn.Module, mem_size: int = 500, **base_kwargs):
        if mem_size < 1:
            raise ValueError(f"mem_size must be >= 1, got {mem_size}.")
        super().__init__(method_plugin=ReplayPlugin(mem_size=mem_size), model=model, **base_kwargs)
